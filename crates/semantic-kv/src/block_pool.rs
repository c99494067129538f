//! Block pool: `BlockId`s with refcounts and an index-linked free queue.
//!
//! ```text
//! meta:  [0]      [1]      [2]      [3]
//!        rc=0     rc=2     rc=0     rc=1
//!        prev/next link the free blocks in order:  head -> 2 -> 0 -> tail
//! ```
//!
//! Invariants (checked by `check_invariants`, used by the tests):
//! - a block is in the free queue iff its refcount is 0;
//! - `allocate` takes the head of the queue, `release` to 0 appends at the tail,
//!   so the least recently freed block is reused first (its content may still be
//!   a cached prefix, which later issues revive with `retain`);
//! - removing any block from the queue is O(1) (doubly linked by index);
//! - releasing a block whose refcount is already 0 is an error, never a silent
//!   double free.

use semantic_core::BlockId;

const NIL: u32 = u32::MAX;
/// One more than the most blocks a pool indexes (ids are `u32`, one kept
/// for "none").
pub const MAX_BLOCKS: usize = NIL as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("block {0} released while already free (double free)")]
    DoubleFree(u32),
    #[error("block {0} is outside the pool")]
    OutOfRange(u32),
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    refcount: u32,
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    head: u32,
    tail: u32,
    n_free: usize,
}

impl BlockPool {
    pub fn new(n_blocks: usize) -> Self {
        assert!(n_blocks < MAX_BLOCKS, "pool too large");
        let n = n_blocks as u32;
        let meta = (0..n)
            .map(|i| Meta {
                refcount: 0,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        Self { meta, head: if n == 0 { NIL } else { 0 }, tail: if n == 0 { NIL } else { n - 1 }, n_free: n_blocks }
    }

    pub fn n_blocks(&self) -> usize {
        self.meta.len()
    }

    pub fn n_free(&self) -> usize {
        self.n_free
    }

    pub fn n_used(&self) -> usize {
        self.meta.len() - self.n_free
    }

    pub fn refcount(&self, id: BlockId) -> u32 {
        self.meta[id.index()].refcount
    }

    /// Takes the oldest free block, with refcount 1.
    pub fn allocate(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let id = self.head;
        self.unlink(id);
        self.meta[id as usize].refcount = 1;
        Some(BlockId(id))
    }

    /// Takes `n` blocks or none at all.
    pub fn allocate_many(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.n_free {
            return None;
        }
        Some((0..n).filter_map(|_| self.allocate()).collect())
    }

    /// Adds a reference. A free block (refcount 0) leaves the free queue.
    pub fn retain(&mut self, id: BlockId) -> Result<(), PoolError> {
        let m = self.meta.get(id.index()).ok_or(PoolError::OutOfRange(id.0))?;
        if m.refcount == 0 {
            self.unlink(id.0);
        }
        self.meta[id.index()].refcount += 1;
        Ok(())
    }

    /// Drops a reference; at 0 the block goes to the tail of the free queue.
    pub fn release(&mut self, id: BlockId) -> Result<(), PoolError> {
        let m = self.meta.get_mut(id.index()).ok_or(PoolError::OutOfRange(id.0))?;
        if m.refcount == 0 {
            return Err(PoolError::DoubleFree(id.0));
        }
        m.refcount -= 1;
        if m.refcount == 0 {
            self.push_tail(id.0);
        }
        Ok(())
    }

    /// The free queue from head to tail (tests and diagnostics).
    pub fn free_queue(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.n_free);
        let mut i = self.head;
        while i != NIL {
            out.push(BlockId(i));
            i = self.meta[i as usize].next;
        }
        out
    }

    /// Verifies the free queue against the refcounts; panics with the first
    /// violation. O(n): for tests and debug checks.
    pub fn check_invariants(&self) {
        let queue = self.free_queue();
        assert_eq!(queue.len(), self.n_free, "free count drifted");
        let mut in_queue = vec![false; self.meta.len()];
        for b in &queue {
            assert!(!in_queue[b.index()], "block {} queued twice", b.0);
            in_queue[b.index()] = true;
        }
        for (i, m) in self.meta.iter().enumerate() {
            assert_eq!(m.refcount == 0, in_queue[i], "block {i} rc={}", m.refcount);
        }
    }

    fn unlink(&mut self, id: u32) {
        let Meta { prev, next, .. } = self.meta[id as usize];
        match prev {
            NIL => self.head = next,
            p => self.meta[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.meta[n as usize].prev = prev,
        }
        self.meta[id as usize].prev = NIL;
        self.meta[id as usize].next = NIL;
        self.n_free -= 1;
    }

    fn push_tail(&mut self, id: u32) {
        let m = &mut self.meta[id as usize];
        m.prev = self.tail;
        m.next = NIL;
        match self.tail {
            NIL => self.head = id,
            t => self.meta[t as usize].next = id,
        }
        self.tail = id;
        self.n_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u32]) -> Vec<BlockId> {
        v.iter().map(|&i| BlockId(i)).collect()
    }

    #[test]
    fn scripted_free_queue_order() {
        let mut pool = BlockPool::new(5);
        assert_eq!(pool.free_queue(), ids(&[0, 1, 2, 3, 4]));
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert_eq!((a, b, c), (BlockId(0), BlockId(1), BlockId(2)));
        assert_eq!(pool.free_queue(), ids(&[3, 4]));
        pool.release(b).unwrap();
        pool.release(a).unwrap();
        assert_eq!(pool.free_queue(), ids(&[3, 4, 1, 0]));
        pool.retain(c).unwrap();
        pool.release(c).unwrap();
        assert_eq!(pool.free_queue(), ids(&[3, 4, 1, 0]), "still referenced");
        pool.release(c).unwrap();
        assert_eq!(pool.free_queue(), ids(&[3, 4, 1, 0, 2]));
        // Reviving a free block removes it from the middle of the queue.
        pool.retain(BlockId(1)).unwrap();
        assert_eq!(pool.free_queue(), ids(&[3, 4, 0, 2]));
        assert_eq!(pool.allocate(), Some(BlockId(3)));
        assert_eq!(pool.release(BlockId(0)), Err(PoolError::DoubleFree(0)));
        assert_eq!(pool.release(BlockId(9)), Err(PoolError::OutOfRange(9)));
        assert_eq!(pool.allocate_many(4), None);
        assert_eq!(pool.allocate_many(2), Some(ids(&[4, 0])));
        assert_eq!(pool.free_queue(), ids(&[2]));
        pool.check_invariants();
    }

    /// 100k seeded random operations against a model of the refcounts.
    #[test]
    fn randomized_no_leak_no_double_free() {
        let n = 64;
        let mut pool = BlockPool::new(n);
        let mut rc = vec![0u32; n];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for step in 0..100_000 {
            let r = next();
            let i = (r >> 8) as usize % n;
            match r % 4 {
                0 | 1 => {
                    if let Some(b) = pool.allocate() {
                        assert_eq!(rc[b.index()], 0, "allocated a used block");
                        rc[b.index()] = 1;
                    } else {
                        assert!(rc.iter().all(|&c| c > 0));
                    }
                }
                2 => {
                    let res = pool.release(BlockId(i as u32));
                    if rc[i] == 0 {
                        assert_eq!(res, Err(PoolError::DoubleFree(i as u32)));
                    } else {
                        res.unwrap();
                        rc[i] -= 1;
                    }
                }
                _ => {
                    if rc[i] > 0 {
                        pool.retain(BlockId(i as u32)).unwrap();
                        rc[i] += 1;
                    }
                }
            }
            if step % 997 == 0 {
                pool.check_invariants();
            }
            assert_eq!(pool.n_free(), rc.iter().filter(|&&c| c == 0).count());
        }
        for (i, c) in rc.iter().enumerate() {
            for _ in 0..*c {
                pool.release(BlockId(i as u32)).unwrap();
            }
        }
        pool.check_invariants();
        assert_eq!(pool.n_free(), n, "every block is back");
    }
}
