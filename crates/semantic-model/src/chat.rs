//! Chat templates: the model's Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja the way Hugging Face `apply_chat_template` renders it.
//!
//! Invariants:
//! - The template is compiled once, in [`ChatTemplate::new`]; a template that does not
//!   compile is an error there, never at render time.
//! - Rendering sees what HF templates expect: `messages`, `add_generation_prompt`,
//!   `tools` (none when absent), `bos_token`, `eos_token`, `raise_exception(msg)` (fails
//!   the render with `msg`), `strftime_now(fmt)` (UTC), Python string/dict methods, and a
//!   `tojson` that writes like Python's `json.dumps(ensure_ascii=False)` (`", "`, `": "`).
//! - Blocks are trimmed as in HF (`trim_blocks` and `lstrip_blocks` on).
//! - Without a template in the GGUF, ChatML is used.

use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::Content;
use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// Used when the GGUF has no `tokenizer.chat_template`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens that end a turn; one the template mentions is a stop token.
const END_OF_TURN_TOKENS: [&str; 6] =
    ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"];

/// One message of a conversation, as chat templates see it. Absent optional fields are
/// left out (so `message.tool_calls is defined` is false), as in HF.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..ChatMessage::default() }
    }

    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

impl ChatTemplate {
    /// The template of a GGUF file (ChatML when it has none), with the tokenizer's
    /// BOS/EOS text.
    pub fn from_gguf(content: &Content, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
        let key = "tokenizer.chat_template";
        let source = match content.metadata.get(key) {
            Some(v) => {
                v.to_string().map_err(|e| ModelError::Metadata { key: key.to_string(), reason: e.to_string() })?
            }
            None => CHATML_TEMPLATE,
        };
        let bos = tokenizer.bos_token().unwrap_or_default();
        ChatTemplate::new(source, bos, tokenizer.eos_token())
    }

    /// Compiles `source`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_global("bos_token", bos_token);
        env.add_global("eos_token", eos_token);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            tools => tools,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        template.render(ctx).map_err(template_error)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// EOS, plus the end-of-turn tokens the template mentions (`<|im_end|>`,
    /// `<|eot_id|>`, ...) and `<|endoftext|>`, when they are special tokens of the vocab.
    pub fn stop_token_ids(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut ids = vec![tokenizer.eos_id()];
        for text in END_OF_TURN_TOKENS {
            let mentioned = self.source.contains(text) || text == "<|endoftext|>";
            let id = tokenizer.token_id(text).filter(|&id| tokenizer.is_special(id));
            if let Some(id) = id.filter(|id| mentioned && !ids.contains(id)) {
                ids.push(id);
            }
        }
        ids
    }
}

fn template_error(e: Error) -> ModelError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        msg.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    ModelError::Template(msg)
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_utc(&format, secs as i64)
}

/// JSON as Python's `json.dumps(value, ensure_ascii=False, indent=..., separators=...)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<String, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = indent.filter(|v| !v.is_none()).map(usize::try_from).transpose()?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(ErrorKind::InvalidOperation, "separators: 2 strings"));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let formatter = PyJsonFormatter {
        item_sep: item_sep.into_bytes(),
        key_sep: key_sep.into_bytes(),
        indent: indent.map(|n| vec![b' '; n]),
        depth: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e))?;
    String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// serde_json formatter with Python's separators and indentation.
struct PyJsonFormatter {
    item_sep: Vec<u8>,
    key_sep: Vec<u8>,
    indent: Option<Vec<u8>>,
    depth: usize,
    has_value: bool,
}

impl PyJsonFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(&self.item_sep)?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.key_sep)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, usize, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as usize;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// C `strftime` for the common conversions (`%Y %y %m %d %-d %e %H %I %M %S %p %B %b %A
/// %a %j %%`) at `secs` since the epoch, UTC. Other conversions are copied verbatim.
fn format_utc(format: &str, secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (rem / 3600, rem / 60 % 60, rem % 60);
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize];
    let day_of_year = days - days_before_year(year) + 1;
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let spec = match chars.next() {
            Some('-') => chars.next().map(|c| (c, false)),
            Some(c) => Some((c, true)),
            None => None,
        };
        let Some((spec, pad)) = spec else {
            out.push('%');
            break;
        };
        let num = |n: i64, width: usize| {
            if pad {
                format!("{n:0width$}")
            } else {
                n.to_string()
            }
        };
        let piece = match spec {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'm' => num(month as i64, 2),
            'd' => num(i64::from(day), 2),
            'e' => format!("{day:>2}"),
            'H' => num(hour, 2),
            'I' => num((hour + 11) % 12 + 1, 2),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'B' => MONTHS[month - 1].to_string(),
            'b' | 'h' => MONTHS[month - 1][..3].to_string(),
            'A' => weekday.to_string(),
            'a' => weekday[..3].to_string(),
            'j' => num(day_of_year, 3),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if pad { "" } else { "-" }),
        };
        out.push_str(&piece);
    }
    out
}

/// Days from 1970-01-01 to January 1st of `year`.
fn days_before_year(year: i64) -> i64 {
    let y = year - 1;
    let leaps = |y: i64| y.div_euclid(4) - y.div_euclid(100) + y.div_euclid(400);
    365 * (year - 1970) + leaps(y) - leaps(1969)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_like_strftime() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(format_utc("%Y-%m-%d %H:%M:%S", t), "2024-07-26 13:25:09");
        assert_eq!(format_utc("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(format_utc("%A %B %-d, %y %I%p %j %%", t), "Friday July 26, 24 01PM 208 %");
        assert_eq!(format_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(format_utc("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
    }

    #[test]
    fn tojson_writes_like_python() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ s | tojson }}", "", "").unwrap();
        let env = &t.env;
        let out = env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(context! { x => serde_json::json!({"a": [1, 2], "b": {}}), s => "<é>" })
            .unwrap();
        assert_eq!(out, "{\"a\": [1, 2], \"b\": {}}|{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {}\n}|\"<é>\"");
    }
}
