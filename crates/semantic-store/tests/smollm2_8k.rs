//! The real SmolLM2-135M layout (30 layers, 3 KV heads x 64) at 8K tokens:
//! 180 MiB of f16 K/V. Asserts exactness; prints the timings (targets: save
//! < 200 ms and load < 100 ms from the page cache) without asserting them.

mod common;

use common::*;
use semantic_kv::{BlockTable, KvPool};
use semantic_store::*;

#[test]
fn smollm2_8k_f16_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let n = 8192;
    let (mut pool, table, skip) = filled_pool(smollm2(16), n, 99, 0);
    let toks = tokens(n, 5);
    let src = PoolSource::new(&pool, table.blocks());
    let mut saves = Vec::new();
    for _ in 0..3 {
        saves.push(write_agent_cache(dir.path(), &agent("smol"), &fp(), KvCodec::F16, &toks, &src).unwrap());
    }
    let stats = saves.last().unwrap();
    assert_eq!(stats.bytes, std::fs::metadata(&stats.path).unwrap().len());
    assert!(stats.bytes as usize >= n * 23_040);

    let mut dst = KvPool::new(smollm2(16), n / 16 + 4);
    let mut loads = Vec::new();
    for _ in 0..3 {
        let mut t = BlockTable::default();
        let loaded = load_agent_cache(&stats.path, &fp(), &mut dst, &mut t).unwrap();
        assert_eq!(loaded.tokens, toks);
        loads.push(loaded.duration);
        if loads.len() == 3 {
            assert!(bits(&export(&dst, &t, n)) == bits(&export(&pool, &table, n)), "8K f16 not bit-exact");
        }
        dst.free_table(t).unwrap();
    }
    let ms = |d: std::time::Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    eprintln!(
        "SmolLM2 8K f16: {:.1} MiB; save {} ms (of which fsync {}) x3; load {} ms x3 (page cache)",
        stats.bytes as f64 / (1 << 20) as f64,
        saves.iter().map(|s| ms(s.duration)).collect::<Vec<_>>().join("/"),
        saves.iter().map(|s| ms(s.fsync)).collect::<Vec<_>>().join("/"),
        loads.iter().map(|d| ms(*d)).collect::<Vec<_>>().join("/"),
    );
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}
