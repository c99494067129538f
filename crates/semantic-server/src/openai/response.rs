//! OpenAI response bodies and stream chunks.

use semantic_core::FinishReason;
use semantic_engine::Usage;
use semantic_model::Tokenizer;
use serde::Serialize;

use crate::generation::GenToken;
use crate::tools::ParsedCall;

#[derive(Serialize, Debug)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: OpenAiUsage,
    pub system_fingerprint: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct ChatChoice {
    pub index: u32,
    pub message: OutMessage,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: &'static str,
}

#[derive(Serialize, Debug)]
pub struct OutMessage {
    pub role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<OutToolCall>,
}

#[derive(Serialize, Debug, Clone)]
pub struct OutToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: OutFunction,
}

#[derive(Serialize, Debug, Clone)]
pub struct OutFunction {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

#[derive(Serialize, Debug, Default)]
pub struct Logprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Serialize, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<()>,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV was reused (RAM or disk), not recomputed.
    pub cached_tokens: usize,
}

impl From<&Usage> for OpenAiUsage {
    fn from(u: &Usage) -> Self {
        OpenAiUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens() },
        }
    }
}

#[derive(Serialize, Debug)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<OpenAiUsage>>,
}

#[derive(Serialize, Debug)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Debug, Default)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<OutToolCall>,
}

#[derive(Serialize, Debug)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<OpenAiUsage>>,
}

#[derive(Serialize, Debug)]
pub struct TextChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions logprobs shape.
#[derive(Serialize, Debug, Default)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Option<()>,
    pub text_offset: Vec<usize>,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::StopString | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

pub fn tool_calls(request_id: &str, calls: &[ParsedCall], indexed: bool) -> Vec<OutToolCall> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| OutToolCall {
            index: indexed.then_some(i as u32),
            id: format!("call_{request_id}_{i}"),
            kind: "function",
            function: OutFunction { name: c.name.clone(), arguments: c.arguments.to_string() },
        })
        .collect()
}

pub fn token_logprob(tok: &Tokenizer, t: &GenToken) -> Option<TokenLogprob> {
    let bytes = tok.token_bytes(t.id).unwrap_or_default().to_vec();
    Some(TokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        logprob: t.logprob?,
        bytes,
        top_logprobs: Vec::new(),
    })
}

pub fn chat_logprobs(tok: &Tokenizer, tokens: &[GenToken]) -> Logprobs {
    Logprobs { content: tokens.iter().filter_map(|t| token_logprob(tok, t)).collect() }
}

pub fn text_logprobs(tok: &Tokenizer, tokens: &[GenToken], offset: usize) -> TextLogprobs {
    let mut out = TextLogprobs::default();
    let mut pos = offset;
    for t in tokens {
        let Some(lp) = token_logprob(tok, t) else {
            continue;
        };
        out.text_offset.push(pos);
        pos += lp.token.len();
        out.tokens.push(lp.token);
        out.token_logprobs.push(lp.logprob);
    }
    out
}
