//! A small blocking client for OpenAI-compatible servers: one streamed chat
//! completion, timed token by token (TTFT, inter-token gaps) with the usage
//! the server reports. Works against `semantic` and llama.cpp's server.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {msg}")]
    Http { url: String, msg: String },
    #[error("bad response from {url}: {msg}")]
    Protocol { url: String, msg: String },
}

/// One chat request of a benchmark.
#[derive(Clone, Debug)]
pub struct ChatCall {
    pub session: Option<String>,
    pub system: String,
    pub user: String,
    pub max_tokens: usize,
    /// Generate exactly `max_tokens` (llama.cpp and `semantic` honour it).
    pub ignore_eos: bool,
}

/// What one streamed completion measured, client side.
#[derive(Clone, Debug, Default)]
pub struct ChatTiming {
    pub ttft: Duration,
    pub total: Duration,
    /// Gaps between consecutive content chunks.
    pub gaps: Vec<Duration>,
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(900)).build();
        Self { base: base.trim_end_matches('/').to_owned(), agent }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp =
            self.agent.get(&url).call().map_err(|e| ClientError::Http { url: url.clone(), msg: e.to_string() })?;
        resp.into_json().map_err(|e| ClientError::Protocol { url, msg: e.to_string() })
    }

    /// Streams one chat completion and times it.
    pub fn chat(&self, call: &ChatCall) -> Result<ChatTiming, ClientError> {
        let url = format!("{}/v1/chat/completions", self.base);
        let body = json!({
            "model": "default",
            "messages": [
                {"role": "system", "content": call.system},
                {"role": "user", "content": call.user},
            ],
            "max_tokens": call.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
            "ignore_eos": call.ignore_eos,
            "cache_prompt": true,
        });
        let mut req = self.agent.post(&url).set("Content-Type", "application/json");
        if let Some(s) = &call.session {
            req = req.set("X-Session-ID", s);
        }
        let start = Instant::now();
        let resp = req.send_json(body).map_err(|e| ClientError::Http { url: url.clone(), msg: e.to_string() })?;
        let mut t = ChatTiming::default();
        let mut last: Option<Instant> = None;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| ClientError::Protocol { url: url.clone(), msg: e.to_string() })?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data.trim() == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| ClientError::Protocol { url: url.clone(), msg: e.to_string() })?;
            let has_content = v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty());
            if has_content {
                let now = Instant::now();
                match last {
                    None => t.ttft = now - start,
                    Some(prev) => t.gaps.push(now - prev),
                }
                last = Some(now);
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                t.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                t.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                t.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as usize;
            }
        }
        t.total = start.elapsed();
        Ok(t)
    }
}
