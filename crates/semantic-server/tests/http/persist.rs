//! The disk tier through HTTP: restarts, eviction, pinning.

use semantic_server::ServerConfig;
use serde_json::{json, Value};

use crate::client::*;

fn turn(addr: std::net::SocketAddr, agent: &str, messages: Value) -> Value {
    let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0});
    let r = post(addr, "/v1/chat/completions", &[("X-Session-ID", agent)], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn an_agent_resumes_from_disk_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first_msgs = json!([{"role": "user", "content": "Name a planet."}]);
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(persistent_engine(dir.path()))));
    let a = turn(s.addr, "restart-agent", first_msgs.clone());
    let reply = a["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let prompt1 = a["usage"]["prompt_tokens"].as_u64().unwrap();
    // Graceful shutdown flushes dirty caches.
    s.stop();
    s.join().unwrap();

    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(persistent_engine(dir.path()))));
    let agent = get(s.addr, "/v1/agents/restart-agent");
    assert_eq!(agent.status, 200, "{}", agent.text());
    assert_eq!(agent.json()["tier"], "warm");
    let second = json!([
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Another one?"},
    ]);
    let b = turn(s.addr, "restart-agent", second);
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached >= prompt1 - 1, "cached {cached} after restart, first prompt {prompt1}: {b}");
    let m = get(s.addr, "/metrics").text();
    assert!(m.contains("semantic_cached_prompt_tokens_total{tier=\"disk\"}"), "{m}");
    assert!(m.contains("semantic_cache_io_seconds") && m.contains("op=\"load\""), "load timings: {m}");
    s.stop();
    s.join().unwrap();
}

#[test]
fn agents_can_be_pinned_unpinned_and_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(ServerConfig::default(), Some(load_runtime(persistent_engine(dir.path()))));
    turn(s.addr, "pin-agent", json!([{"role": "user", "content": "Hi"}]));
    let r = request(s.addr, "POST", "/v1/agents/pin-agent/pin", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(s.addr, "/v1/agents/pin-agent").json()["pinned"], true);
    let r = request(s.addr, "POST", "/v1/agents/pin-agent/unpin", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(s.addr, "/v1/agents/pin-agent").json()["pinned"], false);
    assert_eq!(request(s.addr, "POST", "/v1/agents/nobody/pin", &[], b"").status, 404);

    let r = request(s.addr, "DELETE", "/v1/agents/pin-agent?evict_only=true", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    // The engine writes the file in the background; until it lands the agent
    // is neither hot nor listed as warm (see the report to the engine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let after = get(s.addr, "/v1/agents/pin-agent");
        if after.status == 200 {
            assert_eq!(after.json()["tier"], "warm", "evict_only keeps the disk copy only");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "evicted agent never listed as warm: {}", after.text());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let r = request(s.addr, "DELETE", "/v1/agents/pin-agent", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(s.addr, "/v1/agents/pin-agent").status, 404);
    s.stop();
    s.join().unwrap();
}
