//! Paged K/V storage in f16 and the block tables that index it.
//!
//! One block holds `block_size` token slots of K and V for every layer:
//!
//! ```text
//! block b: [layer 0: K[head 0: slot 0..bs][head 1 ..] V[head 0 ..] ..] [layer 1 ..] ..
//!          each (layer, K|V, head) run is `block_size * head_dim` contiguous f16,
//!          so attention streams one head's keys of one block without gathers.
//! ```
//!
//! The storage is one zeroed allocation; untouched pages cost no RSS.

use half::f16;
use semantic_core::BlockId;

use crate::{BlockPool, PoolError};

/// Shape of the KV cache of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl KvLayout {
    /// f16 elements of one (layer, K|V, head) run of a block.
    pub fn run_elems(&self) -> usize {
        self.block_size * self.head_dim
    }

    pub fn block_elems(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.run_elems()
    }

    pub fn block_bytes(&self) -> usize {
        self.block_elems() * 2
    }

    /// Bytes of K and V of one token over all layers (the theory figure).
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim * 2
    }

    pub fn blocks_for(&self, n_tokens: usize) -> usize {
        n_tokens.div_ceil(self.block_size)
    }
}

/// The block ids of one sequence, in position order. A table must be handed
/// back with [`KvPool::free_table`]; dropping a non-empty table is a leak and
/// panics in debug builds.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        if !self.blocks.is_empty() && !std::thread::panicking() {
            debug_assert!(false, "BlockTable with {} blocks leaked", self.blocks.len());
        }
    }
}

pub struct KvPool {
    layout: KvLayout,
    blocks: BlockPool,
    data: Vec<f16>,
}

impl KvPool {
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        Self {
            layout,
            blocks: BlockPool::new(n_blocks),
            data: vec![f16::ZERO; n_blocks * layout.block_elems()],
        }
    }

    /// A pool of at most `bytes` bytes of K/V.
    pub fn with_budget(layout: KvLayout, bytes: usize) -> Self {
        Self::new(layout, bytes / layout.block_bytes())
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn blocks(&self) -> &BlockPool {
        &self.blocks
    }

    pub fn n_free(&self) -> usize {
        self.blocks.n_free()
    }

    pub fn bytes_in_use(&self) -> usize {
        self.blocks.n_used() * self.layout.block_bytes()
    }

    pub fn capacity_bytes(&self) -> usize {
        self.blocks.n_blocks() * self.layout.block_bytes()
    }

    /// Grows `table` so it covers `n_tokens` slots. All or nothing: on `false`
    /// the table is unchanged.
    pub fn ensure_capacity(&mut self, table: &mut BlockTable, n_tokens: usize) -> bool {
        let need = self.layout.blocks_for(n_tokens).saturating_sub(table.len());
        match self.blocks.allocate_many(need) {
            Some(new) => {
                table.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    /// Returns every block of the table to the pool.
    pub fn free_table(&mut self, mut table: BlockTable) -> Result<(), PoolError> {
        for b in std::mem::take(&mut table.blocks) {
            self.blocks.release(b)?;
        }
        Ok(())
    }

    fn run_offset(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> usize {
        let l = &self.layout;
        block.index() * l.block_elems() + ((layer * 2 + kv) * l.n_kv_heads + head) * l.run_elems()
    }

    /// The `block_size * head_dim` keys (kv = 0) or values (kv = 1) of one head.
    pub fn run(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> &[f16] {
        let off = self.run_offset(block, layer, kv, head);
        &self.data[off..off + self.layout.run_elems()]
    }

    /// Stores K and V (`n_kv_heads * head_dim` f32 each) of the token at
    /// position `pos` of a sequence with block table `table`.
    pub fn write_token(
        &mut self,
        table: &[BlockId],
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let l = self.layout;
        let block = table[pos / l.block_size];
        let slot = pos % l.block_size;
        for (kv, src) in [k, v].into_iter().enumerate() {
            for head in 0..l.n_kv_heads {
                let off = self.run_offset(block, layer, kv, head) + slot * l.head_dim;
                let dst = &mut self.data[off..off + l.head_dim];
                let src = &src[head * l.head_dim..(head + 1) * l.head_dim];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = f16::from_f32(*s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 3,
            head_dim: 4,
            block_size: 2,
        }
    }

    #[test]
    fn sizes_follow_the_layout() {
        let l = layout();
        assert_eq!(l.block_elems(), 2 * 2 * 3 * 2 * 4);
        assert_eq!(l.bytes_per_token() * l.block_size, l.block_bytes());
        let smol = KvLayout {
            n_layers: 30,
            n_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
        };
        assert_eq!(smol.bytes_per_token(), 23_040);
    }

    #[test]
    fn tables_grow_all_or_nothing_and_return_blocks() {
        let mut pool = KvPool::new(layout(), 3);
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, 3));
        assert_eq!(t.len(), 2);
        assert!(
            !pool.ensure_capacity(&mut t, 7),
            "needs 2 more, only 1 free"
        );
        assert_eq!(t.len(), 2);
        assert_eq!(pool.bytes_in_use(), 2 * layout().block_bytes());
        pool.free_table(t).unwrap();
        assert_eq!(pool.n_free(), 3);
    }

    #[test]
    fn written_tokens_land_in_their_slot() {
        let mut pool = KvPool::new(layout(), 2);
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, 4));
        let k: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
        pool.write_token(t.blocks(), 1, 3, &k, &v);
        let run = pool.run(t.blocks()[1], 1, 0, 2);
        assert_eq!(&run[4..8], &[8.0, 9.0, 10.0, 11.0].map(f16::from_f32));
        let run = pool.run(t.blocks()[1], 1, 1, 0);
        assert_eq!(&run[4..8], &[0.0, -1.0, -2.0, -3.0].map(f16::from_f32));
        pool.free_table(t).unwrap();
    }
}
