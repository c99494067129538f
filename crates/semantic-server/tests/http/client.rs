//! A minimal blocking HTTP/1.1 client (one request per connection) and the
//! test servers: the real router on 127.0.0.1:0 with the real default model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use semantic_engine::{EngineConfig, KvCodec, ModelFingerprint, PersistConfig, SchedulerConfig};
use semantic_model::{ChatTemplate, GgufFile, LlamaModel, Tokenizer};
use semantic_server::{AppState, Runtime, ServerConfig};
use serde_json::Value;

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// `(event name, data)` of an SSE body; the name is "" for plain `data:`.
    pub fn sse(&self) -> Vec<(String, String)> {
        let text = self.text();
        text.split("\n\n")
            .filter(|b| !b.trim().is_empty())
            .map(|block| {
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                (name, data)
            })
            .collect()
    }
}

/// Writes one request (with `Connection: close`).
pub fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before it has read everything.
    let _ = s.write_all(body);
    s
}

/// Reads status and headers of a response.
pub fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header line");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let s = send(addr, method, path, headers, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).unwrap();
    let body = if chunked { dechunk(&raw) } else { raw };
    Resp { status, headers, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..i])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .expect("chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[i + 2..i + 2 + size]);
        raw = &raw[i + 2 + size + 2..];
    }
}

pub fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
    request(addr, "POST", path, headers, body.to_string().as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

/// A server on its own thread and runtime; shut down by [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

pub fn load_runtime(engine: EngineConfig) -> Runtime {
    let path = semantic_model::paths::test_model_path();
    let gguf = GgufFile::open(&path).expect("open model");
    let model = LlamaModel::load(&gguf).expect("load model");
    let tok = Tokenizer::from_gguf(gguf.content()).expect("tokenizer");
    let template = ChatTemplate::from_gguf(gguf.content(), &tok).expect("template");
    Runtime::start(model, tok, template, "test-model".into(), engine).expect("start engine")
}

/// An engine with a disk tier in `dir` (lossless f16 files).
pub fn persistent_engine(dir: &std::path::Path) -> EngineConfig {
    let path = semantic_model::paths::test_model_path();
    let fingerprint = ModelFingerprint::of_file(&path).expect("fingerprint");
    EngineConfig {
        persist: Some(PersistConfig {
            dir: dir.to_owned(),
            fingerprint,
            codec: KvCodec::F16,
            disk_budget_bytes: 256 << 20,
            ttl: None,
            fail_after_bytes: None,
        }),
        ..small_engine()
    }
}

pub fn small_engine() -> EngineConfig {
    EngineConfig { kv_pool_bytes: 256 << 20, ..EngineConfig::default() }
}

impl TestServer {
    /// `runtime: None` serves without a model (as while it loads).
    pub fn start(config: ServerConfig, runtime: Option<Runtime>) -> TestServer {
        let state = AppState::new(config);
        if let Some(rt) = runtime {
            state.set_runtime(rt);
        }
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(listener.local_addr()?).unwrap();
                semantic_server::serve(listener, state, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx.recv().expect("server address");
        TestServer { addr, stop: Mutex::new(Some(stop_tx)), thread: Mutex::new(Some(thread)) }
    }

    /// Sends the shutdown signal; `join` waits for `serve` to return.
    pub fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    pub fn join(&self) -> std::io::Result<()> {
        let t = self.thread.lock().unwrap().take().expect("joined once");
        t.join().expect("server thread panicked")
    }
}

/// The server most tests share: no keys, the default model.
pub fn shared() -> SocketAddr {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(ServerConfig::default(), Some(load_runtime(small_engine())))).addr
}

/// A server whose queue is always full (every generation is 503).
pub fn overloaded_engine() -> EngineConfig {
    EngineConfig { scheduler: SchedulerConfig { max_waiting: 0, ..SchedulerConfig::default() }, ..small_engine() }
}
