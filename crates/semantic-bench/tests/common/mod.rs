//! The shared fixture of a benchmark test binary: one [`Suite`] (so one
//! `semantic serve`, started on first use from `target/release/semantic` or
//! `SEMANTIC_BIN`, on a free port with a temp cache dir). Tests lock it and
//! so run one at a time. Each test merges its records into
//! `SEMANTIC_BENCHMARK_OUTPUT` (default `target/benchmarks/benchmark_results.json`)
//! and rewrites the report next to it.
//!
//! Environment: `SEMANTIC_BENCHMARK_MODEL`, `SEMANTIC_BENCHMARK_QUICK=1`,
//! `SEMANTIC_BENCHMARK_COMPARE_LLAMA=1` (llama-server beside it),
//! `SEMANTIC_BENCHMARK_TARGET=URL` (HTTP-level benchmarks against another server).

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use semantic_bench::report::cell;
use semantic_bench::{Record, StderrProgress, Suite, SuiteConfig};

pub fn suite() -> MutexGuard<'static, Suite> {
    static SUITE: OnceLock<Mutex<Suite>> = OnceLock::new();
    SUITE
        .get_or_init(|| {
            let suite = Suite::new(SuiteConfig::from_env(), Box::new(StderrProgress::default()));
            Mutex::new(suite.unwrap_or_else(|e| panic!("benchmark setup: {e}")))
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Merges the suite's records into the results file and rewrites the report.
pub fn publish(s: &mut Suite) {
    let report = s.publish(true).unwrap_or_else(|e| panic!("writing results: {e}"));
    eprintln!("results: {}\nreport:  {}", s.cfg.output.display(), report.display());
}

/// Prints records as `name server params: metric=median (min–max) unit`.
pub fn show(records: &[Record]) {
    for r in records {
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let values: Vec<String> =
            r.values.iter().map(|m| format!("{}={} {}", m.name, cell(Some(r), &m.name, 2), m.unit)).collect();
        println!("{} [{}] {}: {}", r.name, r.server, params.join(" "), values.join(", "));
    }
}

/// Every record has the metric, with a positive finite median.
pub fn assert_measured(records: &[Record], metric: &str) {
    assert!(!records.is_empty(), "no records");
    for r in records {
        let v = r.get(metric).unwrap_or_else(|| panic!("{} [{}] {:?} lacks {metric}", r.name, r.server, r.params));
        assert!(v.is_finite() && v > 0.0, "{} {metric} = {v}", r.name);
    }
}

/// The records of one benchmark.
pub fn named(records: &[Record], name: &str) -> Vec<Record> {
    records.iter().filter(|r| r.name == name).cloned().collect()
}
