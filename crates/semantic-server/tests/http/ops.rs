//! Health, metrics, the agents API, auth, overload, disconnects, shutdown.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use semantic_server::ServerConfig;
use serde_json::{json, Value};

use crate::client::*;

fn chat_body(text: &str, max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn health_and_request_ids() {
    let a = get(shared(), "/health/live");
    assert_eq!(a.status, 200);
    let b = get(shared(), "/health/ready");
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.json()["status"], "ok");
    let (ida, idb) = (a.header("x-request-id").unwrap(), b.header("x-request-id").unwrap());
    assert!(ida.starts_with("req-") && ida != idb);
}

#[test]
fn without_a_model_only_liveness_answers() {
    let s = TestServer::start(ServerConfig::default(), None);
    assert_eq!(get(s.addr, "/health/live").status, 200);
    let r = get(s.addr, "/health/ready");
    assert_eq!(r.status, 503);
    assert!(r.json()["reason"].as_str().unwrap().contains("loading"));
    let r = post(s.addr, "/v1/chat/completions", &[], &chat_body("hi", 2));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "unavailable");
    let r =
        post(s.addr, "/v1/messages", &[], &json!({"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["type"], "error");
    s.stop();
    s.join().unwrap();
}

#[test]
fn metrics_expose_requests_latencies_tokens_and_pool() {
    let r = post(shared(), "/v1/chat/completions", &[], &chat_body("Hi", 3));
    assert_eq!(r.status, 200);
    let m = get(shared(), "/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let t = m.text();
    for needle in [
        "semantic_http_requests_total{route=\"/v1/chat/completions\",method=\"POST\",status=\"200\"}",
        "semantic_time_to_first_token_seconds_bucket",
        "semantic_inter_token_latency_seconds_bucket",
        "semantic_e2e_request_latency_seconds_bucket",
        "semantic_prompt_tokens_total",
        "semantic_generated_tokens_total",
        "semantic_cached_prompt_tokens_total{tier=\"hot\"}",
        "semantic_kv_pool_blocks{state=\"free\"}",
        "semantic_kv_pool_blocks{state=\"used\"}",
        "semantic_agents{tier=\"hot\"}",
    ] {
        assert!(t.contains(needle), "missing {needle} in:\n{t}");
    }
}

#[test]
fn agents_api_lists_inspects_and_deletes() {
    let h = [("X-Agent-ID", "agents-api-1")];
    let r = post(shared(), "/v1/chat/completions", &h, &chat_body("Hi", 2));
    assert_eq!(r.status, 200);
    let list = get(shared(), "/v1/agents").json();
    let me = list["data"].as_array().unwrap().iter().find(|a| a["id"] == "agents-api-1").cloned();
    let me = me.expect("agent listed");
    assert_eq!(me["tier"], "hot");
    assert!(me["tokens"].as_u64().unwrap() > 0 && me["bytes"].as_u64().unwrap() > 0);
    assert_eq!(me["pinned"], false);
    let one = get(shared(), "/v1/agents/agents-api-1");
    assert_eq!(one.status, 200);
    assert!(one.json().as_object().unwrap().contains_key("last_load_ms"));

    let r = request(shared(), "DELETE", "/v1/agents/agents-api-1?evict_only=true", &[], b"");
    assert_eq!(r.status, 501, "{}", r.text());
    let r = request(shared(), "DELETE", "/v1/agents/agents-api-1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(get(shared(), "/v1/agents/agents-api-1").status, 404);
    assert_eq!(request(shared(), "DELETE", "/v1/agents/agents-api-1", &[], b"").status, 404);

    let r = get(shared(), "/v1/agents/bad%20id");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "id");
    for op in ["pin", "unpin"] {
        let r = request(shared(), "POST", &format!("/v1/agents/agents-api-1/{op}"), &[], b"");
        assert_eq!(r.status, 501, "{}", r.text());
    }
}

#[test]
fn a_body_that_stops_arriving_is_cut_off() {
    use std::io::{Read, Write};
    let cfg = ServerConfig { body_deadline: std::time::Duration::from_millis(300), ..ServerConfig::default() };
    let s = TestServer::start(cfg, None);
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(b"{\"messages\": [").unwrap();
    let mut reply = [0u8; 512];
    let n = c.read(&mut reply).expect("an answer before the client's own timeout");
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    s.stop();
}

#[test]
fn api_and_admin_keys_are_enforced_in_each_dialect() {
    let cfg = ServerConfig {
        api_key: Some("user-key".into()),
        admin_key: Some("admin-key".into()),
        ..ServerConfig::default()
    };
    let s = TestServer::start(cfg, Some(load_runtime(small_engine())));
    let r = get(s.addr, "/v1/models");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = request(s.addr, "GET", "/v1/models", &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(r.status, 401);
    assert_eq!(request(s.addr, "GET", "/v1/models", &[("Authorization", "Bearer user-key")], b"").status, 200);
    assert_eq!(request(s.addr, "GET", "/v1/models", &[("x-api-key", "user-key")], b"").status, 200);
    assert_eq!(request(s.addr, "GET", "/v1/models", &[("x-api-key", "admin-key")], b"").status, 200);
    let body = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let r = post(s.addr, "/v1/messages", &[], &body);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = post(s.addr, "/v1/messages", &[("x-api-key", "user-key")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Mutations need the admin key.
    let r = request(s.addr, "DELETE", "/v1/agents/someone", &[("x-api-key", "user-key")], b"");
    assert_eq!(r.status, 403);
    let r = request(s.addr, "DELETE", "/v1/agents/someone", &[], b"");
    assert_eq!(r.status, 401);
    let r = request(s.addr, "DELETE", "/v1/agents/someone", &[("x-api-key", "admin-key")], b"");
    assert_eq!(r.status, 404, "{}", r.text());
    // Health and metrics stay open.
    assert_eq!(get(s.addr, "/health/ready").status, 200);
    assert_eq!(get(s.addr, "/metrics").status, 200);
    s.stop();
    s.join().unwrap();
}

#[test]
fn a_full_queue_is_503_with_retry_after() {
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(overloaded_engine())));
    let r = post(s.addr, "/v1/chat/completions", &[], &chat_body("hi", 2));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "overloaded");
    let r =
        post(s.addr, "/v1/messages", &[], &json!({"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    s.stop();
    s.join().unwrap();
}

/// Running sequences according to /health/ready.
fn running(addr: std::net::SocketAddr) -> u64 {
    get(addr, "/health/ready").json()["running"].as_u64().unwrap()
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(small_engine())));
    let mut body = chat_body("Write a very long story about the sea.", 4000);
    body["stream"] = json!(true);
    let conn = send(s.addr, "POST", "/v1/chat/completions", &[], body.to_string().as_bytes());
    let mut r = BufReader::new(conn);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    let mut line = String::new();
    while !line.contains("\"content\":\"") || line.contains("\"content\":\"\"") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    assert_eq!(running(s.addr), 1);
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(s.addr) != 0 {
        assert!(Instant::now() < deadline, "the sequence still runs after the client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = get(s.addr, "/metrics").text();
    assert!(m.lines().any(|l| l.contains("reason=\"cancelled\"") && l.contains("api=\"openai_chat\"")), "{m}");
    s.stop();
    s.join().unwrap();
}

#[test]
fn shutdown_lets_in_flight_streams_finish_then_stops() {
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(small_engine())));
    let mut body = chat_body("Write a story.", 60);
    body["stream"] = json!(true);
    // The request is in flight (headers received) before the signal.
    let conn = send(s.addr, "POST", "/v1/chat/completions", &[], body.to_string().as_bytes());
    let mut r = BufReader::new(conn);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    s.stop();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "stream cut short: {rest}");
    s.join().expect("serve returns Ok");
    assert!(std::net::TcpStream::connect(s.addr).is_err(), "still accepting");
}

#[test]
fn without_max_tokens_a_small_pool_still_answers() {
    // 8 MiB holds ~350 tokens: the default max_tokens must fit the pool, not the context.
    let engine = semantic_engine::EngineConfig { kv_pool_bytes: 8 << 20, ..small_engine() };
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(engine)));
    let body = json!({"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0});
    let r = post(s.addr, "/v1/chat/completions", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let explicit = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4000});
    let r = post(s.addr, "/v1/chat/completions", &[], &explicit);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("--kv-pool-mb"));
    s.stop();
    s.join().unwrap();
}
