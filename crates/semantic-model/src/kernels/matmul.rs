//! Batched quantized matmul: `y[b, n] = sum_k x[b, k] * W[n, k]` for Q4_0,
//! Q4_1 and Q8_0 weights against [`BlockQ8A`] activations.
//!
//! Why our own: candle 0.11's CPU quantized matmul reads the weights once per
//! activation row (Q8_0: 16 ms per step for 1 sequence, 76 ms for 5) and its
//! Q4_1 dot product is scalar. Here each weight block is loaded from memory
//! once per step and unpacked once per tile of up to [`TILE`] activation rows.
//!
//! Layout: at load, weights are regrouped (not requantized: the same bytes)
//! into groups of 16 rows. For each 32-value block index, a group stores the
//! 16 rows' f16 scales side by side, then their quants interleaved 4 bytes at
//! a time, so each 32-bit lane holds 4 quants of one row:
//!
//! ```text
//! group g, block i:  d[16] (f16) | m[16] (f16, Q4_1 only) | chunk 0 | chunk 1 | ...
//! chunk c (64 bytes): row0 qs[4c..4c+4] | row1 qs[4c..4c+4] | ... | row15 qs[4c..4c+4]
//! ```
//!
//! AVX-512 reads a chunk as one register (16 rows); AVX2 reads each half.
//!
//! (Q8_0 quants are stored `q ^ 0x80`, see [`q8_flip`].)
//!
//! The kernel broadcasts 4 activation bytes to all lanes, so one `vpdpbusd`
//! (VNNI) or `maddubs` + `madd` (AVX2) yields partial sums of 8 rows at once;
//! the scales of 8 rows are one vector and the results of 8 rows are stored
//! contiguously. No horizontal sums.
//!
//! Measured here (AMD EPYC Zen 5, 2 threads, SmolLM2-135M Q4_1, whole model,
//! `examples/decode_steps`): a decode step of 1 sequence takes 2.3-2.7 ms
//! (370-435 tok/s; llama.cpp tg128 in the same session: 169-185 tok/s), of 5
//! sequences 5.8-6.9 ms. The first row-at-a-time version of this kernel
//! (one weight row, horizontal sums) needed 5.9 ms for 1 sequence and 16.9 ms
//! for 5; candle's Q4_1 path decodes at 42-52 tok/s.
//!
//! The scalar reference is [`super::quant::vec_dot_scalar`] over the
//! original block layout ([`QMatrix::row`] rebuilds a row from the groups).

use super::quant::{quantize_row_q8a, vec_dot_scalar, BlockQ8A, QType, QK};
use super::{team, SendPtr};

/// Activation rows unpacked against one weight block at a time.
pub const TILE: usize = 8;
/// Weight rows per interleaved group: one 512-bit register of 32-bit lanes,
/// or two 256-bit halves of 8 rows.
pub const GROUP: usize = 16;

/// Bytes of one block index of one 8-row group (scales, then quants).
fn group_block_bytes(ty: QType) -> usize {
    GROUP * ty.block_bytes()
}

/// Byte offset of the quants inside a group block.
fn quants_offset(ty: QType) -> usize {
    match ty {
        QType::Q4_1 => 64,
        QType::Q4_0 | QType::Q8_0 => 32,
    }
}

/// Bytes of scales in one GGML block (d, or d and m).
fn scale_bytes(ty: QType) -> usize {
    quants_offset(ty) / GROUP
}

/// Q8_0 quants are stored offset-binary (`q + 128` as u8, i.e. `q ^ 0x80`)
/// so the VNNI path can feed them to `dpbusd` as unsigned bytes and subtract
/// `128 * sum(a)`; the AVX2 path flips them back in a register.
fn q8_flip(ty: QType) -> u8 {
    if ty == QType::Q8_0 {
        0x80
    } else {
        0
    }
}

/// A quantized weight matrix `[rows (outputs), cols (inputs)]` in the
/// interleaved 8-row layout above (rows padded to a multiple of 8 with zero
/// scales). Owned, so the GGUF file can be unmapped after loading.
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    /// Takes GGML row-major blocks and regroups them.
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!("{cols} columns is not a multiple of {QK}"));
        }
        let nb = cols / QK;
        let bb = ty.block_bytes();
        let want = rows * nb * bb;
        if data.len() != want {
            return Err(format!("{} bytes, expected {want}", data.len()));
        }
        let groups = rows.div_ceil(GROUP);
        let gbb = group_block_bytes(ty);
        let mut packed = vec![0u8; groups * nb * gbb];
        let qo = quants_offset(ty);
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for i in 0..nb {
                let src = &data[(r * nb + i) * bb..(r * nb + i + 1) * bb];
                let dst = &mut packed[(g * nb + i) * gbb..(g * nb + i + 1) * gbb];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                if ty == QType::Q4_1 {
                    dst[32 + 2 * lane..32 + 2 * lane + 2].copy_from_slice(&src[2..4]);
                }
                let qs = &src[scale_bytes(ty)..];
                let flip = q8_flip(ty);
                for c in 0..qs.len() / 4 {
                    let at = qo + c * 64 + lane * 4;
                    for k in 0..4 {
                        dst[at + k] = qs[4 * c + k] ^ flip;
                    }
                }
            }
        }
        Ok(Self { ty, rows, cols, data: packed })
    }

    /// Stacks matrices with the same type and width (e.g. Q, K and V) so one
    /// call computes all of them from one quantized input.
    pub fn concat(parts: &[QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.ty != first.ty || p.cols != first.cols) {
            return None;
        }
        let mut raw = Vec::new();
        for p in parts {
            for r in 0..p.rows {
                raw.extend(p.row(r));
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Self::new(first.ty, rows, first.cols, raw).ok()
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `r` rebuilt in GGML's block layout (embedding lookup, references).
    pub fn row(&self, r: usize) -> Vec<u8> {
        let (ty, nb) = (self.ty, self.cols / QK);
        let (g, lane) = (r / GROUP, r % GROUP);
        let gbb = group_block_bytes(ty);
        let qo = quants_offset(ty);
        let mut out = Vec::with_capacity(nb * ty.block_bytes());
        for i in 0..nb {
            let src = &self.data[(g * nb + i) * gbb..(g * nb + i + 1) * gbb];
            out.extend_from_slice(&src[2 * lane..2 * lane + 2]);
            if ty == QType::Q4_1 {
                out.extend_from_slice(&src[32 + 2 * lane..32 + 2 * lane + 2]);
            }
            for c in 0..(ty.block_bytes() - scale_bytes(ty)) / 4 {
                let at = qo + c * 64 + lane * 4;
                out.extend(src[at..at + 4].iter().map(|b| b ^ q8_flip(ty)));
            }
        }
        out
    }
}

/// Quantizes `n` activation rows of width `cols` into `out`, the rows
/// spread over the current team.
pub fn quantize_rows(x: &[f32], cols: usize, out: &mut Vec<BlockQ8A>) {
    let nb = cols / QK;
    let n = x.len() / cols;
    out.resize(n * nb, BlockQ8A::ZERO);
    let per = n.div_ceil(4 * team::threads()).max(1);
    let out_ptr = SendPtr(out.as_mut_ptr());
    team::for_each(n.div_ceil(per), |c| {
        let rows = c * per..((c + 1) * per).min(n);
        // SAFETY: task `c` writes only the blocks of its rows.
        let q = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(rows.start * nb), rows.len() * nb) };
        quantize_row_q8a(&x[rows.start * cols..rows.end * cols], q);
    });
}

/// The integer dot-product path of this CPU (`None`: scalar reference).
#[cfg(target_arch = "x86_64")]
pub(crate) type Path = Option<avx2::Dot>;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Path = Option<()>;

/// The best path of this CPU, detected once.
fn best_path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if super::simd_available() {
            return Some(avx2::detect());
        }
        None
    })
}

/// `y[b * w.rows() + n] = dot(W[n], x[b])` for the `n_x` quantized rows of `x`.
pub fn qmatmul(w: &QMatrix, x: &[BlockQ8A], out: &mut [f32]) {
    qmatmul_on(best_path(), w, x, out)
}

/// Groups per task and number of tasks of a matmul of `w` against `n_x`
/// rows on `threads` threads: enough chunks to balance the threads, each
/// with >= 16 KiB of weights (or the equivalent in activation work) to
/// hide the task overhead.
fn chunking(w: &QMatrix, n_x: usize, threads: usize) -> (usize, usize) {
    let groups = w.rows.div_ceil(GROUP);
    let gbytes = (w.cols / QK) * group_block_bytes(w.ty);
    let work = groups * gbytes * n_x.div_ceil(TILE);
    let n_chunks = (work / 16384).clamp(1, threads * 4).min(groups);
    let chunk = groups.div_ceil(n_chunks);
    (chunk, groups.div_ceil(chunk))
}

pub(crate) fn qmatmul_on(path: Path, w: &QMatrix, x: &[BlockQ8A], out: &mut [f32]) {
    let nb = w.cols / QK;
    let n_x = x.len() / nb;
    assert_eq!(x.len(), n_x * nb, "activation blocks do not match the width");
    assert_eq!(out.len(), n_x * w.rows, "output size");
    let groups = w.rows.div_ceil(GROUP);
    let (chunk, n_chunks) = chunking(w, n_x, team::threads());
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |c: usize| {
        let g0 = c * chunk;
        let g1 = (g0 + chunk).min(groups);
        // SAFETY: task `c` writes only columns of rows g0*8..g1*8 of every
        // output row, and the chunks are disjoint; `out` outlives the region.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), n_x * w.rows) };
        groups_kernel(w, x, nb, n_x, g0..g1, out, path);
    };
    team::for_each(n_chunks, run);
}

/// The gate/up projection with SwiGLU and the down projection's input
/// quantization done per task: `w` is `[gate (ff) ; up (ff)]` by `cols`;
/// for every row `act = silu(x W_gate^T) * (x W_up^T)` (`[n_x, ff]`) and
/// `act_q` its Q8 blocks.
///
/// Why: as a matmul and then a row-wise pass, the `[n_x, 2 ff]` products
/// (12 KiB a row here) were written and read back whole, and in a decode
/// step each row's pass ran on one core and read the half of the row that
/// the other core had computed. Here the task that computes the gate and
/// up products of some features combines them and writes only `act` and
/// its blocks: the other core reads 0.85 KiB of each row (for the down
/// projection) instead of 6 KiB.
///
/// Measured with `decode_steps` (250 tokens of context), alternating runs,
/// by where the host had put the two vCPUs (a cache-line ping-pong between
/// them, before each run):
/// - on two CCDs (~400 ns round trip): 3 rows 2.77-2.84 -> 2.67-2.73 ms
///   (row ops 0.40 -> 0.30 ms, gate/up 0.50 -> 0.56), 1 row 2.00 -> 1.83
///   and 1.89 -> 1.77 ms, 5 rows 3.60 -> 3.55;
/// - on one CCD (~100 ns): within 2% either way (3 rows 2.64 -> 2.69 ms,
///   5 rows 3.26 -> 3.33, 1 row 2.22 -> 2.12, 512-token prefill 129.9 ->
///   131.4 ms).
pub fn qmatmul_swiglu(w: &QMatrix, x: &[BlockQ8A], act: &mut [f32], act_q: &mut [BlockQ8A]) {
    qmatmul_swiglu_on(best_path(), w, x, act, act_q)
}

/// Whether [`qmatmul_swiglu`] takes `w`: its halves are whole blocks of 32
/// features, so each task quantizes whole blocks.
pub fn swiglu_fits(w: &QMatrix) -> bool {
    w.rows.is_multiple_of(2 * QK)
}

pub(crate) fn qmatmul_swiglu_on(path: Path, w: &QMatrix, x: &[BlockQ8A], act: &mut [f32], act_q: &mut [BlockQ8A]) {
    assert!(swiglu_fits(w), "gate/up halves of whole blocks");
    let nb = w.cols / QK;
    let n_x = x.len() / nb;
    let ff = w.rows / 2;
    assert_eq!(x.len(), n_x * nb, "activation blocks do not match the width");
    assert_eq!(act.len(), n_x * ff, "output size");
    assert_eq!(act_q.len(), n_x * ff / QK, "quantized output size");
    // Tasks of whole 32-feature blocks (two groups of gate rows and the
    // two matching groups of up rows), as many as a plain matmul's.
    let blocks = ff / QK;
    let (chunk, _) = chunking(w, n_x, team::threads());
    let chunk = chunk.div_ceil(4);
    let n_chunks = blocks.div_ceil(chunk);
    let (act_ptr, q_ptr) = (SendPtr(act.as_mut_ptr()), SendPtr(act_q.as_mut_ptr()));
    team::for_each(n_chunks, |c| {
        // SAFETY: task `c` writes only the features of blocks c*chunk..
        // of every row, and the chunks are disjoint; both outputs outlive
        // the region.
        let (act, act_q) = unsafe {
            (
                std::slice::from_raw_parts_mut(act_ptr.get(), n_x * ff),
                std::slice::from_raw_parts_mut(q_ptr.get(), n_x * blocks),
            )
        };
        let b1 = ((c + 1) * chunk).min(blocks);
        swiglu_blocks(w, x, nb, n_x, c * chunk..b1, act, act_q, path);
    });
}

/// Features of blocks `blocks` (32 each) of every row: per tile of
/// activation rows, gate groups `2 blk, 2 blk + 1` and the up groups
/// `ff / 16` after them; then SwiGLU and quantization once per row over
/// the whole range (called per block, they cost more than they computed:
/// a 1-row decode step 1.83 -> 1.98 ms).
#[allow(clippy::too_many_arguments)]
fn swiglu_blocks(
    w: &QMatrix,
    x: &[BlockQ8A],
    nb: usize,
    n_x: usize,
    blocks: std::ops::Range<usize>,
    act: &mut [f32],
    act_q: &mut [BlockQ8A],
    path: Path,
) {
    thread_local! {
        static GU: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let ff = w.rows / 2;
    let up = ff / GROUP;
    let width = blocks.len() * QK;
    let f0 = blocks.start * QK;
    let mut res = [[0f32; GROUP]; TILE];
    let stream = n_x <= TILE;
    // Per tile row: `[gate (width) | up (width)]`, as `silu_mul` reads it;
    // a per-thread buffer, every value written before it is read.
    GU.with_borrow_mut(|gu| {
        gu.resize(n_x.min(TILE) * 2 * width, 0.0);
        let mut b0 = 0;
        while b0 < n_x {
            let t = (n_x - b0).min(TILE);
            let xt = &x[b0 * nb..(b0 + t) * nb];
            for (i, g) in (2 * blocks.start..2 * blocks.end).enumerate() {
                for (half, grp) in [(0, g), (width, up + g)] {
                    group_tile(w, grp, xt, nb, t, stream, path, &mut res);
                    for (j, rj) in res.iter().enumerate().take(t) {
                        let at = j * 2 * width + half + i * GROUP;
                        gu[at..at + GROUP].copy_from_slice(rj);
                    }
                }
            }
            for j in 0..t {
                let row = b0 + j;
                let a = &mut act[row * ff + f0..row * ff + f0 + width];
                super::vmath::silu_mul(&gu[j * 2 * width..(j + 1) * 2 * width], width, a);
                let q0 = row * (ff / QK);
                quantize_row_q8a(a, &mut act_q[q0 + blocks.start..q0 + blocks.end]);
            }
            b0 += t;
        }
    });
}

/// Group `g` of `w` against the `t` activation rows of `x` into rows
/// `0..t` of `res`.
#[allow(clippy::too_many_arguments)]
fn group_tile(
    w: &QMatrix,
    g: usize,
    x: &[BlockQ8A],
    nb: usize,
    t: usize,
    stream: bool,
    path: Path,
    res: &mut [[f32; GROUP]; TILE],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(dot) = path {
        let gbytes = nb * group_block_bytes(w.ty);
        let wg = &w.data[g * gbytes..(g + 1) * gbytes];
        let tile = avx2::Tile { ty: w.ty, w: wg, x, nb, t, stream };
        // SAFETY: `dot` came from feature detection (or a test that
        // checked it); `wg` holds nb group blocks and `x` t rows of nb.
        unsafe { avx2::group_tile(dot, tile, res) };
        return;
    }
    let r0 = g * GROUP;
    for lane in 0..(w.rows - r0).min(GROUP) {
        let row = w.row(r0 + lane);
        for (j, rj) in res.iter_mut().enumerate().take(t) {
            rj[lane] = vec_dot_scalar(w.ty, &row, &x[j * nb..(j + 1) * nb]);
        }
    }
}

fn groups_kernel(
    w: &QMatrix,
    x: &[BlockQ8A],
    nb: usize,
    n_x: usize,
    groups: std::ops::Range<usize>,
    out: &mut [f32],
    path: Path,
) {
    // One tile per group (a decode): each weight byte is used once, so it
    // is fetched non-temporally (see `prefetch_ahead`).
    let stream = n_x <= TILE;
    // The kernels overwrite rows 0..t of `res` whole. Zeroing it per tile
    // stalled behind the output writes in the server: a ~400-token prefill
    // took 150-165 ms there against 114 ms in `decode_steps`, and 117-122
    // ms without the zeroing.
    let mut res = [[0f32; GROUP]; TILE];
    for g in groups {
        let r0 = g * GROUP;
        let live = (w.rows - r0).min(GROUP);
        let mut b0 = 0;
        while b0 < n_x {
            let t = (n_x - b0).min(TILE);
            group_tile(w, g, &x[b0 * nb..(b0 + t) * nb], nb, t, stream, path, &mut res);
            for (j, rj) in res.iter().enumerate().take(t) {
                let o = (b0 + j) * w.rows + r0;
                out[o..o + live].copy_from_slice(&rj[..live]);
            }
            b0 += t;
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Register tiles are indexed by constant bounds on purpose: the loops unroll
// and the arrays stay in registers.
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::quant::{BlockQ8A, QType, QK};
    use super::{GROUP, TILE};

    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Broadcasts 4 activation bytes to every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    /// Which integer dot-product instruction the CPU has.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub(crate) enum Dot {
        /// `maddubs` + `madd` (any AVX2 CPU).
        Avx2,
        /// `vpdpbusd` on 256-bit registers via AVX-VNNI (Alder Lake, Zen 5).
        AvxVnni,
        /// `vpdpbusd` via AVX-512 VNNI + VL (Ice Lake, Zen 4).
        Avx512Vnni,
        /// Whole 16-row groups in 512-bit registers (AVX-512 F/BW/VNNI).
        Avx512,
    }

    pub(crate) fn detect() -> Dot {
        if has_avx512() {
            Dot::Avx512
        } else if std::arch::is_x86_feature_detected!("avxvnni") {
            Dot::AvxVnni
        } else if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
            Dot::Avx512Vnni
        } else {
            Dot::Avx2
        }
    }

    pub(crate) fn has_avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    const AVX2: u8 = 0;
    const AVXVNNI: u8 = 1;
    const AVX512VNNI: u8 = 2;

    /// One group of weight rows against `t` activation rows.
    #[derive(Clone, Copy)]
    pub(crate) struct Tile<'a> {
        pub ty: QType,
        /// The group's `nb` blocks.
        pub w: &'a [u8],
        /// `t` rows of `nb` blocks.
        pub x: &'a [BlockQ8A],
        pub nb: usize,
        pub t: usize,
        /// Each weight byte is used once: prefetch it non-temporally.
        pub stream: bool,
    }

    pub(crate) unsafe fn group_tile(dot: Dot, tile: Tile<'_>, out: &mut [[f32; GROUP]; TILE]) {
        match dot {
            Dot::Avx2 => tile_avx2(tile, out),
            Dot::AvxVnni => tile_avxvnni(tile, out),
            Dot::Avx512Vnni => tile_avx512vnni(tile, out),
            Dot::Avx512 => tile_avx512(tile, out),
        }
    }

    /// Picks the kernel for `t` activation rows (two 8-row halves).
    /// Inlined into each `tile_*` wrapper so it compiles with that wrapper's
    /// target features.
    #[inline(always)]
    unsafe fn dispatch<const V: u8>(tile: Tile<'_>, out: &mut [[f32; GROUP]; TILE]) {
        let Tile { ty, w, x, nb, t, stream } = tile;
        match (ty, t) {
            (QType::Q4_1, 1) => {
                group_q4::<1, V, true>(w, x, nb, out, 0, stream);
                group_q4::<1, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 2) => {
                group_q4::<2, V, true>(w, x, nb, out, 0, stream);
                group_q4::<2, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 3) => {
                group_q4::<3, V, true>(w, x, nb, out, 0, stream);
                group_q4::<3, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 4) => {
                group_q4::<4, V, true>(w, x, nb, out, 0, stream);
                group_q4::<4, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 5) => {
                group_q4::<5, V, true>(w, x, nb, out, 0, stream);
                group_q4::<5, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 6) => {
                group_q4::<6, V, true>(w, x, nb, out, 0, stream);
                group_q4::<6, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, 7) => {
                group_q4::<7, V, true>(w, x, nb, out, 0, stream);
                group_q4::<7, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_1, _) => {
                group_q4::<8, V, true>(w, x, nb, out, 0, stream);
                group_q4::<8, V, true>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 1) => {
                group_q4::<1, V, false>(w, x, nb, out, 0, stream);
                group_q4::<1, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 2) => {
                group_q4::<2, V, false>(w, x, nb, out, 0, stream);
                group_q4::<2, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 3) => {
                group_q4::<3, V, false>(w, x, nb, out, 0, stream);
                group_q4::<3, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 4) => {
                group_q4::<4, V, false>(w, x, nb, out, 0, stream);
                group_q4::<4, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 5) => {
                group_q4::<5, V, false>(w, x, nb, out, 0, stream);
                group_q4::<5, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 6) => {
                group_q4::<6, V, false>(w, x, nb, out, 0, stream);
                group_q4::<6, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, 7) => {
                group_q4::<7, V, false>(w, x, nb, out, 0, stream);
                group_q4::<7, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q4_0, _) => {
                group_q4::<8, V, false>(w, x, nb, out, 0, stream);
                group_q4::<8, V, false>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 1) => {
                group_q8::<1, V>(w, x, nb, out, 0, stream);
                group_q8::<1, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 2) => {
                group_q8::<2, V>(w, x, nb, out, 0, stream);
                group_q8::<2, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 3) => {
                group_q8::<3, V>(w, x, nb, out, 0, stream);
                group_q8::<3, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 4) => {
                group_q8::<4, V>(w, x, nb, out, 0, stream);
                group_q8::<4, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 5) => {
                group_q8::<5, V>(w, x, nb, out, 0, stream);
                group_q8::<5, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 6) => {
                group_q8::<6, V>(w, x, nb, out, 0, stream);
                group_q8::<6, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, 7) => {
                group_q8::<7, V>(w, x, nb, out, 0, stream);
                group_q8::<7, V>(w, x, nb, out, 1, stream);
            }
            (QType::Q8_0, _) => {
                group_q8::<8, V>(w, x, nb, out, 0, stream);
                group_q8::<8, V>(w, x, nb, out, 1, stream);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vl,fma,f16c")]
    unsafe fn tile_avx512(tile: Tile<'_>, out: &mut [[f32; GROUP]; TILE]) {
        let Tile { ty, w, x, nb, t, stream } = tile;
        match (ty, t) {
            (QType::Q4_1, 1) => group_q4_512::<1, true>(w, x, nb, out, stream),
            (QType::Q4_1, 2) => group_q4_512::<2, true>(w, x, nb, out, stream),
            (QType::Q4_1, 3) => group_q4_512::<3, true>(w, x, nb, out, stream),
            (QType::Q4_1, 4) => group_q4_512::<4, true>(w, x, nb, out, stream),
            (QType::Q4_1, 5) => group_q4_512::<5, true>(w, x, nb, out, stream),
            (QType::Q4_1, 6) => group_q4_512::<6, true>(w, x, nb, out, stream),
            (QType::Q4_1, 7) => group_q4_512::<7, true>(w, x, nb, out, stream),
            (QType::Q4_1, _) => group_q4_512::<8, true>(w, x, nb, out, stream),
            (QType::Q4_0, 1) => group_q4_512::<1, false>(w, x, nb, out, stream),
            (QType::Q4_0, 2) => group_q4_512::<2, false>(w, x, nb, out, stream),
            (QType::Q4_0, 3) => group_q4_512::<3, false>(w, x, nb, out, stream),
            (QType::Q4_0, 4) => group_q4_512::<4, false>(w, x, nb, out, stream),
            (QType::Q4_0, 5) => group_q4_512::<5, false>(w, x, nb, out, stream),
            (QType::Q4_0, 6) => group_q4_512::<6, false>(w, x, nb, out, stream),
            (QType::Q4_0, 7) => group_q4_512::<7, false>(w, x, nb, out, stream),
            (QType::Q4_0, _) => group_q4_512::<8, false>(w, x, nb, out, stream),
            (QType::Q8_0, 1) => group_q8_512::<1>(w, x, nb, out, stream),
            (QType::Q8_0, 2) => group_q8_512::<2>(w, x, nb, out, stream),
            (QType::Q8_0, 3) => group_q8_512::<3>(w, x, nb, out, stream),
            (QType::Q8_0, 4) => group_q8_512::<4>(w, x, nb, out, stream),
            (QType::Q8_0, 5) => group_q8_512::<5>(w, x, nb, out, stream),
            (QType::Q8_0, 6) => group_q8_512::<6>(w, x, nb, out, stream),
            (QType::Q8_0, 7) => group_q8_512::<7>(w, x, nb, out, stream),
            (QType::Q8_0, _) => group_q8_512::<8>(w, x, nb, out, stream),
        }
    }

    /// [`group_q4`] on whole 16-row groups: one 512-bit `vpdpbusd` per
    /// chunk, activations broadcast straight from memory.
    ///
    /// Each row's integer sum runs in two chains (low and high nibbles),
    /// added at the end: with one chain of 8 dependent `vpdpbusd` per row,
    /// 8 rows were too few chains to hide the instruction's latency. The
    /// step's matmuls for 128 rows (`mm_steps 128 20`, medians of 5
    /// interleaved runs) 23.9 -> 22.3 ms; a 128-token prefill 29.8 -> 29.0
    /// ms. Four chains measured the same as two.
    #[inline(always)]
    unsafe fn group_q4_512<const NA: usize, const Q41: bool>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; GROUP]; TILE],
        stream: bool,
    ) {
        let gbb = if Q41 { 320 } else { 288 };
        let qo = if Q41 { 64 } else { 32 };
        let mask = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); NA];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            let blk = wp.add(i * gbb);
            prefetch_ahead(blk, gbb, stream);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let mw = if Q41 { _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(32) as *const __m256i)) } else { dw };
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for c in 0..4 {
                let q = _mm512_loadu_si512(blk.add(qo + 64 * c) as *const _);
                lo[c] = _mm512_and_si512(q, mask);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16::<4>(q), mask);
            }
            for j in 0..NA {
                let a = &*xp.add(j * nb + i);
                let aq = a.qs.as_ptr();
                let (mut s, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for c in 0..4 {
                    s = _mm512_dpbusd_epi32(s, lo[c], bcast4_512(aq.add(4 * c)));
                    s1 = _mm512_dpbusd_epi32(s1, hi[c], bcast4_512(aq.add(16 + 4 * c)));
                }
                s = _mm512_add_epi32(s, s1);
                if !Q41 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * a.sum));
                }
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
                if Q41 {
                    acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s), acc[j]);
                }
            }
        }
        for j in 0..NA {
            _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }

    /// [`group_q8`] on whole 16-row groups (offset-binary quants).
    #[inline(always)]
    unsafe fn group_q8_512<const NA: usize>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; GROUP]; TILE],
        stream: bool,
    ) {
        let gbb = 544;
        let mut acc = [_mm512_setzero_ps(); NA];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            let blk = wp.add(i * gbb);
            prefetch_ahead(blk, gbb, stream);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let mut isum = [_mm512_setzero_si512(); NA];
            for c in 0..8 {
                let u = _mm512_loadu_si512(blk.add(32 + 64 * c) as *const _);
                for j in 0..NA {
                    let a = bcast4_512((*xp.add(j * nb + i)).qs.as_ptr().add(4 * c));
                    isum[j] = _mm512_dpbusd_epi32(isum[j], u, a);
                }
            }
            for j in 0..NA {
                let a = &*xp.add(j * nb + i);
                let s = _mm512_sub_epi32(isum[j], _mm512_set1_epi32(128 * a.sum));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j]);
            }
        }
        for j in 0..NA {
            _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }

    /// Weight bytes fetched ahead of the block being computed (1.3 to 2.5
    /// 16-row groups of a 576-column matrix); 4-16 KiB measured alike, 2 KiB
    /// and less worse.
    const PREFETCH_BYTES: usize = 8192;

    /// Prefetches the weight block `PREFETCH_BYTES` ahead of `blk` (`gbb`
    /// bytes). The weights stream from memory once per step; with several
    /// activation rows the products of a block take long enough that the
    /// hardware prefetcher falls behind and the loads stall: measured on
    /// the default model (2-core Zen 5), a batched decode step of 8 rows
    /// went from 8.0 to 6.0 ms, 5 rows from 4.8 to 4.3, 1 row 2.75 to 2.5.
    ///
    /// `stream` (one activation tile, so each weight byte is used once):
    /// a non-temporal hint, so the weights pass through without evicting
    /// what the step reuses (K/V, activations). Decode steps, interleaved
    /// `decode_steps` medians: 5 rows 3.64 -> 3.53 ms and 1 row unchanged
    /// (7 runs each); on the rayon build before, 3 rows 3.08 -> 2.88 ms and
    /// 5 rows 3.66 -> 3.61 (5 runs each). Prefill tiles reuse each group
    /// once per 8 rows and keep the T0 hint (a 512-token prefill measured
    /// 157 ms with T0 and 161 ms with NTA, 5 runs each).
    #[inline(always)]
    unsafe fn prefetch_ahead(blk: *const u8, gbb: usize, stream: bool) {
        let ahead = blk.wrapping_add(PREFETCH_BYTES) as *const i8;
        if stream {
            for off in (0..gbb).step_by(64) {
                _mm_prefetch::<_MM_HINT_NTA>(ahead.wrapping_add(off));
            }
        } else {
            for off in (0..gbb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off));
            }
        }
    }

    #[inline(always)]
    unsafe fn bcast4_512(p: *const i8) -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
    }

    macro_rules! tile_fn {
        ($name:ident, $features:literal, $v:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(tile: Tile<'_>, out: &mut [[f32; GROUP]; TILE]) {
                dispatch::<{ $v }>(tile, out)
            }
        };
    }
    tile_fn!(tile_avx2, "avx2,fma,f16c", AVX2);
    tile_fn!(tile_avxvnni, "avx2,fma,f16c,avxvnni", AVXVNNI);
    tile_fn!(tile_avx512vnni, "avx2,fma,f16c,avx512vnni,avx512vl", AVX512VNNI);

    /// `acc + sum of 4 (u8 w) * (i8 a) products per 32-bit lane`.
    /// The AVX2 form goes through i16 and saturates at 2^15; callers keep
    /// each pair sum below that.
    #[inline(always)]
    unsafe fn dot_u8i8<const V: u8>(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        match V {
            AVXVNNI => _mm256_dpbusd_avx_epi32(acc, w, a),
            AVX512VNNI => _mm256_dpbusd_epi32(acc, w, a),
            _ => _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))),
        }
    }

    /// Q4_0 (`Q41 = false`: `d * (isum - 8 sum_a)`) or Q4_1 (`d * isum + m * s_a`)
    /// for half `h` (rows 8h..8h+8) of a 16-row group against NA activation rows.
    #[inline(always)]
    unsafe fn group_q4<const NA: usize, const V: u8, const Q41: bool>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; GROUP]; TILE],
        h: usize,
        stream: bool,
    ) {
        let gbb = if Q41 { 320 } else { 288 };
        let qo = (if Q41 { 64 } else { 32 }) + 32 * h;
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); NA];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            let blk = wp.add(i * gbb);
            prefetch_ahead(blk, gbb, stream);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
            let mw = if Q41 { _mm256_cvtph_ps(_mm_loadu_si128(blk.add(32 + 16 * h) as *const __m128i)) } else { dw };
            let mut lo = [_mm256_setzero_si256(); 4];
            let mut hi = [_mm256_setzero_si256(); 4];
            for c in 0..4 {
                let q = _mm256_loadu_si256(blk.add(qo + 64 * c) as *const __m256i);
                lo[c] = _mm256_and_si256(q, mask);
                hi[c] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            }
            for j in 0..NA {
                let a = &*xp.add(j * nb + i);
                let aq = a.qs.as_ptr();
                let mut isum = if V == AVX2 {
                    // i16 lanes: 8 maddubs of at most 2*15*127 each stay < 2^15.
                    let mut s16 = _mm256_maddubs_epi16(lo[0], bcast4(aq));
                    s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[0], bcast4(aq.add(16))));
                    for c in 1..4 {
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo[c], bcast4(aq.add(4 * c))));
                        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi[c], bcast4(aq.add(16 + 4 * c))));
                    }
                    _mm256_madd_epi16(s16, ones)
                } else {
                    let mut s = _mm256_setzero_si256();
                    for c in 0..4 {
                        s = dot_u8i8::<V>(s, lo[c], bcast4(aq.add(4 * c)));
                        s = dot_u8i8::<V>(s, hi[c], bcast4(aq.add(16 + 4 * c)));
                    }
                    s
                };
                if !Q41 {
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * a.sum));
                }
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[j]);
                if Q41 {
                    acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s), acc[j]);
                }
            }
        }
        for j in 0..NA {
            _mm256_storeu_ps(out[j].as_mut_ptr().add(8 * h), acc[j]);
        }
    }

    /// Q8_0 stored offset-binary `u = q + 128`: VNNI computes
    /// `sum(u * a) - 128 * sum(a)`; AVX2 flips back and uses the sign trick
    /// (`maddubs(|q|, a * sign(q))`, pair sums <= 2 * 128 * 127 < 2^15).
    #[inline(always)]
    unsafe fn group_q8<const NA: usize, const V: u8>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; GROUP]; TILE],
        h: usize,
        stream: bool,
    ) {
        let gbb = 544;
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); NA];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            let blk = wp.add(i * gbb);
            prefetch_ahead(blk, gbb, stream);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * h) as *const __m128i));
            let mut isum = [_mm256_setzero_si256(); NA];
            for c in 0..8 {
                let u = _mm256_loadu_si256(blk.add(32 + 64 * c + 32 * h) as *const __m256i);
                if V == AVX2 {
                    let q = _mm256_xor_si256(u, flip);
                    let qabs = _mm256_sign_epi8(q, q);
                    for j in 0..NA {
                        let a = bcast4((*xp.add(j * nb + i)).qs.as_ptr().add(4 * c));
                        let p = _mm256_maddubs_epi16(qabs, _mm256_sign_epi8(a, q));
                        isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(p, ones));
                    }
                } else {
                    for j in 0..NA {
                        let a = bcast4((*xp.add(j * nb + i)).qs.as_ptr().add(4 * c));
                        isum[j] = dot_u8i8::<V>(isum[j], u, a);
                    }
                }
            }
            for j in 0..NA {
                let a = &*xp.add(j * nb + i);
                let mut s = isum[j];
                if V != AVX2 {
                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * a.sum));
                }
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[j]);
            }
        }
        for j in 0..NA {
            _mm256_storeu_ps(out[j].as_mut_ptr().add(8 * h), acc[j]);
        }
    }

    /// `quantize_row_q8a_scalar` in 16 lanes, bit for bit, 16 blocks at a
    /// time: the per-block maxima and sums are reduced together (one
    /// transposing tree instead of a horizontal reduction per block), the
    /// scales are two vector divisions instead of 32 scalar ones, and the
    /// f16 rounding of the scales is vectorized. Blocks past a multiple of
    /// 16 go one at a time. Rounding is half away from zero, as `f32::round`.
    ///
    /// Activation quantization runs four times per layer and row. One block
    /// at a time (two horizontal reductions and two scalar divisions per
    /// block) it took 0.31 ns per value, now 0.137 (5 rows of 576 and of
    /// 1536 values, best of 20 x 2000, interleaved builds). In a 512-token
    /// prefill the row-wise work went from 25.2 to 19.5 ms (best of 5).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")]
    pub(crate) unsafe fn quantize_row_q8a_512(x: &[f32], out: &mut [BlockQ8A]) {
        let n = out.len().min(x.len() / QK);
        let mut b = 0;
        while b + 16 <= n {
            quantize_16_blocks(&x[b * QK..(b + 16) * QK], &mut out[b..b + 16]);
            b += 16;
        }
        for (xs, blk) in x[b * QK..n * QK].chunks_exact(QK).zip(&mut out[b..n]) {
            let v = [_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))];
            let d = _mm512_reduce_max_ps(_mm512_range_ps::<0x0B>(v[0], v[1])) / 127.0;
            let id = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
            let q = v.map(|vi| round_away(_mm512_mul_ps(vi, id)));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            _mm_storeu_si128(blk.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(q[0]));
            _mm_storeu_si128(blk.qs.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q[1]));
            blk.set_scales(d, sum);
        }
    }

    /// `x` rounded half away from zero, as i32 lanes: truncate, then step
    /// away from zero where the dropped fraction is at least one half.
    #[inline(always)]
    unsafe fn round_away(x: __m512) -> __m512i {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
        let frac = _mm512_abs_ps(_mm512_sub_ps(x, t));
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
        // +-1.0 with the sign of x: (x & sign) | 1.0.
        let one = _mm512_castsi512_ps(_mm512_ternarylogic_epi32::<0xEA>(
            _mm512_castps_si512(x),
            _mm512_set1_epi32(i32::MIN),
            _mm512_castps_si512(_mm512_set1_ps(1.0)),
        ));
        _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one))
    }

    /// Lane `b` of the result: `op` over the 16 lanes of `v[b]` (an exact,
    /// order-free `op`: max, or integer add through the float casts).
    #[inline(always)]
    unsafe fn reduce_16x16(v: [__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
        // Pairs of vectors -> each half holds one vector's 8 partials.
        let p: [__m512; 8] = std::array::from_fn(|k| {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            op(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
        });
        // -> each 128-bit chunk holds one vector's 4 partials (chunk c of
        // q[k]: vector 4k + c).
        let q: [__m512; 4] = std::array::from_fn(|k| {
            let (a, b) = (p[2 * k], p[2 * k + 1]);
            op(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        });
        // -> chunk c: 2 partials of vector c (or 8 + c), 2 of vector 4 + c
        // (or 12 + c).
        let r: [__m512; 2] = std::array::from_fn(|k| {
            let (a, b) = (q[2 * k], q[2 * k + 1]);
            op(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
        });
        // -> lane 4c + j: vector c + 4j.
        let f = op(_mm512_shuffle_ps::<0b10_00_10_00>(r[0], r[1]), _mm512_shuffle_ps::<0b11_01_11_01>(r[0], r[1]));
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, f)
    }

    /// 16 whole blocks of [`quantize_row_q8a_512`].
    #[inline(always)]
    unsafe fn quantize_16_blocks(x: &[f32], out: &mut [BlockQ8A]) {
        let p = x.as_ptr();
        let amax: [__m512; 16] = std::array::from_fn(|b| {
            _mm512_range_ps::<0x0B>(_mm512_loadu_ps(p.add(32 * b)), _mm512_loadu_ps(p.add(32 * b + 16)))
        });
        let amax = reduce_16x16(amax, |a, b| _mm512_max_ps(a, b));
        let d = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(d, _mm512_setzero_ps());
        let id = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), d);
        let mut ids = [0f32; 16];
        _mm512_storeu_ps(ids.as_mut_ptr(), id);
        let mut sums = [_mm512_setzero_ps(); 16];
        for (b, blk) in out.iter_mut().enumerate() {
            let idv = _mm512_set1_ps(ids[b]);
            let q0 = round_away(_mm512_mul_ps(_mm512_loadu_ps(p.add(32 * b)), idv));
            let q1 = round_away(_mm512_mul_ps(_mm512_loadu_ps(p.add(32 * b + 16)), idv));
            sums[b] = _mm512_castsi512_ps(_mm512_add_epi32(q0, q1));
            _mm_storeu_si128(blk.qs.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(blk.qs.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
        }
        let sum = _mm512_castps_si512(reduce_16x16(sums, |a, b| {
            _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)))
        }));
        // As `BlockQ8A::set_scales`: d through f16, s = f16(f16(sum) * d16).
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let d16 = _mm512_cvtph_ps(_mm512_cvtps_ph::<NEAREST>(d));
        let sum16 = _mm512_cvtph_ps(_mm512_cvtps_ph::<NEAREST>(_mm512_cvtepi32_ps(sum)));
        let s16 = _mm512_cvtph_ps(_mm512_cvtps_ph::<NEAREST>(_mm512_mul_ps(sum16, d16)));
        let (mut dv, mut sv, mut iv) = ([0f32; 16], [0f32; 16], [0i32; 16]);
        _mm512_storeu_ps(dv.as_mut_ptr(), d16);
        _mm512_storeu_ps(sv.as_mut_ptr(), s16);
        _mm512_storeu_si512(iv.as_mut_ptr() as *mut _, sum);
        for (b, blk) in out.iter_mut().enumerate() {
            blk.d = dv[b];
            blk.s = sv[b];
            blk.sum = iv[b];
        }
    }

    /// AVX2 twin of `quantize_row_q8a_scalar`, bit for bit: rounds half away
    /// from zero (round to nearest even, then moves exact ties outwards).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn quantize_row_q8a(x: &[f32], out: &mut [BlockQ8A]) {
        let sign = _mm256_set1_ps(-0.0);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let p = xs.as_ptr();
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let mut amax = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *vi));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
            let d = _mm_cvtss_f32(m1) / 127.0;
            let id = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
            let half = _mm256_set1_ps(0.5);
            let q = v.map(|vi| {
                let x = _mm256_mul_ps(vi, id);
                let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(x, t));
                let tie = _mm256_cmp_ps(frac, half, _CMP_EQ_OQ);
                let away = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(x, sign), _mm256_set1_ps(1.0)));
                let r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm256_cvtps_epi32(_mm256_blendv_ps(r, away, tie))
            });
            let s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            let s = _mm_hadd_epi32(s, s);
            let s = _mm_hadd_epi32(s, s);
            let sum = _mm_cvtsi128_si32(s);
            let p01 = _mm256_packs_epi32(q[0], q[1]);
            let p23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
            _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes);
            b.set_scales(d, sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::{quantize_row_q8a_scalar, BlockQ4_1};
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random_matrix(ty: QType, rows: usize, cols: usize, seed: &mut u64) -> QMatrix {
        let n = rows * cols / QK * ty.block_bytes();
        let mut data: Vec<u8> = (0..n).map(|_| (lcg(seed) * 127.0) as i8 as u8).collect();
        // Keep the f16 scales finite and small: rewrite them per block.
        for b in data.chunks_exact_mut(ty.block_bytes()) {
            let d = half::f16::from_f32(0.01 + lcg(seed).abs() * 0.02).to_bits().to_le_bytes();
            b[..2].copy_from_slice(&d);
            if ty == QType::Q4_1 {
                let m = half::f16::from_f32(lcg(seed) * 0.1).to_bits().to_le_bytes();
                b[2..4].copy_from_slice(&m);
            }
        }
        QMatrix::new(ty, rows, cols, data).unwrap()
    }

    /// Every dot-product path this CPU can run, scalar included.
    fn paths() -> Vec<Path> {
        let mut p = vec![None];
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd_available() {
            use avx2::Dot;
            p.push(Some(Dot::Avx2));
            if std::arch::is_x86_feature_detected!("avxvnni") {
                p.push(Some(Dot::AvxVnni));
            }
            if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
                p.push(Some(Dot::Avx512Vnni));
            }
            if avx2::has_avx512() {
                p.push(Some(Dot::Avx512));
            }
        }
        p
    }

    /// The fused gate/up + SwiGLU + quantization gives the bits of the
    /// matmul, `silu_mul` and `quantize_row_q8a` run one after the other,
    /// on every path, on one thread and on a team, for decode and prefill
    /// tiles (and a partial last tile).
    #[test]
    fn swiglu_matmul_equals_the_three_passes() {
        let mut seed = 21;
        let team = crate::kernels::team::Team::new(2).unwrap();
        for ty in [QType::Q4_1, QType::Q4_0, QType::Q8_0] {
            for (ff, cols, n_x) in [(96, 64, 1), (1536, 576, 3), (160, 128, 21)] {
                let w = random_matrix(ty, 2 * ff, cols, &mut seed);
                assert!(swiglu_fits(&w));
                let x: Vec<f32> = (0..n_x * cols).map(|_| lcg(&mut seed)).collect();
                let mut xq = Vec::new();
                quantize_rows(&x, cols, &mut xq);
                for path in paths() {
                    let mut gu = vec![0f32; n_x * 2 * ff];
                    qmatmul_on(path, &w, &xq, &mut gu);
                    let mut want = vec![0f32; n_x * ff];
                    crate::kernels::vmath::silu_mul(&gu, ff, &mut want);
                    let mut want_q = vec![BlockQ8A::ZERO; n_x * ff / QK];
                    for (a, q) in want.chunks_exact(ff).zip(want_q.chunks_exact_mut(ff / QK)) {
                        quantize_row_q8a(a, q);
                    }
                    for on_team in [false, true] {
                        let mut act = vec![f32::NAN; n_x * ff];
                        let mut act_q = vec![BlockQ8A::ZERO; n_x * ff / QK];
                        let mut run = || qmatmul_swiglu_on(path, &w, &xq, &mut act, &mut act_q);
                        if on_team {
                            team.install(run);
                        } else {
                            run();
                        }
                        let same = act.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{ty:?} ff={ff} n={n_x} {path:?} team={on_team}");
                        let same_q = act_q.iter().zip(&want_q).all(|(a, b)| a.qs == b.qs && a.d == b.d && a.s == b.s);
                        assert!(same_q, "{ty:?} ff={ff} n={n_x} {path:?} team={on_team}: blocks");
                    }
                }
            }
        }
    }

    /// Chunks spread over a team (lanes, stealing) give the bits one
    /// thread gives: each output is computed whole by one task.
    #[test]
    fn a_team_computes_what_one_thread_does() {
        let mut seed = 11;
        let team = crate::kernels::team::Team::new(3).unwrap();
        for ty in [QType::Q4_1, QType::Q8_0] {
            for (rows, cols, n_x) in [(1000, 576, 1), (1000, 576, 5), (333, 1536, 20), (48, 64, 40)] {
                let w = random_matrix(ty, rows, cols, &mut seed);
                let x: Vec<f32> = (0..n_x * cols).map(|_| lcg(&mut seed)).collect();
                let (mut xq, mut xq_team) = (Vec::new(), Vec::new());
                quantize_rows(&x, cols, &mut xq);
                team.install(|| quantize_rows(&x, cols, &mut xq_team));
                assert!(xq.iter().zip(&xq_team).all(|(a, b)| a.qs == b.qs && a.d == b.d && a.s == b.s));
                let (mut y, mut y_team) = (vec![0f32; n_x * rows], vec![1f32; n_x * rows]);
                qmatmul(&w, &xq, &mut y);
                team.install(|| qmatmul(&w, &xq, &mut y_team));
                assert!(y.iter().zip(&y_team).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty:?} {rows}x{cols} n={n_x}");
            }
        }
    }

    #[test]
    fn simd_matmul_equals_scalar_reference() {
        let mut seed = 7;
        for (path, ty) in paths().into_iter().flat_map(|p| [QType::Q4_0, QType::Q4_1, QType::Q8_0].map(|t| (p, t))) {
            for (rows, cols, n_x) in [(1, 32, 1), (37, 64, 3), (64, 576, 5), (200, 160, 9), (24, 96, 8), (16, 64, 17)] {
                let w = random_matrix(ty, rows, cols, &mut seed);
                let x: Vec<f32> = (0..n_x * cols).map(|_| lcg(&mut seed)).collect();
                let mut xq = Vec::new();
                quantize_rows(&x, cols, &mut xq);
                let mut y = vec![0f32; n_x * rows];
                qmatmul_on(path, &w, &xq, &mut y);
                let nb = cols / QK;
                for b in 0..n_x {
                    for r in 0..rows {
                        let want = vec_dot_scalar(ty, &w.row(r), &xq[b * nb..(b + 1) * nb]);
                        let got = y[b * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{path:?} {ty:?} {rows}x{cols} b={b} r={r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Largest quants against the largest activations: no i16 saturation.
    #[test]
    fn extreme_values_do_not_saturate() {
        for (path, ty) in paths().into_iter().flat_map(|p| [QType::Q4_0, QType::Q4_1, QType::Q8_0].map(|t| (p, t))) {
            let (rows, cols) = (16, 64);
            let bb = ty.block_bytes();
            let mut data = vec![0u8; rows * cols / QK * bb];
            for (k, b) in data.chunks_exact_mut(bb).enumerate() {
                b[..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
                let fill = if ty == QType::Q8_0 { 0x80 } else { 0xff }; // -128 / 15
                let start = if ty == QType::Q4_1 { 4 } else { 2 };
                b[start..].fill(if k % 2 == 0 { fill } else { 0x7f });
            }
            let w = QMatrix::new(ty, rows, cols, data).unwrap();
            for sign in [1.0f32, -1.0] {
                let x = vec![sign; 4 * cols];
                let mut xq = Vec::new();
                quantize_rows(&x, cols, &mut xq);
                let mut y = vec![0f32; 4 * rows];
                qmatmul_on(path, &w, &xq, &mut y);
                for (b, yb) in y.chunks_exact(rows).enumerate() {
                    for (r, got) in yb.iter().enumerate() {
                        let want = vec_dot_scalar(ty, &w.row(r), &xq[b * 2..b * 2 + 2]);
                        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "{path:?} {ty:?}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn regrouping_keeps_every_row_byte_for_byte() {
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let (rows, cols) = (13, 96);
            let n = rows * cols / QK * ty.block_bytes();
            let raw: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let m = QMatrix::new(ty, rows, cols, raw.clone()).unwrap();
            let rb = cols / QK * ty.block_bytes();
            for r in 0..rows {
                assert_eq!(m.row(r), &raw[r * rb..(r + 1) * rb], "{ty:?} row {r}");
            }
            let both = QMatrix::concat(&[m.clone(), m]).unwrap();
            assert_eq!(both.rows(), 2 * rows);
            assert_eq!(both.row(rows + 5), &raw[5 * rb..6 * rb]);
        }
    }

    #[test]
    fn quantized_dot_is_close_to_the_f32_dot() {
        let mut seed = 11;
        let w = random_matrix(QType::Q4_1, 1, 256, &mut seed);
        let x: Vec<f32> = (0..256).map(|_| lcg(&mut seed)).collect();
        let mut wf = vec![0f32; 256];
        super::super::quant::dequantize_row(QType::Q4_1, &w.row(0), &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let mut xq = vec![BlockQ8A::ZERO; 8];
        quantize_row_q8a_scalar(&x, &mut xq);
        let got = vec_dot_scalar(QType::Q4_1, &w.row(0), &xq);
        let scale: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!((got - exact).abs() < 0.01 * scale, "{got} vs {exact}");
        let _ = std::mem::size_of::<BlockQ4_1>();
    }
}
