//! Many streamed chat completions at once, on one thread.
//!
//! The batching benchmark runs its agents on the machine that runs the
//! server under test. With one blocking client thread per agent, every
//! token woke a thread of its own: at 5 agents, five wake-ups (each a
//! chance to preempt one of the server's compute threads) per model step.
//! Here one thread polls every agent's socket and wakes once for the
//! tokens a server step sends together. Same requests, same timing points
//! (a token counts when its line is read); the requests also reach the
//! server together, so a batch's prompts share its first prefill step.
//! Measured against the thread-per-agent client, same server, interleaved
//! rounds of `agent_ratio`: 3 agents 798-942 -> 867-1009 tok/s in one
//! phase of the host (fast memory, vCPUs in two core complexes), no
//! difference in another (one core complex); the client's CPU time is
//! about the same either way.
//!
//! Plain `http://` only (the benchmark's servers are local); HTTP/1.1 with
//! `Connection: close`, chunked or not.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::client::{ChatCall, ChatTiming, Client, ClientError, StreamTimer};

/// How long a silent stream is waited for.
const IDLE: Duration = Duration::from_secs(900);

/// Where the chunked body's decoder is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    Size,
    Data(usize),
    Crlf,
    End,
}

struct Conn {
    sock: TcpStream,
    /// Received bytes not decoded yet.
    raw: Vec<u8>,
    /// Status and chunked-ness, once the head is in.
    head: Option<(u16, bool)>,
    chunk: Chunk,
    /// Decoded body not yet split into lines.
    text: Vec<u8>,
    timer: Option<StreamTimer>,
    done: Option<Result<ChatTiming, ClientError>>,
}

impl Conn {
    /// Decodes what has arrived; `eof` when the server closed.
    fn feed(&mut self, url: &str, eof: bool) {
        let protocol = |msg: String| ClientError::Protocol { url: url.to_owned(), msg };
        if self.head.is_none() {
            let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                if eof {
                    self.done = Some(Err(protocol("connection closed before the response head".into())));
                }
                return;
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).into_owned();
            self.raw.drain(..end + 4);
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
            let Some(status) = status else {
                self.done = Some(Err(protocol(format!("bad status line: {}", head.lines().next().unwrap_or("")))));
                return;
            };
            let chunked = head.lines().skip(1).any(|l| {
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                k.trim().eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
            });
            self.head = Some((status, chunked));
        }
        let (status, chunked) = self.head.expect("head parsed above");
        if chunked {
            if let Err(msg) = self.dechunk() {
                self.done = Some(Err(protocol(msg)));
                return;
            }
        } else {
            self.text.append(&mut self.raw);
        }
        if status != 200 {
            if eof || self.chunk == Chunk::End {
                let body = String::from_utf8_lossy(&self.text).chars().take(300).collect();
                self.done = Some(Err(ClientError::Status { url: url.to_owned(), status, body }));
            }
            return;
        }
        let mut start = 0;
        while let Some(n) = self.text[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.text[start..start + n]);
            start += n + 1;
            let timer = self.timer.as_mut().expect("a timer until done");
            match timer.line(line.trim_end_matches('\r')) {
                Ok(false) => {}
                Ok(true) => return self.finish(),
                Err(msg) => {
                    self.done = Some(Err(protocol(msg)));
                    return;
                }
            }
        }
        self.text.drain(..start);
        if eof || self.chunk == Chunk::End {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.done = Some(Ok(self.timer.take().expect("finished once").finish()));
    }

    /// Moves the payload of complete chunks from `raw` to `text`.
    fn dechunk(&mut self) -> Result<(), String> {
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            match self.chunk {
                Chunk::End => {
                    at = self.raw.len();
                    break;
                }
                Chunk::Size => {
                    let Some(n) = rest.windows(2).position(|w| w == b"\r\n") else { break };
                    let line = String::from_utf8_lossy(&rest[..n]);
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
                    at += n + 2;
                    self.chunk = if size == 0 { Chunk::End } else { Chunk::Data(size) };
                }
                Chunk::Data(left) => {
                    let take = left.min(rest.len());
                    if take == 0 {
                        break;
                    }
                    self.text.extend_from_slice(&rest[..take]);
                    at += take;
                    self.chunk = if take == left { Chunk::Crlf } else { Chunk::Data(left - take) };
                }
                Chunk::Crlf => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err("chunk not followed by CRLF".into());
                    }
                    at += 2;
                    self.chunk = Chunk::Size;
                }
            }
        }
        self.raw.drain(..at);
        Ok(())
    }
}

/// `host:port` and path prefix of a plain-HTTP base URL.
fn split_base(base: &str) -> Option<(String, String)> {
    let rest = base.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:80") };
    let prefix = if path.is_empty() { String::new() } else { format!("/{}", path.trim_end_matches('/')) };
    Some((host, prefix))
}

impl Client {
    /// Streams every call at once (all sent first, in order) and times
    /// each, on this thread. Results are in the calls' order.
    pub fn chat_all(&self, calls: &[ChatCall]) -> Vec<Result<ChatTiming, ClientError>> {
        let url = format!("{}/v1/chat/completions", self.base());
        let Some((host, prefix)) = split_base(self.base()) else {
            // Not plain HTTP: one blocking client per call.
            return std::thread::scope(|s| {
                let hs: Vec<_> = calls.iter().map(|c| s.spawn(move || self.chat(c))).collect();
                hs.into_iter().map(|h| h.join().expect("client thread")).collect()
            });
        };
        let http = |e: std::io::Error| ClientError::Http { url: url.clone(), msg: e.to_string() };
        let mut conns: Vec<Result<Conn, ClientError>> = calls
            .iter()
            .map(|call| {
                let start = Instant::now();
                let body = serde_json::to_vec(&Client::chat_body(call)).expect("JSON body");
                let mut head = format!(
                    "POST {prefix}/v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                     Accept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                if let Some(s) = &call.session {
                    head.push_str(&format!("X-Session-ID: {s}\r\n"));
                }
                head.push_str("\r\n");
                let mut sock = TcpStream::connect(&host).map_err(http)?;
                sock.set_nodelay(true).map_err(http)?;
                sock.write_all(head.as_bytes()).and_then(|_| sock.write_all(&body)).map_err(http)?;
                sock.set_nonblocking(true).map_err(http)?;
                Ok(Conn {
                    sock,
                    raw: Vec::new(),
                    head: None,
                    chunk: Chunk::Size,
                    text: Vec::new(),
                    timer: Some(StreamTimer::new(start)),
                    done: None,
                })
            })
            .collect();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let open: Vec<usize> =
                (0..conns.len()).filter(|&i| matches!(&conns[i], Ok(c) if c.done.is_none())).collect();
            if open.is_empty() {
                break;
            }
            let mut fds: Vec<libc::pollfd> = open
                .iter()
                .map(|&i| {
                    let fd = conns[i].as_ref().expect("open").sock.as_raw_fd();
                    libc::pollfd { fd, events: libc::POLLIN, revents: 0 }
                })
                .collect();
            // SAFETY: `fds` is a live array of `fds.len()` pollfd entries.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, IDLE.as_millis() as i32) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                for &i in &open {
                    conns[i] = Err(http(std::io::Error::new(e.kind(), e.to_string())));
                }
                break;
            }
            if r == 0 {
                for &i in &open {
                    conns[i] = Err(http(std::io::Error::new(ErrorKind::TimedOut, "no data for 900 s")));
                }
                break;
            }
            for (&i, fd) in open.iter().zip(&fds) {
                if fd.revents == 0 {
                    continue;
                }
                let c = conns[i].as_mut().expect("open");
                let mut eof = false;
                loop {
                    match c.sock.read(&mut buf) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => c.raw.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            c.done = Some(Err(http(e)));
                            break;
                        }
                    }
                }
                if c.done.is_none() {
                    c.feed(&url, eof);
                }
            }
        }
        conns.into_iter().map(|c| c.and_then(|c| c.done.expect("every stream ended"))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn_with(raw: &[u8]) -> (Conn, std::net::TcpListener) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let c = Conn {
            sock,
            raw: raw.to_vec(),
            head: None,
            chunk: Chunk::Size,
            text: Vec::new(),
            timer: Some(StreamTimer::new(Instant::now())),
            done: None,
        };
        (c, l)
    }

    const EVENTS: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":7}}\n\ndata: [DONE]\n\n";

    fn chunked(body: &str, piece: usize) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for p in body.as_bytes().chunks(piece) {
            out.extend_from_slice(format!("{:x};ext=1\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn chunked_streams_decode_fed_byte_by_byte() {
        for piece in [1, 5, 17, 1000] {
            let all = chunked(EVENTS, piece);
            let (mut c, _l) = conn_with(b"");
            let mut fed = 0;
            while c.done.is_none() && fed < all.len() {
                c.raw.push(all[fed]);
                c.feed("u", false);
                fed += 1;
            }
            // Done at the `[DONE]` line: only its blank line and the last chunk are left.
            assert!(all.len() - fed < 32, "piece {piece}: {} bytes left", all.len() - fed);
            let t = c.done.take().expect("done at [DONE]").expect("ok");
            assert_eq!((t.completion_tokens, t.prompt_tokens, t.gaps.len()), (2, 7, 1), "piece {piece}");
        }
    }

    #[test]
    fn plain_bodies_end_at_eof_and_errors_keep_the_status() {
        let (mut c, _l) =
            conn_with(format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{EVENTS}").as_bytes());
        c.feed("u", false);
        assert_eq!(c.done.take().unwrap().unwrap().generated(), 2);

        let (mut c, _l) = conn_with(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10\r\n\r\noverloade");
        c.feed("u", false);
        assert!(c.done.is_none(), "waits for the whole body");
        c.raw.extend_from_slice(b"d");
        c.feed("u", true);
        match c.done.take().unwrap() {
            Err(ClientError::Status { status, body, .. }) => assert_eq!((status, body.as_str()), (503, "overloaded")),
            other => panic!("{other:?}"),
        }

        let (mut c, _l) = conn_with(chunked("data: {\"error\":{\"message\":\"x\"}}\n\n", 8).as_slice());
        c.feed("u", false);
        assert!(matches!(c.done.take().unwrap(), Err(ClientError::Protocol { .. })));

        let (mut c, _l) = conn_with(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        c.feed("u", false);
        assert!(matches!(c.done.take().unwrap(), Err(ClientError::Protocol { .. })));
    }

    #[test]
    fn base_urls_split_into_host_and_prefix() {
        assert_eq!(split_base("http://127.0.0.1:8000"), Some(("127.0.0.1:8000".into(), String::new())));
        assert_eq!(split_base("http://h/api/"), Some(("h:80".into(), "/api".into())));
        assert_eq!(split_base("https://h"), None);
    }
}
