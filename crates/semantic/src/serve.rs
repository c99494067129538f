//! `semantic serve`: the HTTP server. Every flag has a `SEMANTIC_*`
//! environment variable; a flag given on the command line wins.
//!
//! The port is bound first and answers `/health/live` while the model loads;
//! `/health/ready` turns 200 once the engine runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use semantic_engine::{EngineConfig, ModelFingerprint, PersistConfig, SchedulerConfig};
use semantic_server::{AppState, Runtime, ServerConfig};

use crate::UsageError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvCodec {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl From<KvCodec> for semantic_engine::KvCodec {
    fn from(c: KvCodec) -> Self {
        match c {
            KvCodec::F16 => Self::F16,
            KvCodec::Q8_0 => Self::Q8_0,
            KvCodec::Q4_0 => Self::Q4_0,
        }
    }
}

/// Most kernel threads `--threads` accepts.
const MAX_THREADS: usize = 256;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Any llama-family GGUF; default: SmolLM2-135M-Instruct, pulled if missing.
    #[arg(long, env = "SEMANTIC_MODEL")]
    model: Option<PathBuf>,
    #[arg(long, env = "SEMANTIC_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "SEMANTIC_PORT", default_value_t = 8000)]
    port: u16,
    /// Where agent KV caches are kept on disk (default: $SEMANTIC_HOME/kv).
    #[arg(long, env = "SEMANTIC_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// RAM for KV blocks (the hot tier), in MiB.
    #[arg(long, env = "SEMANTIC_KV_POOL_MB", default_value_t = 1024)]
    kv_pool_mb: usize,
    /// Disk budget for agent caches (the warm tier), in MiB; 0 keeps
    /// caches in RAM only (nothing survives a restart).
    #[arg(long, env = "SEMANTIC_DISK_BUDGET_MB", default_value_t = 10240)]
    disk_budget_mb: u64,
    /// Delete agent cache files unused for this long (`90s`, `30m`, `12h`,
    /// `7d`); pinned agents are kept. Default: keep them.
    #[arg(long, env = "SEMANTIC_CACHE_TTL", value_parser = parse_ttl)]
    cache_ttl: Option<Duration>,
    /// Encoding of KV caches on disk (f16 is lossless).
    #[arg(long, env = "SEMANTIC_KV_CODEC", value_enum, default_value = "f16")]
    kv_codec: KvCodec,
    /// Require this key on /v1/* (`Authorization: Bearer KEY` or `x-api-key`).
    #[arg(long, env = "SEMANTIC_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Require this key for agent mutations (delete, pin, unpin).
    #[arg(long, env = "SEMANTIC_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Tokens per engine step (decodes plus prefill chunks).
    #[arg(long, env = "SEMANTIC_STEP_TOKENS", default_value_t = 512)]
    step_tokens: usize,
    /// A step that carries prefill beside decodes aims at this many times
    /// a decode-only step, so decoding agents keep a smooth inter-token
    /// latency while another agent prefills; 0 turns the cap off (every
    /// step fills `--step-tokens`).
    #[arg(long, env = "SEMANTIC_MIXED_STEP_FACTOR", default_value_t = 2.0, value_parser = parse_factor)]
    mixed_step_factor: f64,
    /// Threads that run the model (1 to 256; default: every core this
    /// process may use).
    #[arg(long, env = "SEMANTIC_THREADS")]
    threads: Option<usize>,
    /// Sequences decoding at once.
    #[arg(long, env = "SEMANTIC_MAX_RUNNING", default_value_t = 16)]
    max_running: usize,
    /// Requests queued before new ones get 503.
    #[arg(long, env = "SEMANTIC_MAX_WAITING", default_value_t = 256)]
    max_waiting: usize,
    /// Request bodies over this size get 413, in MiB.
    #[arg(long, env = "SEMANTIC_BODY_LIMIT_MB", default_value_t = 4)]
    body_limit_mb: usize,
    /// Seconds in-flight requests may run after SIGINT/SIGTERM.
    #[arg(long, env = "SEMANTIC_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
}

impl ServeArgs {
    fn check(&self) -> Result<(), UsageError> {
        let positive = [
            ("--kv-pool-mb", self.kv_pool_mb),
            ("--step-tokens", self.step_tokens),
            ("--max-running", self.max_running),
            ("--max-waiting", self.max_waiting),
            ("--body-limit-mb", self.body_limit_mb),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err(UsageError(format!("`{flag}` must be at least 1")));
            }
        }
        let mib = [
            ("--kv-pool-mb", self.kv_pool_mb as u64),
            ("--disk-budget-mb", self.disk_budget_mb),
            ("--body-limit-mb", self.body_limit_mb as u64),
        ];
        for (flag, v) in mib {
            if v.checked_mul(1 << 20).and_then(|b| usize::try_from(b).ok()).is_none() {
                return Err(UsageError(format!("`{flag}` {v} MiB is more bytes than this machine can address")));
            }
        }
        if let Some(total) = total_memory_mib().filter(|&t| self.kv_pool_mb > t) {
            return Err(UsageError(format!(
                "`--kv-pool-mb` {} is more than this machine's memory ({total} MiB)",
                self.kv_pool_mb
            )));
        }
        if let Some(t) = self.threads.filter(|t| !(1..=MAX_THREADS).contains(t)) {
            return Err(UsageError(format!("`--threads` must be between 1 and {MAX_THREADS}, got {t}")));
        }
        for key in [&self.api_key, &self.admin_key].into_iter().flatten() {
            if key.is_empty() {
                return Err(UsageError("API and admin keys must not be empty".into()));
            }
        }
        Ok(())
    }

    /// The engine settings; `fingerprint` names the model's cache files and
    /// salts its block hashes.
    fn engine_config(&self, cache_dir: PathBuf, fingerprint: ModelFingerprint) -> EngineConfig {
        let persist = (self.disk_budget_mb > 0).then(|| PersistConfig {
            dir: cache_dir,
            fingerprint,
            codec: self.kv_codec.into(),
            disk_budget_bytes: self.disk_budget_mb << 20,
            ttl: self.cache_ttl,
            fail_after_bytes: None,
        });
        EngineConfig {
            hash_salt: u64::from_str_radix(fingerprint.as_str(), 16).unwrap_or(0),
            persist,
            kv_pool_bytes: self.kv_pool_mb << 20,
            mixed_step_factor: self.mixed_step_factor,
            scheduler: SchedulerConfig {
                step_tokens: self.step_tokens,
                max_running: self.max_running,
                max_waiting: self.max_waiting,
            },
            ..EngineConfig::default()
        }
    }

    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            api_key: self.api_key.clone(),
            admin_key: self.admin_key.clone(),
            body_limit: self.body_limit_mb << 20,
            shutdown_grace: Duration::from_secs(self.shutdown_timeout),
            ..ServerConfig::default()
        }
    }
}

/// Physical memory in MiB (`MemTotal` of `/proc/meminfo`; `None` where
/// that cannot be read).
fn total_memory_mib() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb >> 10)
}

/// The cache directory must be one the server can write: created if
/// missing, and a file written and removed in it. Checked before the port
/// is bound, so `--cache-dir /proc/x` is a usage error, not a server that
/// fails every save.
fn check_cache_dir(dir: &Path) -> Result<(), UsageError> {
    let bad =
        |e: std::io::Error| UsageError(format!("`--cache-dir` {} is not a writable directory: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(bad)?;
    let probe = dir.join(format!(".semantic-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(bad)?;
    std::fs::remove_file(&probe).map_err(bad)
}

pub fn run(home: &Path, args: ServeArgs) -> Result<()> {
    init_logging();
    args.check()?;
    if args.disk_budget_mb > 0 {
        check_cache_dir(&args.cache_dir.clone().unwrap_or_else(|| home.join("kv")))?;
    }
    fixed_mmap_threshold();
    // Pull (with its progress bar) before the server starts.
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => crate::pull::ensure_default(home)?,
    };
    // One async worker: the HTTP edge is light, and every core it does not
    // take is a core the kernels' fork-join steps can count on.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("semantic-http")
        .build()
        .context("starting the async runtime")?;
    let res = rt.block_on(serve(home.to_owned(), model_path, args));
    // A model load still running after an early stop must not hold the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    res
}

/// Buffers of 4 MiB and more (cache snapshots, file images) always come
/// from mmap and go back to the system when freed. glibc otherwise raises
/// its mmap threshold to the largest buffer freed so far, and later ones
/// stay in the heap: the leak benchmark saw RSS step up 17 MiB once,
/// mid-run, after many 11 MiB snapshots.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

async fn serve(home: PathBuf, model_path: PathBuf, args: ServeArgs) -> Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(addr = %local, "listening on http://{local}");
    let state = AppState::new(args.server_config());
    let (load_failed, failed) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        tokio::select! {
            () = semantic_server::shutdown_signal() => {}
            _ = failed => {}
        }
    };
    let server = tokio::spawn(semantic_server::serve(listener, state.clone(), shutdown));

    let started = tokio::task::spawn_blocking(move || start_runtime(&home, &model_path, &args))
        .await
        .context("model loading task failed")?;
    let runtime = match started {
        Ok(rt) => rt,
        Err(e) => {
            let _ = load_failed.send(());
            let _ = server.await;
            return Err(e);
        }
    };
    state.set_runtime(runtime);
    let res = server.await.context("server task failed")?;
    // Also covers a shutdown that began while the model was loading.
    semantic_server::stop_engine(&state).await;
    tracing::info!("stopped");
    res.context("serving HTTP")
}

/// Loads the model, fingerprints it and starts the engine (which scans the
/// cache directory for warm agents first).
fn start_runtime(home: &Path, model_path: &Path, args: &ServeArgs) -> Result<Runtime> {
    let m = crate::generate::load_model(home, Some(model_path), args.threads)?;
    let fingerprint =
        ModelFingerprint::of_file(&m.path).with_context(|| format!("fingerprinting {}", m.path.display()))?;
    let cache_dir = args.cache_dir.clone().unwrap_or_else(|| home.join("kv"));
    let cfg = args.engine_config(cache_dir.clone(), fingerprint);
    let name = model_name(&m.path);
    let threads = m.model.threads();
    let runtime = Runtime::start(m.model, m.tokenizer, m.template, name.clone(), cfg)
        .with_context(|| format!("starting the engine (cache dir {})", cache_dir.display()))?;
    tracing::info!(
        model = %name,
        fingerprint = %fingerprint,
        context = runtime.context_length,
        threads,
        kv_pool_mb = args.kv_pool_mb,
        cache_dir = %cache_dir.display(),
        disk_budget_mb = args.disk_budget_mb,
        cache_ttl_s = args.cache_ttl.map(|d| d.as_secs()),
        kv_codec = ?args.kv_codec,
        persistent = runtime.persistent,
        "model loaded; ready"
    );
    Ok(runtime)
}

/// `N` seconds, or `N` with a unit: `s`, `m`, `h`, `d`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("expected a number with an optional unit (s, m, h, d), got {s:?}"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?}; use s, m, h or d")),
    };
    if n == 0 {
        return Err("the TTL must be positive".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// A mixed-step factor: 0 (no cap) or a finite number above 1.
fn parse_factor(s: &str) -> Result<f64, String> {
    let f: f64 = s.trim().parse().map_err(|_| format!("expected a number, got {s:?}"))?;
    if f == 0.0 || (f.is_finite() && f > 1.0) {
        Ok(f)
    } else {
        Err(format!("must be 0 (no cap) or above 1, got {s}"))
    }
}

/// The GGUF file name without `.gguf`: what `/v1/models` lists.
fn model_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".gguf").unwrap_or(n).to_string())
        .unwrap_or_else(|| "model".into())
}

/// Structured logs on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs in files stay plain key=value text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(flags: &[&str]) -> Result<(), String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.serve.check().map_err(|e| e.0)
    }

    #[test]
    fn sizes_and_counts_out_of_range_are_usage_errors() {
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&["--kv-pool-mb", "64", "--max-waiting", "1"]), Ok(()));
        for (flag, v, says) in [
            ("--max-waiting", "0", "`--max-waiting` must be at least 1"),
            ("--step-tokens", "0", "`--step-tokens` must be at least 1"),
            ("--kv-pool-mb", "99999999999999", "`--kv-pool-mb` 99999999999999 MiB is more bytes"),
            ("--disk-budget-mb", "99999999999999999", "`--disk-budget-mb`"),
            ("--body-limit-mb", "99999999999999999", "`--body-limit-mb`"),
        ] {
            let err = check(&[flag, v]).unwrap_err();
            assert!(err.contains(says), "{flag} {v}: {err}");
        }
        if let Some(total) = total_memory_mib() {
            let err = check(&["--kv-pool-mb", &(total + 1).to_string()]).unwrap_err();
            assert!(err.contains("more than this machine's memory"), "{err}");
        }
    }

    #[test]
    fn a_cache_dir_that_cannot_be_written_is_a_usage_error() {
        let ok = std::env::temp_dir().join(format!("semantic-cache-dir-{}", std::process::id()));
        assert_eq!(check_cache_dir(&ok.join("nested")).map_err(|e| e.0), Ok(()));
        let file = ok.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        for bad in [file.clone(), file.join("below"), PathBuf::from("/proc/semantic-nope")] {
            let err = check_cache_dir(&bad).unwrap_err().0;
            assert!(err.contains("`--cache-dir`") && err.contains("not a writable directory"), "{err}");
        }
        std::fs::remove_dir_all(&ok).unwrap();
    }

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("5w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
