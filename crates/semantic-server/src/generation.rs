//! What both dialects share once a request is parsed: the agent id, the
//! token budget, submitting to the engine and reading its token events.
//!
//! Dropping a [`Generation`] drops the engine's `TokenStream`, which cancels
//! the request: a client that disconnects (its handler future or its SSE
//! body is dropped) frees its sequence at the engine's next step.

use std::time::Instant;

use axum::http::HeaderMap;
use semantic_core::{AgentId, FinishReason, RequestId, SamplingParams};
use semantic_engine::{EngineRequest, TokenEvent, TokenStream, Usage};

use crate::error::{bad_agent_id, ApiError};
use crate::metrics;
use crate::state::Runtime;

/// Headers that name the agent, in the order they are looked at.
pub const AGENT_HEADERS: [&str; 3] = ["x-session-id", "x-agent-id", "x-claude-code-session-id"];

/// The agent id of a request: the first agent header present, else the
/// body's `session_id` (OpenAI only). Invalid ids are 400s naming the source.
pub fn agent_id(headers: &HeaderMap, body_field: Option<&str>) -> Result<Option<AgentId>, ApiError> {
    for name in AGENT_HEADERS {
        if let Some(v) = headers.get(name) {
            let s = v.to_str().map_err(|_| ApiError::invalid(name, format!("header `{name}` is not visible ASCII")))?;
            return AgentId::new(s).map(Some).map_err(|e| bad_agent_id(name, e));
        }
    }
    match body_field {
        Some(s) => AgentId::new(s).map(Some).map_err(|e| bad_agent_id("session_id", e)),
        None => Ok(None),
    }
}

/// The number of tokens to generate: the request's value (`field` names it)
/// checked against the context, else what is left of `limit` (the context,
/// or less when the KV pool cannot hold a full-context sequence).
/// A value that fits the context but not after the prompt is clamped: the
/// reply then ends with a length finish, as the context is full.
pub fn max_new_tokens(
    requested: Option<i64>,
    field: &str,
    prompt_len: usize,
    context: usize,
    limit: usize,
) -> Result<usize, ApiError> {
    match requested {
        Some(n) if n < 1 => Err(ApiError::invalid(field, format!("`{field}` must be at least 1, got {n}"))),
        Some(n) if n as u64 > context as u64 => Err(ApiError::invalid(
            field,
            format!("`{field}` is {n}, more than the model's context of {context} tokens"),
        )),
        Some(n) => Ok((n as usize).min(context.saturating_sub(prompt_len)).max(1)),
        None => Ok(limit.min(context).saturating_sub(prompt_len).max(1)),
    }
}

/// 400 when a `logit_bias` key is not a token of the vocabulary.
pub fn check_logit_bias(params: &SamplingParams, vocab_size: usize) -> Result<(), ApiError> {
    match params.logit_bias.iter().find(|(t, _)| *t as usize >= vocab_size) {
        Some((t, _)) => Err(ApiError::invalid(
            "logit_bias",
            format!("`logit_bias` names token {t}; the vocabulary has {vocab_size} tokens"),
        )),
        None => Ok(()),
    }
}

/// 400 when the prompt leaves no room for one generated token.
pub fn check_prompt_fits(prompt_len: usize, context: usize, field: &str) -> Result<(), ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid(field, format!("`{field}` is empty")));
    }
    if prompt_len + 1 > context {
        return Err(ApiError::invalid(
            field,
            format!(
                "`{field}` is {prompt_len} tokens; the model's context is {context} tokens \
                 and at least one must be left to generate"
            ),
        ));
    }
    Ok(())
}

/// Runs CPU work (template rendering, tokenizing) off the async reactor.
pub async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}

/// A request ready for the engine.
pub struct Prepared {
    pub id: RequestId,
    pub agent: Option<AgentId>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub logprobs: bool,
    /// Extension (llama.cpp, vLLM): generate `max_tokens` tokens, ignoring
    /// end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

/// Submits to the engine; queue-full, too-long and stopped errors come back here.
pub async fn submit(rt: &Runtime, api: &'static str, p: Prepared) -> Result<Generation, ApiError> {
    tracing::debug!(
        request = %p.id,
        agent = p.agent.as_ref().map(AgentId::as_str),
        prompt_tokens = p.prompt.len(),
        max_tokens = p.params.max_tokens,
        "submitting"
    );
    let req = EngineRequest {
        id: p.id,
        agent: p.agent,
        prompt: p.prompt,
        params: p.params,
        stop_ids: if p.ignore_eos { Vec::new() } else { rt.stop_ids.clone() },
        banned_ids: if p.ignore_eos { rt.stop_ids.clone() } else { Vec::new() },
        logprobs: p.logprobs,
    };
    let stream = rt.engine.submit(req).await?;
    Ok(Generation { stream, api, id: p.id, last_token: None, done: false })
}

/// The token events of one request, with latency metrics recorded as they pass.
pub struct Generation {
    stream: TokenStream,
    api: &'static str,
    id: RequestId,
    last_token: Option<Instant>,
    /// The last event (`Finished` or `Error`) was returned.
    done: bool,
}

/// A generation dropped before its last event: the client went away (the
/// engine cancels it at its next step). Counted and logged as `cancelled`,
/// as a finished one is.
impl Drop for Generation {
    fn drop(&mut self) {
        if !self.done {
            metrics::record_cancelled(self.api);
            tracing::info!(request = %self.id, reason = "cancelled", "client left before the end");
        }
    }
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenToken {
    pub id: u32,
    pub logprob: Option<f32>,
}

/// A finished, non-streamed generation.
#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<GenToken>,
    pub reason: FinishReason,
    pub usage: Usage,
    /// The stop string that ended the reply.
    pub stop: Option<String>,
}

impl Generation {
    /// The next event; `Finished` and `Error` are the last. A stream that
    /// ends without either (the engine stopped) yields an `Error`.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        let ev = match self.stream.next().await {
            Some(ev) => ev,
            None if self.done => return None,
            None => {
                self.done = true;
                return Some(TokenEvent::Error("the engine stopped".into()));
            }
        };
        match &ev {
            TokenEvent::Token { .. } => {
                let now = Instant::now();
                if let Some(prev) = self.last_token {
                    metrics::record_inter_token(now - prev);
                }
                self.last_token = Some(now);
            }
            TokenEvent::Finished { reason, usage, .. } => {
                self.done = true;
                metrics::record_finished(self.api, usage, finish_label(*reason));
                tracing::info!(
                    request = %self.id,
                    reason = finish_label(*reason),
                    prompt_tokens = usage.prompt_tokens,
                    cached_tokens = usage.cached_tokens(),
                    completion_tokens = usage.completion_tokens,
                    ttft_ms = usage.ttft.as_millis() as u64,
                    total_ms = usage.total_time.as_millis() as u64,
                    "finished"
                );
            }
            TokenEvent::Error(e) => {
                self.done = true;
                tracing::error!(request = %self.id, error = %e, "generation failed");
            }
        }
        Some(ev)
    }

    /// Reads the whole generation.
    pub async fn collect(mut self) -> Result<Completion, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(ev) = self.next().await {
            match ev {
                TokenEvent::Token { id, text: t, logprob } => {
                    text.push_str(&t);
                    tokens.push(GenToken { id, logprob });
                }
                TokenEvent::Finished { reason, text_tail, usage, stop, hidden_tokens } => {
                    text.push_str(&text_tail);
                    tokens.truncate(tokens.len().saturating_sub(hidden_tokens));
                    return Ok(Completion { text, tokens, reason, usage, stop });
                }
                TokenEvent::Error(e) => return Err(ApiError::Internal(e)),
            }
        }
        Err(ApiError::Internal("the engine stopped".into()))
    }
}

pub fn finish_label(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::StopString => "stop_string",
        FinishReason::Length => "length",
        FinishReason::ContextFull => "context_full",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Seconds since the Unix epoch (`created` fields).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn max_tokens_is_checked_and_clamped() {
        assert_eq!(max_new_tokens(None, "max_tokens", 100, 1000, 1000), Ok(900));
        assert_eq!(max_new_tokens(None, "max_tokens", 100, 1000, 300), Ok(200));
        assert_eq!(max_new_tokens(Some(50), "max_tokens", 100, 1000, 1000), Ok(50));
        assert_eq!(max_new_tokens(Some(950), "max_tokens", 100, 1000, 1000), Ok(900));
        let e = max_new_tokens(Some(0), "max_tokens", 100, 1000, 1000).unwrap_err();
        assert_eq!(e.param(), Some("max_tokens"));
        let e = max_new_tokens(Some(-5), "max_completion_tokens", 1, 1000, 1000).unwrap_err();
        assert_eq!(e.param(), Some("max_completion_tokens"));
        let e = max_new_tokens(Some(1001), "max_tokens", 1, 1000, 1000).unwrap_err();
        assert!(e.to_string().contains("context of 1000"), "{e}");
        assert!(check_prompt_fits(999, 1000, "messages").is_ok());
        assert!(check_prompt_fits(1000, 1000, "messages").is_err());
        assert!(check_prompt_fits(0, 1000, "prompt").is_err());
    }

    #[test]
    fn agent_id_comes_from_headers_then_body() {
        let mut h = HeaderMap::new();
        assert_eq!(agent_id(&h, None), Ok(None));
        assert_eq!(agent_id(&h, Some("body-1")).unwrap().unwrap().as_str(), "body-1");
        let e = agent_id(&h, Some("../x")).unwrap_err();
        assert_eq!(e.param(), Some("session_id"));
        h.insert("x-agent-id", HeaderValue::from_static("agent.2"));
        assert_eq!(agent_id(&h, Some("body-1")).unwrap().unwrap().as_str(), "agent.2");
        h.insert("x-session-id", HeaderValue::from_static("bad id"));
        let e = agent_id(&h, None).unwrap_err();
        assert_eq!(e.param(), Some("x-session-id"));
    }
}
