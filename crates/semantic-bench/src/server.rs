//! Starting a server for a benchmark: the real `semantic` binary or
//! llama.cpp's `llama-server`, on a free port, stopped when dropped.
//!
//! Each server runs under a tiny `sh` watchdog that holds a pipe to us:
//! when our process ends for any reason (also a test binary that exits
//! without running destructors), the pipe closes and the watchdog stops the
//! server (SIGTERM, then SIGKILL after 10 s). The server's own pid is known,
//! for its RSS.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::error::BenchError;

/// Starts `$@` with output to `$1`, prints its pid, waits for stdin to
/// close, then stops it.
const WATCHDOG: &str = r#"log=$1; shift
"$@" >"$log" 2>&1 </dev/null &
p=$!
echo $p
read line
kill $p 2>/dev/null
i=0
while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
kill -9 $p 2>/dev/null
wait $p 2>/dev/null
exit 0"#;

/// How to start a server and how to know it is ready.
#[derive(Clone, Debug)]
pub struct Launch {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub port: u16,
    /// Answers 2xx once the model is loaded.
    pub ready_path: String,
    pub timeout: Duration,
    pub log: PathBuf,
}

pub struct ServerProcess {
    watchdog: Child,
    stdin: Option<ChildStdin>,
    pub url: String,
    pub pid: u32,
    pub name: String,
    pub log: PathBuf,
    /// Spawn to ready.
    pub startup: Duration,
}

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl ServerProcess {
    /// Spawns the server and waits until `ready_path` answers.
    pub fn start(l: &Launch) -> Result<ServerProcess, BenchError> {
        let fail = |msg: String| BenchError::ServerStart { name: l.name.clone(), msg };
        let t0 = Instant::now();
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(&l.log)
            .arg(&l.program)
            .args(&l.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("cannot run sh: {e}")))?;
        let mut line = String::new();
        let stdout = watchdog.stdout.take().expect("piped stdout");
        BufReader::new(stdout.take(64)).read_line(&mut line).map_err(|e| fail(e.to_string()))?;
        let pid: u32 = line.trim().parse().map_err(|_| fail(format!("watchdog printed {line:?}")))?;
        let stdin = watchdog.stdin.take();
        let mut me = ServerProcess {
            watchdog,
            stdin,
            url: format!("http://127.0.0.1:{}", l.port),
            pid,
            name: l.name.clone(),
            log: l.log.clone(),
            startup: Duration::ZERO,
        };
        me.wait_ready(l, t0)
            .map_err(|msg| fail(format!("{msg}; log {}:\n{}", l.log.display(), log_tail(&l.log, 15))))?;
        me.startup = t0.elapsed();
        Ok(me)
    }

    fn wait_ready(&self, l: &Launch, t0: Instant) -> Result<(), String> {
        let client = Client::new(&self.url);
        loop {
            if client.get_json(&l.ready_path).is_ok() {
                return Ok(());
            }
            if !alive(self.pid) {
                return Err("it exited".into());
            }
            if t0.elapsed() > l.timeout {
                return Err(format!("not ready after {} s", l.timeout.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url)
    }

    /// Resident memory of the server process, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(self.pid)
    }

    /// Stops the server (SIGTERM: a graceful shutdown) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stdin.take());
        let _ = self.watchdog.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `VmRSS` of a process.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Settings of a `semantic serve` under test.
#[derive(Clone, Debug)]
pub struct SemanticLaunch {
    pub bin: PathBuf,
    pub model: PathBuf,
    pub cache_dir: PathBuf,
    pub kv_pool_mb: usize,
    pub disk_budget_mb: u64,
    pub kv_codec: String,
    pub log: PathBuf,
}

impl SemanticLaunch {
    pub fn launch(&self, port: u16) -> Launch {
        let args = [
            "serve",
            "--port",
            &port.to_string(),
            "--model",
            &self.model.to_string_lossy(),
            "--cache-dir",
            &self.cache_dir.to_string_lossy(),
            "--kv-pool-mb",
            &self.kv_pool_mb.to_string(),
            "--disk-budget-mb",
            &self.disk_budget_mb.to_string(),
            "--kv-codec",
            &self.kv_codec,
        ]
        .map(String::from)
        .to_vec();
        Launch {
            name: "semantic".into(),
            program: self.bin.clone(),
            args,
            port,
            ready_path: "/health/ready".into(),
            timeout: Duration::from_secs(180),
            log: self.log.clone(),
        }
    }

    pub fn start(&self) -> Result<ServerProcess, BenchError> {
        let port = free_port().map_err(|e| BenchError::io("binding", Path::new("127.0.0.1:0"), e))?;
        ServerProcess::start(&self.launch(port))
    }
}

/// A `semantic serve` that the cache benchmarks stop and start again (other
/// codec, restart from the same cache directory).
pub struct SemanticRunner {
    pub launch: SemanticLaunch,
    pub server: Option<ServerProcess>,
}

impl SemanticRunner {
    pub fn new(launch: SemanticLaunch) -> SemanticRunner {
        SemanticRunner { launch, server: None }
    }

    /// Stops the running server (gracefully: dirty caches are flushed) and
    /// starts one with `codec` on the same cache directory.
    pub fn start(&mut self, codec: &str) -> Result<&ServerProcess, BenchError> {
        self.stop();
        self.launch.kv_codec = codec.to_owned();
        Ok(self.server.insert(self.launch.start()?))
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }

    pub fn running(&self) -> Result<&ServerProcess, BenchError> {
        self.server.as_ref().ok_or_else(|| BenchError::Unexpected("the semantic server is not running".into()))
    }
}

/// Settings of a llama.cpp `llama-server` beside ours.
#[derive(Clone, Debug)]
pub struct LlamaLaunch {
    pub bin: PathBuf,
    pub model: PathBuf,
    /// Parallel slots (`-np`): one per agent.
    pub slots: usize,
    /// Total context (`-c`), split evenly over the slots.
    pub ctx: usize,
    pub threads: usize,
    pub slot_save_path: Option<PathBuf>,
    pub log: PathBuf,
}

impl LlamaLaunch {
    pub fn launch(&self, port: u16) -> Launch {
        let mut args: Vec<String> = vec!["-m".into(), self.model.to_string_lossy().into()];
        for (k, v) in [("-t", self.threads), ("-np", self.slots), ("-c", self.ctx), ("--port", port as usize)] {
            args.extend([k.to_string(), v.to_string()]);
        }
        if let Some(dir) = &self.slot_save_path {
            args.extend(["--slot-save-path".into(), dir.to_string_lossy().into()]);
        }
        Launch {
            name: "llama-server".into(),
            program: self.bin.clone(),
            args,
            port,
            ready_path: "/health".into(),
            timeout: Duration::from_secs(180),
            log: self.log.clone(),
        }
    }

    pub fn start(&self) -> Result<ServerProcess, BenchError> {
        let port = free_port().map_err(|e| BenchError::io("binding", Path::new("127.0.0.1:0"), e))?;
        ServerProcess::start(&self.launch(port))
    }
}

/// llama.cpp's server as `../shared/peers/llama-server.sh` builds it:
/// `$LLAMA_SERVER`, else `~/.cache/semantic-peers/llama.cpp-0.3.36/build/bin/`.
pub fn default_llama_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLAMA_SERVER") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/semantic-peers/llama.cpp-0.3.36/build/bin/llama-server");
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_stops_the_server_when_dropped() {
        let dir = std::env::temp_dir().join(format!("semantic-bench-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port().unwrap();
        // A "server" that never becomes ready: start fails, and the child is gone after.
        let l = Launch {
            name: "sleeper".into(),
            program: "sleep".into(),
            args: vec!["30".into()],
            port,
            ready_path: "/".into(),
            timeout: Duration::from_millis(300),
            log: dir.join("log"),
        };
        let t = Instant::now();
        let err = ServerProcess::start(&l).err().expect("never ready");
        assert!(err.to_string().contains("not ready"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_exiting_server_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("semantic-bench-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = Launch {
            name: "false".into(),
            program: "sh".into(),
            args: vec!["-c".into(), "echo boom; exit 3".into()],
            port: free_port().unwrap(),
            ready_path: "/".into(),
            timeout: Duration::from_secs(20),
            log: dir.join("log"),
        };
        let err = ServerProcess::start(&l).err().expect("exits").to_string();
        assert!(err.contains("exited") && err.contains("boom"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn launch_arguments() {
        let l = LlamaLaunch {
            bin: "llama-server".into(),
            model: "m.gguf".into(),
            slots: 3,
            ctx: 4096,
            threads: 2,
            slot_save_path: Some("/tmp/s".into()),
            log: "log".into(),
        }
        .launch(9000);
        assert_eq!(l.args.join(" "), "-m m.gguf -t 2 -np 3 -c 4096 --port 9000 --slot-save-path /tmp/s");
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
