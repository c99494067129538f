//! `kill -9` of the real server at random moments while it saves agent
//! caches, 20 rounds on one cache directory: no file ever loads wrongly, and
//! after the last restart every agent with a complete file is served warm
//! with the same answer as a cold run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn model() -> String {
    semantic_model::paths::test_model_path().to_string_lossy().into_owned()
}

/// One HTTP/1.1 exchange with `Connection: close`; returns (status, body).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Type: application/json\r\n\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

fn start(dir: &Path, port: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_semantic"))
        .args(["serve", "--port", &port.to_string(), "--kv-pool-mb", "256", "--model", &model(), "--cache-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if http(port, "GET", "/health/ready", &[], "").is_some_and(|(s, _)| s == 200) {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not become ready");
}

fn body(agent: usize) -> String {
    let system = format!("Agent {agent} keeps notes. {}", "Every note is short and exact. ".repeat(40 + 10 * agent));
    serde_json::json!({
        "model": "default",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Write a note about rain."}],
    })
    .to_string()
}

/// (reply text, cached prompt tokens).
fn ask(port: u16, agent: Option<usize>, which: usize) -> (String, u64) {
    let name = agent.map(|a| format!("crash-{a}"));
    let headers: Vec<(&str, &str)> = name.iter().map(|n| ("X-Session-ID", n.as_str())).collect();
    let (status, text) = http(port, "POST", "/v1/chat/completions", &headers, &body(which)).expect("answered");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let reply = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    (reply, v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0))
}

#[test]
fn kill_9_while_saving_never_leaves_a_file_that_loads_wrongly() {
    let dir = std::env::temp_dir().join(format!("semantic-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    // Cold answers, from a server without those agents.
    let mut srv = start(&dir.join("cold"), port);
    let cold: Vec<String> = (0..3).map(|a| ask(port, None, a).0).collect();
    srv.kill().unwrap();
    srv.wait().unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        let mut srv = start(&dir, port);
        let agent = round % 3;
        let (reply, _) = ask(port, Some(agent), agent);
        assert_eq!(reply, cold[agent], "round {round}: agent {agent} answered differently");
        // Die at a random moment of the write-behind (0-120 ms after the reply).
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(x % 120));
        srv.kill().unwrap();
        srv.wait().unwrap();
    }
    let mut srv = start(&dir, port);
    let (status, agents) = http(port, "GET", "/v1/agents", &[], "").unwrap();
    assert_eq!(status, 200);
    for (agent, cold_reply) in cold.iter().enumerate() {
        let (reply, cached) = ask(port, Some(agent), agent);
        assert_eq!(&reply, cold_reply, "agent {agent} after the crashes");
        if agents.contains(&format!("crash-{agent}")) {
            assert!(cached > 0, "agent {agent} has a complete file but was served cold");
        }
    }
    assert!(agents.contains("crash-"), "at least one save completed in 20 rounds: {agents}");
    let quarantined = std::fs::read_dir(dir.join("quarantine")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(quarantined, 0, "an atomic write never leaves a corrupt file");
    srv.kill().unwrap();
    srv.wait().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
