//! Cache save, load and resume at 2K, 4K and 8K tokens for each KV codec,
//! with the server's own save/load timings. The four timing tests share one
//! measurement run (the first test to run pays for it); `codec_fidelity`
//! runs the model in process. Run: `cargo test --release -p semantic-bench
//! --test cache_resume -- --ignored --nocapture`.

mod common;

use common::{assert_measured, named, publish, show, suite};
use semantic_bench::{Group, Record};

fn cache_records(name: &str) -> Vec<Record> {
    let mut s = suite();
    s.resume_outcome().unwrap();
    let recs: Vec<Record> = named(&s.results.records, name).into_iter().filter(|r| r.group == Group::Cache).collect();
    show(&recs);
    publish(&mut s);
    recs
}

fn semantic_only(recs: &[Record]) -> Vec<Record> {
    recs.iter().filter(|r| r.server == "semantic").cloned().collect()
}

#[test]
#[ignore = "benchmark"]
fn cache_save_time_2k_4k_8k_tokens() {
    let recs = semantic_only(&cache_records("cache_save_time"));
    assert_measured(&recs, "save_ms");
    assert_measured(&recs, "file_mib");
    for codec in ["f16", "q8_0", "q4_0"] {
        assert!(recs.iter().any(|r| r.param_str("codec") == Some(codec)), "no {codec} saves");
    }
}

#[test]
#[ignore = "benchmark"]
fn cache_load_time_2k_4k_8k_tokens() {
    let recs = semantic_only(&cache_records("cache_load_time"));
    assert_measured(&recs, "load_ms");
    assert_measured(&recs, "load_ms_after_restart");
}

#[test]
#[ignore = "benchmark"]
fn resume_generation_speed() {
    let recs = semantic_only(&cache_records("resume_generation_speed"));
    assert_measured(&recs, "ttft_warm_disk_ms");
    assert_measured(&recs, "ttft_after_restart_ms");
}

#[test]
#[ignore = "benchmark"]
fn cold_start_vs_cache_resume() {
    let recs = semantic_only(&cache_records("cold_start_vs_cache_resume"));
    assert_measured(&recs, "ttft_cold_ms");
    assert_measured(&recs, "speedup_disk_x");
}

/// Greedy agreement and logit error of q8_0/q4_0 caches against f16. Only
/// the exact properties are asserted: f16 round-trips losslessly, and the
/// lossy codecs stay within their stated K/V error bounds on real K/V.
#[test]
#[ignore = "benchmark"]
fn codec_fidelity() {
    let mut s = suite();
    let recs = s.codec_fidelity().unwrap();
    show(&recs);
    publish(&mut s);
    for codec in ["f16", "q8_0", "q4_0"] {
        assert!(recs.iter().any(|r| r.param_str("codec") == Some(codec)), "no {codec} records");
    }
    for r in &recs {
        let bound = r.get("kv_worst_err_over_bound").unwrap_or(f64::INFINITY);
        assert!(bound <= 1.0, "{:?}: K/V error {bound} x the stated bound", r.params);
        if r.param_str("codec") == Some("f16") {
            assert_eq!((r.get("token_agreement"), r.get("first_max_abs_dlogit")), (Some(1.0), Some(0.0)), "{r:?}");
        }
    }
}
