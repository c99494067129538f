//! Profiling aid: `cargo run --release --example decode_steps -- MODEL B CTX STEPS [CHUNK AT]`
//! runs STEPS batched decode steps of B sequences at CTX tokens of context;
//! with CHUNK, each step also prefills CHUNK tokens of another sequence at
//! position AT (a mixed step, as when an agent prefills beside decodes).
//! With `SEMANTIC_FORWARD_PROFILE=1`, it also prints the time per phase;
//! `THREADS=N` sets the kernel threads (default: every core).

use semantic_core::{LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::{GgufFile, LlamaModel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let gguf = GgufFile::open(args[1].as_ref()).unwrap();
    let model = match std::env::var("THREADS").ok().and_then(|t| t.parse().ok()) {
        Some(n) => LlamaModel::load_with_threads(&gguf, n).unwrap(),
        None => LlamaModel::load(&gguf).unwrap(),
    };
    let (b, ctx, steps, chunk, at) = (arg(2, 5), arg(3, 128), arg(4, 200), arg(5, 0), arg(6, 0));
    let layout = model.kv_layout(16);
    let fresh = std::env::var_os("FRESH").is_some();
    let extra = if fresh { steps * layout.blocks_for(at + chunk) } else { 0 };
    let mut pool = KvPool::new(layout, b * layout.blocks_for(ctx + steps) + layout.blocks_for(at + chunk) + extra);
    let mut tables: Vec<BlockTable> = (0..b).map(|_| BlockTable::default()).collect();
    let mut prefill = BlockTable::default();
    assert!(pool.ensure_capacity(&mut prefill, at + chunk));
    let toks = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| 100 + i * 13 % 4000).collect() };
    if at > 0 {
        let seqs = vec![SeqStep {
            tokens: toks(at),
            start_pos: 0,
            block_table: prefill.blocks().to_vec(),
            logits: LogitsWanted::None,
        }];
        model.forward(&StepPlan { seqs }, &mut pool).unwrap();
    }
    for t in &mut tables {
        assert!(pool.ensure_capacity(t, ctx + steps));
        let toks = toks(ctx);
        let plan = StepPlan {
            seqs: vec![SeqStep {
                tokens: toks,
                start_pos: 0,
                block_table: t.blocks().to_vec(),
                logits: LogitsWanted::None,
            }],
        };
        model.forward(&plan, &mut pool).unwrap();
    }
    semantic_model::llama::forward_profile();
    let t0 = std::time::Instant::now();
    for s in 0..steps {
        let mut seqs: Vec<SeqStep> = tables
            .iter()
            .map(|t| SeqStep {
                tokens: vec![300],
                start_pos: ctx + s,
                block_table: t.blocks().to_vec(),
                logits: LogitsWanted::Last,
            })
            .collect();
        if chunk > 0 {
            if fresh {
                let mut t = BlockTable::default();
                assert!(pool.ensure_capacity(&mut t, at + chunk));
                prefill = t;
            }
            let block_table = prefill.blocks().to_vec();
            seqs.push(SeqStep { tokens: toks(chunk), start_pos: at, block_table, logits: LogitsWanted::None });
        }
        model.forward(&StepPlan { seqs }, &mut pool).unwrap();
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "B={b} ctx={ctx} chunk={chunk}@{at}: {:.2} ms/step, {:.1} tok/s aggregate",
        dt * 1e3 / steps as f64,
        (b * steps) as f64 / dt
    );
    for (name, t) in semantic_model::llama::forward_profile() {
        if !t.is_zero() {
            println!("  {name:>15}: {:.3} ms/step", t.as_secs_f64() * 1e3 / steps as f64);
        }
    }
    pool.free_table(prefill).unwrap();
    for t in tables {
        pool.free_table(t).unwrap();
    }
}
