//! Profiling aid: `cargo run --release --example sample_steps -p semantic-model -- MODEL [REPS]`
//! times one token's sampling (µs per call, median of REPS) from the
//! model's real logits after a short prompt, for the samplers clients ask
//! for: greedy, the OpenAI default (temperature 1, top-p 1), top-p 0.9,
//! top-k 40, min-p 0.05.

use semantic_core::{LogitsWanted, SamplingParams, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::{GgufFile, LlamaModel, Sampler};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500);
    let gguf = GgufFile::open(args[1].as_ref()).unwrap();
    let model = LlamaModel::load(&gguf).unwrap();
    let mut pool = KvPool::new(model.kv_layout(16), 8);
    let mut table = BlockTable::default();
    let tokens: Vec<u32> = (0..40u32).map(|i| 100 + i * 37 % 3000).collect();
    assert!(pool.ensure_capacity(&mut table, tokens.len()));
    let seqs = vec![SeqStep { tokens, start_pos: 0, block_table: table.blocks().to_vec(), logits: LogitsWanted::Last }];
    let logits = model.forward(&StepPlan { seqs }, &mut pool).unwrap();
    let base = SamplingParams { temperature: 1.0, seed: Some(1), ..Default::default() };
    let cases = [
        ("greedy", SamplingParams { temperature: 0.0, ..base.clone() }),
        ("temperature 1", base.clone()),
        ("temperature 0.7, top-p 0.9", SamplingParams { temperature: 0.7, top_p: 0.9, ..base.clone() }),
        ("top-k 40", SamplingParams { top_k: 40, ..base.clone() }),
        ("min-p 0.05", SamplingParams { min_p: 0.05, ..base.clone() }),
    ];
    for (name, p) in cases {
        let mut s = Sampler::new(p);
        let mut row = logits.clone();
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                row.copy_from_slice(&logits);
                let t = std::time::Instant::now();
                std::hint::black_box(s.sample(&mut row, &[]));
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!("{name:>28}: {:8.1} us per token (median of {reps})", times[reps / 2]);
    }
}
