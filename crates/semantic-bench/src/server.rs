//! Starting a server for a benchmark: the real `semantic` binary (or
//! llama.cpp's `llama-server`) on a free port, killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;

pub struct ServerProcess {
    child: Child,
    pub url: String,
    pub pid: u32,
}

/// A port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ServerProcess {
    /// Spawns `cmd` (which must listen on `port`) and waits until
    /// `ready_path` answers 200.
    pub fn start(mut cmd: Command, port: u16, ready_path: &str, timeout: Duration) -> std::io::Result<Self> {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut me = Self { pid: child.id(), child, url };
        let client = Client::new(&me.url);
        let deadline = Instant::now() + timeout;
        loop {
            if client.get_json(ready_path).is_ok() {
                return Ok(me);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(std::io::Error::other(format!("server exited early: {status}")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("server did not become ready"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resident memory of the server process (MiB), from /proc.
    pub fn rss_mib(&self) -> Option<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kb: f64 = s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
