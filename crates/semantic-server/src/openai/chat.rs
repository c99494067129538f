//! `POST /v1/chat/completions`, plain and streamed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use semantic_core::RequestId;
use semantic_engine::TokenEvent;

use super::request::{check_n, ChatRequest};
use super::response::*;
use crate::body::parse_json;
use crate::error::{ApiError, OpenAiError};
use crate::generation::{self, Completion, GenToken, Generation, Prepared};
use crate::sse;
use crate::state::{AppState, Runtime};
use crate::tools::{self, split_delta, split_finish, StreamSplitter};

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let req: ChatRequest = parse_json(body, state.config().body_limit)?;
    check_n(req.n)?;
    let conv = req.conversation()?;
    let mut params = req.sampling().params()?;
    let logprobs = req.wants_logprobs()?;
    // One JSON object: asked for, or the arguments of a forced tool call.
    params.json_object = req.json_mode() || conv.forces_arguments();
    let agent = generation::agent_id(&headers, req.session_id.as_deref())?;
    let rt = state.runtime()?;
    generation::check_logit_bias(&params, rt.engine.model_info().vocab_size)?;
    generation::check_logit_bias(&params, rt.engine.model_info().vocab_size)?;
    let (messages, tools) = conv.template_input(rt.template_knows_tools());
    let reply_start = conv.reply_start();
    let prompt = {
        let rt = Arc::clone(&rt);
        let start = reply_start.clone();
        generation::blocking(move || rt.chat_prompt(&messages, tools.as_ref(), &start)).await?
    };
    generation::check_prompt_fits(prompt.len(), rt.context_length, "messages")?;
    let (max, field) = req.max_tokens();
    params.max_tokens = generation::max_new_tokens(max, field, prompt.len(), rt.context_length, rt.sequence_limit)?;
    let p = Prepared { id, agent, prompt, params, logprobs, ignore_eos: req.ignore_eos.unwrap_or(false) };
    let gen = generation::submit(&rt, "openai_chat", p).await?;
    let out = Output {
        id: format!("chatcmpl-{id}"),
        model: rt.model_name.clone(),
        created: generation::unix_now(),
        tool_names: conv.tool_names(),
        reply_start,
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(stream(rt, gen, out, include_usage));
    }
    let c = gen.collect().await?;
    Ok(Json(out.completion(&rt, c)).into_response())
}

/// What every response and chunk of one request repeats.
struct Output {
    id: String,
    model: String,
    created: u64,
    tool_names: Vec<String>,
    /// The forced opening of the reply (in the prompt, not generated).
    reply_start: String,
}

impl Output {
    fn completion(&self, rt: &Runtime, c: Completion) -> ChatCompletion {
        let reply = format!("{}{}", self.reply_start, c.text);
        let (text, calls) =
            if self.tool_names.is_empty() { (reply, Vec::new()) } else { tools::parse(&reply, &self.tool_names) };
        let (text, calls) = tools::finish_forced(!self.reply_start.is_empty(), text, calls, &self.tool_names);
        let finish = if calls.is_empty() { finish_reason(c.reason) } else { "tool_calls" };
        let logprobs = c.tokens.iter().any(|t| t.logprob.is_some()).then(|| chat_logprobs(&rt.tokenizer, &c.tokens));
        ChatCompletion {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChoice {
                index: 0,
                message: OutMessage {
                    role: "assistant",
                    content: (!text.is_empty() || calls.is_empty()).then_some(text),
                    tool_calls: tool_calls(&self.id, &calls, false),
                },
                logprobs,
                finish_reason: finish,
            }],
            usage: OpenAiUsage::from(&c.usage),
            system_fingerprint: None,
        }
    }

    fn chunk(
        &self,
        delta: Delta,
        logprobs: Option<Logprobs>,
        finish: Option<&'static str>,
        usage: bool,
    ) -> ChatChunk<'_> {
        ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice { index: 0, delta, logprobs, finish_reason: finish }],
            usage: usage.then_some(None),
        }
    }
}

struct ChatStream {
    rt: Arc<Runtime>,
    gen: Generation,
    out: Output,
    include_usage: bool,
    splitter: Option<StreamSplitter>,
    started: bool,
    done: bool,
}

fn stream(rt: Arc<Runtime>, gen: Generation, out: Output, include_usage: bool) -> Response {
    let mut splitter = (!out.tool_names.is_empty()).then(StreamSplitter::default);
    // The forced opening is a tool call's start: the splitter holds it.
    let held = split_delta(&mut splitter, out.reply_start.clone());
    debug_assert!(held.is_empty());
    let st = ChatStream { rt, gen, out, include_usage, splitter, started: false, done: false };
    sse::response(futures_util::stream::unfold(st, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((chunk, st))
    }))
}

impl ChatStream {
    /// The next piece of the body; `None` ends it.
    async fn next_chunk(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        let mut out = String::new();
        if !self.started {
            self.started = true;
            let delta = Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() };
            sse::data(&mut out, &self.out.chunk(delta, None, None, self.include_usage));
            return Some(out);
        }
        loop {
            match self.gen.next().await {
                Some(TokenEvent::Token { id, text, logprob }) => {
                    let text = split_delta(&mut self.splitter, text);
                    let lp = logprob.and_then(|logprob| {
                        let t = GenToken { id, logprob: Some(logprob) };
                        let content = token_logprob(&self.rt.tokenizer, &t)?;
                        Some(Logprobs { content: vec![content] })
                    });
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    let delta = Delta { content: Some(text), ..Delta::default() };
                    sse::data(&mut out, &self.out.chunk(delta, lp, None, self.include_usage));
                    return Some(out);
                }
                Some(TokenEvent::Finished { reason, text_tail, usage, .. }) => {
                    self.done = true;
                    let (text, calls) = split_finish(self.splitter.take(), text_tail, &self.out.tool_names);
                    let forced = !self.out.reply_start.is_empty();
                    let (text, calls) = tools::finish_forced(forced, text, calls, &self.out.tool_names);
                    if !text.is_empty() {
                        let delta = Delta { content: Some(text), ..Delta::default() };
                        sse::data(&mut out, &self.out.chunk(delta, None, None, self.include_usage));
                    }
                    let finish = if calls.is_empty() {
                        finish_reason(reason)
                    } else {
                        let delta = Delta { tool_calls: tool_calls(&self.out.id, &calls, true), ..Delta::default() };
                        sse::data(&mut out, &self.out.chunk(delta, None, None, self.include_usage));
                        "tool_calls"
                    };
                    let last = self.out.chunk(Delta::default(), None, Some(finish), self.include_usage);
                    sse::data(&mut out, &last);
                    if self.include_usage {
                        let mut u = self.out.chunk(Delta::default(), None, None, false);
                        u.choices.clear();
                        u.usage = Some(Some(OpenAiUsage::from(&usage)));
                        sse::data(&mut out, &u);
                    }
                    out.push_str("data: [DONE]\n\n");
                    return Some(out);
                }
                Some(TokenEvent::Error(e)) => {
                    self.done = true;
                    sse::data(&mut out, &ApiError::Internal(e).openai_body());
                    return Some(out);
                }
                None => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}
