//! Content-addressed full blocks: a chained hash per full block, an index from
//! hash to block, and the copy-on-write rule that keeps shared blocks intact.
//!
//! ```text
//! tokens:  [t0 .. t15][t16 .. t31][t32 .. t40)
//! hash:     h0 = H(None, t0..t15, salt)
//!                      h1 = H(h0, t16..t31, salt)        partial: not indexed
//! ```
//!
//! Invariants:
//! - only full blocks are indexed, and an indexed block is never written:
//!   before a sequence writes into an existing block ([`KvPool::make_writable`])
//!   the block is copied if it is shared, or dropped from the index if not;
//! - a hit is verified token by token against the tokens stored with the
//!   block (never trusted on the hash alone);
//! - a block whose refcount drops to 0 stays indexed while it sits in the
//!   free queue (lazy eviction, as vLLM's prefix cache); when it is allocated
//!   for something else it leaves the index ([`PrefixIndex::forget`]).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use semantic_core::BlockId;

use crate::{BlockTable, KvPool, PoolError};

pub type BlockHash = u64;

/// `H(parent, tokens, salt)`; `salt` is the model fingerprint, so blocks of
/// different models never match.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], salt: u64) -> BlockHash {
    let mut h = DefaultHasher::new();
    (parent, tokens, salt).hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub(crate) struct PrefixIndex {
    by_hash: HashMap<BlockHash, BlockId>,
    of_block: Vec<Option<(BlockHash, Box<[u32]>)>>,
}

impl PrefixIndex {
    pub(crate) fn new(n_blocks: usize) -> Self {
        Self { by_hash: HashMap::new(), of_block: vec![None; n_blocks] }
    }

    /// Drops the block's entry (it is about to hold other content).
    pub(crate) fn forget(&mut self, block: BlockId) {
        if let Some((h, _)) = self.of_block[block.index()].take() {
            if self.by_hash.get(&h) == Some(&block) {
                self.by_hash.remove(&h);
            }
        }
    }
}

impl KvPool {
    /// Records a full block of a sequence under its chained hash. If another
    /// block already holds the same content, the index keeps that one.
    pub fn register_block(&mut self, block: BlockId, hash: BlockHash, tokens: &[u32]) {
        debug_assert_eq!(tokens.len(), self.layout.block_size);
        if self.prefix.by_hash.contains_key(&hash) || self.prefix.of_block[block.index()].is_some() {
            return;
        }
        self.prefix.by_hash.insert(hash, block);
        self.prefix.of_block[block.index()] = Some((hash, tokens.into()));
    }

    /// The indexed blocks that hold the longest prefix of `tokens` made of
    /// full blocks, each verified token by token.
    pub fn match_prefix(&self, tokens: &[u32], salt: u64) -> Vec<BlockId> {
        let bs = self.layout.block_size;
        let mut out = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(bs) {
            let h = block_hash(parent, chunk, salt);
            let Some(&b) = self.prefix.by_hash.get(&h) else {
                break;
            };
            match &self.prefix.of_block[b.index()] {
                Some((bh, toks)) if *bh == h && toks[..] == *chunk => out.push(b),
                _ => break,
            }
            parent = Some(h);
        }
        out
    }

    /// Appends shared blocks to an empty table (one reference each).
    pub fn attach_shared(&mut self, table: &mut BlockTable, blocks: &[BlockId]) -> Result<(), PoolError> {
        debug_assert!(table.blocks.is_empty());
        for &b in blocks {
            self.blocks.retain(b)?;
            table.blocks.push(b);
        }
        Ok(())
    }

    /// Makes block `i` of the table safe to write: a shared block is copied
    /// into a fresh one (copy-on-write), a private one leaves the index.
    /// False when no free block is left for the copy.
    pub fn make_writable(&mut self, table: &mut BlockTable, i: usize) -> bool {
        let Some(&old) = table.blocks.get(i) else {
            return true;
        };
        if self.blocks.refcount(old) == 1 {
            self.prefix.forget(old);
            return true;
        }
        let Some(new) = self.blocks.allocate() else {
            return false;
        };
        self.prefix.forget(new);
        let n = self.layout.block_elems();
        self.data.copy_within(old.index() * n..(old.index() + 1) * n, new.index() * n);
        self.blocks.release(old).expect("shared block has references");
        table.blocks[i] = new;
        true
    }

    /// Blocks currently indexed (tests, stats).
    pub fn indexed_blocks(&self) -> usize {
        self.prefix.by_hash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvLayout;

    fn pool(n: usize) -> KvPool {
        KvPool::new(KvLayout { n_layers: 1, n_kv_heads: 1, head_dim: 2, block_size: 4 }, n)
    }

    /// A table for `tokens` with every full block registered, as the engine
    /// does after computing them.
    fn computed(p: &mut KvPool, tokens: &[u32]) -> BlockTable {
        let mut t = BlockTable::default();
        assert!(p.ensure_capacity(&mut t, tokens.len()));
        let mut parent = None;
        for (i, c) in tokens.chunks_exact(4).enumerate() {
            let h = block_hash(parent, c, 7);
            p.register_block(t.blocks()[i], h, c);
            parent = Some(h);
        }
        t
    }

    #[test]
    fn prefixes_match_by_chained_hash_and_tokens() {
        let mut p = pool(8);
        let a = computed(&mut p, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(p.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0], 7), a.blocks()[..2].to_vec());
        assert_eq!(p.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 0], 7), a.blocks()[..1].to_vec());
        assert!(p.match_prefix(&[0, 2, 3, 4, 5, 6, 7, 8], 7).is_empty(), "the chain breaks at block 0");
        assert!(p.match_prefix(&[1, 2, 3, 4], 8).is_empty(), "another model");
        // Same second block content after a different first block: no match.
        let b = computed(&mut p, &[9, 9, 9, 9, 5, 6, 7, 8]);
        assert_eq!(p.match_prefix(&[9, 9, 9, 9, 5, 6, 7, 8], 7), b.blocks().to_vec());
        p.free_table(a).unwrap();
        p.free_table(b).unwrap();
    }

    #[test]
    fn shared_blocks_are_copied_before_a_write_and_freed_blocks_stay_findable() {
        let mut p = pool(6);
        let a = computed(&mut p, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let hit = p.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 7);
        let mut b = BlockTable::default();
        p.attach_shared(&mut b, &hit).unwrap();
        assert_eq!(p.blocks().refcount(a.blocks()[1]), 2);
        assert_eq!(p.n_free(), 4, "two agents, one copy");
        // b recomputes its last token: block 1 is shared, so it is copied.
        assert!(p.make_writable(&mut b, 1));
        assert_ne!(b.blocks()[1], a.blocks()[1]);
        assert_eq!(p.blocks().refcount(a.blocks()[1]), 1);
        assert_eq!(p.n_free(), 3);
        let a_blocks = a.blocks().to_vec();
        p.free_table(a).unwrap();
        // Freed but still indexed: a later request revives them.
        assert_eq!(p.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 7), a_blocks);
        // Allocating a free block for other content drops it from the index.
        let mut c = BlockTable::default();
        assert!(p.ensure_capacity(&mut c, 16), "takes 3, 4, 5 and then block 1");
        assert!(p.match_prefix(&[1, 2, 3, 4, 5, 6, 7, 8], 7).len() < 2);
        p.free_table(b).unwrap();
        p.free_table(c).unwrap();
        p.blocks().check_invariants();
        assert_eq!(p.n_free(), 6);
    }

    #[test]
    fn a_private_indexed_block_leaves_the_index_before_it_is_written() {
        let mut p = pool(4);
        let mut a = computed(&mut p, &[1, 2, 3, 4]);
        assert_eq!(p.indexed_blocks(), 1);
        assert!(p.make_writable(&mut a, 0));
        assert_eq!(p.indexed_blocks(), 0);
        assert!(p.match_prefix(&[1, 2, 3, 4], 7).is_empty());
        p.free_table(a).unwrap();
    }
}
