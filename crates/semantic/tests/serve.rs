//! `semantic serve` as a process: flags and environment, a request, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn serve(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_semantic"));
    c.arg("serve").args(args).env("RUST_LOG", "info");
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// Reads stderr until the "listening on" line; returns the address.
fn listening_addr(child: &mut Child) -> (String, BufReader<std::process::ChildStderr>) {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before listening");
        if let Some(i) = line.find("listening on http://") {
            let addr = line[i + "listening on http://".len()..].split_whitespace().next().unwrap();
            return (addr.to_string(), err);
        }
    }
}

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out)
}

#[test]
fn serves_answers_and_exits_0_on_sigterm() {
    let model = semantic_model::paths::test_model_path();
    let cache = tempfile::tempdir().unwrap();
    // The flag wins over the environment (an unusable port in SEMANTIC_PORT).
    let mut child = serve(
        &["--port", "0", "--kv-pool-mb", "64", "--model", model.to_str().unwrap()],
        &[("SEMANTIC_PORT", "1"), ("SEMANTIC_CACHE_DIR", cache.path().to_str().unwrap())],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (addr, mut err) = listening_addr(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&addr, "GET", "/health/ready", "").0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3}"#;
    let (status, resp) = http(&addr, "POST", "/v1/chat/completions", body);
    assert_eq!(status, 200, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("x-request-id: req-"), "{resp}");

    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let code = child.wait().unwrap();
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    assert!(code.success(), "exit {code:?}; log:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[test]
fn bad_serve_arguments_exit_2() {
    let out = serve(&["--kv-codec", "q5_k"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("q5_k"));

    let out = serve(&["--kv-pool-mb", "0", "--port", "0"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kv-pool-mb"));

    for bad in ["0", "257", "-1", "many"] {
        let flag = format!("--threads={bad}");
        let out = serve(&[&flag, "--port", "0"], &[]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"), "{bad}");
    }

    for bad in ["0.5", "1", "inf", "-2", "fast"] {
        let flag = format!("--mixed-step-factor={bad}");
        let out = serve(&[&flag, "--port", "0"], &[]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--mixed-step-factor"), "{bad}");
    }

    let out = serve(&["--port", "0", "--model", "/nonexistent/model.gguf"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().last().unwrap().contains("/nonexistent/model.gguf"), "{err}");
}
