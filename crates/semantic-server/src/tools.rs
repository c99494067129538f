//! Tool calling. Tools travel to the chat template in the OpenAI shape
//! (`{"type":"function","function":{name, description, parameters}}`), which
//! Hugging Face templates expect. A template that does not render `tools`
//! (SmolLM2's ChatML) gets them as a Hermes-style system prompt instead.
//!
//! The model calls a tool by writing `<tool_call>{"name":..,"arguments":..}</tool_call>`
//! (a JSON array inside the tags is accepted too). Calls are recognised only
//! for tools the request declared; anything else stays text.

use serde_json::Value;

use crate::error::ApiError;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// One tool call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// A JSON object.
    pub arguments: Value,
}

/// How the request constrains tool use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolUse {
    Auto,
    Required,
    Named(String),
}

/// Checks a declared tool's name (`field` names it in the error): 1 to 64
/// letters, digits, `_` or `-`, as OpenAI and Anthropic require.
pub fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok =
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("`{field}` must be 1 to 64 letters, digits, `_` or `-`, got `{name}`")))
    }
}

/// Checks a declared tool's parameter schema: a JSON object.
pub fn check_schema(field: &str, schema: &Value) -> Result<(), ApiError> {
    if schema.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid(field, format!("`{field}` must be a JSON Schema object")))
    }
}

/// 400 when two declared tools share a name (`field(i)` names the later).
pub fn check_unique<'a>(names: impl Iterator<Item = &'a str>, field: impl Fn(usize) -> String) -> Result<(), ApiError> {
    let mut seen = std::collections::HashSet::new();
    for (i, n) in names.enumerate() {
        if !seen.insert(n) {
            let f = field(i);
            return Err(ApiError::invalid(f.clone(), format!("`{f}` is `{n}`, declared twice")));
        }
    }
    Ok(())
}

/// The system prompt that describes `tools` (OpenAI shape) to a model whose
/// template does not.
pub fn system_prompt(tools: &[Value], use_: &ToolUse) -> String {
    let mut s = String::from(
        "You are a function calling AI model. You are provided with function signatures \
         within <tools></tools> XML tags. You may call one or more functions to assist with \
         the user query. Don't make assumptions about what values to plug into functions.\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nFor each function call, return a json object with the function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    match use_ {
        ToolUse::Auto => {}
        ToolUse::Required => s.push_str("\nYou must call at least one function."),
        ToolUse::Named(n) => s.push_str(&format!("\nYou must call the function `{n}`.")),
    }
    s
}

/// How a past assistant tool call is written into the prompt for a template
/// that does not render `tool_calls`.
pub fn call_as_text(name: &str, arguments: &Value) -> String {
    let name = Value::String(name.to_string());
    format!("{OPEN}\n{{\"name\": {name}, \"arguments\": {arguments}}}\n{CLOSE}")
}

/// Splits a reply into text and the tool calls in it. When no block parses
/// as a call to a known tool, the whole reply is text.
pub fn parse(text: &str, known: &[String]) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(OPEN) {
        content.push_str(&rest[..i]);
        let after = &rest[i + OPEN.len()..];
        let (inner, next) = match after.find(CLOSE) {
            Some(j) => (&after[..j], &after[j + CLOSE.len()..]),
            None => (after, ""),
        };
        match calls_in(inner, known) {
            Some(mut c) => calls.append(&mut c),
            None => content.push_str(&rest[i..rest.len() - next.len()]),
        }
        rest = next;
    }
    content.push_str(rest);
    if calls.is_empty() {
        return (text.to_string(), calls);
    }
    (content.trim().to_string(), calls)
}

fn calls_in(inner: &str, known: &[String]) -> Option<Vec<ParsedCall>> {
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    let items = match v {
        Value::Array(items) => items,
        one => vec![one],
    };
    let calls: Option<Vec<ParsedCall>> = items.into_iter().map(|c| call_of(c, known)).collect();
    calls.filter(|c| !c.is_empty())
}

fn call_of(v: Value, known: &[String]) -> Option<ParsedCall> {
    let Value::Object(mut o) = v else {
        return None;
    };
    let name = o.get("name")?.as_str()?.to_string();
    if !known.contains(&name) {
        return None;
    }
    let arguments = match o.remove("arguments").or_else(|| o.remove("parameters")) {
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => serde_json::from_str(&s).ok()?,
        Some(v @ Value::Object(_)) => v,
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(_) => return None,
    };
    Some(ParsedCall { name, arguments })
}

/// A reply that was forced to open a tool call (see
/// `Conversation::reply_start`) whose block does not parse whole (small
/// models trail junk after the arguments, or never close the tag): the
/// first JSON string after `"name":` and the first JSON value after
/// `"arguments":` still make the call when the name is known and the
/// arguments are an object. Otherwise `(text, calls)` as they were.
pub fn finish_forced(
    forced: bool,
    text: String,
    calls: Vec<ParsedCall>,
    known: &[String],
) -> (String, Vec<ParsedCall>) {
    if !forced || !calls.is_empty() {
        return (text, calls);
    }
    match forced_call(&text, known) {
        Some(call) => (String::new(), vec![call]),
        None => (text, calls),
    }
}

/// The text after the first `key` in `s`.
fn after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    Some(&s[s.find(key)? + key.len()..])
}

fn forced_call(text: &str, known: &[String]) -> Option<ParsedCall> {
    let first_value = |s: &str| serde_json::Deserializer::from_str(s).into_iter::<Value>().next()?.ok();
    let after_name = after(after(text, OPEN)?, "\"name\":")?;
    let name = first_value(after_name)?.as_str()?.to_string();
    let after_args = after(after_name, "\"arguments\":")?;
    let arguments = first_value(after_args).filter(Value::is_object)?;
    known.contains(&name).then_some(ParsedCall { name, arguments })
}

/// Streams text while holding back anything from `<tool_call>` on, so that a
/// tool call is never sent as text. [`Self::finish`] parses what was held.
#[derive(Debug, Default)]
pub struct StreamSplitter {
    /// Text not yet emitted: a possible start of the tag, or everything from
    /// the tag on once it was seen.
    held: String,
    in_call: bool,
}

impl StreamSplitter {
    /// Adds a text delta; returns the text that is safe to emit now.
    pub fn push(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        if self.in_call {
            return String::new();
        }
        if let Some(i) = self.held.find(OPEN) {
            self.in_call = true;
            let out = self.held[..i].to_string();
            self.held.drain(..i);
            return out;
        }
        // Keep the longest suffix that could still grow into the tag.
        let keep = (1..OPEN.len())
            .rev()
            .find(|&k| {
                self.held.len() >= k
                    && self.held.is_char_boundary(self.held.len() - k)
                    && OPEN.starts_with(&self.held[self.held.len() - k..])
            })
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// The rest of the text and the tool calls found in what was held.
    pub fn finish(self, known: &[String]) -> (String, Vec<ParsedCall>) {
        if !self.in_call {
            return (self.held, Vec::new());
        }
        let (text, calls) = parse(&self.held, known);
        if calls.is_empty() {
            (self.held, calls)
        } else {
            (text, calls)
        }
    }
}

/// A streamed text delta through the stream's splitter, if it has tools.
pub fn split_delta(splitter: &mut Option<StreamSplitter>, text: String) -> String {
    match splitter {
        Some(s) => s.push(&text),
        None => text,
    }
}

/// The end of a stream: its last text (`tail` and whatever the splitter
/// held) and the tool calls found.
pub fn split_finish(splitter: Option<StreamSplitter>, tail: String, known: &[String]) -> (String, Vec<ParsedCall>) {
    match splitter {
        Some(mut s) => {
            let mut text = s.push(&tail);
            let (rest, calls) = s.finish(known);
            text.push_str(&rest);
            (text, calls)
        }
        None => (tail, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn known() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    #[test]
    fn a_forced_call_survives_trailing_junk() {
        let junk = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \n{\"city\": \"Oslo\"}},\"type\":\"function\"\ndef f(";
        let (text, calls) = parse(junk, &known());
        assert!(calls.is_empty());
        let (text, calls) = finish_forced(true, text, calls, &known());
        assert_eq!(
            (text.as_str(), calls),
            ("", vec![ParsedCall { name: "get_weather".into(), arguments: json!({"city": "Oslo"}) }])
        );
        // Not forced, an unknown name, or arguments that are not an object: text.
        assert!(finish_forced(false, junk.into(), vec![], &known()).1.is_empty());
        let unknown = junk.replace("get_weather", "weather");
        assert_eq!(finish_forced(true, unknown.clone(), vec![], &known()).0, unknown);
        let scalar = "<tool_call>\n{\"name\": \"add\", \"arguments\": 5}";
        assert!(finish_forced(true, scalar.into(), vec![], &known()).1.is_empty());
    }

    #[test]
    fn parses_calls_and_keeps_other_text() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (text, calls) = parse(t, &known());
        assert_eq!(text, "Let me check.");
        assert_eq!(calls, vec![ParsedCall { name: "get_weather".into(), arguments: json!({"city": "Paris"}) }]);
        // An array, string arguments, and a missing close tag.
        let t = "<tool_call>[{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}, {\"name\": \"add\"}]";
        let (text, calls) = parse(t, &known());
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, json!({"a": 1}));
        assert_eq!(calls[1].arguments, json!({}));
    }

    #[test]
    fn unknown_tools_and_bad_json_stay_text() {
        for t in [
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            "<tool_call>{not json}</tool_call>",
            "no calls here",
        ] {
            assert_eq!(parse(t, &known()), (t.to_string(), vec![]));
        }
    }

    #[test]
    fn splitter_holds_back_the_tag() {
        let mut s = StreamSplitter::default();
        assert_eq!(s.push("Hello <to"), "Hello ");
        assert_eq!(s.push("day> is"), "<today> is");
        assert_eq!(s.push(" é<tool_"), " é");
        assert_eq!(s.push("call>{\"name\": \"add\", "), "");
        assert_eq!(s.push("\"arguments\": {\"a\": 2}}</tool_call>"), "");
        let (text, calls) = s.finish(&known());
        assert_eq!(text, "");
        assert_eq!(calls[0].name, "add");

        let mut s = StreamSplitter::default();
        assert_eq!(s.push("a <tool_call> b"), "a ");
        assert_eq!(s.finish(&known()), ("<tool_call> b".to_string(), vec![]));

        let mut s = StreamSplitter::default();
        assert_eq!(s.push("ends with <"), "ends with ");
        assert_eq!(s.finish(&known()), ("<".to_string(), vec![]));
    }

    #[test]
    fn system_prompt_lists_tools() {
        let tools = vec![json!({"type": "function", "function": {"name": "add"}})];
        let p = system_prompt(&tools, &ToolUse::Named("add".into()));
        assert!(p.contains("<tools>\n{"), "{p}");
        assert!(p.contains("\"name\":\"add\"}"), "{p}");
        assert!(p.ends_with("You must call the function `add`."));
        assert_eq!(
            call_as_text("add", &json!({"a": 1})),
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\":1}}\n</tool_call>"
        );
    }
}
