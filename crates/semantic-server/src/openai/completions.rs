//! `POST /v1/completions` (raw text, no chat template) and `GET /v1/models`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use semantic_core::RequestId;
use semantic_engine::TokenEvent;
use serde_json::json;

use super::request::CompletionRequest;
use super::response::*;
use crate::body::parse_json;
use crate::error::{ApiError, OpenAiError};
use crate::generation::{self, GenToken, Generation, Prepared};
use crate::sse;
use crate::state::{AppState, Runtime};

/// `max_tokens` of a completion that does not set it.
pub const COMPLETION_DEFAULT_MAX_TOKENS: i64 = 16;

pub async fn completions(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OpenAiError> {
    let req: CompletionRequest = parse_json(body, state.config().body_limit)?;
    req.check_unsupported()?;
    let text = req.prompt_text()?.to_string();
    if text.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty").into());
    }
    let mut params = req.sampling().params()?;
    let agent = generation::agent_id(&headers, req.session_id.as_deref())?;
    let rt = state.runtime()?;
    generation::check_logit_bias(&params, rt.engine.model_info().vocab_size)?;
    let prompt = {
        let rt = Arc::clone(&rt);
        generation::blocking(move || rt.encode(&text)).await?
    };
    generation::check_prompt_fits(prompt.len(), rt.context_length, "prompt")?;
    // OpenAI's default for this endpoint (vLLM's too): 16 tokens, where
    // chat fills the context.
    let max = Some(req.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS));
    params.max_tokens =
        generation::max_new_tokens(max, "max_tokens", prompt.len(), rt.context_length, rt.sequence_limit)?;
    let p = Prepared {
        id,
        agent,
        prompt,
        params,
        logprobs: req.wants_logprobs(),
        ignore_eos: req.ignore_eos.unwrap_or(false),
    };
    let gen = generation::submit(&rt, "openai_completions", p).await?;
    let id = format!("cmpl-{id}");
    let created = generation::unix_now();
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        let st = TextStream { rt, gen, id, created, include_usage, offset: 0, done: false };
        return Ok(sse::response(futures_util::stream::unfold(st, |mut st| async move {
            let chunk = st.next_chunk().await?;
            Some((chunk, st))
        })));
    }
    let c = gen.collect().await?;
    let logprobs = c.tokens.iter().any(|t| t.logprob.is_some()).then(|| text_logprobs(&rt.tokenizer, &c.tokens, 0));
    let body = TextCompletion {
        id: &id,
        object: "text_completion",
        created,
        model: &rt.model_name,
        choices: vec![TextChoice { text: c.text, index: 0, logprobs, finish_reason: Some(finish_reason(c.reason)) }],
        usage: Some(Some(OpenAiUsage::from(&c.usage))),
    };
    Ok(Json(body).into_response())
}

struct TextStream {
    rt: Arc<Runtime>,
    gen: Generation,
    id: String,
    created: u64,
    include_usage: bool,
    offset: usize,
    done: bool,
}

impl TextStream {
    fn chunk(&self, text: String, logprobs: Option<TextLogprobs>, finish: Option<&'static str>) -> TextCompletion<'_> {
        TextCompletion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.rt.model_name,
            choices: vec![TextChoice { text, index: 0, logprobs, finish_reason: finish }],
            usage: self.include_usage.then_some(None),
        }
    }

    async fn next_chunk(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        let mut out = String::new();
        loop {
            match self.gen.next().await? {
                TokenEvent::Token { id, text, logprob } => {
                    let lp = logprob.map(|lp| {
                        let t = GenToken { id, logprob: Some(lp) };
                        text_logprobs(&self.rt.tokenizer, &[t], self.offset)
                    });
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    self.offset += text.len();
                    sse::data(&mut out, &self.chunk(text, lp, None));
                    return Some(out);
                }
                TokenEvent::Finished { reason, text_tail, usage, .. } => {
                    self.done = true;
                    let last = self.chunk(text_tail, None, Some(finish_reason(reason)));
                    sse::data(&mut out, &last);
                    if self.include_usage {
                        let mut u = self.chunk(String::new(), None, None);
                        u.choices.clear();
                        u.usage = Some(Some(OpenAiUsage::from(&usage)));
                        sse::data(&mut out, &u);
                    }
                    out.push_str("data: [DONE]\n\n");
                    return Some(out);
                }
                TokenEvent::Error(e) => {
                    self.done = true;
                    sse::data(&mut out, &ApiError::Internal(e).openai_body());
                    return Some(out);
                }
            }
        }
    }
}

pub async fn models(State(state): State<AppState>) -> Result<Response, OpenAiError> {
    let rt = state.runtime()?;
    Ok(Json(json!({"object": "list", "data": [model_object(&rt)]})).into_response())
}

/// `GET /v1/models/{id}`: the served model, by its name (or `default`).
pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, OpenAiError> {
    let rt = state.runtime()?;
    if id != rt.model_name && id != "default" {
        return Err(ApiError::NotFound(format!("model `{id}` is not served here; `{}` is", rt.model_name)).into());
    }
    Ok(Json(model_object(&rt)).into_response())
}

fn model_object(rt: &Runtime) -> serde_json::Value {
    json!({
        "id": rt.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "semantic",
        "context_length": rt.engine.model_info().context_length,
    })
}
