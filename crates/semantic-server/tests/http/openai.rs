//! The OpenAI dialect on the real model.

use serde_json::{json, Value};

use crate::client::{get, post, shared};

fn chat(body: Value, headers: &[(&str, &str)]) -> Value {
    let r = post(shared(), "/v1/chat/completions", headers, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-request-id").is_some_and(|v| v.starts_with("req-")));
    r.json()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn chat_completion_reports_usage_and_is_deterministic_when_greedy() {
    let body = json!({"model": "x", "messages": user("Say hello."), "max_tokens": 12, "temperature": 0});
    let a = chat(body.clone(), &[]);
    let b = chat(body, &[]);
    let msg = &a["choices"][0]["message"];
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(msg["role"], "assistant");
    assert!(!msg["content"].as_str().unwrap().is_empty());
    assert_eq!(msg, &b["choices"][0]["message"]);
    let u = &a["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 5);
    let done = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&done));
    assert_eq!(u["total_tokens"].as_u64().unwrap(), u["prompt_tokens"].as_u64().unwrap() + done);
    let reason = a["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || (reason == "length" && done == 12), "{a}");
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
}

#[test]
fn a_second_turn_of_the_same_session_reuses_the_cache() {
    let first = json!({"messages": user("Name a colour."), "max_tokens": 8, "temperature": 0});
    let a = chat(first, &[("X-Session-ID", "openai-turns")]);
    let reply = a["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let prompt1 = a["usage"]["prompt_tokens"].as_u64().unwrap();
    // The body field names the same agent.
    let second = json!({
        "session_id": "openai-turns",
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": [{"type": "text", "text": "Another one?"}]},
        ],
        "max_tokens": 8, "temperature": 0,
    });
    let b = chat(second, &[]);
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1 - 1, "cached {cached} of a {prompt1}-token first prompt: {b}");
}

#[test]
fn stream_matches_the_plain_reply_and_ends_with_usage_and_done() {
    let body = json!({"messages": user("Count to five."), "max_tokens": 16, "temperature": 0});
    let plain = chat(body.clone(), &[]);
    let mut sbody = body;
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = post(shared(), "/v1/chat/completions", &[], &sbody);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.sse();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, plain["choices"][0]["message"]["content"].as_str().unwrap());
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], plain["usage"]["completion_tokens"]);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &plain["choices"][0]["finish_reason"]);
    assert!(chunks[1..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[test]
fn stop_strings_cut_the_reply() {
    let body = json!({"messages": user("Count from one to ten in words."), "max_tokens": 24, "temperature": 0});
    let full = chat(body.clone(), &[]);
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    // Stop at the third word of the greedy reply.
    let word = text.split_whitespace().nth(2).expect("three words").to_string();
    let mut b = body;
    b["stop"] = json!([word.clone(), "zzzz-never"]);
    let cut = chat(b, &[]);
    let got = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert!(!got.contains(&word), "{got:?} still has {word:?}");
    assert!(text.starts_with(got), "{got:?} is not a prefix of {text:?}");
}

#[test]
fn logprobs_end_with_the_last_token_the_reply_shows() {
    let body = json!({"messages": user("Describe Paris in one sentence."), "max_tokens": 24, "temperature": 0, "logprobs": true});
    let full = chat(body.clone(), &[]);
    let toks: Vec<String> = full["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    // A stop string across the boundary of two tokens: the first shows in
    // part, the second not at all.
    let k = (2..toks.len() - 1)
        .find(|&k| toks[k].len() > 1 && toks[k + 1].len() > 1 && toks[k].is_ascii() && toks[k + 1].is_ascii())
        .expect("two plain tokens");
    let stop = format!("{}{}", &toks[k][toks[k].len() - 1..], &toks[k + 1][..1]);
    let text: String = toks.concat();
    let cut_at = text.find(&stop).unwrap();
    let mut starts = Vec::new();
    toks.iter().fold(0, |at, t| {
        starts.push(at);
        at + t.len()
    });
    let shown = starts.iter().filter(|&&at| at < cut_at).count();
    let mut b = body;
    b["stop"] = json!(stop);
    let cut = chat(b, &[]);
    assert_eq!(cut["choices"][0]["message"]["content"], &text[..cut_at], "{cut}");
    let got: Vec<&str> = cut["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(got, toks[..shown].iter().map(String::as_str).collect::<Vec<_>>(), "stop {stop:?}");
}

#[test]
fn logprobs_cover_every_token() {
    let body = json!({"messages": user("Hi"), "max_tokens": 5, "temperature": 0.7, "seed": 7, "logprobs": true});
    let r = chat(body, &[]);
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap());
    assert!(lp.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0 && t["bytes"].is_array()));
}

#[test]
fn tools_are_accepted_with_their_history() {
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body = json!({
        "messages": [
            {"role": "system", "content": "You help."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        "tools": tools, "tool_choice": "auto", "max_tokens": 12, "temperature": 0,
    });
    let r = chat(body, &[]);
    let choice = &r["choices"][0];
    let finish = choice["finish_reason"].as_str().unwrap();
    if finish == "tool_calls" {
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap();
    } else {
        assert!(choice["message"]["content"].is_string(), "{r}");
    }
}

#[test]
fn a_required_or_named_tool_choice_opens_the_call() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
    ]);
    for (choice, stream) in
        [(json!({"type": "function", "function": {"name": "get_weather"}}), false), (json!("required"), true)]
    {
        let body = json!({
            "messages": user("Call get_weather for London."), "tools": tools, "tool_choice": choice,
            "max_tokens": 60, "temperature": 0,
        });
        let calls: Vec<Value> = if stream {
            let mut b = body.clone();
            b["stream"] = json!(true);
            let r = post(shared(), "/v1/chat/completions", &[], &b);
            r.sse()
                .iter()
                .filter(|(_, d)| d.starts_with('{'))
                .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
                .flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned().unwrap_or_default())
                .collect()
        } else {
            let r = chat(body, &[]);
            assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
            r["choices"][0]["message"]["tool_calls"].as_array().cloned().unwrap_or_default()
        };
        assert_eq!(calls.len(), 1, "{choice}: {calls:?}");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args.is_object(), "{args}");
    }
}

#[test]
fn json_mode_replies_with_one_json_object() {
    for stream in [false, true] {
        let body = json!({
            "messages": user("Return JSON with the fields name and age for Alice, 30."),
            "response_format": {"type": "json_object"}, "max_tokens": 120, "temperature": 0, "stream": stream,
        });
        let r = post(shared(), "/v1/chat/completions", &[], &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let (text, finish) = if stream {
            let chunks: Vec<Value> = r
                .sse()
                .iter()
                .filter(|(_, d)| d.starts_with('{'))
                .map(|(_, d)| serde_json::from_str(d).unwrap())
                .collect();
            let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
            let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_string));
            (text, finish.unwrap())
        } else {
            let v = r.json();
            (
                v["choices"][0]["message"]["content"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(finish, "stop", "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v.is_object(), "{text}");
    }
}

#[test]
fn json_object_format_is_accepted_when_json_is_asked_for() {
    let body = json!({"messages": user("Reply in JSON."), "max_tokens": 4, "response_format": {"type": "json_object"}});
    chat(body, &[]);
}

#[test]
fn completions_use_the_raw_prompt() {
    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let r = post(shared(), "/v1/completions", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text:?}");

    let mut s = body;
    s["stream"] = json!(true);
    let r = post(shared(), "/v1/completions", &[], &s);
    let events = r.sse();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
}

#[test]
fn models_lists_the_loaded_model() {
    let r = get(shared(), "/v1/models");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "test-model");
    assert_eq!(v["data"][0]["context_length"], 8192);
}

#[test]
fn models_retrieve_by_name_or_default() {
    for id in ["test-model", "default"] {
        let r = get(shared(), &format!("/v1/models/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["id"], "test-model");
    }
    let r = get(shared(), "/v1/models/gpt-4o");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("gpt-4o"));
}

#[test]
fn completions_default_to_16_tokens() {
    let body = json!({"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true});
    let r = post(shared(), "/v1/completions", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 16);
}

#[test]
fn logit_bias_and_penalties_reach_the_sampler() {
    let text = |extra: Value| {
        let mut body = json!({"prompt": "The sky is", "temperature": 0, "ignore_eos": true, "max_tokens": 3});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = post(shared(), "/v1/completions", &[], &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    // A +100 bias makes one token win every step.
    let one = text(json!({"logit_bias": {"1234": 100}, "max_tokens": 1}));
    assert_eq!(text(json!({"logit_bias": {"1234": 100}})), one.repeat(3));
    // With the presence penalty at its maximum against that bias, the
    // token still wins (100 - 2), so the output is the same.
    assert_eq!(text(json!({"logit_bias": {"1234": 100}, "presence_penalty": 2})), one.repeat(3));
    // Pushing that token down instead keeps it out of the reply.
    let down = text(json!({"logit_bias": {"1234": -100}, "max_tokens": 1}));
    assert_ne!(down, one);
}

#[test]
fn ignore_eos_generates_exactly_max_tokens() {
    let q = user("What is 2 + 2?");
    let natural = chat(json!({"messages": q, "max_tokens": 40, "temperature": 0}), &[]);
    let natural_n = natural["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(natural_n < 40, "the model stops early on its own: {natural}");
    let forced =
        chat(json!({"messages": q, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "logprobs": true}), &[]);
    assert_eq!(forced["usage"]["completion_tokens"], 40);
    assert_eq!(forced["choices"][0]["finish_reason"], "length");
    // EOS is masked, not just ignored: the same greedy answer, then more
    // text where the model would have ended (no empty end-of-turn tokens).
    let (a, b) = (
        natural["choices"][0]["message"]["content"].as_str().unwrap(),
        forced["choices"][0]["message"]["content"].as_str().unwrap(),
    );
    assert!(b.starts_with(a) && b.len() > a.len() + 20, "{a:?} then {b:?}");
    let tokens = forced["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(tokens.len(), 40);
    assert!(tokens.iter().all(|t| !t["token"].as_str().unwrap().contains("<|im_end|>")), "{tokens:?}");
}

#[test]
fn greedy_logprobs_are_real_log_probabilities() {
    let body = json!({"messages": user("Hi"), "max_tokens": 5, "temperature": 0, "logprobs": true});
    let r = chat(body, &[]);
    let lp = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!lp.is_empty());
    assert!(lp.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0));
    assert!(lp.iter().any(|t| t["logprob"].as_f64().unwrap() < -1e-4), "not all 0.0: {lp:?}");
}
