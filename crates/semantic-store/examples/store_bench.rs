//! Save/load timings of agent cache files for the SmolLM2-135M layout.
//!
//! ```text
//! cargo run --release -p semantic-store --example store_bench [-- --cold] [--dir D] [--gguf F]
//! ```
//!
//! For 2K, 4K and 8K tokens and each codec: file size, save ms (median of 5,
//! fsyncs included, and the fsync part), load ms into a pool (median of 5,
//! page cache) and, with `--cold` (root, writes /proc/sys/vm/drop_caches),
//! one load after dropping the page cache. `--gguf` also times the model
//! fingerprint. Prints a Markdown table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use half::f16;
use semantic_core::AgentId;
use semantic_kv::{BlockTable, KvLayout, KvPool};
use semantic_store::*;

const RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn filled(l: KvLayout, n: usize) -> (KvPool, BlockTable) {
    let mut pool = KvPool::new(l, l.blocks_for(n));
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, n));
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut row = vec![f16::ZERO; n * l.head_dim];
    for layer in 0..l.n_layers {
        for kv in 0..2 {
            for head in 0..l.n_kv_heads {
                for x in row.iter_mut() {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    *x = f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0);
                }
                pool.import_head_tokens(table.blocks(), layer, kv, head, 0, &row);
            }
        }
    }
    (pool, table)
}

fn drop_caches() -> bool {
    // SAFETY-free: sync first so dirty pages can be dropped too.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    let cold = flag("--cold").is_some();
    let value = |name: &str| flag(name).and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let tmp = tempfile::tempdir_in(value("--dir").unwrap_or_else(std::env::temp_dir)).unwrap();
    let fp = ModelFingerprint::new("b179c9523d0e6a0f").unwrap();

    if let Some(gguf) = value("--gguf") {
        let t = Instant::now();
        let got = ModelFingerprint::of_file(&gguf).unwrap();
        let size = std::fs::metadata(&gguf).unwrap().len();
        println!("fingerprint of {} ({size} B): {got} in {:.1} ms\n", gguf.display(), t.elapsed().as_secs_f64() * 1e3);
    }

    let l = KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16 };
    println!("| tokens | codec | file MiB | save ms (fsync ms) | load ms, page cache | load ms, cold |");
    println!("|---:|---|---:|---:|---:|---:|");
    for n in [2048, 4096, 8192] {
        let (pool, table) = filled(l, n);
        let tokens: Vec<u32> = (0..n as u32).map(|i| i * 7 % 49_152).collect();
        let mut dst = KvPool::new(l, l.blocks_for(n));
        for codec in KvCodec::ALL {
            let agent = AgentId::new(&format!("bench-{n}-{codec}")).unwrap();
            let src = PoolSource::new(&pool, table.blocks());
            let saves: Vec<SaveStats> =
                (0..RUNS).map(|_| write_agent_cache(tmp.path(), &agent, &fp, codec, &tokens, &src).unwrap()).collect();
            let path = saves[0].path.clone();
            let mut load = || {
                let mut t = BlockTable::default();
                let loaded = load_agent_cache(&path, &fp, &mut dst, &mut t).unwrap();
                assert_eq!(loaded.tokens.len(), n);
                dst.free_table(t).unwrap();
                loaded.duration
            };
            let warm = median((0..RUNS).map(|_| load()).collect());
            let cold_ms = if cold && drop_caches() { format!("{:.1}", load().as_secs_f64() * 1e3) } else { "-".into() };
            println!(
                "| {n} | {codec} | {:.1} | {:.1} ({:.1}) | {warm:.1} | {cold_ms} |",
                saves[0].bytes as f64 / (1 << 20) as f64,
                median(saves.iter().map(|s| s.duration).collect()),
                median(saves.iter().map(|s| s.fsync).collect()),
            );
        }
        let _ = table;
    }
}
