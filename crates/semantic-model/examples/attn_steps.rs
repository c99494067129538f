//! Profiling aid: `cargo run --release --example attn_steps -p semantic-model -- B CTX REPS [HOT]`
//! times decode attention alone (SmolLM2-135M shapes: 30 layers, 9 heads,
//! 3 kv heads, head_dim 64) for B sequences at CTX tokens, over all layers
//! (or layer 0 only with HOT=1, so K/V stays in cache). With HOT=2, each
//! layer first reads 3 MiB of a 96 MiB buffer, as a decode step streams its
//! weights between attention calls (the time of those reads alone is
//! subtracted).

use semantic_kv::{BlockTable, KvLayout, KvPool};
use semantic_model::kernels::attention::{paged_attention, AttnSeq, AttnShape};
use semantic_model::kernels::team::{for_each, Team};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (b, ctx, reps, hot, nthreads) = (arg(1, 5), arg(2, 228), arg(3, 200), arg(4, 0), arg(5, 2));
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
    let threads = Team::new(nthreads).unwrap();
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| AttnSeq { block_table: t.blocks(), start_pos: ctx - 1, n_new: 1, first_row: i })
        .collect();
    let weights: Vec<u64> = (0..96u64 << 17).collect();
    let slice = (3 << 20) / 8;
    let at = std::sync::atomic::AtomicUsize::new(0);
    let sink = std::sync::atomic::AtomicU64::new(0);
    let stream = |on: bool| {
        if on {
            let a = at.load(std::sync::atomic::Ordering::Relaxed);
            sink.fetch_xor(
                weights[a..a + slice].iter().fold(0u64, |a, &b| a ^ b),
                std::sync::atomic::Ordering::Relaxed,
            );
            at.store((a + slice) % (weights.len() - slice), std::sync::atomic::Ordering::Relaxed);
        }
    };
    threads.install(|| {
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            for _layer in 0..30 {
                stream(hot == 2);
            }
        }
        let flush = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            for layer in 0..30 {
                stream(hot == 2);
                if hot == 3 {
                    for_each(b * 3, |i| {
                        let mut acc = 0u64;
                        for &blk in tables[i / 3].blocks() {
                            for kv in 0..2 {
                                let run = pool.run(blk, layer, kv, i % 3);
                                let w: &[u64] =
                                    unsafe { std::slice::from_raw_parts(run.as_ptr() as *const u64, run.len() / 4) };
                                acc ^= w.iter().fold(0u64, |a, &v| a.wrapping_add(v));
                            }
                        }
                        sink.fetch_xor(acc, std::sync::atomic::Ordering::Relaxed);
                    });
                } else {
                    paged_attention(&q, &mut out, &pool, if hot == 1 { 0 } else { layer }, &seqs, shape);
                }
            }
        }
        let dt = (t0.elapsed().as_secs_f64() - flush) / reps as f64;
        let bytes = (b * ctx * 30 * 3 * 256) as f64;
        println!(
            "B={b} ctx={ctx} hot={hot}: {:.3} ms per 30 layers, {:.1} GB/s of K/V (sink {})",
            dt * 1e3,
            bytes / dt / 1e9,
            sink.load(std::sync::atomic::Ordering::Relaxed) % 2
        );
    });
}
