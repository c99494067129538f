//! The whole suite in one run — model load, throughput, cache save, load and
//! resume, memory — into one results file and one Markdown report with
//! charts and verdicts. Run: `cargo test --release -p semantic-bench --test
//! comprehensive -- --ignored --nocapture` (`SEMANTIC_BENCHMARK_QUICK=1` for
//! the short version; the CLI equivalent is `semantic bench all`).

mod common;

use common::{assert_measured, publish, show, suite};
use semantic_bench::Group;

#[test]
#[ignore = "benchmark"]
fn model_load_time() {
    let mut s = suite();
    let recs = s.model_load().unwrap();
    show(&recs);
    assert_measured(&recs, "ready_ms");
    publish(&mut s);
}

#[test]
#[ignore = "benchmark"]
fn comprehensive_suite() {
    let mut s = suite();
    s.run(&[Group::ModelLoad, Group::Batching, Group::Cache, Group::Memory]).unwrap();
    publish(&mut s);
    show(&s.results.records);
    for v in &s.results.verdicts {
        println!(
            "{:<70} {:>10} {:>12}  {}",
            v.criterion,
            v.threshold,
            v.measured.map_or("–".into(), |m| format!("{m:.2}")),
            v.status.label()
        );
    }
    assert!(s.results.verdicts.iter().any(|v| v.measured.is_some()));
}
