//! Paged attention over the f16 KV pool: causal, grouped-query, online softmax.
//!
//! Each new token at position `p` attends to slots `0..=p` of its sequence,
//! found through the sequence's block table. One work item is a tile of up
//! to [`QUERY_TILE`] new tokens of one sequence and one kv head; it computes
//! all `group = n_heads / n_kv_heads` query heads sharing that kv head, so
//! K/V is converted from f16 once per tile, spans of 64 keys (whole blocks)
//! share one softmax update, and scores are exponentiated a vector at a
//! time with a polynomial exp (a libm call per score was half of a
//! 2K-token prefill):
//!
//! ```text
//! for span in table[..]:               # 64 keys of one kv head
//!     K (dimension major), V <- f16 -> f32 scratch, once per span per tile
//!     s[head][0..64] = scale * sum_d q_head[d] * K[d][0..64]
//!     m' = max(m, max s); acc = acc * e^(m - m') + sum e^(s - m') V
//! out = acc / l
//! ```
//!
//! Keys are stored dimension major in the pool ([`KvPool::run`]), so one
//! multiply-add per dimension yields 16 scores (8 with AVX2) and no
//! horizontal sums are needed; with keys slot major, scoring took a dot
//! product and a reduction per key and was the largest part of decode
//! attention. AVX-512 (chosen at run time) scores up to three heads per
//! pass over K (and, on the direct path below, weighs them per pass over V). A 5-sequence decode at ~230 tokens of
//! context, attention alone, 2 threads, K/V in cache: 0.78 -> 0.54 ms per
//! step (slot-major keys with 8-key reductions -> this); in a whole decode
//! step of 5 sequences 6.5 -> 5.5 ms (`decode_steps`, A/B in one session).
//!
//! At head_dim 64 with 16-slot blocks (AVX-512), tiles read K and V
//! straight from the pool's f16 runs instead, each query converting as it
//! goes (a span's 16 KiB stay in L1 for the tile's other queries), and
//! spread the prefetch of the next span over their loops, two cache lines
//! per step: attention over a long context is bound by reading K/V from
//! memory, and reads issued in bursts left the memory idle while the span
//! computed. Measured with `decode_steps` (medians of interleaved runs
//! against the build before):
//! - 5-row decode step at ~230 tokens of context 5.06 -> 4.29 ms, 1 row
//!   2.78 -> 2.51 ms (single-token tiles only);
//! - then for all tiles: a decode step beside a 2-token prefill chunk at
//!   position 2000 7.9 -> 5.5 ms (what paces a long prefill next to
//!   decoding agents), 16 tokens 17.5 -> 16.3 ms; whole 512-token prefills
//!   unchanged (162 ms at 0, 317 ms at 1536).
//!
//! The direct path takes a tile's queries two at a time, so each K and V
//! vector is loaded and converted once per pair (2 x 3 heads x 4 x 16
//! accumulators fill the 32 registers): a 512-token prefill at position
//! 1536 spent 200 -> 177 ms in attention (318 -> 297 ms in all), a decode
//! step beside a 5-token chunk at 1500 4.57 -> 4.43 ms (interleaved
//! medians of 5).
//!
//! A query's output does not depend on how its work was split. Every
//! kernel folds its softmax state `(m, l, acc)` at each multiple of
//! [`SPLIT_KEYS`] keys into a running total ([`fold`]), and a key range
//! split between the threads is cut at those multiples: the first part
//! folds as an unsplit item does, later parts keep one result per span,
//! and [`merge_parts`] folds them in key order with the same function. So
//! the same query gives the same bits alone or in a tile, split or not,
//! whatever else the step holds; before, a reused cache, another chunking
//! of the prompt or other agents in the step changed greedy replies past
//! ~512 tokens of context (a 703-token chat answered "122." cold and
//! "144." from a shared prefix). Single-agent decode at 8K keys costs the
//! same (6.13 ms against 6.12 for 30 layers, `attn_steps 1 8000 50 2`,
//! medians of 5 interleaved).
//!
//! Checked against [`attend_scalar`] (plain two-loop softmax on the same
//! inputs) in the tests.

use semantic_core::BlockId;
use semantic_kv::KvPool;

use super::quant::{quantize_row_q8a, BlockQ8A, QK};

use super::SendPtr;

/// The attention view of one sequence in a step.
#[derive(Clone, Copy, Debug)]
pub struct AttnSeq<'a> {
    pub block_table: &'a [BlockId],
    /// Position of the first new token.
    pub start_pos: usize,
    /// Number of new tokens (rows of `q` from `first_row`).
    pub n_new: usize,
    pub first_row: usize,
}

/// Head configuration of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One work item: a tile of new tokens of one sequence and one kv head, over
/// keys `k0..k1`; `part` is the first of its `nt` slots in the
/// split-results buffer when the tile's key range is split (parts start at
/// multiples of [`SPLIT_KEYS`]; see [`fold`]).
#[derive(Clone, Copy, Debug)]
struct Item {
    seq: usize,
    t0: usize,
    nt: usize,
    kv_head: usize,
    k0: usize,
    k1: usize,
    part: Option<usize>,
    /// Result slots per query of a split part: 1 for the first part (its
    /// spans folded), one per span of [`SPLIT_KEYS`] keys for the others.
    spans: usize,
}

/// Fewest keys in one part of a split key range.
pub const SPLIT_KEYS: usize = 256;

/// Relative cost of a tile of `nt` queries over `keys` keys: reading the
/// keys (once per tile) plus scoring them per query.
fn tile_cost(nt: usize, keys: usize) -> usize {
    keys * (1 + nt)
}

/// Work items of a step. With `split`, key ranges are split where a tile
/// would hold the threads back:
/// - a decode step with too few items to keep every thread busy (one
///   sequence has only `n_kv_heads`) splits each long range into parts;
/// - a tile that costs more than a quarter of the step's attention on two
///   threads (a prefill chunk deep in its context beside short decodes)
///   splits so that the lanes can balance. Before, a 2-token chunk at
///   position 1500 beside one decode was 3 long items: one thread ran two.
fn plan_items(seqs: &[AttnSeq<'_>], shape: AttnShape, threads: usize, split: bool) -> Vec<Item> {
    let tiles = || {
        seqs.iter().enumerate().flat_map(|(si, s)| {
            (0..s.n_new).step_by(QUERY_TILE).map(move |t0| (si, t0, (s.n_new - t0).min(QUERY_TILE)))
        })
    };
    let base = tiles().count() * shape.n_kv_heads;
    let total: usize = tiles().map(|(si, t0, nt)| tile_cost(nt, seqs[si].start_pos + t0 + nt)).sum();
    let share = (total * shape.n_kv_heads / (2 * threads)).max(1);
    let mut items = Vec::new();
    let mut slots = 0;
    for (si, t0, nt) in tiles() {
        let s = &seqs[si];
        let n_keys = s.start_pos + t0 + nt;
        let few = if nt == 1 && base < 2 * threads { (4 * threads).div_ceil(base) } else { 1 };
        let dear = if threads > 1 { tile_cost(nt, n_keys).div_ceil(share) } else { 1 };
        let want = if split { few.max(dear) } else { 1 };
        // Parts begin at multiples of SPLIT_KEYS: the first folds its spans
        // as an unsplit item does, every later one keeps a result per span
        // (see `fold`), so a split result is bit for bit the unsplit one.
        let n_split = want.min(n_keys / SPLIT_KEYS).max(1);
        for g in 0..shape.n_kv_heads {
            if n_split == 1 {
                items.push(Item { seq: si, t0, nt, kv_head: g, k0: 0, k1: n_keys, part: None, spans: 1 });
                continue;
            }
            let mut k0 = 0;
            for i in 1..=n_split {
                let k1 = if i == n_split { n_keys } else { (i * n_keys / n_split / SPLIT_KEYS).max(1) * SPLIT_KEYS };
                if k1 <= k0 {
                    continue;
                }
                let spans = if k0 == 0 { 1 } else { (k1 - k0).div_ceil(SPLIT_KEYS) };
                items.push(Item { seq: si, t0, nt, kv_head: g, k0, k1, part: Some(slots), spans });
                slots += nt * spans;
                k0 = k1;
            }
        }
    }
    items
}

/// `q` and `out` are `[n_tokens, n_heads * head_dim]`; K/V of every new token
/// must already be in the pool.
pub fn paged_attention(
    q: &[f32],
    out: &mut [f32],
    pool: &KvPool,
    layer: usize,
    seqs: &[AttnSeq<'_>],
    shape: AttnShape,
) {
    paged_attention_on(Path::best(shape.head_dim), q, out, None, pool, layer, seqs, shape)
}

/// [`paged_attention`] that also writes `out` quantized into `out_q`
/// (`[n_tokens, n_heads * head_dim / 32]` Q8 blocks), each work item its
/// own outputs as it finishes them, so the output projection's input needs
/// no pass of its own. Needs [`quantizes_in_items`].
///
/// As a separate pass each row was quantized by one core from outputs the
/// other core had partly computed (one more fork-join per layer). Decode
/// steps (`decode_steps`, 250 tokens of context, alternating runs, vCPUs
/// on two CCDs): 3 rows 2.58-2.60 -> 2.45-2.49 ms, 5 rows 3.27-3.38 ->
/// 3.19-3.26 ms, 1 row unchanged (1.69-1.83 ms both); a 512-token prefill
/// unchanged (146-147 ms).
pub fn paged_attention_q(
    q: &[f32],
    out: &mut [f32],
    out_q: &mut [BlockQ8A],
    pool: &KvPool,
    layer: usize,
    seqs: &[AttnSeq<'_>],
    shape: AttnShape,
) {
    assert!(quantizes_in_items(shape), "a kv head's outputs are whole Q8 blocks");
    assert_eq!(out_q.len() * QK, out.len(), "one block per 32 outputs");
    paged_attention_on(Path::best(shape.head_dim), q, out, Some(out_q), pool, layer, seqs, shape)
}

/// Whether the outputs of one kv head's query group are whole Q8 blocks,
/// as [`paged_attention_q`] needs.
pub fn quantizes_in_items(shape: AttnShape) -> bool {
    (shape.n_heads / shape.n_kv_heads * shape.head_dim).is_multiple_of(QK)
}

/// Which kernels run the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Path {
    Scalar,
    Avx2,
    Avx512,
}

impl Path {
    fn best(head_dim: usize) -> Path {
        #[cfg(target_arch = "x86_64")]
        if super::simd_available() {
            return if simd::use_avx512(head_dim) { Path::Avx512 } else { Path::Avx2 };
        }
        let _ = head_dim;
        Path::Scalar
    }
}

#[allow(clippy::too_many_arguments)]
fn paged_attention_on(
    path: Path,
    q: &[f32],
    out: &mut [f32],
    out_q: Option<&mut [BlockQ8A]>,
    pool: &KvPool,
    layer: usize,
    seqs: &[AttnSeq<'_>],
    shape: AttnShape,
) {
    let group = shape.n_heads / shape.n_kv_heads;
    let width = shape.n_heads * shape.head_dim;
    let len = group * shape.head_dim;
    let simd = path != Path::Scalar;
    let bs = pool.layout().block_size;
    #[cfg(target_arch = "x86_64")]
    let split = simd && simd::tiles_supported(shape.head_dim, bs, group);
    #[cfg(not(target_arch = "x86_64"))]
    let split = false;
    let items = plan_items(seqs, shape, super::team::threads(), split);
    // Split items write, per query, its unnormalized acc, then m and l.
    let part_len = len + 2 * group;
    let n_parts: usize = items.iter().filter(|i| i.part.is_some()).map(|i| i.nt * i.spans).sum();
    let mut parts = vec![0f32; n_parts * part_len];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let parts_ptr = SendPtr(parts.as_mut_ptr());
    let out_q_ptr = out_q.map(|b| SendPtr(b.as_mut_ptr()));
    // Quantizes the outputs of one (token, kv head) at `off` in `out`.
    let quantize = |off: usize| {
        if let Some(qp) = out_q_ptr {
            // SAFETY: each (token, kv head) owns a disjoint range of `out`
            // and of the blocks (`len` is a multiple of 32, checked by
            // `paged_attention_q`); it was written before this call.
            let (o, b) = unsafe {
                (
                    std::slice::from_raw_parts(out_ptr.get().add(off), len),
                    std::slice::from_raw_parts_mut(qp.get().add(off / QK), len / QK),
                )
            };
            quantize_row_q8a(o, b);
        }
    };
    #[cfg(target_arch = "x86_64")]
    let attend_tile: TileFn = if path == Path::Avx512 { simd::attend_tile_avx512 } else { simd::attend_tile };
    let run = |it: &Item, next: Option<&Item>| {
        let s = &seqs[it.seq];
        let then = next.map(|n| (&seqs[n.seq].block_table[n.k0 / bs..], n.kv_head));
        let keys = Keys {
            pool,
            layer,
            kv_head: it.kv_head,
            table: s.block_table,
            first_key: it.k0,
            n_keys: it.k1,
            causal_end: s.start_pos + it.t0 + it.nt,
            then,
        };
        // On the stack: a heap Vec per item was two allocations for each
        // of a decode step's ~300 items. Attention alone (`attn_steps`, K/V
        // in cache, medians of 7 interleaved, both orders): 5 decodes at 64
        // tokens 0.148 -> 0.139-0.141 ms, 1 decode 0.043 -> 0.040 ms.
        let mut row_buf = [0usize; QUERY_TILE];
        let rows = &mut row_buf[..it.nt];
        for (t, r) in rows.iter_mut().enumerate() {
            *r = (s.first_row + it.t0 + t) * width + it.kv_head * len;
        }
        let rows = &*rows;
        #[cfg(target_arch = "x86_64")]
        if simd {
            let tile = QueryTile { q, rows, len };
            let mut outs: [&mut [f32]; QUERY_TILE] = Default::default();
            if let Some(p) = it.part {
                // SAFETY: each part slot belongs to exactly one item.
                let slots = unsafe {
                    std::slice::from_raw_parts_mut(parts_ptr.get().add(p * part_len), it.spans * it.nt * part_len)
                };
                // SAFETY: AVX2/FMA/F16C checked by simd_available(); a split
                // item accumulates in scratch and writes its slots.
                unsafe { attend_tile(&tile, &mut [], &keys, shape, Some(slots)) };
            } else {
                for (o, &off) in outs.iter_mut().zip(rows) {
                    // SAFETY: each (token, kv head) owns a disjoint range of `out`.
                    *o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(off), len) };
                }
                // SAFETY: as above.
                unsafe { attend_tile(&tile, &mut outs[..it.nt], &keys, shape, None) };
                rows.iter().for_each(|&off| quantize(off));
            }
            return;
        }
        for (t, &off) in rows.iter().enumerate() {
            // SAFETY: as above.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(off), len) };
            let k = Keys { n_keys: s.start_pos + it.t0 + t + 1, ..keys };
            attend_scalar(&q[off..off + len], o, &k, shape);
            quantize(off);
        }
    };
    // A thread runs its lane of items in order (see `team`): item i + 1\n    // is usually its next.
    super::team::for_each(items.len(), |i| run(&items[i], items.get(i + 1)));
    if n_parts > 0 {
        merge_parts(&items, seqs, &parts, out, shape);
        // Split tiles' outputs exist only now.
        for it in items.iter().filter(|it| it.part.is_some() && it.k0 == 0) {
            for t in 0..it.nt {
                quantize((seqs[it.seq].first_row + it.t0 + t) * width + it.kv_head * len);
            }
        }
    }
}

/// One tile's attention: queries, one output row per query, keys, shape,
/// and the split-result slot when the key range is split.
#[cfg(target_arch = "x86_64")]
type TileFn = unsafe fn(&QueryTile<'_>, &mut [&mut [f32]], &Keys<'_>, AttnShape, Option<&mut [f32]>);

/// Folds a span's partial softmax `(m, l, acc)` (unnormalized `acc`) into
/// a running total `(tm, tl, tacc)`. The kernels fold at every multiple of
/// [`SPLIT_KEYS`] keys and [`merge_parts`] folds split parts with this same
/// function in the same order, so a query's output does not depend on how
/// its key range was split between threads (nor, therefore, on the other
/// sequences of the step or the chunking of a prompt). An empty side
/// (`m = -inf`) leaves the other exactly as it is.
#[inline]
pub(crate) fn fold(tm: &mut f32, tl: &mut f32, tacc: &mut [f32], m: f32, l: f32, acc: &[f32]) {
    if m == f32::NEG_INFINITY {
        return;
    }
    if *tm == f32::NEG_INFINITY {
        (*tm, *tl) = (m, l);
        tacc.copy_from_slice(acc);
        return;
    }
    let mx = tm.max(m);
    let (a, b) = ((*tm - mx).exp(), (m - mx).exp());
    *tl = *tl * a + l * b;
    for (t, v) in tacc.iter_mut().zip(acc) {
        *t = *t * a + v * b;
    }
    *tm = mx;
}

/// Combines the split results of each (token, kv head):
/// `m = max m_i`, `out = sum(acc_i e^(m_i - m)) / sum(l_i e^(m_i - m))`.
/// A part's slots hold, per span result, its tile's queries in order: accs
/// `[nt][len]`, then `m` and `l` of each query (`[nt][2 * group]`).
fn merge_parts(items: &[Item], seqs: &[AttnSeq<'_>], parts: &[f32], out: &mut [f32], shape: AttnShape) {
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let len = group * hd;
    let width = shape.n_heads * hd;
    let part_len = len + 2 * group;
    let mut i = 0;
    while i < items.len() {
        if items[i].part.is_none() {
            i += 1;
            continue;
        }
        let it = items[i];
        let n = items[i..]
            .iter()
            .take_while(|x| x.part.is_some() && x.seq == it.seq && x.t0 == it.t0 && x.kv_head == it.kv_head)
            .count();
        let nt = it.nt;
        // Every span result of the tile, in key order: part k's span j is
        // at slot `part + j * nt` (accs `[nt][len]`, then `(m, l)`).
        let regions: Vec<usize> = items[i..i + n]
            .iter()
            .flat_map(|it| (0..it.spans).map(move |j| (it.part.expect("split part") + j * nt) * part_len))
            .collect();
        for t in 0..nt {
            let off = (seqs[it.seq].first_row + it.t0 + t) * width + it.kv_head * len;
            let o = &mut out[off..off + len];
            for h in 0..group {
                let oh = &mut o[h * hd..(h + 1) * hd];
                oh.fill(0.0);
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                for &r in &regions {
                    let acc = &parts[r + t * len + h * hd..r + t * len + (h + 1) * hd];
                    let ml = &parts[r + nt * len + t * 2 * group..r + nt * len + (t + 1) * 2 * group];
                    fold(&mut m, &mut l, oh, ml[h], ml[group + h], acc);
                }
                // As the kernels normalize: times the reciprocal.
                let r = 1.0 / l;
                oh.iter_mut().for_each(|d| *d *= r);
            }
        }
        i += n;
    }
}

/// New tokens whose queries share one pass over the K/V blocks.
pub const QUERY_TILE: usize = 16;

/// The queries of one work item: token `t` of the tile reads
/// `q[rows[t]..rows[t] + len]` and attends to `n_keys - (rows.len() - 1 - t)` keys.
struct QueryTile<'a> {
    q: &'a [f32],
    rows: &'a [usize],
    len: usize,
}

/// Where the keys of one work item live.
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    pub pool: &'a KvPool,
    pub layer: usize,
    pub kv_head: usize,
    pub table: &'a [BlockId],
    /// First key of the range (0 unless the item is one split of a range).
    pub first_key: usize,
    /// End of the key range (for a tile: the last token's causal limit).
    pub n_keys: usize,
    /// The tile's last token's causal limit: token `t` of `nt` sees keys
    /// below `min(n_keys, causal_end - (nt - 1 - t))`.
    pub causal_end: usize,
    /// Blocks and kv head of the work item this thread runs next, from its
    /// first key: the last span prefetches them (see `attend_spans`).
    pub then: Option<(&'a [BlockId], usize)>,
}

/// Scalar reference: two-pass softmax over all keys, for each query head of
/// the group (`q`, `out`: `[group, head_dim]`).
pub fn attend_scalar(q: &[f32], out: &mut [f32], keys: &Keys<'_>, shape: AttnShape) {
    let hd = shape.head_dim;
    let bs = keys.pool.layout().block_size;
    // Key runs are dimension major, value runs slot major.
    let key = |j: usize, kv: usize| -> Vec<f32> {
        let run = keys.pool.run(keys.table[j / bs], keys.layer, kv, keys.kv_head);
        match kv {
            0 => (0..hd).map(|d| run[d * bs + j % bs].to_f32()).collect(),
            _ => run[(j % bs) * hd..(j % bs + 1) * hd].iter().map(|v| v.to_f32()).collect(),
        }
    };
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        let scores: Vec<f32> =
            (0..keys.n_keys).map(|j| key(j, 0).iter().zip(qh).map(|(k, q)| k * q).sum::<f32>() * shape.scale).collect();
        let m = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let p: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let l: f32 = p.iter().sum();
        oh.fill(0.0);
        for (j, pj) in p.iter().enumerate() {
            for (o, v) in oh.iter_mut().zip(key(j, 1)) {
                *o += pj / l * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::super::matmul::avx2::hsum;
    use super::super::vmath::{exp256, exp512};
    use super::{AttnShape, Keys, QueryTile};

    const MAX_HD: usize = 256;
    const MAX_GROUP: usize = 16;

    /// Keys per pass: whole blocks, so the softmax bookkeeping (max,
    /// rescale, one exp) runs once per 64 keys rather than once per block.
    const SPAN: usize = 64;

    /// The vector operations of one pass over a span, in 8 lanes (AVX2) or
    /// 16 (AVX-512). [`attend_spans`] is written once over them; the entry
    /// points enable the target features, and everything here is inlined
    /// into them.
    trait Lanes {
        /// Lanes per vector; head_dim must be a multiple of it.
        const W: usize;
        #[inline(always)]
        unsafe fn to_f32(src: &[f16], dst: &mut [f32]) {
            let whole = src.len() / Self::W * Self::W;
            for i in (0..whole).step_by(Self::W) {
                Self::vec_to_f32(src.as_ptr().add(i), dst.as_mut_ptr().add(i));
            }
            for i in whole..src.len() {
                dst[i] = src[i].to_f32();
            }
        }
        /// Row `r` of `src` (`[rows][width]`) into `dst[r * stride..][..width]`.
        #[inline(always)]
        unsafe fn rows_to_f32(src: &[f16], width: usize, dst: &mut [f32], stride: usize) {
            let rows = src.len() / width;
            assert!(dst.len() >= (rows - 1) * stride + width);
            if width == Self::W {
                for r in 0..rows {
                    Self::vec_to_f32(src.as_ptr().add(r * width), dst.as_mut_ptr().add(r * stride));
                }
            } else {
                for r in 0..rows {
                    Self::to_f32(&src[r * width..(r + 1) * width], &mut dst[r * stride..r * stride + width]);
                }
            }
        }
        /// `W` values at `src` to `dst`.
        unsafe fn vec_to_f32(src: *const f16, dst: *mut f32);
        /// At head_dim 64 and 16-slot blocks, tiles read K and V straight
        /// from the pool ([`Lanes::scores_direct`],
        /// [`Lanes::weighted_direct`]; a span's 16 KiB stay in L1 for the
        /// tile's other queries) rather than through the f32 scratch.
        const DIRECT: bool = false;
        /// [`Lanes::scores`] for `Q` queries (`n[i]` keys each) with the
        /// span's 4 key runs (`[64][16]` f16) in the pool, each key vector
        /// converted once for all of them; runs past the span's blocks
        /// repeat the first.
        #[allow(clippy::too_many_arguments)]
        unsafe fn scores_direct<const Q: usize>(
            _q: [&[f32]; Q],
            _k: &[*const f16; 4],
            _next: &[*const f16; 4],
            _n: [usize; Q],
            _scale: f32,
            _out: [&mut [[f32; SPAN]]; Q],
            _maxes: [&mut [f32]; Q],
        ) {
            unreachable!("no direct path")
        }
        /// [`Lanes::weighted_sums`] for `Q` queries over the first `n` keys
        /// (weights past a query's own keys must be 0), with the span's
        /// value runs (`[16][64]` f16) in the pool.
        unsafe fn weighted_direct<const Q: usize>(
            _acc: [&mut [f32]; Q],
            _c: [&[f32]; Q],
            _p: [&[[f32; SPAN]]; Q],
            _n: usize,
            _v: &[*const f16; 4],
            _next: &[*const f16; 4],
        ) {
            unreachable!("no direct path")
        }
        /// For each head `h` of `q` (`[group][hd]`): `out[h][j] = scale *
        /// q_h . k_j` for keys `j < n` of the span in `kt` (dimension major,
        /// `kt[d * SPAN + j]`), -inf from `n` to the next multiple of `W`;
        /// `maxes[h]` = the largest score.
        unsafe fn scores(
            q: &[f32],
            hd: usize,
            kt: &[f32],
            n: usize,
            scale: f32,
            out: &mut [[f32; SPAN]],
            maxes: &mut [f32],
        );
        /// `s[j] = exp(s[j] - m)` for `j < n` (s.len() is n rounded up to
        /// `W`); returns the sum of the first `n`.
        unsafe fn exp_shifted(s: &mut [f32], n: usize, m: f32) -> f32;
        /// `acc = c * acc + sum_j p[j] * V[j]`; V rows are contiguous.
        unsafe fn weighted_sum(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]);
        /// [`Lanes::weighted_sum`] for every head: `acc[h]` (`[group][hd]`)
        /// with `c[h]` and the first `n` of `p[h]`.
        #[inline(always)]
        unsafe fn weighted_sums(acc: &mut [f32], hd: usize, c: &[f32], p: &[[f32; SPAN]], n: usize, v: &[f32]) {
            for (h, (ch, ph)) in c.iter().zip(p).enumerate() {
                Self::weighted_sum(&mut acc[h * hd..(h + 1) * hd], *ch, &ph[..n], v);
            }
        }
        unsafe fn scale(acc: &mut [f32], c: f32);
    }

    struct Avx2;
    struct Avx512;

    impl Lanes for Avx2 {
        const W: usize = 8;

        #[inline(always)]
        unsafe fn vec_to_f32(src: *const f16, dst: *mut f32) {
            _mm256_storeu_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i)));
        }

        /// One head at a time, the span's 64 keys in eight accumulators; a
        /// multiply-add per dimension gives eight scores. (With keys slot
        /// major this took one dot product and a horizontal sum per key.)
        #[inline(always)]
        unsafe fn scores(
            q: &[f32],
            hd: usize,
            kt: &[f32],
            n: usize,
            scale: f32,
            out: &mut [[f32; SPAN]],
            maxes: &mut [f32],
        ) {
            debug_assert!(kt.len() >= hd * SPAN && n <= SPAN);
            let chunks = n.div_ceil(8);
            for (h, (o, mx)) in out.iter_mut().zip(maxes.iter_mut()).enumerate() {
                let qh = &q[h * hd..(h + 1) * hd];
                let mut a = [_mm256_setzero_ps(); SPAN / 8];
                for (d, &qd) in qh.iter().enumerate() {
                    let qv = _mm256_set1_ps(qd);
                    let row = kt.as_ptr().add(d * SPAN);
                    for (c, ac) in a.iter_mut().enumerate().take(chunks) {
                        *ac = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(8 * c)), *ac);
                    }
                }
                let sv = _mm256_set1_ps(scale);
                let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
                for (c, ac) in a.iter().enumerate().take(chunks) {
                    let mut sc = _mm256_mul_ps(*ac, sv);
                    if 8 * c + 8 > n {
                        let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
                        let keep = _mm256_cmp_ps(lane, _mm256_set1_ps((n - 8 * c) as f32), _CMP_LT_OQ);
                        sc = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), sc, keep);
                    }
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * c), sc);
                    vmax = _mm256_max_ps(vmax, sc);
                }
                let m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                *mx = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            }
        }

        #[inline(always)]
        unsafe fn exp_shifted(s: &mut [f32], n: usize, m: f32) -> f32 {
            let mv = _mm256_set1_ps(m);
            let mut sum = _mm256_setzero_ps();
            for i in (0..s.len()).step_by(8) {
                let x = _mm256_sub_ps(_mm256_loadu_ps(s.as_ptr().add(i)), mv);
                let mut e = exp256(x);
                if i + 8 > n {
                    let lane = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
                    let keep = _mm256_cmp_ps(lane, _mm256_set1_ps((n - i) as f32), _CMP_LT_OQ);
                    e = _mm256_and_ps(e, keep);
                }
                _mm256_storeu_ps(s.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
            }
            hsum(sum)
        }

        #[inline(always)]
        unsafe fn weighted_sum(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
            match acc.len() {
                32 => weighted_sum_256::<4>(acc, c, p, v),
                64 => weighted_sum_256::<8>(acc, c, p, v),
                128 => weighted_sum_256::<16>(acc, c, p, v),
                hd => {
                    Self::scale(acc, c);
                    for (j, &pj) in p.iter().enumerate() {
                        let pv = _mm256_set1_ps(pj);
                        for i in (0..hd).step_by(8) {
                            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                            let x = _mm256_loadu_ps(v.as_ptr().add(j * hd + i));
                            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(pv, x, a));
                        }
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn scale(acc: &mut [f32], c: f32) {
            let c = _mm256_set1_ps(c);
            for i in (0..acc.len()).step_by(8) {
                let a = _mm256_loadu_ps(acc.as_ptr().add(i));
                _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_mul_ps(a, c));
            }
        }
    }

    /// `acc = c * acc + sum_j p[j] * V[j]` with the accumulator row in
    /// registers (`HD8 * 8` = head_dim).
    #[inline(always)]
    unsafe fn weighted_sum_256<const HD8: usize>(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
        let cv = _mm256_set1_ps(c);
        let mut r = [_mm256_setzero_ps(); HD8];
        for (k, rk) in r.iter_mut().enumerate() {
            *rk = _mm256_mul_ps(cv, _mm256_loadu_ps(acc.as_ptr().add(8 * k)));
        }
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            let row = v.as_ptr().add(j * HD8 * 8);
            for (k, rk) in r.iter_mut().enumerate() {
                *rk = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(8 * k)), *rk);
            }
        }
        for (k, rk) in r.iter().enumerate() {
            _mm256_storeu_ps(acc.as_mut_ptr().add(8 * k), *rk);
        }
    }

    impl Lanes for Avx512 {
        const W: usize = 16;
        const DIRECT: bool = true;

        #[inline(always)]
        unsafe fn scores_direct<const Q: usize>(
            q: [&[f32]; Q],
            k: &[*const f16; 4],
            next: &[*const f16; 4],
            n: [usize; Q],
            scale: f32,
            out: [&mut [[f32; SPAN]]; Q],
            maxes: [&mut [f32]; Q],
        ) {
            scores_direct_q::<Q>(q, k, next, n, scale, out, maxes)
        }

        #[inline(always)]
        unsafe fn weighted_direct<const Q: usize>(
            acc: [&mut [f32]; Q],
            c: [&[f32]; Q],
            p: [&[[f32; SPAN]]; Q],
            n: usize,
            v: &[*const f16; 4],
            next: &[*const f16; 4],
        ) {
            weighted_direct_q::<Q>(acc, c, p, n, v, next)
        }

        #[inline(always)]
        unsafe fn vec_to_f32(src: *const f16, dst: *mut f32) {
            _mm512_storeu_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i)));
        }

        /// Up to three heads at a time over the span's 64 keys: 12
        /// accumulators, each dimension's 4 key vectors loaded once for all
        /// three heads.
        #[inline(always)]
        unsafe fn scores(
            q: &[f32],
            hd: usize,
            kt: &[f32],
            n: usize,
            scale: f32,
            out: &mut [[f32; SPAN]],
            maxes: &mut [f32],
        ) {
            debug_assert!(kt.len() >= hd * SPAN && n <= SPAN);
            let mut h = 0;
            while h < out.len() {
                let take = (out.len() - h).min(3);
                let (o, mx) = (&mut out[h..h + take], &mut maxes[h..h + take]);
                let qh = &q[h * hd..(h + take) * hd];
                match (take, n.div_ceil(16)) {
                    (3, 4) => scores_heads::<3, 4>(qh, hd, kt, n, scale, o, mx),
                    (3, 3) => scores_heads::<3, 3>(qh, hd, kt, n, scale, o, mx),
                    (3, 2) => scores_heads::<3, 2>(qh, hd, kt, n, scale, o, mx),
                    (3, _) => scores_heads::<3, 1>(qh, hd, kt, n, scale, o, mx),
                    (2, _) => scores_heads::<2, 4>(qh, hd, kt, n, scale, o, mx),
                    _ => scores_heads::<1, 4>(qh, hd, kt, n, scale, o, mx),
                }
                h += take;
            }
        }

        #[inline(always)]
        unsafe fn exp_shifted(s: &mut [f32], n: usize, m: f32) -> f32 {
            let mv = _mm512_set1_ps(m);
            let mut sum = _mm512_setzero_ps();
            for i in (0..s.len()).step_by(16) {
                let mut e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr().add(i)), mv));
                if i + 16 > n {
                    e = _mm512_maskz_mov_ps(((1u32 << (n - i)) - 1) as __mmask16, e);
                }
                _mm512_storeu_ps(s.as_mut_ptr().add(i), e);
                sum = _mm512_add_ps(sum, e);
            }
            _mm512_reduce_add_ps(sum)
        }

        #[inline(always)]
        unsafe fn weighted_sum(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
            match acc.len() {
                32 => weighted_sum_512::<2>(acc, c, p, v),
                64 => weighted_sum_512::<4>(acc, c, p, v),
                128 => weighted_sum_512::<8>(acc, c, p, v),
                hd => {
                    Self::scale(acc, c);
                    for (j, &pj) in p.iter().enumerate() {
                        let pv = _mm512_set1_ps(pj);
                        for i in (0..hd).step_by(16) {
                            let a = _mm512_loadu_ps(acc.as_ptr().add(i));
                            let x = _mm512_loadu_ps(v.as_ptr().add(j * hd + i));
                            _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_fmadd_ps(pv, x, a));
                        }
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn scale(acc: &mut [f32], c: f32) {
            let c = _mm512_set1_ps(c);
            for i in (0..acc.len()).step_by(16) {
                let a = _mm512_loadu_ps(acc.as_ptr().add(i));
                _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_mul_ps(a, c));
            }
        }
    }

    /// Scores of `G` heads over the first `C` 16-key chunks of a span
    /// (`C * 16 >= n`); see [`Lanes::scores`]. Register tiles are indexed
    /// by constant bounds on purpose, so the loops unroll.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn scores_heads<const G: usize, const C: usize>(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        n: usize,
        scale: f32,
        out: &mut [[f32; SPAN]],
        maxes: &mut [f32],
    ) {
        let mut a = [[_mm512_setzero_ps(); C]; G];
        for d in 0..hd {
            let row = kt.as_ptr().add(d * SPAN);
            let k: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(row.add(16 * c)));
            for (g, ag) in a.iter_mut().enumerate() {
                let qv = _mm512_set1_ps(*q.get_unchecked(g * hd + d));
                for c in 0..C {
                    ag[c] = _mm512_fmadd_ps(qv, k[c], ag[c]);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for g in 0..G {
            let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in 0..C.min(n.div_ceil(16)) {
                let mut sc = _mm512_mul_ps(a[g][c], sv);
                if 16 * c + 16 > n {
                    let keep = ((1u32 << (n - 16 * c)) - 1) as __mmask16;
                    sc = _mm512_mask_blend_ps(keep, _mm512_set1_ps(f32::NEG_INFINITY), sc);
                }
                _mm512_storeu_ps(out[g].as_mut_ptr().add(16 * c), sc);
                vmax = _mm512_max_ps(vmax, sc);
            }
            maxes[g] = _mm512_reduce_max_ps(vmax);
        }
    }

    /// Spans of K/V prefetched (into L2) ahead of the one being computed.
    /// A 5-row decode at ~330 tokens of context, attention alone, K/V out
    /// of cache (`attn_steps 5 328 200 0 2`, medians of 5 interleaved
    /// runs): 1.91 ms with none, 1.71 with 2, 1.75 with 4, 1.77 with 4 and
    /// the next item's first span as well. Plain reads of the same K/V take
    /// 0.7 ms and the compute alone (K/V in cache) ~0.8 ms: the two still
    /// overlap poorly.
    const KV_AHEAD: usize = 2;

    /// Prefetches the K and V runs of the span of keys starting at `first`.
    #[inline(always)]
    unsafe fn prefetch_span(keys: &Keys<'_>, first: usize) {
        let bs = keys.pool.layout().block_size;
        if first >= keys.n_keys {
            return;
        }
        let n = (keys.n_keys - first).min(SPAN);
        for &block in keys.table[first / bs..].iter().take(n.div_ceil(bs)) {
            for kv in 0..2 {
                let run = keys.pool.run(block, keys.layer, kv, keys.kv_head);
                let p = run.as_ptr() as *const i8;
                for off in (0..run.len() * 2).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(p.add(off));
                }
            }
        }
    }

    /// Step `i` (of 64) of spreading the prefetch of the next span's four
    /// 2 KiB runs over a loop, two cache lines per step, so reads stay in
    /// flight while the current span computes. Issued all at once at the
    /// top of a span (32 KiB), the same prefetches gained little: 5 decodes
    /// at ~330 tokens of context, attention alone, K/V out of cache: 1.23
    /// ms -> 0.82 ms; a whole 5-row decode step 4.54 -> 4.19 ms (medians of
    /// 5 interleaved runs).
    #[inline(always)]
    unsafe fn prefetch_paced(runs: &[*const f16; 4], i: usize) {
        let run = runs[(i / 16) & 3];
        if !run.is_null() {
            let p = (run as *const i8).add((i % 16) * 128);
            _mm_prefetch::<_MM_HINT_T0>(p);
            _mm_prefetch::<_MM_HINT_T0>(p.add(64));
        }
    }

    #[inline(always)]
    unsafe fn load_f16x16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// [`scores_heads`] for `G` heads of `Q` queries at head_dim 64, the
    /// keys read from the pool's f16 runs (`[64][16]` each, 4 per span):
    /// each key vector is loaded and converted once for all of them (two
    /// queries x 3 heads x 4 accumulators fill the 32 registers).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn scores_heads_f16<const G: usize, const Q: usize>(
        q: [&[f32]; Q],
        k: &[*const f16; 4],
        next: &[*const f16; 4],
        n: [usize; Q],
        scale: f32,
        out: [&mut [[f32; SPAN]]; Q],
        maxes: [&mut [f32]; Q],
    ) {
        let mut a = [[[_mm512_setzero_ps(); 4]; G]; Q];
        for d in 0..64 {
            prefetch_paced(next, d);
            let kd: [__m512; 4] = std::array::from_fn(|c| load_f16x16(k[c].add(16 * d)));
            for g in 0..G {
                for i in 0..Q {
                    let qv = _mm512_set1_ps(*q[i].get_unchecked(g * 64 + d));
                    for c in 0..4 {
                        a[i][g][c] = _mm512_fmadd_ps(qv, kd[c], a[i][g][c]);
                    }
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for (i, (o, mx)) in out.into_iter().zip(maxes).enumerate() {
            for g in 0..G {
                let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
                for c in 0..n[i].div_ceil(16) {
                    let mut sc = _mm512_mul_ps(a[i][g][c], sv);
                    if 16 * c + 16 > n[i] {
                        let keep = ((1u32 << (n[i] - 16 * c)) - 1) as __mmask16;
                        sc = _mm512_mask_blend_ps(keep, _mm512_set1_ps(f32::NEG_INFINITY), sc);
                    }
                    _mm512_storeu_ps(o[g].as_mut_ptr().add(16 * c), sc);
                    vmax = _mm512_max_ps(vmax, sc);
                }
                mx[g] = _mm512_reduce_max_ps(vmax);
            }
        }
    }

    /// `acc[g] = c[g] * acc[g] + sum_j p[g][j] * V[j]` for `G` heads of
    /// `Q` queries at head_dim 64, the values read from the pool's f16
    /// runs (`[16][64]` each): each V row is converted once for all.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn weighted_heads_f16<const G: usize, const Q: usize>(
        acc: [&mut [f32]; Q],
        c: [&[f32]; Q],
        p: [&[[f32; SPAN]]; Q],
        n: usize,
        v: &[*const f16; 4],
        next: &[*const f16; 4],
    ) {
        let mut r: [[[__m512; 4]; G]; Q] = std::array::from_fn(|i| {
            debug_assert!(acc[i].len() >= G * 64);
            std::array::from_fn(|g| {
                let cv = _mm512_set1_ps(c[i][g]);
                std::array::from_fn(|k| _mm512_mul_ps(cv, _mm512_loadu_ps(acc[i].as_ptr().add(g * 64 + 16 * k))))
            })
        });
        for j in 0..n {
            prefetch_paced(next, j);
            let row = v[j / 16].add((j % 16) * 64);
            let x: [__m512; 4] = std::array::from_fn(|k| load_f16x16(row.add(16 * k)));
            for g in 0..G {
                for i in 0..Q {
                    let pv = _mm512_set1_ps(*p[i].get_unchecked(g).get_unchecked(j));
                    for k in 0..4 {
                        r[i][g][k] = _mm512_fmadd_ps(pv, x[k], r[i][g][k]);
                    }
                }
            }
        }
        for (a, ri) in acc.into_iter().zip(&r) {
            for (g, rg) in ri.iter().enumerate() {
                for (k, rk) in rg.iter().enumerate() {
                    _mm512_storeu_ps(a.as_mut_ptr().add(g * 64 + 16 * k), *rk);
                }
            }
        }
    }

    /// [`Lanes::scores_direct`] for `Q` queries: heads in groups of up to 3.
    #[inline(always)]
    unsafe fn scores_direct_q<const Q: usize>(
        q: [&[f32]; Q],
        k: &[*const f16; 4],
        next: &[*const f16; 4],
        n: [usize; Q],
        scale: f32,
        mut out: [&mut [[f32; SPAN]]; Q],
        mut maxes: [&mut [f32]; Q],
    ) {
        let heads = out[0].len();
        let mut h = 0;
        while h < heads {
            let take = (heads - h).min(3);
            let qh = q.map(|qi| &qi[h * 64..(h + take) * 64]);
            let o = out.each_mut().map(|o| &mut o[h..h + take]);
            let mx = maxes.each_mut().map(|m| &mut m[h..h + take]);
            match take {
                3 => scores_heads_f16::<3, Q>(qh, k, next, n, scale, o, mx),
                2 => scores_heads_f16::<2, Q>(qh, k, next, n, scale, o, mx),
                _ => scores_heads_f16::<1, Q>(qh, k, next, n, scale, o, mx),
            }
            h += take;
        }
    }

    /// [`Lanes::weighted_direct`] for `Q` queries: heads in groups of up to 3.
    #[inline(always)]
    unsafe fn weighted_direct_q<const Q: usize>(
        mut acc: [&mut [f32]; Q],
        c: [&[f32]; Q],
        p: [&[[f32; SPAN]]; Q],
        n: usize,
        v: &[*const f16; 4],
        next: &[*const f16; 4],
    ) {
        let heads = c[0].len();
        let mut h = 0;
        while h < heads {
            let take = (heads - h).min(3);
            let a = acc.each_mut().map(|a| &mut a[h * 64..(h + take) * 64]);
            let (cc, pp) = (c.map(|ci| &ci[h..h + take]), p.map(|pi| &pi[h..h + take]));
            match take {
                3 => weighted_heads_f16::<3, Q>(a, cc, pp, n, v, next),
                2 => weighted_heads_f16::<2, Q>(a, cc, pp, n, v, next),
                _ => weighted_heads_f16::<1, Q>(a, cc, pp, n, v, next),
            }
            h += take;
        }
    }

    /// As [`weighted_sum_256`] in 16 lanes, with even and odd keys in two
    /// accumulator sets: with only `HD16` chains the FMA latency, not its
    /// throughput, would bound the loop.
    #[inline(always)]
    unsafe fn weighted_sum_512<const HD16: usize>(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
        let cv = _mm512_set1_ps(c);
        let mut r0 = [_mm512_setzero_ps(); HD16];
        let mut r1 = [_mm512_setzero_ps(); HD16];
        for (k, rk) in r0.iter_mut().enumerate() {
            *rk = _mm512_mul_ps(cv, _mm512_loadu_ps(acc.as_ptr().add(16 * k)));
        }
        let pairs = p.len() / 2;
        for j in 0..pairs {
            let (p0, p1) = (_mm512_set1_ps(p[2 * j]), _mm512_set1_ps(p[2 * j + 1]));
            let row = v.as_ptr().add(2 * j * HD16 * 16);
            for k in 0..HD16 {
                r0[k] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(row.add(16 * k)), r0[k]);
                r1[k] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(row.add(HD16 * 16 + 16 * k)), r1[k]);
            }
        }
        if p.len() % 2 == 1 {
            let pv = _mm512_set1_ps(p[p.len() - 1]);
            let row = v.as_ptr().add((p.len() - 1) * HD16 * 16);
            for (k, rk) in r0.iter_mut().enumerate() {
                *rk = _mm512_fmadd_ps(pv, _mm512_loadu_ps(row.add(16 * k)), *rk);
            }
        }
        for k in 0..HD16 {
            _mm512_storeu_ps(acc.as_mut_ptr().add(16 * k), _mm512_add_ps(r0[k], r1[k]));
        }
    }

    /// True when the AVX-512 path can run: the CPU has it and head_dim is a
    /// multiple of 16.
    pub(super) fn use_avx512(head_dim: usize) -> bool {
        head_dim.is_multiple_of(16) && super::super::matmul::avx2::has_avx512()
    }

    /// Online softmax for a tile of queries: each K/V span is converted
    /// once for all of them; query `t` stops at its own causal limit.
    /// The caller checked AVX2/FMA/F16C.
    pub(super) unsafe fn attend_tile(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        partial: Option<&mut [f32]>,
    ) {
        with_scratch(tile, outs, keys, shape, partial, spans_avx2)
    }

    /// [`attend_tile`] in 16 lanes; the caller checked [`use_avx512`].
    pub(super) unsafe fn attend_tile_avx512(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        partial: Option<&mut [f32]>,
    ) {
        with_scratch(tile, outs, keys, shape, partial, spans_avx512)
    }

    type SpansFn = unsafe fn(
        &QueryTile<'_>,
        &mut [&mut [f32]],
        &Keys<'_>,
        AttnShape,
        &mut [f32],
        &mut [f32],
        &mut [f32],
        Option<&mut [f32]>,
    );

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn spans_avx2(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        kbuf: &mut [f32],
        vbuf: &mut [f32],
        tbuf: &mut [f32],
        partial: Option<&mut [f32]>,
    ) {
        attend_spans::<Avx2>(tile, outs, keys, shape, kbuf, vbuf, tbuf, partial)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn spans_avx512(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        kbuf: &mut [f32],
        vbuf: &mut [f32],
        tbuf: &mut [f32],
        partial: Option<&mut [f32]>,
    ) {
        attend_spans::<Avx512>(tile, outs, keys, shape, kbuf, vbuf, tbuf, partial)
    }

    /// Whether the SIMD tiles take this shape (else each query runs the
    /// scalar reference, and key ranges are not split).
    pub(super) fn tiles_supported(hd: usize, bs: usize, group: usize) -> bool {
        hd.is_multiple_of(8) && hd <= MAX_HD && bs <= SPAN && group <= MAX_GROUP
    }

    unsafe fn with_scratch(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        partial: Option<&mut [f32]>,
        spans: SpansFn,
    ) {
        let hd = shape.head_dim;
        let bs = keys.pool.layout().block_size;
        let nt = tile.rows.len();
        let group = tile.len / hd;
        if !tiles_supported(hd, bs, group) {
            debug_assert!(partial.is_none() && keys.first_key == 0, "split items need the SIMD path");
            for (t, o) in outs.iter_mut().enumerate() {
                let k = Keys { n_keys: keys.n_keys - (nt - 1 - t), ..*keys };
                super::attend_scalar(&tile.q[tile.rows[t]..tile.rows[t] + tile.len], o, &k, shape);
            }
            return;
        }
        // Per-thread scratch: zeroing two 64 KiB stack arrays per work item
        // was a third of a decode step's attention time.
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(2 * SPAN * hd + 2 * super::QUERY_TILE * tile.len, 0.0);
            let (kbuf, rest) = scratch.split_at_mut(SPAN * hd);
            let (vbuf, rest) = rest.split_at_mut(SPAN * hd);
            let (tbuf, abuf) = rest.split_at_mut(super::QUERY_TILE * tile.len);
            if partial.is_some() {
                // A split item's running span lives in scratch; its results
                // go to its slots.
                let mut accs: [&mut [f32]; super::QUERY_TILE] = Default::default();
                for (a, chunk) in accs.iter_mut().zip(abuf.chunks_exact_mut(tile.len)) {
                    *a = chunk;
                }
                spans(tile, &mut accs[..nt], keys, shape, kbuf, vbuf, tbuf, partial);
            } else {
                spans(tile, outs, keys, shape, kbuf, vbuf, tbuf, partial);
            }
        });
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Online softmax over one span for each head of a query: updates the
    /// running max `m` and sum `l`, turns `scores` into weights, and
    /// returns the factor for the accumulated outputs.
    #[inline(always)]
    unsafe fn softmax_update<L: Lanes>(
        m: &mut [f32; MAX_GROUP],
        l: &mut [f32; MAX_GROUP],
        scores: &mut [[f32; SPAN]],
        maxes: &[f32; MAX_GROUP],
        nn: usize,
    ) -> [f32; MAX_GROUP] {
        let mut rescale = [1f32; MAX_GROUP];
        for (h, sh) in scores.iter_mut().enumerate() {
            let m_new = m[h].max(maxes[h]);
            let c = if m[h] == m_new { 1.0 } else { _mm256_cvtss_f32(exp256(_mm256_set1_ps(m[h] - m_new))) };
            let lsum = L::exp_shifted(&mut sh[..nn.next_multiple_of(L::W)], nn, m_new);
            m[h] = m_new;
            l[h] = l[h] * c + lsum;
            rescale[h] = c;
        }
        rescale
    }

    /// `tbuf` holds the folded totals of an item that starts at key 0
    /// (`nt * len`): at every multiple of [`super::SPLIT_KEYS`] the running
    /// span's `(m, l, acc)` is folded into them and the span starts afresh,
    /// so that the result is the same fold of the same span partials
    /// whether the range ran here whole or as split parts.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn attend_spans<L: Lanes>(
        tile: &QueryTile<'_>,
        outs: &mut [&mut [f32]],
        keys: &Keys<'_>,
        shape: AttnShape,
        kbuf: &mut [f32],
        vbuf: &mut [f32],
        tbuf: &mut [f32],
        partial: Option<&mut [f32]>,
    ) {
        let hd = shape.head_dim;
        let bs = keys.pool.layout().block_size;
        let per = SPAN / bs;
        let nt = tile.rows.len();
        let group = tile.len / hd;
        let mut m = [[f32::NEG_INFINITY; MAX_GROUP]; super::QUERY_TILE];
        let mut l = [[0f32; MAX_GROUP]; super::QUERY_TILE];
        let mut scores = [[0f32; SPAN]; MAX_GROUP];
        let mut maxes = [0f32; MAX_GROUP];
        // The second query of a pair (direct path).
        let mut scores2 = [[0f32; SPAN]; MAX_GROUP];
        let mut maxes2 = [0f32; MAX_GROUP];
        for o in outs.iter_mut() {
            o.fill(0.0);
        }
        debug_assert!(keys.first_key.is_multiple_of(bs));
        debug_assert!(keys.first_key.is_multiple_of(super::SPLIT_KEYS), "parts start at span boundaries");
        let folds = keys.first_key == 0;
        // Whether a span was folded into the totals (else the running span
        // is the result: folding it into empty totals would copy it).
        let mut folded = false;
        let mut partial = partial;
        let mut slot = 0;
        // Writes the running span of every query to result slot `slot`
        // (a later part of a split range, one slot per span).
        let write_slot = |partial: &mut [f32],
                          slot: usize,
                          m: &[[f32; MAX_GROUP]; super::QUERY_TILE],
                          l: &[[f32; MAX_GROUP]; super::QUERY_TILE],
                          outs: &[&mut [f32]]| {
            let region = &mut partial[slot * nt * (tile.len + 2 * group)..][..nt * (tile.len + 2 * group)];
            let (accs, ml) = region.split_at_mut(nt * tile.len);
            for (t, (acc, mlt)) in accs.chunks_exact_mut(tile.len).zip(ml.chunks_exact_mut(2 * group)).enumerate() {
                acc.copy_from_slice(outs[t]);
                mlt[..group].copy_from_slice(&m[t][..group]);
                mlt[group..].copy_from_slice(&l[t][..group]);
            }
        };
        let (mut tm, mut tl) =
            ([[f32::NEG_INFINITY; MAX_GROUP]; super::QUERY_TILE], [[0f32; MAX_GROUP]; super::QUERY_TILE]);
        // Folds the running span of every query into the totals.
        let mut fold_all = |m: &[[f32; MAX_GROUP]; super::QUERY_TILE],
                            l: &[[f32; MAX_GROUP]; super::QUERY_TILE],
                            outs: &[&mut [f32]]| {
            for (t, o) in outs.iter().enumerate() {
                let tacc = &mut tbuf[t * tile.len..(t + 1) * tile.len];
                for h in 0..group {
                    let r = h * hd..(h + 1) * hd;
                    super::fold(&mut tm[t][h], &mut tl[t][h], &mut tacc[r.clone()], m[t][h], l[t][h], &o[r]);
                }
            }
        };
        let direct = L::DIRECT && hd == 64 && bs == 16;
        let mut first = keys.first_key;
        // The direct path prefetches the next span as it goes.
        for s in 0..if direct { 1 } else { KV_AHEAD } {
            prefetch_span(keys, first + s * per * bs);
        }
        while first < keys.n_keys {
            if first > keys.first_key && first.is_multiple_of(super::SPLIT_KEYS) {
                // The span ends: into the totals, or into its own slot.
                if folds {
                    fold_all(&m, &l, outs);
                    folded = true;
                } else if let Some(p) = partial.as_deref_mut() {
                    write_slot(p, slot, &m, &l, outs);
                    slot += 1;
                }
                for (t, o) in outs.iter_mut().enumerate() {
                    m[t] = [f32::NEG_INFINITY; MAX_GROUP];
                    l[t] = [0f32; MAX_GROUP];
                    o.fill(0.0);
                }
            }
            let n = (keys.n_keys - first).min(per * bs);
            if !direct {
                prefetch_span(keys, first + KV_AHEAD * per * bs);
            }
            let blocks = &keys.table[first / bs..][..n.div_ceil(bs)];
            let (mut kr, mut vr) = ([std::ptr::null::<f16>(); 4], [std::ptr::null::<f16>(); 4]);
            let (mut kn, mut vn) = ([std::ptr::null::<f16>(); 4], [std::ptr::null::<f16>(); 4]);
            if direct {
                for i in 0..4 {
                    let block = blocks[if i < blocks.len() { i } else { 0 }];
                    kr[i] = keys.pool.run(block, keys.layer, 0, keys.kv_head).as_ptr();
                    vr[i] = keys.pool.run(block, keys.layer, 1, keys.kv_head).as_ptr();
                }
                let next = (first + n).div_ceil(bs)..keys.n_keys.div_ceil(bs);
                // The last span prefetches the next item's first: 5 decodes at
                // ~230 tokens, attention alone, K/V out of cache, 0.51 -> 0.45
                // ms (`attn_steps 5 228 300 0 2`, medians of 5 interleaved
                // runs); in whole 5-row decode steps the attention phase
                // 0.86-0.97 -> 0.81-0.87 ms (6 runs each). Rayon's stealing
                // left a thread's next item unknown; the team's lanes keep
                // it `i + 1`.
                let (table, head) = match keys.then {
                    Some(t) if next.is_empty() => t,
                    _ => (&keys.table[next], keys.kv_head),
                };
                for (i, &block) in table.iter().take(4).enumerate() {
                    kn[i] = keys.pool.run(block, keys.layer, 0, head).as_ptr();
                    vn[i] = keys.pool.run(block, keys.layer, 1, head).as_ptr();
                }
            }
            // Otherwise K into `kbuf` dimension major (`[d][SPAN]`, as the
            // runs are), V into `vbuf` slot major.
            if !direct {
                for (b, &block) in blocks.iter().enumerate() {
                    let valid = (n - b * bs).min(bs);
                    // Whole rows of the block: slots past `valid` hold stale
                    // but finite values, and their scores are masked.
                    let k = keys.pool.run(block, keys.layer, 0, keys.kv_head);
                    L::rows_to_f32(k, bs, &mut kbuf[b * bs..], SPAN);
                    let (v, at) = (keys.pool.run(block, keys.layer, 1, keys.kv_head), b * bs * hd);
                    L::to_f32(&v[..valid * hd], &mut vbuf[at..at + valid * hd]);
                }
            }
            let limit = |t: usize| keys.n_keys.min(keys.causal_end - (nt - 1 - t));
            let mut t = 0;
            while t < nt {
                if first >= limit(t) {
                    t += 1;
                    continue;
                }
                let nn = (limit(t) - first).min(n);
                let q = &tile.q[tile.rows[t]..tile.rows[t] + tile.len];
                // The tile's first query prefetches the next span; the
                // others would only repeat it.
                let none = [std::ptr::null::<f16>(); 4];
                let (kn, vn) = if t == 0 { (&kn, &vn) } else { (&none, &none) };
                // Queries after the first see at least its keys.
                if direct && t + 1 < nt {
                    let nn1 = (limit(t + 1) - first).min(n);
                    let q1 = &tile.q[tile.rows[t + 1]..tile.rows[t + 1] + tile.len];
                    L::scores_direct::<2>(
                        [q, q1],
                        &kr,
                        kn,
                        [nn, nn1],
                        shape.scale,
                        [&mut scores[..group], &mut scores2[..group]],
                        [&mut maxes[..group], &mut maxes2[..group]],
                    );
                    let c0 = softmax_update::<L>(&mut m[t], &mut l[t], &mut scores[..group], &maxes, nn);
                    let c1 = softmax_update::<L>(&mut m[t + 1], &mut l[t + 1], &mut scores2[..group], &maxes2, nn1);
                    // Query t weighs no key past its own.
                    for sh in &mut scores[..group] {
                        sh[nn..nn1].fill(0.0);
                    }
                    let (a, b) = outs.split_at_mut(t + 1);
                    L::weighted_direct::<2>(
                        [&mut *a[t], &mut *b[0]],
                        [&c0[..group], &c1[..group]],
                        [&scores[..group], &scores2[..group]],
                        nn1,
                        &vr,
                        vn,
                    );
                    t += 2;
                    continue;
                }
                if direct {
                    L::scores_direct::<1>(
                        [q],
                        &kr,
                        kn,
                        [nn],
                        shape.scale,
                        [&mut scores[..group]],
                        [&mut maxes[..group]],
                    );
                } else {
                    L::scores(q, hd, kbuf, nn, shape.scale, &mut scores[..group], &mut maxes[..group]);
                }
                let rescale = softmax_update::<L>(&mut m[t], &mut l[t], &mut scores[..group], &maxes, nn);
                if direct {
                    L::weighted_direct::<1>([&mut *outs[t]], [&rescale[..group]], [&scores[..group]], nn, &vr, vn);
                } else {
                    L::weighted_sums(outs[t], hd, &rescale[..group], &scores[..group], nn, vbuf);
                }
                t += 1;
            }
            first += n;
        }
        if folded {
            fold_all(&m, &l, outs);
            for (t, o) in outs.iter_mut().enumerate() {
                o.copy_from_slice(&tbuf[t * tile.len..(t + 1) * tile.len]);
            }
            (m, l) = (tm, tl);
        }
        if let Some(p) = partial {
            write_slot(p, slot, &m, &l, outs);
            return;
        }
        for (t, o) in outs.iter_mut().enumerate() {
            for h in 0..group {
                L::scale(&mut o[h * hd..(h + 1) * hd], 1.0 / l[t][h]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use semantic_kv::{BlockTable, KvLayout};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn long_decodes_split_their_keys_and_prefills_do_not() {
        let table: Vec<BlockId> = (0..64).map(BlockId).collect();
        let shape = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, scale: 0.125 };
        let decode = AttnSeq { block_table: &table, start_pos: 999, n_new: 1, first_row: 0 };
        let items = plan_items(&[decode], shape, 2, true);
        // 3 kv heads x 3 parts from span boundaries; the later ones keep a
        // result per span.
        assert_eq!(items.len(), 9);
        assert!(items.iter().all(|i| i.part.is_some() && i.k0 % SPLIT_KEYS == 0));
        assert!(items.iter().all(|i| i.spans == if i.k0 == 0 { 1 } else { (i.k1 - i.k0).div_ceil(SPLIT_KEYS) }));
        assert_eq!(items.iter().filter(|i| i.kv_head == 0).map(|i| i.k1 - i.k0).sum::<usize>(), 1000);
        let prefill = AttnSeq { n_new: 40, start_pos: 0, ..decode };
        assert!(plan_items(&[prefill], shape, 2, true).iter().all(|i| i.part.is_none()));
        assert!(plan_items(&[decode], shape, 2, false).iter().all(|i| i.part.is_none()));
    }

    #[test]
    fn deep_chunks_beside_decodes_split_at_span_boundaries() {
        let table: Vec<BlockId> = (0..128).map(BlockId).collect();
        let shape = AttnShape { n_heads: 9, n_kv_heads: 3, head_dim: 64, scale: 0.125 };
        let decode = AttnSeq { block_table: &table, start_pos: 199, n_new: 1, first_row: 0 };
        for nt in [2, 5, 16] {
            let chunk = AttnSeq { block_table: &table, start_pos: 1500, n_new: nt, first_row: 1 };
            let items = plan_items(&[decode, chunk], shape, 2, true);
            let parts: Vec<&Item> = items.iter().filter(|i| i.seq == 1).collect();
            assert!(parts.len() > 3, "nt={nt}: the chunk's 3 items split");
            for it in &parts {
                // Parts start at span boundaries.
                assert_eq!(it.k0 % SPLIT_KEYS, 0, "nt={nt}: {it:?}");
            }
            assert!(parts.iter().any(|i| i.k1 == 1500 + nt));
            // The short decode is not split; a lone thread splits nothing.
            assert!(items.iter().filter(|i| i.seq == 0).all(|i| i.part.is_none()));
            assert!(plan_items(&[decode, chunk], shape, 1, true).iter().all(|i| i.part.is_none()));
        }
    }

    /// The same query gets the same bits whether it runs in a tile of 16
    /// (split between the threads or not) or alone as a decode (split or
    /// not): reusing a cache or batching sequences differently must not
    /// change a greedy reply.
    #[test]
    fn a_query_gets_the_same_bits_however_its_keys_are_split_or_tiled() {
        let mut seed = 9;
        let team = crate::kernels::team::Team::new(2).unwrap();
        let (n_heads, n_kv, hd, bs) = (9, 3, 64, 16);
        let layout = KvLayout { n_layers: 2, n_kv_heads: n_kv, head_dim: hd, block_size: bs };
        let shape = AttnShape { n_heads, n_kv_heads: n_kv, head_dim: hd, scale: 0.125 };
        let (start, nt) = (1084, 16);
        let mut pool = KvPool::new(layout, (start + nt) / bs + 2);
        let mut table = BlockTable::default();
        assert!(pool.ensure_capacity(&mut table, start + nt));
        for pos in 0..start + nt {
            let k: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed) * 3.0).collect();
            let v: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed)).collect();
            pool.write_token(table.blocks(), 1, pos, &k, &v);
        }
        let width = n_heads * hd;
        let q: Vec<f32> = (0..nt * width).map(|_| lcg(&mut seed) * 2.0).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let path = Path::best(hd);
        let tile = AttnSeq { block_table: table.blocks(), start_pos: start, n_new: nt, first_row: 0 };
        let run_tile = |threads: Option<&crate::kernels::team::Team>| {
            let mut out = vec![f32::NAN; q.len()];
            let mut f = || paged_attention_on(path, &q, &mut out, None, &pool, 1, &[tile], shape);
            match threads {
                Some(t) => t.install(f),
                None => f(),
            }
            out
        };
        let whole = run_tile(None);
        assert_eq!(bits(&run_tile(Some(&team))), bits(&whole), "tile split between threads");
        for t in 0..nt {
            let one = AttnSeq { block_table: table.blocks(), start_pos: start + t, n_new: 1, first_row: 0 };
            assert!(plan_items(&[one], shape, 2, true).iter().any(|i| i.part.is_some()), "a long decode splits");
            let qr = &q[t * width..(t + 1) * width];
            for threads in [None, Some(&team)] {
                let mut out = vec![f32::NAN; width];
                let mut f = || paged_attention_on(path, qr, &mut out, None, &pool, 1, &[one], shape);
                match threads {
                    Some(tm) => tm.install(f),
                    None => f(),
                }
                assert_eq!(
                    bits(&out),
                    bits(&whole[t * width..(t + 1) * width]),
                    "query {t}, team {}",
                    threads.is_some()
                );
            }
        }
        pool.free_table(table).unwrap();
    }

    #[test]
    fn split_chunks_equal_scalar_reference() {
        let mut seed = 5;
        let team = crate::kernels::team::Team::new(2).unwrap();
        let (n_heads, n_kv, hd, bs) = (9, 3, 64, 16);
        let layout = KvLayout { n_layers: 2, n_kv_heads: n_kv, head_dim: hd, block_size: bs };
        let shape = AttnShape { n_heads, n_kv_heads: n_kv, head_dim: hd, scale: 0.125 };
        for (path, nt) in [(Path::best(hd), 2), (Path::best(hd), 7), (Path::Avx2, 3)] {
            #[cfg(target_arch = "x86_64")]
            if path == Path::Avx2 && !crate::kernels::simd_available() {
                continue;
            }
            // A short decode and a chunk of `nt` tokens at position 1300.
            let lens = [120, 1300 + nt];
            let mut pool = KvPool::new(layout, lens.iter().map(|l| l / bs + 1).sum::<usize>() + 2);
            let mut tables = Vec::new();
            for &n in &lens {
                let mut t = BlockTable::default();
                assert!(pool.ensure_capacity(&mut t, n));
                for pos in 0..n {
                    let k: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed) * 3.0).collect();
                    let v: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed)).collect();
                    pool.write_token(t.blocks(), 1, pos, &k, &v);
                }
                tables.push(t);
            }
            let seqs = [
                AttnSeq { block_table: tables[0].blocks(), start_pos: lens[0] - 1, n_new: 1, first_row: 0 },
                AttnSeq { block_table: tables[1].blocks(), start_pos: 1300, n_new: nt, first_row: 1 },
            ];
            assert!(plan_items(&seqs, shape, 2, true).iter().any(|i| i.part.is_some()));
            let width = n_heads * hd;
            let q: Vec<f32> = (0..(1 + nt) * width).map(|_| lcg(&mut seed)).collect();
            let mut out = vec![f32::NAN; q.len()];
            let mut out_q = vec![BlockQ8A::ZERO; q.len() / QK];
            team.install(|| paged_attention_on(path, &q, &mut out, Some(&mut out_q), &pool, 1, &seqs, shape));
            check_blocks(&out, &out_q);
            let len = hd * n_heads / n_kv;
            for (row, (si, n_keys)) in [(0, lens[0])].into_iter().chain((0..nt).map(|t| (1, 1301 + t))).enumerate() {
                for g in 0..n_kv {
                    let off = row * width + g * len;
                    let table = tables[si].blocks();
                    let keys = Keys {
                        first_key: 0,
                        pool: &pool,
                        layer: 1,
                        kv_head: g,
                        table,
                        n_keys,
                        causal_end: n_keys,
                        then: None,
                    };
                    let mut want = vec![0f32; len];
                    attend_scalar(&q[off..off + len], &mut want, &keys, shape);
                    for (a, b) in out[off..off + len].iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4, "{path:?} nt={nt} row {row}: {a} vs {b}");
                    }
                }
            }
            for t in tables {
                pool.free_table(t).unwrap();
            }
        }
    }

    #[test]
    fn simd_attention_equals_scalar_reference() {
        let mut seed = 3;
        let team = crate::kernels::team::Team::new(2).unwrap();
        let cases = [
            (1, 1, 8, 4, 1),
            (9, 3, 64, 16, 1),
            (9, 3, 64, 16, 37),
            (8, 2, 32, 8, 100),
            (4, 4, 128, 16, 17),
            (6, 1, 16, 32, 70),
            (9, 3, 64, 16, 90),
            // Groups of 2 and 5 (3 + 2) at head_dim 64, prefill and decode.
            (8, 4, 64, 16, 50),
            (10, 2, 64, 16, 40),
            (8, 4, 64, 16, 600),
            (10, 2, 64, 16, 1000),
            // A tile starting at an odd position (95): in its last span a
            // query pair sees 32 and 33 keys, so the first query's weight
            // for key 32 lies past its own scores (stale unless cleared).
            (9, 3, 64, 16, 100),
            // head_dim 64 off the direct path (8-slot blocks).
            (9, 3, 64, 8, 45),
            // Decode of long sequences: key ranges split across items.
            (9, 3, 64, 16, 1000),
            (8, 2, 32, 8, 600),
        ];
        for (n_heads, n_kv, hd, bs, n_tok) in cases {
            let layout = KvLayout { n_layers: 2, n_kv_heads: n_kv, head_dim: hd, block_size: bs };
            let mut pool = KvPool::new(layout, n_tok / bs + 8);
            // Scatter the table so blocks are not in order.
            let mut t = BlockTable::default();
            assert!(pool.ensure_capacity(&mut t, 3 * bs));
            let mut table = BlockTable::default();
            assert!(pool.ensure_capacity(&mut table, n_tok));
            pool.free_table(t).unwrap();
            for pos in 0..n_tok {
                let k: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed) * 3.0).collect();
                let v: Vec<f32> = (0..n_kv * hd).map(|_| lcg(&mut seed)).collect();
                pool.write_token(table.blocks(), 1, pos, &k, &v);
            }
            let shape = AttnShape { n_heads, n_kv_heads: n_kv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt() };
            let n_new = match n_tok {
                90 => 40,
                600 | 1000 => 1,
                _ => n_tok.min(5),
            };
            let q: Vec<f32> = (0..n_new * n_heads * hd).map(|_| lcg(&mut seed)).collect();
            let mut out = vec![0f32; q.len()];
            let seq = AttnSeq { block_table: table.blocks(), start_pos: n_tok - n_new, n_new, first_row: 0 };
            // Every path this CPU has, not only the one it would pick.
            let best = Path::best(hd);
            let mut paths = vec![Path::Scalar, best];
            if best == Path::Avx512 {
                paths.push(Path::Avx2);
            }
            paths.dedup();
            // On one thread, and on a team, where long decodes split
            // their keys across items.
            for (path, team) in paths.into_iter().flat_map(|p| [(p, None), (p, Some(&team))]) {
                out.fill(f32::NAN);
                // Quantized in the items where the outputs are whole blocks.
                let mut out_q = vec![BlockQ8A::ZERO; q.len() / QK];
                let blocks = quantizes_in_items(shape).then_some(&mut out_q[..]);
                let check = blocks.is_some();
                let run = || paged_attention_on(path, &q, &mut out, blocks, &pool, 1, &[seq], shape);
                match team {
                    Some(t) => t.install(run),
                    None => run(),
                }
                if check {
                    check_blocks(&out, &out_q);
                }
                check_against_scalar(&q, &out, &pool, table.blocks(), (n_heads, n_kv, hd, n_tok, n_new), shape, path);
            }
            pool.free_table(table).unwrap();
        }
    }

    /// The blocks written by the items are `out` quantized.
    fn check_blocks(out: &[f32], out_q: &[BlockQ8A]) {
        let mut want = vec![BlockQ8A::ZERO; out_q.len()];
        quantize_row_q8a(out, &mut want);
        assert!(out_q.iter().zip(&want).all(|(a, b)| a.qs == b.qs && a.d == b.d && a.s == b.s), "quantized outputs");
    }

    /// `out` against [`attend_scalar`] for every new token and kv head.
    fn check_against_scalar(
        q: &[f32],
        out: &[f32],
        pool: &KvPool,
        table: &[BlockId],
        (n_heads, n_kv, hd, n_tok, n_new): (usize, usize, usize, usize, usize),
        shape: AttnShape,
        path: Path,
    ) {
        let group = n_heads / n_kv;
        let len = group * hd;
        for t in 0..n_new {
            for g in 0..n_kv {
                let off = t * n_heads * hd + g * len;
                let n_keys = n_tok - n_new + t + 1;
                let keys =
                    Keys { first_key: 0, pool, layer: 1, kv_head: g, table, n_keys, causal_end: n_keys, then: None };
                let mut want = vec![0f32; len];
                attend_scalar(&q[off..off + len], &mut want, &keys, shape);
                let bs = pool.layout().block_size;
                for (a, b) in out[off..off + len].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{path:?} {n_heads}/{n_kv}x{hd} bs={bs}: {a} vs {b}");
                }
            }
        }
    }
}
