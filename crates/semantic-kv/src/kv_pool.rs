//! Paged K/V storage in f16 and the block tables that index it.
//!
//! One block holds `block_size` token slots of K and V for every layer:
//!
//! ```text
//! block b: [layer 0: K[head 0: slot 0..bs][head 1 ..] V[head 0 ..] ..] [layer 1 ..] ..
//!          each (layer, K|V, head) run is `block_size * head_dim` contiguous f16,
//!          so attention streams one head's keys of one block without gathers;
//!          K runs are dimension major ([d][slot]), V runs slot major ([slot][d]).
//! ```
//!
//! The storage is one zeroed allocation; untouched pages cost no RSS.

use std::marker::PhantomData;
use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
use semantic_core::BlockId;

use crate::prefix::PrefixIndex;
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

    /// Element offset of a run (one head's K or V of one layer) in the pool.
    fn run_offset(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> usize {
        block.index() * self.block_elems() + ((layer * 2 + kv) * self.n_kv_heads + head) * self.run_elems()
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
    pub(crate) blocks: Vec<BlockId>,
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
    pub(crate) layout: KvLayout,
    pub(crate) blocks: BlockPool,
    pub(crate) data: Vec<f16>,
    pub(crate) prefix: PrefixIndex,
}

impl KvPool {
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        Self {
            layout,
            blocks: BlockPool::new(n_blocks),
            data: zeroed_f16(n_blocks * layout.block_elems()),
            prefix: PrefixIndex::new(n_blocks),
        }
    }

    /// A pool of at most `bytes` bytes of K/V.
    pub fn with_budget(layout: KvLayout, bytes: usize) -> Self {
        Self::new(layout, bytes / layout.block_bytes())
    }

    /// [`with_budget`](Self::with_budget), or why not: a budget the
    /// address space or the allocator refuses is an error here, where
    /// `with_budget` would abort the process.
    pub fn try_with_budget(layout: KvLayout, bytes: usize) -> Result<Self, String> {
        let n_blocks = bytes / layout.block_bytes();
        if n_blocks >= crate::block_pool::MAX_BLOCKS {
            return Err(format!("{n_blocks} blocks of K/V is more than a pool can index"));
        }
        let data = try_zeroed_f16(n_blocks * layout.block_elems())
            .ok_or_else(|| format!("cannot allocate {} MiB of K/V", (n_blocks * layout.block_bytes()) >> 20))?;
        Ok(Self { layout, blocks: BlockPool::new(n_blocks), data, prefix: PrefixIndex::new(n_blocks) })
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
                // A reused free block may still be indexed as a cached prefix.
                for &b in &new {
                    self.prefix.forget(b);
                }
                table.blocks.extend(new);
                true
            }
            None => false,
        }
    }

    /// A second table over the same blocks, holding one more reference to
    /// each (a reader that must see them unchanged: writers copy-on-write
    /// while it lives). Free it with [`KvPool::free_table`].
    pub fn share_table(&mut self, table: &BlockTable) -> BlockTable {
        for &b in &table.blocks {
            self.blocks.retain(b).expect("blocks of a live table");
        }
        BlockTable { blocks: table.blocks.clone() }
    }

    /// Keeps the first `n_tokens` slots of the table; the blocks after them
    /// go back to the pool.
    pub fn truncate_table(&mut self, table: &mut BlockTable, n_tokens: usize) -> Result<(), PoolError> {
        let keep = self.layout.blocks_for(n_tokens).min(table.blocks.len());
        for b in table.blocks.drain(keep..) {
            self.blocks.release(b)?;
        }
        Ok(())
    }

    /// Returns every block of the table to the pool.
    pub fn free_table(&mut self, mut table: BlockTable) -> Result<(), PoolError> {
        for b in std::mem::take(&mut table.blocks) {
            self.blocks.release(b)?;
        }
        Ok(())
    }

    /// The `block_size * head_dim` keys (kv = 0) or values (kv = 1) of one
    /// head in one block. Values are slot major (`[slot][d]`, what the
    /// weighted sum reads); keys are dimension major (`[d][slot]`), so
    /// attention computes a vector of scores per multiply-add with no
    /// horizontal sums.
    pub fn run(&self, block: BlockId, layer: usize, kv: usize, head: usize) -> &[f16] {
        let off = self.layout.run_offset(block, layer, kv, head);
        &self.data[off..off + self.layout.run_elems()]
    }

    /// Copies K (`kv = 0`) or V (`kv = 1`) of one head for the positions
    /// `tokens` of the sequence with block table `table` into `out`, position
    /// major: `out[(p - tokens.start) * head_dim + d]`. This is the on-disk row
    /// order of an agent cache, independent of the block size and of the
    /// key runs' layout.
    ///
    /// Panics if `out.len() != tokens.len() * head_dim` or the table does not
    /// cover `tokens.end` positions.
    pub fn export_head_tokens(
        &self,
        table: &[BlockId],
        layer: usize,
        kv: usize,
        head: usize,
        tokens: Range<usize>,
        out: &mut [f16],
    ) {
        let (dim, bs) = (self.layout.head_dim, self.layout.block_size);
        assert_eq!(out.len(), tokens.len() * dim, "output length");
        for (pos, n, at) in self.block_spans(tokens) {
            let run = self.run(table[pos / bs], layer, kv, head);
            let rows = &mut out[at * dim..(at + n) * dim];
            if kv == 0 {
                keys_to_rows(run, bs, dim, pos % bs, rows);
            } else {
                rows.copy_from_slice(&run[(pos % bs) * dim..(pos % bs + n) * dim]);
            }
        }
    }

    /// The inverse of [`KvPool::export_head_tokens`]: stores `src`
    /// (`n * head_dim` values, position major) as K or V of one head for the
    /// positions `first..first + n`.
    ///
    /// Panics if `src.len()` is not a multiple of `head_dim` or the table does
    /// not cover `first + n` positions.
    pub fn import_head_tokens(
        &mut self,
        table: &[BlockId],
        layer: usize,
        kv: usize,
        head: usize,
        first: usize,
        src: &[f16],
    ) {
        let (dim, bs) = (self.layout.head_dim, self.layout.block_size);
        assert_eq!(src.len() % dim, 0, "source length is not whole tokens");
        for (pos, n, at) in self.block_spans(first..first + src.len() / dim) {
            let off = self.layout.run_offset(table[pos / bs], layer, kv, head);
            let run = &mut self.data[off..off + self.layout.run_elems()];
            let rows = &src[at * dim..(at + n) * dim];
            if kv == 0 {
                rows_to_keys(rows, bs, dim, pos % bs, run);
            } else {
                run[(pos % bs) * dim..(pos % bs + n) * dim].copy_from_slice(rows);
            }
        }
    }

    /// Splits `tokens` at block boundaries: `(position, count, index into the
    /// range)` for each piece that lies in one block.
    fn block_spans(&self, tokens: Range<usize>) -> impl Iterator<Item = (usize, usize, usize)> {
        let bs = self.layout.block_size;
        let start = tokens.start;
        let mut pos = start;
        std::iter::from_fn(move || {
            if pos >= tokens.end {
                return None;
            }
            let n = (bs - pos % bs).min(tokens.end - pos);
            let span = (pos, n, pos - start);
            pos += n;
            Some(span)
        })
    }

    /// Stores K and V (`n_kv_heads * head_dim` f32 each) of the token at
    /// position `pos` of a sequence with block table `table`.
    pub fn write_token(&mut self, table: &[BlockId], layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        // SAFETY: `&mut self` rules out any other write.
        unsafe { self.token_writer().write(table, layer, pos, k, v) }
    }

    /// A handle that stores tokens from several threads at once (the rows
    /// of one step), each into its own slot.
    pub fn token_writer(&mut self) -> TokenWriter<'_> {
        TokenWriter { layout: self.layout, data: self.data.as_mut_ptr(), len: self.data.len(), _pool: PhantomData }
    }
}

/// See [`KvPool::token_writer`].
pub struct TokenWriter<'a> {
    layout: KvLayout,
    data: *mut f16,
    len: usize,
    _pool: PhantomData<&'a mut KvPool>,
}

// SAFETY: the writer is a `&mut KvPool` whose writes callers keep disjoint
// (see `TokenWriter::write`).
unsafe impl Send for TokenWriter<'_> {}
unsafe impl Sync for TokenWriter<'_> {}

impl TokenWriter<'_> {
    /// [`KvPool::write_token`] through a shared handle.
    ///
    /// # Safety
    /// Calls that may run at the same time write different (block, slot)
    /// pairs: different positions of one table, or blocks of different
    /// tables (a step's sequences write only blocks they own alone).
    pub unsafe fn write(&self, table: &[BlockId], layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        let block = table[pos / l.block_size];
        let slot = pos % l.block_size;
        assert!(
            layer < l.n_layers && (block.index() + 1) * l.block_elems() <= self.len,
            "block or layer out of the pool"
        );
        assert!(k.len() >= l.n_kv_heads * l.head_dim && v.len() >= l.n_kv_heads * l.head_dim);
        let mut buf = [f16::ZERO; KEY_CHUNK];
        for head in 0..l.n_kv_heads {
            let src = &k[head * l.head_dim..(head + 1) * l.head_dim];
            let off = l.run_offset(block, layer, 0, head) + slot;
            // Keys converted a slice at a time (F16C), then scattered.
            for (c, chunk) in src.chunks(KEY_CHUNK).enumerate() {
                let kh = &mut buf[..chunk.len()];
                kh.convert_from_f32_slice(chunk);
                for (i, h) in kh.iter().enumerate() {
                    // SAFETY: inside the block (asserted above); this slot
                    // is ours alone (the caller's contract).
                    *self.data.add(off + (c * KEY_CHUNK + i) * l.block_size) = *h;
                }
            }
            let off = l.run_offset(block, layer, 1, head) + slot * l.head_dim;
            // SAFETY: as above.
            let dst = std::slice::from_raw_parts_mut(self.data.add(off), l.head_dim);
            dst.convert_from_f32_slice(&v[head * l.head_dim..(head + 1) * l.head_dim]);
        }
    }
}

/// Keys per conversion in [`KvPool::write_token`].
const KEY_CHUNK: usize = 128;

/// Key rows `slot..slot + n` of a dimension-major key run (`[dim][bs]`) into
/// `rows` (`[n][dim]`). Whole blocks go through 8x8 transposes: with the
/// scalar loop for every block, loading an 8K-token f16 cache took 59 ms
/// instead of 37-39 (`cargo run --release -p semantic-store --example
/// store_bench`, page cache).
fn keys_to_rows(run: &[f16], bs: usize, dim: usize, slot: usize, rows: &mut [f16]) {
    let n = rows.len() / dim;
    if slot == 0 && n == bs && transpose_u16(run, dim, bs, rows) {
        return;
    }
    for t in 0..n {
        for d in 0..dim {
            rows[t * dim + d] = run[d * bs + slot + t];
        }
    }
}

/// The inverse of [`keys_to_rows`].
fn rows_to_keys(rows: &[f16], bs: usize, dim: usize, slot: usize, run: &mut [f16]) {
    let n = rows.len() / dim;
    if slot == 0 && n == bs && transpose_u16(rows, bs, dim, run) {
        return;
    }
    for t in 0..n {
        for d in 0..dim {
            run[d * bs + slot + t] = rows[t * dim + d];
        }
    }
}

/// `dst[c * rows + r] = src[r * cols + c]` in 8x8 tiles (SSE2); false,
/// with nothing written, unless both sides are multiples of 8.
fn transpose_u16(src: &[f16], rows: usize, cols: usize, dst: &mut [f16]) -> bool {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if rows.is_multiple_of(8) && cols.is_multiple_of(8) {
        for r in (0..rows).step_by(8) {
            for c in (0..cols).step_by(8) {
                // SAFETY: SSE2 is part of x86_64; the tile lies inside both
                // buffers (checked above); f16 is a transparent u16.
                unsafe {
                    transpose8x8(src.as_ptr().add(r * cols + c), cols, dst.as_mut_ptr().add(c * rows + r), rows);
                }
            }
        }
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
unsafe fn transpose8x8(src: *const f16, src_stride: usize, dst: *mut f16, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m128i; 8] = std::array::from_fn(|i| _mm_loadu_si128(src.add(i * src_stride) as *const __m128i));
    // a[2i], a[2i+1]: rows 2i and 2i+1 interleaved, columns 0-3 and 4-7.
    let a: [__m128i; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm_unpacklo_epi16(x, y)
        } else {
            _mm_unpackhi_epi16(x, y)
        }
    });
    // b: four rows' columns in pairs: b[0] cols 0-1 of rows 0-3, b[1] cols
    // 2-3, b[2] cols 4-5, b[3] cols 6-7; b[4..8] the same for rows 4-7.
    let b: [__m128i; 8] = std::array::from_fn(|i| {
        let base = if i < 4 { 0 } else { 4 };
        let (x, y) = (a[base + (i % 4) / 2], a[base + 2 + (i % 4) / 2]);
        if i % 2 == 0 {
            _mm_unpacklo_epi32(x, y)
        } else {
            _mm_unpackhi_epi32(x, y)
        }
    });
    for c in 0..8 {
        let (x, y) = (b[c / 2], b[4 + c / 2]);
        let col = if c % 2 == 0 { _mm_unpacklo_epi64(x, y) } else { _mm_unpackhi_epi64(x, y) };
        _mm_storeu_si128(dst.add(c * dst_stride) as *mut __m128i, col);
    }
}

/// A zero-filled f16 buffer from a zeroed allocation: the OS hands out zero
/// pages lazily, so untouched memory costs no RSS (`vec![f16::ZERO; n]`
/// writes every element: it made a whole 1 GiB pool resident at start, and
/// filling an 8K-token cache snapshot stalled the engine for tens of ms).
pub fn zeroed_f16(n: usize) -> Vec<f16> {
    match std::alloc::Layout::array::<f16>(n) {
        Ok(layout) => try_zeroed_f16(n).unwrap_or_else(|| std::alloc::handle_alloc_error(layout)),
        Err(_) => panic!("{n} f16 values overflow the address space"),
    }
}

/// [`zeroed_f16`], or `None` when the allocation fails.
fn try_zeroed_f16(n: usize) -> Option<Vec<f16>> {
    let layout = std::alloc::Layout::array::<f16>(n).ok()?;
    if layout.size() == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout has a non-zero size; a non-null result is `n`
    // zeroed f16 values (0 is +0.0) allocated with the global allocator and
    // this layout, which is what `Vec::from_raw_parts` needs.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f16;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout { n_layers: 2, n_kv_heads: 3, head_dim: 4, block_size: 2 }
    }

    #[test]
    fn sizes_follow_the_layout() {
        let l = layout();
        assert_eq!(l.block_elems(), 2 * 2 * 3 * 2 * 4);
        assert_eq!(l.bytes_per_token() * l.block_size, l.block_bytes());
        let smol = KvLayout { n_layers: 30, n_kv_heads: 3, head_dim: 64, block_size: 16 };
        assert_eq!(smol.bytes_per_token(), 23_040);
    }

    #[test]
    fn budgets_the_machine_refuses_are_errors() {
        let l = layout();
        let pool = KvPool::try_with_budget(l, 10 * l.block_bytes()).unwrap();
        assert_eq!((pool.n_free(), pool.capacity_bytes()), (10, 10 * l.block_bytes()));
        let err = |l, bytes| KvPool::try_with_budget(l, bytes).err().expect("an error");
        assert!(err(l, usize::MAX).contains("more than a pool can index"));
        // Few enough blocks to index, too many bytes to allocate.
        let wide = KvLayout { n_layers: 1 << 20, n_kv_heads: 1, head_dim: 1024, block_size: 1024 };
        let e = err(wide, 1 << 62);
        assert!(e.contains("cannot allocate"), "{e}");
        assert_eq!(KvPool::try_with_budget(l, 0).map(|p| p.n_free()), Ok(0));
    }

    #[test]
    fn tables_grow_all_or_nothing_and_return_blocks() {
        let mut pool = KvPool::new(layout(), 3);
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, 3));
        assert_eq!(t.len(), 2);
        assert!(!pool.ensure_capacity(&mut t, 7), "needs 2 more, only 1 free");
        assert_eq!(t.len(), 2);
        assert_eq!(pool.bytes_in_use(), 2 * layout().block_bytes());
        pool.free_table(t).unwrap();
        assert_eq!(pool.n_free(), 3);
    }

    fn fill_random(pool: &mut KvPool, table: &[BlockId], n_tokens: usize, seed: u64) {
        let l = *pool.layout();
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let width = l.n_kv_heads * l.head_dim;
        for pos in 0..n_tokens {
            for layer in 0..l.n_layers {
                let k: Vec<f32> = (0..width).map(|_| next()).collect();
                let v: Vec<f32> = (0..width).map(|_| next()).collect();
                pool.write_token(table, layer, pos, &k, &v);
            }
        }
    }

    /// Whatever layout the runs have, export gives back the written rows
    /// (f16 of the written values), for partial and whole blocks; layouts
    /// with sides that are multiples of 8 take the transposing fast path.
    #[test]
    fn export_returns_the_written_rows() {
        let small = layout();
        let wide = KvLayout { n_layers: 2, n_kv_heads: 2, head_dim: 16, block_size: 8 };
        for l in [small, wide] {
            let mut pool = KvPool::new(l, 16);
            let mut t = BlockTable::default();
            assert!(pool.ensure_capacity(&mut t, 21));
            let value = |pos: usize, layer: usize, i: usize, kv: usize| {
                let x = (pos * 131 + layer * 17 + i * 7 + kv * 3) % 1000;
                x as f32 / 8.0 - if kv == 1 { 60.0 } else { 0.0 }
            };
            let width = l.n_kv_heads * l.head_dim;
            for pos in 0..21 {
                for layer in 0..l.n_layers {
                    let k: Vec<f32> = (0..width).map(|i| value(pos, layer, i, 0)).collect();
                    let v: Vec<f32> = (0..width).map(|i| value(pos, layer, i, 1)).collect();
                    pool.write_token(t.blocks(), layer, pos, &k, &v);
                }
            }
            for range in [0..21, 1..6, 8..16, 3..4] {
                let mut out = vec![f16::ZERO; range.len() * l.head_dim];
                for (layer, kv, head) in [(1, 0, 1), (1, 1, 1), (0, 0, 0), (0, 1, 0)] {
                    pool.export_head_tokens(t.blocks(), layer, kv, head, range.clone(), &mut out);
                    for (at, pos) in range.clone().enumerate() {
                        for d in 0..l.head_dim {
                            let want = f16::from_f32(value(pos, layer, head * l.head_dim + d, kv));
                            assert_eq!(
                                out[at * l.head_dim + d],
                                want,
                                "{l:?} {range:?} layer {layer} kv {kv} pos {pos}"
                            );
                        }
                    }
                }
            }
            let mut empty: [f16; 0] = [];
            pool.export_head_tokens(t.blocks(), 0, 0, 0, 3..3, &mut empty);
            pool.free_table(t).unwrap();
        }
    }

    /// Export from one block size, import into another: the rows are the
    /// same bits, so a file written from one pool loads into any other.
    #[test]
    fn export_then_import_across_block_sizes_is_bit_exact() {
        let wide = KvLayout { n_layers: 2, n_kv_heads: 2, head_dim: 16, block_size: 16 };
        for (a_layout, b_bs) in [(layout(), 5), (wide, 8)] {
            across_block_sizes(a_layout, KvLayout { block_size: b_bs, ..a_layout });
        }
    }

    fn across_block_sizes(a_layout: KvLayout, b_layout: KvLayout) {
        let n = 11 + a_layout.block_size;
        let mut a = KvPool::new(a_layout, 16);
        let mut ta = BlockTable::default();
        assert!(a.ensure_capacity(&mut ta, n));
        fill_random(&mut a, ta.blocks(), n, 7);
        let mut b = KvPool::new(b_layout, 16);
        let mut skip = BlockTable::default();
        assert!(b.ensure_capacity(&mut skip, 1), "so b's table is not 0..");
        let mut tb = BlockTable::default();
        assert!(b.ensure_capacity(&mut tb, n));
        let mut row = vec![f16::ZERO; n * a_layout.head_dim];
        let mut back = row.clone();
        for layer in 0..a_layout.n_layers {
            for kv in 0..2 {
                for head in 0..a_layout.n_kv_heads {
                    a.export_head_tokens(ta.blocks(), layer, kv, head, 0..n, &mut row);
                    // Two pieces, split inside a block of b.
                    let cut = 7 * a_layout.head_dim;
                    b.import_head_tokens(tb.blocks(), layer, kv, head, 0, &row[..cut]);
                    b.import_head_tokens(tb.blocks(), layer, kv, head, 7, &row[cut..]);
                    b.export_head_tokens(tb.blocks(), layer, kv, head, 0..n, &mut back);
                    let bits = |r: &[f16]| r.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&row), bits(&back), "layer {layer} kv {kv} head {head}");
                }
            }
        }
        a.free_table(ta).unwrap();
        b.free_table(tb).unwrap();
        b.free_table(skip).unwrap();
    }

    #[test]
    fn written_tokens_land_in_their_slot() {
        let mut pool = KvPool::new(layout(), 2);
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, 4));
        let k: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
        pool.write_token(t.blocks(), 1, 3, &k, &v);
        // Keys are dimension major: slot 1 of each of the 4 dimensions.
        let run = pool.run(t.blocks()[1], 1, 0, 2);
        assert_eq!([run[1], run[3], run[5], run[7]], [8.0, 9.0, 10.0, 11.0].map(f16::from_f32));
        let run = pool.run(t.blocks()[1], 1, 1, 0);
        assert_eq!(&run[4..8], &[0.0, -1.0, -2.0, -3.0].map(f16::from_f32));
        pool.free_table(t).unwrap();
    }
}
