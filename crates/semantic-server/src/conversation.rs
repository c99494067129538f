//! A chat request in dialect-neutral form, and how it is handed to the
//! model's template: with `tools` when the template renders them, else with
//! the tools described in a system prompt and past tool calls and results
//! written as text (see [`crate::tools`]).

use semantic_model::ChatMessage;
use serde_json::Value;

use crate::tools::{self, ToolUse};

/// Where a forced tool call's arguments begin.
const ARGUMENTS_OPEN: &str = "\"arguments\": ";

/// A past assistant tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct PastCall {
    pub id: Option<String>,
    pub name: String,
    pub arguments: Value,
}

/// One message after dialect parsing.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: &'static str,
    pub content: String,
    pub calls: Vec<PastCall>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

impl Turn {
    pub fn new(role: &'static str, content: String) -> Turn {
        Turn { role, content, calls: Vec::new(), tool_call_id: None, name: None }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conversation {
    pub turns: Vec<Turn>,
    /// Tool definitions in the OpenAI shape.
    pub tools: Vec<Value>,
    /// `None`: tools are off (none given, or `tool_choice: none`).
    pub tool_use: Option<ToolUse>,
}

impl Conversation {
    /// Names of the tools the model may call (empty when tools are off).
    pub fn tool_names(&self) -> Vec<String> {
        if self.tool_use.is_none() {
            return Vec::new();
        }
        self.tools.iter().filter_map(|t| t.pointer("/function/name")?.as_str().map(str::to_string)).collect()
    }

    /// What the reply must start with: the opening of a tool call when
    /// `tool_choice` requires one (any tool: up to the name; a named tool:
    /// up to its arguments). The model continues from there, so a required
    /// call is a call, not a promise in the system prompt.
    pub fn reply_start(&self) -> String {
        if self.tools.is_empty() {
            return String::new();
        }
        // The tool to call: the named one, or the only one when any will do.
        let named = match (&self.tool_use, self.tools.as_slice()) {
            (Some(ToolUse::Named(name)), _) => Some(name.as_str()),
            (Some(ToolUse::Required), [one]) => one.pointer("/function/name").and_then(Value::as_str),
            _ => None,
        };
        match (named, &self.tool_use) {
            (Some(name), _) => format!("{}\n{{\"name\": {}, {ARGUMENTS_OPEN}", tools::OPEN, Value::String(name.into())),
            (None, Some(ToolUse::Required)) => format!("{}\n{{\"name\": \"", tools::OPEN),
            _ => String::new(),
        }
    }

    /// Whether [`reply_start`](Self::reply_start) ends where a tool call's
    /// arguments begin: the reply is then one JSON object (constrained).
    pub fn forces_arguments(&self) -> bool {
        self.reply_start().ends_with(ARGUMENTS_OPEN)
    }

    /// The messages and `tools` value to render the template with.
    pub fn template_input(&self, template_knows_tools: bool) -> (Vec<ChatMessage>, Option<Value>) {
        let tools_on = self.tool_use.is_some() && !self.tools.is_empty();
        let mut msgs: Vec<ChatMessage> = self.turns.iter().map(|t| message(t, template_knows_tools)).collect();
        if !tools_on {
            return (msgs, None);
        }
        if template_knows_tools {
            return (msgs, Some(Value::Array(self.tools.clone())));
        }
        let use_ = self.tool_use.clone().unwrap_or(ToolUse::Auto);
        let prompt = tools::system_prompt(&self.tools, &use_);
        match msgs.first_mut() {
            Some(m) if m.role == "system" => {
                m.content = format!("{}\n\n{prompt}", m.content);
            }
            _ => msgs.insert(0, ChatMessage::system(prompt)),
        }
        (msgs, None)
    }
}

fn message(t: &Turn, template_knows_tools: bool) -> ChatMessage {
    let mut m = ChatMessage::new(t.role, t.content.clone());
    m.name = t.name.clone();
    m.tool_call_id = t.tool_call_id.clone();
    if template_knows_tools {
        if !t.calls.is_empty() {
            let calls: Vec<Value> = t
                .calls
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    })
                })
                .collect();
            m.tool_calls = Some(Value::Array(calls));
        }
        return m;
    }
    for c in &t.calls {
        if !m.content.is_empty() {
            m.content.push('\n');
        }
        m.content.push_str(&tools::call_as_text(&c.name, &c.arguments));
    }
    if t.role == "tool" {
        m.content = format!("<tool_response>\n{}\n</tool_response>", m.content);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv() -> Conversation {
        let mut a = Turn::new("assistant", String::new());
        a.calls.push(PastCall { id: Some("call_1".into()), name: "add".into(), arguments: json!({"a": 1}) });
        let mut r = Turn::new("tool", "2".into());
        r.tool_call_id = Some("call_1".into());
        Conversation {
            turns: vec![Turn::new("user", "1+1?".into()), a, r],
            tools: vec![json!({"type": "function", "function": {"name": "add"}})],
            tool_use: Some(ToolUse::Auto),
        }
    }

    #[test]
    fn tools_become_a_system_prompt_for_plain_templates() {
        let (msgs, tools) = conv().template_input(false);
        assert!(tools.is_none());
        assert_eq!(msgs[0].role, "system");
        assert!(msgs[0].content.contains("<tools>"));
        assert_eq!(msgs[2].content, "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":1}}\n</tool_call>");
        assert_eq!(msgs[3].content, "<tool_response>\n2\n</tool_response>");
        assert_eq!(conv().tool_names(), vec!["add".to_string()]);
    }

    #[test]
    fn tool_aware_templates_get_tools_and_calls() {
        let (msgs, tools) = conv().template_input(true);
        assert_eq!(tools.unwrap().as_array().unwrap().len(), 1);
        assert_eq!(msgs.len(), 3);
        let calls = msgs[1].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"], json!({"a": 1}));
        assert_eq!(msgs[2].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn tool_choice_none_turns_tools_off() {
        let mut c = conv();
        c.tool_use = None;
        let (msgs, tools) = c.template_input(false);
        assert!(tools.is_none());
        assert_eq!(msgs[0].role, "user");
        assert!(c.tool_names().is_empty());
    }
}
