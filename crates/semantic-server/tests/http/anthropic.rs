//! The Anthropic dialect on the real model.

use serde_json::{json, Value};

use crate::client::{post, shared};

fn messages(body: Value, headers: &[(&str, &str)]) -> Value {
    let r = post(shared(), "/v1/messages", headers, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn message_has_text_stop_reason_and_usage() {
    let body = json!({
        "model": "x", "max_tokens": 10, "temperature": 0,
        "system": [{"type": "text", "text": "You are brief."}],
        "metadata": {"user_id": "u-1"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
    });
    let m = messages(body, &[]);
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["content"][0]["type"], "text");
    assert!(!m["content"][0]["text"].as_str().unwrap().is_empty());
    let reason = m["stop_reason"].as_str().unwrap();
    assert!(reason == "end_turn" || reason == "max_tokens", "{m}");
    let u = &m["usage"];
    // Without an agent id nothing is written to an agent cache.
    assert_eq!(u["cache_creation_input_tokens"], 0);
    let total = u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap();
    let counted = post(
        shared(),
        "/v1/messages/count_tokens",
        &[],
        &json!({"model": "x", "system": "You are brief.", "messages": [{"role": "user", "content": "Say hi."}]}),
    );
    assert_eq!(counted.status, 200);
    assert_eq!(counted.json()["input_tokens"].as_u64().unwrap(), total);
}

/// A counting request and the third word of its greedy answer.
fn counting_and_third_word() -> (serde_json::Value, String) {
    let body = json!({"max_tokens": 30, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from one to ten in words."}]});
    let full = messages(body.clone(), &[]);
    let text = full["content"][0]["text"].as_str().unwrap().to_string();
    (body, text.split_whitespace().nth(2).expect("three words").to_string())
}

#[test]
fn stop_sequences_report_stop_sequence() {
    let (mut b, word) = counting_and_third_word();
    b["stop_sequences"] = json!([word.clone()]);
    let m = messages(b, &[]);
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], json!(word));
    assert!(!m["content"][0]["text"].as_str().unwrap().contains(&word));
}

#[test]
fn the_matching_one_of_several_stop_sequences_is_reported() {
    let (mut b, word) = counting_and_third_word();
    b["stop_sequences"] = json!(["zzzz-never", word.clone(), "qqqq-never"]);
    let m = messages(b, &[]);
    assert_eq!(m["stop_reason"], "stop_sequence");
    assert_eq!(m["stop_sequence"], json!(word));
}

#[test]
fn a_second_turn_reads_the_agent_cache() {
    let first = json!({"max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a fruit."}]});
    let h = [("x-claude-code-session-id", "anthropic-turns")];
    let a = messages(first, &h);
    let ua = &a["usage"];
    // With an agent id every computed prompt token is kept in its cache.
    assert!(ua["cache_creation_input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(ua["input_tokens"], 0);
    let prompt1 = ua["cache_creation_input_tokens"].as_u64().unwrap() + ua["cache_read_input_tokens"].as_u64().unwrap();
    let reply = a["content"][0]["text"].as_str().unwrap();
    let second = json!({"max_tokens": 8, "temperature": 0, "messages": [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Another?"},
    ]});
    let b = messages(second, &h);
    let read = b["usage"]["cache_read_input_tokens"].as_u64().unwrap();
    assert!(read >= prompt1 - 1, "{b}");
}

#[test]
fn stream_has_the_full_event_sequence() {
    let body = json!({"max_tokens": 12, "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let plain = {
        let mut b = body.clone();
        b["stream"] = json!(false);
        messages(b, &[])
    };
    let r = post(shared(), "/v1/messages", &[], &body);
    assert_eq!(r.status, 200);
    let events = r.sse();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(&names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    assert!(names[3..names.len() - 3].iter().all(|n| *n == "content_block_delta"));
    let data: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    for ((name, _), d) in events.iter().zip(&data) {
        assert_eq!(d["type"], name.as_str());
    }
    let text: String = data.iter().filter_map(|d| d["delta"]["text"].as_str()).collect();
    assert_eq!(text, plain["content"][0]["text"].as_str().unwrap());
    let delta = &data[data.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], plain["stop_reason"]);
    assert_eq!(delta["usage"]["output_tokens"], plain["usage"]["output_tokens"]);
}

#[test]
fn tool_use_and_tool_result_blocks_are_accepted() {
    let body = json!({
        "max_tokens": 10, "temperature": 0,
        "tools": [{"name": "get_weather", "description": "Weather of a city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "auto"},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
        ],
    });
    let m = messages(body, &[]);
    let reason = m["stop_reason"].as_str().unwrap();
    assert!(["end_turn", "max_tokens", "tool_use"].contains(&reason), "{m}");
    if reason == "tool_use" {
        let block = m["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap();
        assert_eq!(block["name"], "get_weather");
        assert!(block["input"].is_object());
    }
}
