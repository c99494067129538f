//! Profiling aid: `cargo run --release --example attn_steps -p semantic-model -- B CTX REPS [HOT]`
//! times decode attention alone (SmolLM2-135M shapes: 30 layers, 9 heads,
//! 3 kv heads, head_dim 64) for B sequences at CTX tokens, over all layers
//! (or layer 0 only with HOT=1, so K/V stays in cache).

use semantic_kv::{BlockTable, KvLayout, KvPool};
use semantic_model::kernels::attention::{paged_attention, AttnSeq, AttnShape};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (b, ctx, reps, hot, nthreads) = (arg(1, 5), arg(2, 228), arg(3, 200), arg(4, 0) == 1, arg(5, 2));
    let layout = KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16 };
    let shape = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, scale: 0.125 };
    let mut pool = KvPool::new(layout, b * layout.blocks_for(ctx) + 4);
    let mut seed = 7u64;
    let mut rnd = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut tables = Vec::new();
    for _ in 0..b {
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, ctx));
        for layer in 0..30 {
            for pos in 0..ctx {
                let k: Vec<f32> = (0..192).map(|_| rnd()).collect();
                let v: Vec<f32> = (0..192).map(|_| rnd()).collect();
                pool.write_token(t.blocks(), layer, pos, &k, &v);
            }
        }
        tables.push(t);
    }
    let q: Vec<f32> = (0..b * 576).map(|_| rnd()).collect();
    let mut out = vec![0f32; q.len()];
    let threads = rayon::ThreadPoolBuilder::new().num_threads(nthreads).build().unwrap();
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| AttnSeq { block_table: t.blocks(), start_pos: ctx - 1, n_new: 1, first_row: i })
        .collect();
    threads.install(|| {
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            for layer in 0..30 {
                paged_attention(&q, &mut out, &pool, if hot { 0 } else { layer }, &seqs, shape);
            }
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        let bytes = (b * ctx * 30 * 3 * 256) as f64;
        println!(
            "B={b} ctx={ctx} hot={hot}: {:.3} ms per 30 layers, {:.1} GB/s of K/V",
            dt * 1e3,
            bytes / dt / 1e9
        );
    });
}
