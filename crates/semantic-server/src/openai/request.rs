//! OpenAI request bodies, and their validation into a [`Conversation`] and
//! [`SamplingParams`]. Unknown fields are ignored (clients send many);
//! fields we cannot honour are rejected by name.

use std::collections::HashMap;

use semantic_core::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::conversation::{Conversation, PastCall, Turn};
use crate::error::ApiError;
use crate::tools::{self, ToolUse};

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    #[allow(dead_code)]
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<ToolSpec>>,
    /// Accepted as a flag; several calls in one reply are returned either
    /// way when the model makes them.
    #[allow(dead_code)]
    pub parallel_tool_calls: Option<bool>,
    pub modalities: Option<Vec<String>>,
    pub tool_choice: Option<ToolChoice>,
    pub response_format: Option<ResponseFormat>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub session_id: Option<String>,
    /// Extension: keep generating through end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    #[allow(dead_code)]
    pub model: Option<String>,
    pub prompt: PromptSpec,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub best_of: Option<i64>,
    /// Extension: keep generating through end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub session_id: Option<String>,
}

/// Sampling fields shared by both endpoints (`top_k`, `min_p` and
/// `repetition_penalty` are extensions, as in vLLM). Not `#[serde(flatten)]`:
/// flattening loses the field path in errors.
#[derive(Debug, Default)]
pub struct Sampling<'a> {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<&'a HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<&'a StopSpec>,
}

macro_rules! sampling_of {
    ($r:expr) => {
        Sampling {
            temperature: $r.temperature,
            top_p: $r.top_p,
            top_k: $r.top_k,
            min_p: $r.min_p,
            repetition_penalty: $r.repetition_penalty,
            presence_penalty: $r.presence_penalty,
            frequency_penalty: $r.frequency_penalty,
            logit_bias: $r.logit_bias.as_ref(),
            seed: $r.seed,
            stop: $r.stop.as_ref(),
        }
    };
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string or an array of strings")]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string or an array of one string")]
pub enum PromptSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Deserialize, Debug)]
pub struct InMessage {
    pub role: Role,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<InToolCall>>,
    pub tool_call_id: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string or an array of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct InToolCall {
    pub id: Option<String>,
    pub function: InFunctionCall,
}

#[derive(Deserialize, Debug)]
pub struct InFunctionCall {
    pub name: String,
    pub arguments: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct ToolSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionSpec,
}

#[derive(Deserialize, Debug)]
pub struct FunctionSpec {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

#[derive(Deserialize, Debug)]
#[serde(
    untagged,
    expecting = "expected `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoice {
    Mode(String),
    Named { function: NamedFunction },
}

#[derive(Deserialize, Debug)]
pub struct NamedFunction {
    pub name: String,
}

#[derive(Deserialize, Debug)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

impl Sampling<'_> {
    /// OpenAI defaults (temperature 1) and ranges; `max_tokens` is set later,
    /// once the prompt length is known.
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        let stop = match self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        let top_k = match self.top_k {
            None | Some(-1) => 0, // -1 disables top-k in vLLM
            Some(k) if k < 0 => {
                return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off), 0 (off) or more, got {k}")))
            }
            Some(k) => k as usize,
        };
        let mut logit_bias = Vec::new();
        for (k, &b) in self.logit_bias.into_iter().flatten() {
            let t = k.parse::<u32>().map_err(|_| {
                ApiError::invalid("logit_bias", format!("`logit_bias` keys must be token ids, got `{k}`"))
            })?;
            logit_bias.push((t, b));
        }
        logit_bias.sort_by_key(|&(t, _)| t);
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias,
            seed: self.seed.map(|s| s as u64),
            max_tokens: 1,
            stop,
            json_object: false,
        };
        p.validate()?;
        Ok(p)
    }
}

/// `n` must be absent or 1.
pub fn check_n(n: Option<i64>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid("n", format!("`n` must be 1 (one choice per request), got {n}"))),
    }
}

impl ChatRequest {
    pub fn sampling(&self) -> Sampling<'_> {
        sampling_of!(self)
    }

    /// The messages, tools and tool choice, checked.
    pub fn conversation(&self) -> Result<Conversation, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` must not be empty"));
        }
        let turns = self.messages.iter().enumerate().map(|(i, m)| turn(i, m)).collect::<Result<Vec<_>, _>>()?;
        if let Some(m) = self.modalities.iter().flatten().find(|m| *m != "text") {
            return Err(ApiError::invalid("modalities", format!("`modalities` may only hold `text`, got `{m}`")));
        }
        let tools = tool_defs(self.tools.as_deref().unwrap_or_default())?;
        let tool_use = tool_use(self.tool_choice.as_ref(), &tools)?;
        if let Some(f) = &self.response_format {
            check_response_format(&f.kind, &turns)?;
        }
        Ok(Conversation { turns, tools, tool_use })
    }

    pub fn max_tokens(&self) -> (Option<i64>, &'static str) {
        match self.max_completion_tokens {
            Some(n) => (Some(n), "max_completion_tokens"),
            None => (self.max_tokens, "max_tokens"),
        }
    }

    /// `response_format: json_object`: the reply is constrained to one
    /// JSON object.
    pub fn json_mode(&self) -> bool {
        self.response_format.as_ref().is_some_and(|f| f.kind == "json_object")
    }

    /// Whether to return the chosen tokens' logprobs.
    pub fn wants_logprobs(&self) -> Result<bool, ApiError> {
        match self.top_logprobs {
            None | Some(0) => Ok(self.logprobs.unwrap_or(false)),
            Some(n) => Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be 0 (only the chosen token's logprob is reported), got {n}"),
            )),
        }
    }
}

fn turn(i: usize, m: &InMessage) -> Result<Turn, ApiError> {
    let field = |f: &str| format!("messages[{i}].{f}");
    let content = match &m.content {
        Some(c) => text_of(c, &field("content"))?,
        None if m.role == Role::Assistant && m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => String::new(),
        None if m.role == Role::Assistant => {
            return Err(ApiError::invalid(
                field("content"),
                format!("`{}` is required when the message has no `tool_calls`", field("content")),
            ))
        }
        None => return Err(ApiError::invalid(field("content"), format!("`{}` is required", field("content")))),
    };
    if m.role == Role::Tool && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::invalid(field("tool_call_id"), format!("`{}` is required", field("tool_call_id"))));
    }
    let role = match m.role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut t = Turn::new(role, content);
    t.name = m.name.clone();
    t.tool_call_id = m.tool_call_id.clone();
    for (j, c) in m.tool_calls.iter().flatten().enumerate() {
        let args = c.function.arguments.as_deref().unwrap_or("{}");
        let arguments = serde_json::from_str(args).map_err(|e| {
            let f = field(&format!("tool_calls[{j}].function.arguments"));
            ApiError::invalid(f.clone(), format!("`{f}` is not JSON: {e}"))
        })?;
        t.calls.push(PastCall { id: c.id.clone(), name: c.function.name.clone(), arguments });
    }
    Ok(t)
}

fn text_of(c: &Content, field: &str) -> Result<String, ApiError> {
    match c {
        Content::Text(s) => Ok(s.clone()),
        Content::Parts(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            format!("{field}[{j}].text"),
                            format!("`{field}[{j}].text` is required"),
                        ))
                    }
                    (other, _) => {
                        let f = format!("{field}[{j}].type");
                        return Err(ApiError::invalid(
                            f.clone(),
                            format!("`{f}` is `{other}`; only `text` parts are supported"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

fn tool_defs(specs: &[ToolSpec]) -> Result<Vec<Value>, ApiError> {
    tools::check_unique(specs.iter().map(|t| t.function.name.as_str()), |i| format!("tools[{i}].function.name"))?;
    specs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("`tools[{i}].type` is `{}`; only `function` is supported", t.kind),
                ));
            }
            tools::check_name(&format!("tools[{i}].function.name"), &t.function.name)?;
            if let Some(p) = &t.function.parameters {
                tools::check_schema(&format!("tools[{i}].function.parameters"), p)?;
            }
            let mut f = serde_json::Map::new();
            f.insert("name".into(), Value::String(t.function.name.clone()));
            if let Some(d) = &t.function.description {
                f.insert("description".into(), Value::String(d.clone()));
            }
            if let Some(p) = &t.function.parameters {
                f.insert("parameters".into(), p.clone());
            }
            Ok(serde_json::json!({"type": "function", "function": f}))
        })
        .collect()
}

fn tool_use(choice: Option<&ToolChoice>, tools: &[Value]) -> Result<Option<ToolUse>, ApiError> {
    let names: Vec<&str> = tools.iter().filter_map(|t| t.pointer("/function/name")?.as_str()).collect();
    let use_ = match choice {
        None => ToolUse::Auto,
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => return Ok(None),
            "auto" => ToolUse::Auto,
            "required" => ToolUse::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a named function, got `{other}`"),
                ))
            }
        },
        Some(ToolChoice::Named { function }) => {
            if !names.contains(&function.name.as_str()) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`tool_choice` names `{}`, which is not in `tools`", function.name),
                ));
            }
            ToolUse::Named(function.name.clone())
        }
    };
    if tools.is_empty() {
        return match choice {
            None => Ok(None),
            Some(_) if use_ == ToolUse::Auto => Ok(None),
            Some(_) => Err(ApiError::invalid("tool_choice", "`tool_choice` requires `tools`")),
        };
    }
    Ok(Some(use_))
}

/// `json_object` is accepted when the messages ask for JSON (as OpenAI
/// requires); the reply is then constrained to one JSON object
/// (`semantic_model::json`).
fn check_response_format(kind: &str, turns: &[Turn]) -> Result<(), ApiError> {
    match kind {
        "text" => Ok(()),
        "json_object" => {
            if turns.iter().any(|t| t.content.to_lowercase().contains("json")) {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    "response_format",
                    "`response_format` json_object requires the word `json` in the messages",
                ))
            }
        }
        "json_schema" => {
            Err(ApiError::invalid("response_format", "`response_format` json_schema is not supported; use json_object"))
        }
        other => Err(ApiError::invalid(
            "response_format",
            format!("`response_format.type` must be text or json_object, got `{other}`"),
        )),
    }
}

impl CompletionRequest {
    pub fn sampling(&self) -> Sampling<'_> {
        sampling_of!(self)
    }

    /// `logprobs: 0` asks for the chosen tokens' logprobs.
    pub fn wants_logprobs(&self) -> bool {
        self.logprobs == Some(0)
    }

    pub fn prompt_text(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            PromptSpec::One(s) => Ok(s),
            PromptSpec::Many(v) if v.len() == 1 => Ok(&v[0]),
            PromptSpec::Many(v) => {
                Err(ApiError::invalid("prompt", format!("`prompt` must be one string, got an array of {}", v.len())))
            }
        }
    }

    pub fn check_unsupported(&self) -> Result<(), ApiError> {
        check_n(self.n)?;
        if let Some(b) = self.best_of.filter(|&b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                format!("`best_of` must be 1 (one completion per request), got {b}"),
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo", "`echo` is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
        }
        match self.logprobs {
            None | Some(0) => Ok(()),
            Some(n) => Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be 0 or absent (the chosen token's logprob only), got {n}"),
            )),
        }
    }
}
