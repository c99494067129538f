//! Memory: RSS and KV per agent with 1, 5 and 10 agents, block padding,
//! cache vs model size, measured vs theoretical bytes per token, and a leak
//! check over 50 create/use/delete cycles. Run: `cargo test --release -p
//! semantic-bench --test memory_utilization -- --ignored --nocapture`.

mod common;

use common::{assert_measured, named, publish, show, suite};
use semantic_bench::Record;

fn memory_records(name: &str) -> Vec<Record> {
    let mut s = suite();
    let recs = named(&s.memory_outcome().unwrap(), name);
    show(&recs);
    publish(&mut s);
    recs.into_iter().filter(|r| r.server == "semantic").collect()
}

#[test]
#[ignore = "benchmark"]
fn memory_per_agent_1_5_10_agents() {
    let recs = memory_records("memory_per_agent");
    assert_eq!(recs.iter().filter_map(|r| r.param_u64("agents")).collect::<Vec<_>>(), vec![1, 5, 10]);
    assert_measured(&recs, "kv_per_agent_mib");
    assert_measured(&recs, "rss_mib");
}

#[test]
#[ignore = "benchmark"]
fn block_padding_overhead() {
    let recs = memory_records("block_padding_overhead");
    assert_measured(&recs, "allocated_token_slots");
}

#[test]
#[ignore = "benchmark"]
fn cache_vs_model_memory_ratio() {
    let recs = memory_records("cache_vs_model_memory_ratio");
    assert_measured(&recs, "kv_per_agent_over_model_x");
}

#[test]
#[ignore = "benchmark"]
fn actual_vs_theoretical_memory() {
    let recs = memory_records("actual_vs_theoretical_memory");
    assert_measured(&recs, "theory_bytes_per_token");
    assert_measured(&recs, "pool_bytes_per_token");
}

/// Pool blocks, agents and cache files back to where they were, RSS flat.
#[test]
#[ignore = "benchmark"]
fn leak_check_50_create_use_delete_cycles() {
    let mut s = suite();
    let r = s.leak_check().unwrap();
    show(std::slice::from_ref(&r));
    publish(&mut s);
    assert_eq!(r.param_u64("cycles"), Some(50));
    assert!(r.get("used_blocks_after").is_some() && r.get("rss_growth_mib").is_some());
}
