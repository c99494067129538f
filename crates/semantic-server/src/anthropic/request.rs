//! Anthropic request bodies and their validation into a [`Conversation`].

use semantic_core::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::conversation::{Conversation, PastCall, Turn};
use crate::error::ApiError;
use crate::tools::{self, ToolUse};

#[derive(Deserialize, Debug)]
pub struct MessagesRequest {
    #[allow(dead_code)]
    pub model: Option<String>,
    /// Required by `/v1/messages`, ignored by `count_tokens`.
    pub max_tokens: Option<i64>,
    pub messages: Vec<InMessage>,
    pub system: Option<SystemSpec>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    #[allow(dead_code)]
    pub metadata: Option<Metadata>,
    pub stream: Option<bool>,
    pub tools: Option<Vec<ToolSpec>>,
    pub tool_choice: Option<ToolChoice>,
}

#[derive(Deserialize, Debug)]
pub struct Metadata {
    #[allow(dead_code)]
    pub user_id: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string or an array of text blocks")]
pub enum SystemSpec {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Deserialize, Debug)]
pub struct InMessage {
    pub role: Role,
    pub content: Content,
}

#[derive(Deserialize, Debug)]
#[serde(untagged, expecting = "expected a string or an array of content blocks")]
pub enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block of any type; which fields are required depends on `type`.
#[derive(Deserialize, Debug)]
pub struct Block {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub input: Option<Value>,
    pub tool_use_id: Option<String>,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
pub struct ToolSpec {
    /// Absent or `custom`; Anthropic's server tools (web search, ...) are
    /// not ours to run.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Option<Value>,
}

#[derive(Deserialize, Debug)]
pub struct ToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
}

impl MessagesRequest {
    /// Anthropic ranges: temperature 0..=1 (default 1).
    pub fn params(&self) -> Result<SamplingParams, ApiError> {
        if let Some(t) = self.temperature {
            if !(0.0..=1.0).contains(&t) {
                return Err(ApiError::invalid(
                    "temperature",
                    format!("`temperature` must be between 0 and 1, got {t}"),
                ));
            }
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => return Err(ApiError::invalid("top_k", format!("`top_k` must be >= 0, got {k}"))),
            Some(k) => k as usize,
        };
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            stop: self.stop_sequences.clone().unwrap_or_default(),
            max_tokens: 1,
            ..SamplingParams::default()
        };
        p.validate().map_err(|e| {
            let e = ApiError::from(e);
            match e.param() {
                Some("stop") => ApiError::invalid(
                    "stop_sequences",
                    "`stop_sequences` may hold at most 16 strings of 1 to 256 bytes",
                ),
                _ => e,
            }
        })?;
        Ok(p)
    }

    pub fn conversation(&self) -> Result<Conversation, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "`messages` must not be empty"));
        }
        let mut turns = Vec::new();
        match &self.system {
            Some(SystemSpec::Text(s)) if !s.is_empty() => turns.push(Turn::new("system", s.clone())),
            Some(SystemSpec::Blocks(b)) if !b.is_empty() => {
                let text = blocks_text(b, "system")?;
                turns.push(Turn::new("system", text));
            }
            _ => {}
        }
        for (i, m) in self.messages.iter().enumerate() {
            message_turns(i, m, &mut turns)?;
        }
        let tools = tool_defs(self.tools.as_deref().unwrap_or_default())?;
        let tool_use = tool_use(self.tool_choice.as_ref(), &tools)?;
        Ok(Conversation { turns, tools, tool_use })
    }
}

/// Text of a list of text blocks (system prompts, tool results).
fn blocks_text(blocks: &[Block], field: &str) -> Result<String, ApiError> {
    let mut out = String::new();
    for (j, b) in blocks.iter().enumerate() {
        match (b.kind.as_str(), &b.text) {
            ("text", Some(t)) => {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(t);
            }
            ("text", None) => return Err(required(&format!("{field}[{j}].text"))),
            (other, _) => {
                let f = format!("{field}[{j}].type");
                return Err(ApiError::invalid(
                    f.clone(),
                    format!("`{f}` is `{other}`; only `text` blocks are supported here"),
                ));
            }
        }
    }
    Ok(out)
}

fn required(field: &str) -> ApiError {
    ApiError::invalid(field, format!("`{field}` is required"))
}

fn message_turns(i: usize, m: &InMessage, turns: &mut Vec<Turn>) -> Result<(), ApiError> {
    let role = match m.role {
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    let blocks = match &m.content {
        Content::Text(s) => {
            turns.push(Turn::new(role, s.clone()));
            return Ok(());
        }
        Content::Blocks(b) => b,
    };
    let mut turn = Turn::new(role, String::new());
    for (j, b) in blocks.iter().enumerate() {
        let field = format!("messages[{i}].content[{j}]");
        match b.kind.as_str() {
            "text" => {
                let t = b.text.as_ref().ok_or_else(|| required(&format!("{field}.text")))?;
                if !turn.content.is_empty() {
                    turn.content.push('\n');
                }
                turn.content.push_str(t);
            }
            "tool_use" if m.role == Role::Assistant => {
                let name = b.name.clone().ok_or_else(|| required(&format!("{field}.name")))?;
                turn.calls.push(PastCall {
                    id: b.id.clone(),
                    name,
                    arguments: b.input.clone().unwrap_or_else(|| Value::Object(Default::default())),
                });
            }
            "tool_result" if m.role == Role::User => {
                let id = b.tool_use_id.clone().ok_or_else(|| required(&format!("{field}.tool_use_id")))?;
                let content = match &b.content {
                    None => String::new(),
                    Some(Content::Text(s)) => s.clone(),
                    Some(Content::Blocks(c)) => blocks_text(c, &format!("{field}.content"))?,
                };
                let mut r = Turn::new("tool", content);
                r.tool_call_id = Some(id);
                turns.push(r);
            }
            // Reasoning blocks of earlier turns carry nothing the model can use.
            "thinking" | "redacted_thinking" => {}
            other => {
                let f = format!("{field}.type");
                return Err(ApiError::invalid(
                    f.clone(),
                    format!("`{f}` is `{other}`, which is not supported in a {role} message"),
                ));
            }
        }
    }
    if !turn.content.is_empty() || !turn.calls.is_empty() {
        turns.push(turn);
    }
    Ok(())
}

/// Anthropic tools in the OpenAI shape the templates expect.
fn tool_defs(specs: &[ToolSpec]) -> Result<Vec<Value>, ApiError> {
    tools::check_unique(specs.iter().map(|t| t.name.as_str()), |i| format!("tools[{i}].name"))?;
    specs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if let Some(k) = t.kind.as_deref().filter(|k| *k != "custom") {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!("`tools[{i}].type` is `{k}`; only custom tools (with `input_schema`) are supported"),
                ));
            }
            tools::check_name(&format!("tools[{i}].name"), &t.name)?;
            if let Some(s) = &t.input_schema {
                tools::check_schema(&format!("tools[{i}].input_schema"), s)?;
            }
            let mut f = serde_json::Map::new();
            f.insert("name".into(), Value::String(t.name.clone()));
            if let Some(d) = &t.description {
                f.insert("description".into(), Value::String(d.clone()));
            }
            if let Some(s) = &t.input_schema {
                f.insert("parameters".into(), s.clone());
            }
            Ok(serde_json::json!({"type": "function", "function": f}))
        })
        .collect()
}

fn tool_use(choice: Option<&ToolChoice>, tools: &[Value]) -> Result<Option<ToolUse>, ApiError> {
    if tools.is_empty() {
        return match choice.map(|c| c.kind.as_str()) {
            Some("any" | "tool") => Err(ApiError::invalid("tool_choice", "`tool_choice` any or tool requires `tools`")),
            _ => Ok(None),
        };
    }
    let Some(c) = choice else {
        return Ok(Some(ToolUse::Auto));
    };
    match c.kind.as_str() {
        "auto" => Ok(Some(ToolUse::Auto)),
        "any" => Ok(Some(ToolUse::Required)),
        "none" => Ok(None),
        "tool" => {
            let name = c.name.clone().ok_or_else(|| required("tool_choice.name"))?;
            let known = tools.iter().any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(&name));
            if !known {
                return Err(ApiError::invalid(
                    "tool_choice.name",
                    format!("`tool_choice.name` is `{name}`, which is not in `tools`"),
                ));
            }
            Ok(Some(ToolUse::Named(name)))
        }
        other => Err(ApiError::invalid(
            "tool_choice.type",
            format!("`tool_choice.type` must be auto, any, tool or none, got `{other}`"),
        )),
    }
}
