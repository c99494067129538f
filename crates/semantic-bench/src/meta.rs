//! The run's metadata: machine (CPU, cores, RAM, kernel, load), code (git
//! commit), model (path, fingerprint, shape), time.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::ModelInfo;
use crate::results::Metadata;

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (UTC).
pub fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_owned())
}

pub fn ram_bytes() -> u64 {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn load_average() -> Option<[f64; 3]> {
    let s = read("/proc/loadavg");
    let v: Vec<f64> = s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    v.try_into().ok()
}

fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `HEAD` of the repository at `dir`, with `-dirty` when tracked files
/// changed; "unknown" outside a repository.
pub fn git_commit(dir: &Path) -> String {
    let Some(head) = run(Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"])) else {
        return "unknown".into();
    };
    let dirty = run(Command::new("git").arg("-C").arg(dir).args(["status", "--porcelain", "--untracked-files=no"]))
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// The first line of `llama-server --version` that names the version.
pub fn llama_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output();
    let text = out
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .unwrap_or_default();
    let version = text.lines().find(|l| l.starts_with("version")).unwrap_or("version unknown").trim();
    format!("{} ({version})", bin.display())
}

/// Nanoseconds for two threads to pass a cache line there and back (the
/// median of 5 runs of 20000 round trips); `None` on one core. On a 2-vCPU
/// VM this tells where the host put the vCPUs, which moves from minute to
/// minute: seen here 50-130 ns (one core complex) and 400-450 ns (two),
/// and the batching ratios move with it (each fork-join of a decode step
/// costs a few such trips).
pub fn core_round_trip_ns() -> Option<f64> {
    use std::sync::atomic::{AtomicU64, Ordering::*};
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return None;
    }
    const TRIPS: u64 = 20_000;
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let flag = AtomicU64::new(0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..TRIPS {
                        while flag.load(Acquire) != 2 * i + 1 {
                            std::hint::spin_loop();
                        }
                        flag.store(2 * i + 2, Release);
                    }
                });
                let t0 = std::time::Instant::now();
                for i in 0..TRIPS {
                    flag.store(2 * i + 1, Release);
                    while flag.load(Acquire) != 2 * i + 2 {
                        std::hint::spin_loop();
                    }
                }
                t0.elapsed().as_secs_f64() * 1e9 / TRIPS as f64
            })
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    Some(runs[2])
}

pub fn collect(model: &ModelInfo, quick: bool, repo: &Path) -> Metadata {
    let unix = unix_now();
    let kernel = read("/proc/sys/kernel/osrelease");
    Metadata {
        timestamp: rfc3339(unix),
        unix_time: unix,
        quick,
        model_path: model.path.display().to_string(),
        model_fingerprint: model.fingerprint.clone(),
        model_file_bytes: model.file_bytes,
        model_shape: model.shape.clone(),
        kv_bytes_per_token_f16: model.shape.kv_bytes_per_token_f16(),
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ram_bytes: ram_bytes(),
        os: format!("{} {}", std::env::consts::OS, kernel.trim()),
        git_commit: git_commit(repo),
        semantic_version: env!("CARGO_PKG_VERSION").into(),
        load_average_start: load_average(),
        // The end value is measured again by the suite's `finish`.
        core_round_trip_ns: core_round_trip_ns().map(|ns| [ns, ns]),
        ..Metadata::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z");
    }

    #[test]
    fn reads_the_machine() {
        assert!(ram_bytes() > 0);
        assert!(!cpu_model().is_empty());
        assert_eq!(git_commit(Path::new("/")), "unknown");
        if let Some(ns) = core_round_trip_ns() {
            assert!(ns > 0.0 && ns.is_finite(), "{ns}");
        }
        let here = git_commit(Path::new(env!("CARGO_MANIFEST_DIR")));
        assert!(here == "unknown" || here.len() >= 40, "{here}");
    }
}
