//! A small blocking client for OpenAI-compatible servers: one streamed chat
//! completion, timed token by token (TTFT, inter-token gaps) with the usage
//! the server reports, plus plain JSON/text calls for the admin endpoints.
//! Works against `semantic` and llama.cpp's server.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {msg}")]
    Http { url: String, msg: String },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("bad response from {url}: {msg}")]
    Protocol { url: String, msg: String },
}

impl ClientError {
    /// The HTTP status, when the server answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One chat request of a benchmark.
#[derive(Clone, Debug, Default)]
pub struct ChatCall {
    pub session: Option<String>,
    pub system: String,
    pub user: String,
    pub max_tokens: usize,
    /// Generate exactly `max_tokens` (llama.cpp and `semantic` honour it).
    pub ignore_eos: bool,
    /// llama.cpp only: run on this slot.
    pub slot: Option<usize>,
    /// Send no `temperature`, so the server's API default applies (1 for
    /// OpenAI's API: random sampling over the whole vocabulary); else
    /// greedy (`temperature` 0), which benchmarks compare across runs.
    pub default_sampling: bool,
}

/// What one streamed completion measured, client side.
#[derive(Clone, Debug, Default)]
pub struct ChatTiming {
    /// Request sent to the first content chunk (or to the end of the
    /// stream when the server generated nothing).
    pub ttft: Duration,
    pub total: Duration,
    /// Gaps between consecutive content chunks.
    pub gaps: Vec<Duration>,
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// When the request was sent.
    pub started: Option<Instant>,
}

impl ChatTiming {
    /// Tokens generated: the usage count, or the chunks seen when the server
    /// reported no usage.
    pub fn generated(&self) -> usize {
        let chunks = if self.ttft > Duration::ZERO { self.gaps.len() + 1 } else { 0 };
        self.completion_tokens.max(chunks)
    }

    /// When each content chunk arrived.
    pub fn token_instants(&self) -> Vec<Instant> {
        let Some(start) = self.started.filter(|_| self.ttft < self.total || !self.gaps.is_empty()) else {
            return Vec::new();
        };
        let mut t = start + self.ttft;
        let mut out = vec![t];
        for g in &self.gaps {
            t += *g;
            out.push(t);
        }
        out
    }

    /// Decode speed after the first token (tokens/s); 0 with one token or none.
    pub fn decode_tok_s(&self) -> f64 {
        let after_first = self.total.saturating_sub(self.ttft).as_secs_f64();
        let n = self.generated().saturating_sub(1);
        if n == 0 || after_first <= 0.0 {
            0.0
        } else {
            n as f64 / after_first
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

fn http_error(url: &str, e: ureq::Error) -> ClientError {
    match e {
        ureq::Error::Status(status, resp) => {
            let body = resp.into_string().unwrap_or_default();
            ClientError::Status { url: url.to_owned(), status, body: body.chars().take(300).collect() }
        }
        other => ClientError::Http { url: url.to_owned(), msg: other.to_string() },
    }
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(900)).build();
        Self { base: base.trim_end_matches('/').to_owned(), agent }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        let resp = self.agent.get(&url).call().map_err(|e| http_error(&url, e))?;
        resp.into_json().map_err(|e| ClientError::Protocol { url, msg: e.to_string() })
    }

    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = self.url(path);
        let resp = self.agent.get(&url).call().map_err(|e| http_error(&url, e))?;
        resp.into_string().map_err(|e| ClientError::Protocol { url, msg: e.to_string() })
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        let resp = self.agent.post(&url).send_json(body).map_err(|e| http_error(&url, e))?;
        resp.into_json().map_err(|e| ClientError::Protocol { url, msg: e.to_string() })
    }

    pub fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        let resp = self.agent.delete(&url).call().map_err(|e| http_error(&url, e))?;
        resp.into_json().map_err(|e| ClientError::Protocol { url, msg: e.to_string() })
    }

    pub(crate) fn chat_body(call: &ChatCall) -> Value {
        let mut body = json!({
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
        if let Some(slot) = call.slot {
            body["id_slot"] = json!(slot);
        }
        if call.default_sampling {
            body.as_object_mut().expect("a JSON object").remove("temperature");
        }
        body
    }

    /// Streams one chat completion and times it.
    pub fn chat(&self, call: &ChatCall) -> Result<ChatTiming, ClientError> {
        let url = self.url("/v1/chat/completions");
        let mut req = self.agent.post(&url).set("Content-Type", "application/json");
        if let Some(s) = &call.session {
            req = req.set("X-Session-ID", s);
        }
        let mut timer = StreamTimer::new(Instant::now());
        let resp = req.send_json(Self::chat_body(call)).map_err(|e| http_error(&url, e))?;
        let protocol = |msg: String| ClientError::Protocol { url: url.clone(), msg };
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.map_err(|e| protocol(e.to_string()))?;
            if timer.line(&line).map_err(protocol)? {
                break;
            }
        }
        Ok(timer.finish())
    }
}

/// Times a chat stream from its server-sent-event lines.
pub(crate) struct StreamTimer {
    start: Instant,
    t: ChatTiming,
    last: Option<Instant>,
}

impl StreamTimer {
    /// `start`: when the request was sent.
    pub(crate) fn new(start: Instant) -> Self {
        StreamTimer { start, t: ChatTiming { started: Some(start), ..ChatTiming::default() }, last: None }
    }

    /// Takes one line of the stream; true at `[DONE]`.
    pub(crate) fn line(&mut self, line: &str) -> Result<bool, String> {
        let Some(data) = line.strip_prefix("data: ") else {
            return Ok(false);
        };
        if data.trim() == "[DONE]" {
            return Ok(true);
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if let Some(err) = v.get("error") {
            return Err(format!("error event: {err}"));
        }
        if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
            let now = Instant::now();
            match self.last {
                None => self.t.ttft = now - self.start,
                Some(prev) => self.t.gaps.push(now - prev),
            }
            self.last = Some(now);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.t.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            self.t.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
            self.t.cached_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0) as usize;
        }
        Ok(false)
    }

    /// The timing, the stream having ended.
    pub(crate) fn finish(mut self) -> ChatTiming {
        self.t.total = self.start.elapsed();
        if self.last.is_none() {
            self.t.ttft = self.t.total;
        }
        self.t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_speed_counts_tokens_after_the_first() {
        let t = ChatTiming {
            ttft: Duration::from_millis(100),
            total: Duration::from_millis(1100),
            gaps: vec![Duration::from_millis(100); 10],
            completion_tokens: 11,
            ..ChatTiming::default()
        };
        assert_eq!(t.generated(), 11);
        assert!((t.decode_tok_s() - 10.0).abs() < 1e-9);
        assert_eq!(ChatTiming::default().decode_tok_s(), 0.0);
    }

    #[test]
    fn chat_body_names_the_slot_only_when_given() {
        let call = ChatCall { max_tokens: 4, ignore_eos: true, ..ChatCall::default() };
        assert!(Client::chat_body(&call).get("id_slot").is_none());
        let body = Client::chat_body(&ChatCall { slot: Some(2), ..call });
        assert_eq!(body["id_slot"], 2);
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn default_sampling_leaves_the_temperature_to_the_server() {
        let call = ChatCall { max_tokens: 4, ..ChatCall::default() };
        assert_eq!(Client::chat_body(&call)["temperature"], 0);
        let body = Client::chat_body(&ChatCall { default_sampling: true, ..call });
        assert!(body.get("temperature").is_none(), "{body}");
    }
}
