//! Tuning aid: `cargo run --release -p semantic-bench --example agent_ratio -- URL MODEL [REPS] [GEN] [PROMPT]`
//! runs the batching throughput sweep (1, 3, 5, 8 agents, interleaved
//! repetitions) against a running server and prints each count's median
//! aggregate and its speedup over one agent. With `GAPS=1` in the
//! environment it runs the inter-token latency during a 2K prefill instead
//! (REPS repetitions). `NO_AGENTS_API=1` for a server without the agents
//! API (llama.cpp's).

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
    let target = Target { name: "target".into(), client, has_agents_api: std::env::var_os("NO_AGENTS_API").is_none() };
    let (mut progress, mut seeds) = (StderrProgress::default(), 1_000_000u64);
    let mut ctx = Ctx { model: &model, plan: &plan, progress: &mut progress, seeds: &mut seeds };
    batching::warm_up(&mut ctx, &target).expect("warm-up");
    if std::env::var_os("GAPS").is_some() {
        use semantic_bench::client::ChatCall;
        let short = model.prompt(128, 77).expect("prompt");
        let long = model.prompt(2048, 78).expect("prompt");
        let call = |p: &semantic_bench::model::Prompt, n: usize, s: &str| ChatCall {
            session: Some(s.into()),
            system: p.system.clone(),
            user: p.user.clone(),
            max_tokens: n,
            ignore_eos: true,
            ..ChatCall::default()
        };
        let client = &target.client;
        let (t, p0, p1) = std::thread::scope(|sc| {
            let d = sc.spawn(|| client.chat(&call(&short, 1536, "gaps-a")).expect("decoder"));
            std::thread::sleep(std::time::Duration::from_millis(300));
            let p0 = std::time::Instant::now();
            client.chat(&call(&long, 1, "gaps-b")).expect("prefill");
            let p1 = std::time::Instant::now();
            (d.join().expect("join"), p0, p1)
        });
        let at = t.token_instants();
        let mut gaps: Vec<(f64, f64, bool)> = at
            .windows(2)
            .map(|w| {
                let inside = w[1] >= p0 && w[0] <= p1;
                ((w[1] - w[0]).as_secs_f64() * 1e3, w[0].saturating_duration_since(p0).as_secs_f64() * 1e3, inside)
            })
            .collect();
        println!("prefill window {:.0} ms", (p1 - p0).as_secs_f64() * 1e3);
        gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
        for g in gaps.iter().filter(|g| g.2).take(12) {
            println!("gap {:.2} ms at +{:.0} ms", g.0, g.1);
        }
        return;
    }
    if std::env::var_os("ITL").is_some() {
        let r = batching::itl_record(&mut ctx, &target).expect("itl");
        for m in ["itl_p50_alone_ms", "itl_p50_ms", "itl_p99_ms", "p99_over_p50_x"] {
            let v = r.metric(m).expect("metric");
            println!("{m}: median {:.2} of {:?}", v.median, v.samples);
        }
        return;
    }
    let recs = batching::throughput_sweep(&mut ctx, &target, &[1, 3, 5, 8], arg(5, 128)).expect("sweep");
    let one = recs[0].get("aggregate_tok_s").unwrap_or(f64::NAN);
    for r in &recs {
        let agg = r.get("aggregate_tok_s").unwrap_or(f64::NAN);
        let (ttft, itl) = (r.get("ttft_ms").unwrap_or(f64::NAN), r.get("itl_p50_ms").unwrap_or(f64::NAN));
        let agents = r.param_u64("agents").unwrap_or(0);
        println!("{agents} agents: {agg:.0} tok/s  x{:.2}  ttft {ttft:.0} ms  itl p50 {itl:.2} ms", agg / one);
    }
}
