//! Tuning aid: `cargo run --release -p semantic-bench --example agent_ratio -- URL MODEL [REPS] [GEN] [PROMPT]`
//! runs the batching throughput sweep (1, 3, 5, 8 agents, interleaved
//! repetitions) against a running server and prints each count's median
//! aggregate and its speedup over one agent.

use semantic_bench::batching;
use semantic_bench::client::Client;
use semantic_bench::context::{Ctx, Target};
use semantic_bench::model::ModelInfo;
use semantic_bench::{Plan, StderrProgress};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let model = ModelInfo::open(args[2].as_ref()).expect("model");
    let mut plan = Plan::new(false);
    (plan.batch_reps, plan.batch_gen) = (arg(3, 3), arg(4, 200));
    let client = Client::new(&args[1]);
    let target = Target { name: "target".into(), client, has_agents_api: true };
    let (mut progress, mut seeds) = (StderrProgress::default(), 1_000_000u64);
    let mut ctx = Ctx { model: &model, plan: &plan, progress: &mut progress, seeds: &mut seeds };
    batching::warm_up(&mut ctx, &target).expect("warm-up");
    let recs = batching::throughput_sweep(&mut ctx, &target, &[1, 3, 5, 8], arg(5, 128)).expect("sweep");
    let one = recs[0].get("aggregate_tok_s").unwrap_or(f64::NAN);
    for r in &recs {
        let agg = r.get("aggregate_tok_s").unwrap_or(f64::NAN);
        let (ttft, itl) = (r.get("ttft_ms").unwrap_or(f64::NAN), r.get("itl_p50_ms").unwrap_or(f64::NAN));
        let agents = r.param_u64("agents").unwrap_or(0);
        println!("{agents} agents: {agg:.0} tok/s  x{:.2}  ttft {ttft:.0} ms  itl p50 {itl:.2} ms", agg / one);
    }
}
