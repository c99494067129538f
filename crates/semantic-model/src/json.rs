//! Constrained decoding to one JSON object (OpenAI's `response_format:
//! json_object`, and a forced tool call's arguments).
//!
//! [`JsonObject`] is a byte-level pushdown automaton for RFC 8259 JSON whose
//! top-level value is an object. The engine keeps one per constrained
//! sequence: a token is allowed when every byte of its text is a valid
//! continuation ([`JsonObject::accepts`]), and the reply ends when the
//! object closes. The sampler tries the tokens it would pick and rejects
//! the ones the automaton refuses (see `Sampler::sample_where`), so a step
//! checks a handful of tokens, not the 49K of the vocabulary.
//!
//! Whitespace between tokens is capped ([`MAX_SPACE`] bytes in a row): a
//! small model asked for JSON may otherwise pad forever.

/// Most whitespace bytes in a row outside strings.
pub const MAX_SPACE: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// Before the top-level `{`.
    Start,
    /// A value must come (after `:` or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ValueOrClose,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    Key,
    /// Inside a string; `key` when it is an object key. `esc`: 0 none,
    /// 1 after `\`, 2..=5 inside `\uXXXX` (hex digits seen + 2).
    Str {
        key: bool,
        esc: u8,
    },
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the close of the container.
    After,
    Num(Num),
    /// Inside `true`, `false` or `null`: the word and bytes matched.
    Lit(&'static [u8], u8),
    /// The top-level object closed.
    Done,
}

/// The state of a JSON object being generated.
#[derive(Clone, Debug)]
pub struct JsonObject {
    /// Open containers, `{` or `[`.
    stack: Vec<u8>,
    st: St,
    space: u8,
}

impl Default for JsonObject {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonObject {
    pub fn new() -> Self {
        Self { stack: Vec::new(), st: St::Start, space: 0 }
    }

    /// Whether the top-level object has closed.
    pub fn is_done(&self) -> bool {
        self.st == St::Done
    }

    /// Whether `bytes` may come next (the state is unchanged).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.clone().feed_all(bytes)
    }

    /// Feeds `bytes`; false (and a state to drop) at the first refused one.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Feeds one byte; false when JSON cannot continue with it.
    pub fn feed(&mut self, b: u8) -> bool {
        let space = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        if let St::Num(n) = self.st {
            if let Some(next) = num_step(n, b) {
                self.st = St::Num(next);
                return true;
            }
            if !n.complete() {
                return false;
            }
            self.st = St::After;
        }
        match self.st {
            St::Str { .. } | St::Lit(..) | St::Done | St::Num(_) => {}
            _ if space => {
                self.space += 1;
                return self.space <= MAX_SPACE;
            }
            _ => self.space = 0,
        }
        self.st = match (self.st, b) {
            (St::Start, b'{') => self.open(b'{'),
            (St::Value | St::ValueOrClose, _) if b != b']' => match value_start(b) {
                Some(St::KeyOrClose) => self.open(b'{'),
                Some(St::ValueOrClose) => self.open(b'['),
                Some(s) => s,
                None => return false,
            },
            (St::ValueOrClose, b']') => return self.close(b'['),
            (St::KeyOrClose | St::Key, b'"') => St::Str { key: true, esc: 0 },
            (St::KeyOrClose, b'}') => return self.close(b'{'),
            (St::Str { key, esc: 0 }, b'"') => {
                if key {
                    St::Colon
                } else {
                    St::After
                }
            }
            (St::Str { key, esc: 0 }, b'\\') => St::Str { key, esc: 1 },
            (St::Str { esc: 0, .. }, c) if c < 0x20 => return false,
            (St::Str { key, esc: 0 }, _) => St::Str { key, esc: 0 },
            (St::Str { key, esc: 1 }, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                St::Str { key, esc: 0 }
            }
            (St::Str { key, esc: 1 }, b'u') => St::Str { key, esc: 2 },
            (St::Str { key, esc }, c) if esc >= 2 && c.is_ascii_hexdigit() => {
                St::Str { key, esc: if esc == 5 { 0 } else { esc + 1 } }
            }
            (St::Colon, b':') => St::Value,
            (St::After, b',') => match self.stack.last() {
                Some(b'{') => St::Key,
                _ => St::Value,
            },
            (St::After, b'}') => return self.close(b'{'),
            (St::After, b']') => return self.close(b'['),
            (St::Lit(word, at), c) if word[at as usize] == c => {
                if at as usize + 1 == word.len() {
                    St::After
                } else {
                    St::Lit(word, at + 1)
                }
            }
            _ => return false,
        };
        true
    }

    fn open(&mut self, c: u8) -> St {
        self.stack.push(c);
        if c == b'{' {
            St::KeyOrClose
        } else {
            St::ValueOrClose
        }
    }

    fn close(&mut self, c: u8) -> bool {
        if self.stack.pop() != Some(c) {
            return false;
        }
        self.st = if self.stack.is_empty() { St::Done } else { St::After };
        true
    }
}

/// The state after the first byte of a value (containers as the state
/// their opening leads to).
fn value_start(b: u8) -> Option<St> {
    Some(match b {
        b'{' => St::KeyOrClose,
        b'[' => St::ValueOrClose,
        b'"' => St::Str { key: false, esc: 0 },
        b'-' => St::Num(Num::Minus),
        b'0' => St::Num(Num::Zero),
        b'1'..=b'9' => St::Num(Num::Int),
        b't' => St::Lit(b"true", 1),
        b'f' => St::Lit(b"false", 1),
        b'n' => St::Lit(b"null", 1),
        _ => return None,
    })
}

fn num_step(n: Num, b: u8) -> Option<Num> {
    let digit = b.is_ascii_digit();
    Some(match (n, b) {
        (Num::Minus, b'0') => Num::Zero,
        (Num::Minus, _) if digit => Num::Int,
        (Num::Int, _) if digit => Num::Int,
        (Num::Zero | Num::Int, b'.') => Num::Dot,
        (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::E,
        (Num::Dot | Num::Frac, _) if digit => Num::Frac,
        (Num::E, b'+' | b'-') => Num::ESign,
        (Num::E | Num::ESign | Num::Exp, _) if digit => Num::Exp,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &str) -> bool {
        let mut j = JsonObject::new();
        j.feed_all(s.as_bytes()) && j.is_done()
    }

    fn prefix(s: &str) -> bool {
        JsonObject::new().feed_all(s.as_bytes())
    }

    #[test]
    fn accepts_objects_and_what_serde_accepts() {
        for s in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,2.5,-0.1e+3,true,false,null,\"x\\\"\\u00e9\\n\"],\"b\":{\"c\":{}}}",
            "{\"é\": \"naïve\", \"n\": -0, \"e\": 1E9}",
            "{\"a\" : [ ] , \"b\" : [ {} ]}",
        ] {
            assert!(whole(s), "{s}");
            serde_json::from_str::<serde_json::Value>(s).unwrap();
        }
    }

    #[test]
    fn refuses_what_is_not_json_or_not_an_object() {
        for s in [
            "[1]",
            "\"x\"",
            "1",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1,}",
            "{\"a\":[1,]}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\n\"}",
            "{\"a\":1}}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{]",
            "{\"a\":[}",
            "{\"a\":\"\\u12g4\"}",
        ] {
            assert!(!whole(s), "{s}");
            assert!(serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).is_err(), "{s}");
        }
        // Prefixes of valid objects are accepted; the object is not done.
        for s in ["", " ", "{", "{\"a", "{\"a\":", "{\"a\": [1, 2", "{\"a\": 1.5e", "{\"a\": tr"] {
            assert!(prefix(s), "{s}");
            assert!(!whole(s), "{s}");
        }
        // Nothing after the close.
        assert!(!prefix("{} "));
        assert!(!prefix("{}x"));
    }

    #[test]
    fn whitespace_runs_are_capped() {
        let ok = format!("{{{}\"a\":1}}", " ".repeat(MAX_SPACE as usize));
        assert!(whole(&ok));
        let long = format!("{{{}\"a\":1}}", " ".repeat(MAX_SPACE as usize + 1));
        assert!(!prefix(&long));
        // Spaces inside strings do not count.
        assert!(whole(&format!("{{\"a\":\"{}\"}}", " ".repeat(100))));
    }

    #[test]
    fn accepts_leaves_the_state_alone() {
        let mut j = JsonObject::new();
        assert!(j.feed_all(b"{\"k\": "));
        assert!(j.accepts(b"12}"));
        assert!(!j.accepts(b"}"));
        assert!(!j.accepts(b""));
        assert!(j.feed_all(b"\"v\"}"));
        assert!(j.is_done());
    }
}
