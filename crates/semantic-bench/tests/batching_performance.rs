//! Batching performance: aggregate throughput of 1, 3, 5 (and 8) agents on
//! one model. Run: `cargo test --release -p semantic-bench --test
//! batching_performance -- --ignored --nocapture`.

mod common;

use common::{assert_measured, publish, show, suite};

fn agents(n: usize) {
    let mut s = suite();
    let prompt = s.plan.batch_prompts[0];
    let r = s.throughput(n, prompt).unwrap();
    show(std::slice::from_ref(&r));
    assert_measured(&[r], "aggregate_tok_s");
    publish(&mut s);
}

#[test]
#[ignore = "benchmark"]
fn sequential_1_agent_per_model() {
    agents(1);
}

#[test]
#[ignore = "benchmark"]
fn batched_3_agents_per_model() {
    agents(3);
}

#[test]
#[ignore = "benchmark"]
fn batched_5_agents_per_model() {
    agents(5);
}

/// 1, 3, 5, 8 agents at every prompt length, speedups over 1 agent, and
/// inter-token latency during a 2K prefill (and llama-server with
/// `SEMANTIC_BENCHMARK_COMPARE_LLAMA=1`).
#[test]
#[ignore = "benchmark"]
fn throughput_comparison() {
    let mut s = suite();
    let recs = s.throughput_comparison().unwrap();
    show(&recs);
    let ours: Vec<_> = recs.iter().filter(|r| r.name == "throughput" && r.server == "semantic").cloned().collect();
    assert_measured(&ours, "speedup_vs_1_x");
    assert_measured(&common::named(&recs, "itl_under_prefill"), "itl_p99_ms");
    publish(&mut s);
}
