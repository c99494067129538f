//! Helpers shared by the integration tests.
#![allow(dead_code)]

use half::f16;
use semantic_core::AgentId;
use semantic_kv::{BlockTable, KvLayout, KvPool};
use semantic_store::ModelFingerprint;

pub fn fp() -> ModelFingerprint {
    ModelFingerprint::new("b179c9523d0e6a0f").unwrap()
}

pub fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

pub fn small(block_size: usize) -> KvLayout {
    KvLayout { n_layers: 2, n_kv_heads: 2, head_dim: 8, block_size }
}

pub fn smollm2(block_size: usize) -> KvLayout {
    KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size }
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Roughly normal, times a scale that varies per call site.
    pub fn normal(&mut self) -> f32 {
        let u = |r: &mut Self| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        u(self) + u(self) + u(self) + u(self) - 2.0
    }
}

/// Every (layer, kv, head) of a layout.
pub fn rows(l: &KvLayout) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for layer in 0..l.n_layers {
        for kv in 0..2 {
            for head in 0..l.n_kv_heads {
                v.push((layer, kv, head));
            }
        }
    }
    v
}

/// A pool holding one sequence of `n` positions of K/V-like values (heads
/// of different magnitude, a few outliers). `junk` extra blocks are taken
/// first so the sequence's block ids do not start at 0.
pub fn filled_pool(l: KvLayout, n: usize, seed: u64, junk: usize) -> (KvPool, BlockTable, BlockTable) {
    let mut pool = KvPool::new(l, l.blocks_for(n) + junk + 2);
    let mut skip = BlockTable::default();
    assert!(pool.ensure_capacity(&mut skip, junk * l.block_size));
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, n));
    let mut rng = Rng::new(seed);
    let mut row = vec![f16::ZERO; n * l.head_dim];
    for (layer, kv, head) in rows(&l) {
        let scale = [0.02, 1.0, 6.0, 0.3][(layer + kv + head) % 4];
        for x in row.iter_mut() {
            let outlier = if rng.below(100) == 0 { 10.0 } else { 1.0 };
            *x = f16::from_f32(rng.normal() * scale * outlier);
        }
        pool.import_head_tokens(table.blocks(), layer, kv, head, 0, &row);
    }
    (pool, table, skip)
}

pub fn export(pool: &KvPool, table: &BlockTable, n: usize) -> Vec<Vec<f16>> {
    let l = *pool.layout();
    rows(&l)
        .into_iter()
        .map(|(layer, kv, head)| {
            let mut out = vec![f16::ZERO; n * l.head_dim];
            pool.export_head_tokens(table.blocks(), layer, kv, head, 0..n, &mut out);
            out
        })
        .collect()
}

pub fn bits(rows: &[Vec<f16>]) -> Vec<Vec<u16>> {
    rows.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
}

pub fn tokens(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(49_152) as u32).collect()
}

/// Files in a directory, sorted by name.
pub fn ls(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}
