//! Every class of bad input is a 4xx in the dialect's format, naming the field.

use serde_json::{json, Value};

use crate::client::{request, shared, Resp};

fn send_raw(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    request(shared(), "POST", path, headers, body)
}

/// Asserts an OpenAI error with `status` and, when given, `param`.
fn openai_error(r: &Resp, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.as_object().unwrap().contains_key("code"), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
        assert!(e["message"].as_str().unwrap().contains(p.split('[').next().unwrap()), "{v}");
    }
}

/// Asserts an Anthropic error; `field` must appear in the message.
fn anthropic_error(r: &Resp, status: u16, field: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    if let Some(f) = field {
        assert!(msg.contains(f), "{msg:?} does not name {f}");
    }
}

fn msgs() -> Value {
    json!([{"role": "user", "content": "hi"}])
}

fn long_prompt() -> String {
    "hello world ".repeat(9000)
}

#[test]
fn openai_chat_rejects_bad_input_by_field() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"messages": []}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            "messages[0].content[0].type",
        ),
        (json!({"messages": msgs(), "temperature": "hot"}), "temperature"),
        (json!({"messages": msgs(), "temperature": 3.5}), "temperature"),
        (json!({"messages": msgs(), "top_p": 0}), "top_p"),
        (json!({"messages": msgs(), "max_tokens": 0}), "max_tokens"),
        (json!({"messages": msgs(), "max_tokens": -3}), "max_tokens"),
        (json!({"messages": msgs(), "max_tokens": 1_000_000}), "max_tokens"),
        (json!({"messages": msgs(), "max_completion_tokens": 0}), "max_completion_tokens"),
        (json!({"messages": msgs(), "n": 2}), "n"),
        (json!({"messages": msgs(), "stop": 5}), "stop"),
        (json!({"messages": msgs(), "stop": [""]}), "stop"),
        (json!({"messages": msgs(), "top_logprobs": 3}), "top_logprobs"),
        (json!({"messages": msgs(), "response_format": {"type": "json_object"}}), "response_format"),
        (
            json!({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
        ),
        (json!({"messages": msgs(), "tools": [{"type": "retrieval", "function": {"name": "f"}}]}), "tools[0].type"),
        (json!({"messages": msgs(), "session_id": "../etc"}), "session_id"),
        (json!({"messages": [{"role": "user", "content": long_prompt()}]}), "messages"),
        (json!({"messages": msgs(), "presence_penalty": 2.5}), "presence_penalty"),
        (json!({"messages": msgs(), "frequency_penalty": -3}), "frequency_penalty"),
        (json!({"messages": msgs(), "logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"messages": msgs(), "logit_bias": {"5": 200}}), "logit_bias"),
        (json!({"messages": msgs(), "logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"messages": msgs(), "top_k": -5}), "top_k"),
        (json!({"messages": msgs(), "modalities": ["text", "audio"]}), "modalities"),
        (json!({"messages": msgs(), "parallel_tool_calls": "x"}), "parallel_tool_calls"),
        (
            json!({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "get weather!"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}),
            "tools[1].function.name",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}),
            "messages[1].content",
        ),
        (json!({"messages": [{"role": null, "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": 5, "content": "x"}]}), "messages[0].role"),
    ];
    for (body, param) in cases {
        let r = send_raw("/v1/chat/completions", &[], body.to_string().as_bytes());
        openai_error(&r, 400, Some(param));
    }
}

#[test]
fn openai_rejects_malformed_bodies_and_bad_headers() {
    for body in [&b"{\"messages\": ["[..], b"", b"not json", b"[1, 2]", b"{} {}"] {
        let r = send_raw("/v1/chat/completions", &[], body);
        openai_error(&r, 400, None);
    }
    let r = send_raw("/v1/chat/completions", &[], b" [1, 2]");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("must be a JSON object"), "{}", r.text());
    for (h, v) in [("X-Session-ID", "a b"), ("X-Agent-ID", "a/b"), ("X-Claude-Code-Session-Id", "..")] {
        let r = send_raw("/v1/chat/completions", &[(h, v)], json!({"messages": msgs()}).to_string().as_bytes());
        openai_error(&r, 400, Some(&h.to_lowercase()));
    }
    let big = vec![b' '; 5 << 20];
    openai_error(&send_raw("/v1/chat/completions", &[], &big), 413, None);
    openai_error(&request(shared(), "GET", "/v1/chat/completions", &[], b""), 405, None);
    openai_error(&request(shared(), "GET", "/v1/nothing-here", &[], b""), 404, None);
}

#[test]
fn openai_completions_reject_bad_input() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": 7}), "prompt"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "n": 3}), "n"),
        (json!({"prompt": "x", "echo": true}), "echo"),
        (json!({"prompt": "x", "best_of": 2}), "best_of"),
        (json!({"prompt": "x", "presence_penalty": 9}), "presence_penalty"),
        (json!({"prompt": "x", "logit_bias": {"-1": 3}}), "logit_bias"),
        (json!({"prompt": long_prompt()}), "prompt"),
    ];
    for (body, param) in cases {
        let r = send_raw("/v1/completions", &[], body.to_string().as_bytes());
        openai_error(&r, 400, Some(param));
    }
}

#[test]
fn anthropic_messages_reject_bad_input_by_field() {
    let m = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"messages": m}), "max_tokens"),
        (json!({"max_tokens": 5, "messages": []}), "messages"),
        (json!({"max_tokens": 5}), "messages"),
        (json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}), "messages[0].role"),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "messages[0].content[0].text",
        ),
        (json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}), "tool_use_id"),
        (json!({"max_tokens": 0, "messages": m}), "max_tokens"),
        (json!({"max_tokens": -1, "messages": m}), "max_tokens"),
        (json!({"max_tokens": 99_999_999, "messages": m}), "max_tokens"),
        (json!({"max_tokens": "ten", "messages": m}), "max_tokens"),
        (json!({"max_tokens": 5, "messages": m, "temperature": 1.5}), "temperature"),
        (json!({"max_tokens": 5, "messages": m, "top_k": -2}), "top_k"),
        (json!({"max_tokens": 5, "messages": m, "stop_sequences": "x"}), "stop_sequences"),
        (json!({"max_tokens": 5, "messages": m, "system": 5}), "system"),
        (
            json!({"max_tokens": 5, "messages": m, "tool_choice": {"type": "sometimes"}, "tools": [{"name": "f"}]}),
            "tool_choice.type",
        ),
        (json!({"max_tokens": 5, "messages": [{"role": "user", "content": long_prompt()}]}), "messages"),
        (json!({"max_tokens": 5, "messages": m, "tool_choice": {"type": "any"}}), "tool_choice"),
        (
            json!({"max_tokens": 5, "messages": m, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "tools[0].type",
        ),
        (json!({"max_tokens": 5, "messages": m, "tools": [{"name": "a b"}]}), "tools[0].name"),
        (
            json!({"max_tokens": 5, "messages": m, "tools": [{"name": "f", "input_schema": []}]}),
            "tools[0].input_schema",
        ),
        (json!({"max_tokens": 5, "messages": m, "tools": [{"name": "f"}, {"name": "f"}]}), "tools[1].name"),
    ];
    for (body, field) in cases {
        let r = send_raw("/v1/messages", &[], body.to_string().as_bytes());
        anthropic_error(&r, 400, Some(field));
    }
    let body = json!({"max_tokens": 5, "messages": m}).to_string();
    let r = send_raw("/v1/messages", &[("x-session-id", "no spaces please")], body.as_bytes());
    anthropic_error(&r, 400, Some("x-session-id"));
    anthropic_error(&send_raw("/v1/messages", &[], b"{oops"), 400, Some("malformed JSON"));
    anthropic_error(&send_raw("/v1/messages", &[], &vec![b' '; 5 << 20]), 413, None);
    let r = send_raw("/v1/messages/count_tokens", &[], b"{\"messages\": 1}");
    anthropic_error(&r, 400, Some("messages"));
}
