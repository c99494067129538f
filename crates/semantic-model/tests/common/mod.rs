//! Shared test helpers: locate the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

use semantic_core::{BlockId, LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::{GgufFile, LlamaModel};

/// The real default model (fails, never skips, when absent).
pub fn model_path() -> PathBuf {
    semantic_model::paths::test_model_path()
}

pub fn load() -> (GgufFile, LlamaModel) {
    let g = GgufFile::open(&model_path()).expect("open model");
    let m = LlamaModel::load(&g).expect("load model");
    (g, m)
}

/// Runs `tokens` as one sequence in chunks of `chunk`, returning logits of
/// every position; frees its blocks afterwards.
pub fn logits_in_chunks(model: &LlamaModel, pool: &mut KvPool, tokens: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, tokens.len()));
    let vocab = model.config().vocab_size;
    let mut out = Vec::new();
    for (i, c) in tokens.chunks(chunk).enumerate() {
        let plan = StepPlan {
            seqs: vec![SeqStep {
                tokens: c.to_vec(),
                start_pos: i * chunk,
                block_table: table.blocks().to_vec(),
                logits: LogitsWanted::All,
            }],
        };
        let l = model.forward(&plan, pool).expect("forward");
        out.extend(l.chunks_exact(vocab).map(<[f32]>::to_vec));
    }
    pool.free_table(table).unwrap();
    out
}

pub fn blocks(t: &BlockTable) -> Vec<BlockId> {
    t.blocks().to_vec()
}
