//! `POST /v1/messages` (plain and streamed) and `POST /v1/messages/count_tokens`.
//!
//! Usage follows Anthropic's accounting, where the three input fields add up
//! to the prompt: `cache_read_input_tokens` were reused (RAM or disk),
//! `cache_creation_input_tokens` were computed and kept as the agent's cache
//! (0 without an agent id), `input_tokens` are the rest.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use semantic_core::{FinishReason, RequestId};
use semantic_engine::{TokenEvent, Usage};
use serde::Serialize;
use serde_json::{json, Value};

use super::request::MessagesRequest;
use crate::body::parse_json;
use crate::error::{AnthropicError, ApiError};
use crate::generation::{self, Generation, Prepared};
use crate::sse;
use crate::state::{AppState, Runtime};
use crate::tools::{self, split_delta, split_finish, ParsedCall, StreamSplitter};

#[derive(Serialize, Debug, Clone, Default)]
pub struct AnthropicUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub cache_creation_input_tokens: usize,
    pub cache_read_input_tokens: usize,
}

impl AnthropicUsage {
    pub fn of(u: &Usage, has_agent: bool) -> AnthropicUsage {
        let read = u.cached_tokens().min(u.prompt_tokens);
        let computed = u.prompt_tokens - read;
        let created = if has_agent { computed } else { 0 };
        AnthropicUsage {
            input_tokens: computed - created,
            output_tokens: u.completion_tokens,
            cache_creation_input_tokens: created,
            cache_read_input_tokens: read,
        }
    }
}

pub fn stop_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "end_turn",
        FinishReason::StopString => "stop_sequence",
        FinishReason::Length | FinishReason::ContextFull => "max_tokens",
    }
}

/// Renders and tokenizes the request's conversation.
/// The prompt, the tools the reply may call and the reply's forced opening.
/// And whether the reply is a forced call's arguments (one JSON object).
async fn prompt_of(
    rt: &Arc<Runtime>,
    req: &MessagesRequest,
) -> Result<(Vec<u32>, Vec<String>, String, bool), ApiError> {
    let conv = req.conversation()?;
    let (messages, tools) = conv.template_input(rt.template_knows_tools());
    let rt2 = Arc::clone(rt);
    let start = conv.reply_start();
    let s2 = start.clone();
    let prompt = generation::blocking(move || rt2.chat_prompt(&messages, tools.as_ref(), &s2)).await?;
    Ok((prompt, conv.tool_names(), start, conv.forces_arguments()))
}

pub async fn count_tokens(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = parse_json(body, state.config().body_limit)?;
    let rt = state.runtime()?;
    let (prompt, ..) = prompt_of(&rt, &req).await?;
    Ok(Json(json!({"input_tokens": prompt.len()})).into_response())
}

pub async fn messages(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let req: MessagesRequest = parse_json(body, state.config().body_limit)?;
    let max = req.max_tokens.ok_or_else(|| ApiError::invalid("max_tokens", "`max_tokens` is required"))?;
    let mut params = req.params()?;
    let agent = generation::agent_id(&headers, None)?;
    let rt = state.runtime()?;
    let (prompt, tool_names, reply_start, json_object) = prompt_of(&rt, &req).await?;
    params.json_object = json_object;
    generation::check_prompt_fits(prompt.len(), rt.context_length, "messages")?;
    params.max_tokens =
        generation::max_new_tokens(Some(max), "max_tokens", prompt.len(), rt.context_length, rt.sequence_limit)?;
    let out = Output {
        id: format!("msg_{id}"),
        model: rt.model_name.clone(),
        has_agent: agent.is_some(),
        single_stop: match params.stop.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        },
        tool_names,
        forced: !reply_start.is_empty(),
        prompt_tokens: prompt.len(),
    };
    let p = Prepared { id, agent, prompt, params, logprobs: false, ignore_eos: false };
    let gen = generation::submit(&rt, "anthropic_messages", p).await?;
    if req.stream.unwrap_or(false) {
        let st = MessageStream {
            gen,
            phase: Phase::Start,
            splitter: {
                let mut splitter = (!out.tool_names.is_empty()).then(StreamSplitter::default);
                // The forced opening is a tool call's start: the splitter holds it.
                let held = split_delta(&mut splitter, reply_start.clone());
                debug_assert!(held.is_empty());
                splitter
            },
            out,
        };
        return Ok(sse::response(futures_util::stream::unfold(st, |mut st| async move {
            let chunk = st.next_chunk().await?;
            Some((chunk, st))
        })));
    }
    let c = gen.collect().await?;
    let reply = format!("{reply_start}{}", c.text);
    let (text, calls) =
        if out.tool_names.is_empty() { (reply, Vec::new()) } else { tools::parse(&reply, &out.tool_names) };
    let (text, calls) = tools::finish_forced(out.forced, text, calls, &out.tool_names);
    let mut content = Vec::new();
    if !text.is_empty() || calls.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    content.extend(out.tool_use_blocks(&calls));
    let body = json!({
        "id": out.id,
        "type": "message",
        "role": "assistant",
        "model": out.model,
        "content": content,
        "stop_reason": out.stop_reason(c.reason, &calls),
        "stop_sequence": out.stop_sequence(c.reason, c.stop.as_deref()),
        "usage": AnthropicUsage::of(&c.usage, out.has_agent),
    });
    Ok(Json(body).into_response())
}

struct Output {
    id: String,
    model: String,
    has_agent: bool,
    /// The engine does not say which stop string matched; with one, we know.
    single_stop: Option<String>,
    tool_names: Vec<String>,
    /// The reply was forced to open a tool call.
    forced: bool,
    prompt_tokens: usize,
}

impl Output {
    fn stop_reason(&self, r: FinishReason, calls: &[ParsedCall]) -> &'static str {
        if calls.is_empty() {
            stop_reason(r)
        } else {
            "tool_use"
        }
    }

    fn stop_sequence<'a>(&'a self, r: FinishReason, matched: Option<&'a str>) -> Option<&'a str> {
        (r == FinishReason::StopString).then_some(matched.or(self.single_stop.as_deref())).flatten()
    }

    fn tool_use_blocks(&self, calls: &[ParsedCall]) -> Vec<Value> {
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "type": "tool_use",
                    "id": format!("toolu_{}_{i}", self.id),
                    "name": c.name,
                    "input": c.arguments,
                })
            })
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Text,
    Done,
}

struct MessageStream {
    gen: Generation,
    out: Output,
    phase: Phase,
    /// Holds back tool calls; only when tools were given.
    splitter: Option<StreamSplitter>,
}

impl MessageStream {
    async fn next_chunk(&mut self) -> Option<String> {
        let mut out = String::new();
        match self.phase {
            Phase::Done => return None,
            Phase::Start => {
                self.phase = Phase::Text;
                // Cache numbers are known only at the end; message_delta has them.
                let usage = AnthropicUsage {
                    input_tokens: self.out.prompt_tokens,
                    output_tokens: 0,
                    ..AnthropicUsage::default()
                };
                let message = json!({
                    "id": self.out.id, "type": "message", "role": "assistant",
                    "model": self.out.model, "content": [], "stop_reason": null,
                    "stop_sequence": null, "usage": usage,
                });
                sse::event(&mut out, "message_start", &json!({"type": "message_start", "message": message}));
                sse::event(
                    &mut out,
                    "content_block_start",
                    &json!({
                        "type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    }),
                );
                sse::event(&mut out, "ping", &json!({"type": "ping"}));
                return Some(out);
            }
            Phase::Text => {}
        }
        loop {
            match self.gen.next().await? {
                TokenEvent::Token { text, .. } => {
                    let text = split_delta(&mut self.splitter, text);
                    if text.is_empty() {
                        continue;
                    }
                    text_delta(&mut out, &text);
                    return Some(out);
                }
                TokenEvent::Finished { reason, text_tail, usage, stop, .. } => {
                    self.phase = Phase::Done;
                    let (text, calls) = split_finish(self.splitter.take(), text_tail, &self.out.tool_names);
                    let (text, calls) = tools::finish_forced(self.out.forced, text, calls, &self.out.tool_names);
                    if !text.is_empty() {
                        text_delta(&mut out, &text);
                    }
                    sse::event(&mut out, "content_block_stop", &json!({"type": "content_block_stop", "index": 0}));
                    for (i, block) in self.out.tool_use_blocks(&calls).into_iter().enumerate() {
                        let index = i + 1;
                        let input = block["input"].to_string();
                        let mut start = block;
                        start["input"] = json!({});
                        sse::event(
                            &mut out,
                            "content_block_start",
                            &json!({
                                "type": "content_block_start", "index": index, "content_block": start,
                            }),
                        );
                        sse::event(
                            &mut out,
                            "content_block_delta",
                            &json!({
                                "type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": input},
                            }),
                        );
                        sse::event(
                            &mut out,
                            "content_block_stop",
                            &json!({"type": "content_block_stop", "index": index}),
                        );
                    }
                    let delta = json!({
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": self.out.stop_reason(reason, &calls),
                            "stop_sequence": self.out.stop_sequence(reason, stop.as_deref()),
                        },
                        "usage": AnthropicUsage::of(&usage, self.out.has_agent),
                    });
                    sse::event(&mut out, "message_delta", &delta);
                    sse::event(&mut out, "message_stop", &json!({"type": "message_stop"}));
                    return Some(out);
                }
                TokenEvent::Error(e) => {
                    self.phase = Phase::Done;
                    sse::event(&mut out, "error", &ApiError::Internal(e).anthropic_body());
                    return Some(out);
                }
            }
        }
    }
}

fn text_delta(out: &mut String, text: &str) {
    sse::event(
        out,
        "content_block_delta",
        &json!({
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text},
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_fields_add_up_to_the_prompt() {
        let u = Usage {
            prompt_tokens: 100,
            completion_tokens: 7,
            cached_hot_tokens: 60,
            cached_disk_tokens: 10,
            ..Usage::default()
        };
        let a = AnthropicUsage::of(&u, true);
        assert_eq!((a.input_tokens, a.cache_creation_input_tokens, a.cache_read_input_tokens), (0, 30, 70));
        let a = AnthropicUsage::of(&u, false);
        assert_eq!((a.input_tokens, a.cache_creation_input_tokens, a.cache_read_input_tokens), (30, 0, 70));
        assert_eq!(a.output_tokens, 7);
    }
}
