//! Batched quantized matmul: `y[b, n] = sum_k x[b, k] * W[n, k]` for Q4_0,
//! Q4_1 and Q8_0 weights against [`BlockQ8A`] activations.
//!
//! Why our own: candle 0.11's CPU quantized matmul reads the weights once per
//! activation row (Q8_0: 16 ms per step for 1 sequence, 76 ms for 5) and its
//! Q4_1 dot product is scalar. Here each weight row is loaded from memory once
//! per step and unpacked once per tile of up to [`TILE`] activation rows, so a
//! step with several sequences costs little more than one.
//!
//! Loop order (per thread, over a chunk of weight rows):
//!
//! ```text
//! for each weight row r in chunk:        # row r comes from RAM once, then L1
//!     for each tile of TILE activation rows:
//!         for each 32-value block i:      # unpack w[r, i] once for the tile
//!             acc[t] += d_w * d_a[t] * isum(w[r, i], a[t, i]) (+ m_w * s_a[t])
//! ```
//!
//! Threads split the weight rows (rayon); every task writes its own columns
//! of `y`. The scalar reference is [`super::quant::vec_dot_scalar`].

use rayon::prelude::*;

use super::quant::{quantize_row_q8a, vec_dot_scalar, BlockQ8A, QType, QK};
use super::SendPtr;

/// Activation rows unpacked against one weight block at a time.
pub const TILE: usize = 4;
/// Weight rows computed together (independent accumulators).
pub const ROWS: usize = 4;

/// A quantized weight matrix `[rows (outputs), cols (inputs)]`, row-major
/// GGML blocks, owned (copied out of the GGUF so the file can be unmapped).
#[derive(Clone, Debug)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(QK) {
            return Err(format!("{cols} columns is not a multiple of {QK}"));
        }
        let want = rows * cols / QK * ty.block_bytes();
        if data.len() != want {
            return Err(format!("{} bytes, expected {want}", data.len()));
        }
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Stacks matrices with the same type and width (e.g. Q, K and V) so one
    /// call computes all of them from one quantized input.
    pub fn concat(parts: &[QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.ty != first.ty || p.cols != first.cols)
        {
            return None;
        }
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Some(Self {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data,
        })
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

    pub fn row_bytes(&self) -> usize {
        self.cols / QK * self.ty.block_bytes()
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Quantizes `n` activation rows of width `cols` into `out`.
pub fn quantize_rows(x: &[f32], cols: usize, out: &mut Vec<BlockQ8A>) {
    let nb = cols / QK;
    let n = x.len() / cols;
    out.clear();
    out.resize(n * nb, BlockQ8A::ZERO);
    let rows: Vec<(&[f32], &mut [BlockQ8A])> =
        x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)).collect();
    if n >= 16 {
        rows.into_par_iter()
            .for_each(|(x, q)| quantize_row_q8a(x, q));
    } else {
        rows.into_iter().for_each(|(x, q)| quantize_row_q8a(x, q));
    }
}

/// `y[b * w.rows() + n] = dot(W[n], x[b])` for the `n_x` quantized rows of `x`.
pub fn qmatmul(w: &QMatrix, x: &[BlockQ8A], out: &mut [f32]) {
    let nb = w.cols / QK;
    let n_x = x.len() / nb;
    assert_eq!(
        x.len(),
        n_x * nb,
        "activation blocks do not match the width"
    );
    assert_eq!(out.len(), n_x * w.rows, "output size");
    let simd = super::simd_available();
    // Enough chunks to balance the threads, each with >= 16 KiB of weights
    // (or the equivalent in activation work) to hide the task overhead.
    let threads = rayon::current_num_threads().max(1);
    let work = w.rows * w.row_bytes() * n_x.div_ceil(TILE);
    let n_chunks = (work / 16384)
        .clamp(1, threads * 4)
        .min(w.rows.div_ceil(ROWS));
    let chunk_rows = w.rows.div_ceil(n_chunks).next_multiple_of(ROWS);
    let n_chunks = w.rows.div_ceil(chunk_rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |c: usize| {
        let r0 = c * chunk_rows;
        let r1 = (r0 + chunk_rows).min(w.rows);
        // SAFETY: task `c` writes only columns r0..r1 of every output row, and
        // the chunks are disjoint; `out` outlives the parallel region.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), n_x * w.rows) };
        rows_kernel(w, x, nb, n_x, r0..r1, out, simd);
    };
    if n_chunks == 1 {
        run(0);
    } else {
        (0..n_chunks).into_par_iter().for_each(run);
    }
}

fn rows_kernel(
    w: &QMatrix,
    x: &[BlockQ8A],
    nb: usize,
    n_x: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    simd: bool,
) {
    let mut r = rows.start;
    while r < rows.end {
        let rw = (rows.end - r).min(ROWS);
        let mut b0 = 0;
        while b0 < n_x {
            let t = (n_x - b0).min(TILE);
            let mut res = [[0f32; TILE]; ROWS];
            #[cfg(target_arch = "x86_64")]
            if simd {
                let wr = &w.data[r * w.row_bytes()..(r + rw) * w.row_bytes()];
                // SAFETY: AVX2/FMA/F16C present; `wr` holds rw rows of nb
                // blocks and rows b0..b0+t of `x` hold nb blocks each.
                unsafe {
                    avx2::dot_tile(w.ty, wr, rw, &x[b0 * nb..(b0 + t) * nb], nb, t, &mut res)
                };
            }
            if !simd {
                for (i, rr) in res.iter_mut().enumerate().take(rw) {
                    for (j, v) in rr.iter_mut().enumerate().take(t) {
                        *v = vec_dot_scalar(
                            w.ty,
                            w.row(r + i),
                            &x[(b0 + j) * nb..(b0 + j + 1) * nb],
                        );
                    }
                }
            }
            for (i, rr) in res.iter().enumerate().take(rw) {
                for (j, v) in rr.iter().enumerate().take(t) {
                    out[(b0 + j) * w.rows + r + i] = *v;
                }
            }
            b0 += t;
        }
        r += rw;
    }
}

#[cfg(target_arch = "x86_64")]
// Register tiles are indexed [row][act] on purpose: the loops are unrolled
// over const bounds and the arrays stay in registers.
#[allow(clippy::needless_range_loop)]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::quant::{BlockQ8A, QType, QK};
    use super::{ROWS, TILE};

    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Computes `out[i][j] = dot(w row i, x row j)` for `rw` weight rows and
    /// `t` activation rows. Full tiles use RW x NA independent accumulators
    /// (ILP hides the FMA latency); partial tiles fall back to 1-row kernels.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn dot_tile(
        ty: QType,
        w: &[u8],
        rw: usize,
        x: &[BlockQ8A],
        nb: usize,
        t: usize,
        out: &mut [[f32; TILE]; ROWS],
    ) {
        macro_rules! tiles {
            ($f:ident, $($extra:tt)*) => {
                match (rw, t) {
                    (4, 1) => $f::<4, 1 $($extra)*>(w, x, nb, out),
                    (4, 2) => $f::<4, 2 $($extra)*>(w, x, nb, out),
                    (4, 3) => { $f::<2, 3 $($extra)*>(w, x, nb, out); tail::<3>(ty, w, x, nb, out) }
                    (4, _) => { $f::<2, 4 $($extra)*>(w, x, nb, out); tail::<4>(ty, w, x, nb, out) }
                    (r, t) => {
                        for i in 0..r {
                            let wr = &w[i * w.len() / r..(i + 1) * w.len() / r];
                            let mut one = [[0f32; TILE]; ROWS];
                            match t {
                                1 => $f::<1, 1 $($extra)*>(wr, x, nb, &mut one),
                                2 => $f::<1, 2 $($extra)*>(wr, x, nb, &mut one),
                                3 => $f::<1, 3 $($extra)*>(wr, x, nb, &mut one),
                                _ => $f::<1, 4 $($extra)*>(wr, x, nb, &mut one),
                            }
                            out[i] = one[0];
                        }
                    }
                }
            };
        }
        match ty {
            QType::Q4_1 => tiles!(dot_q4, , true),
            QType::Q4_0 => tiles!(dot_q4, , false),
            QType::Q8_0 => tiles!(dot_q8,),
        }
    }

    /// Rows 2 and 3 of a 4-row tile that ran as 2 rows (register pressure).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tail<const NA: usize>(
        ty: QType,
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; TILE]; ROWS],
    ) {
        let half = &w[w.len() / 2..];
        let mut two = [[0f32; TILE]; ROWS];
        match ty {
            QType::Q4_1 => dot_q4::<2, NA, true>(half, x, nb, &mut two),
            QType::Q4_0 => dot_q4::<2, NA, false>(half, x, nb, &mut two),
            QType::Q8_0 => dot_q8::<2, NA>(half, x, nb, &mut two),
        }
        out[2] = two[0];
        out[3] = two[1];
    }

    /// Q4_0 (`Q41 = false`, offset -8 d) or Q4_1 (offset m): RW weight rows
    /// (consecutive in `w`) against NA activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4<const RW: usize, const NA: usize, const Q41: bool>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; TILE]; ROWS],
    ) {
        let bb = if Q41 { 20 } else { 18 };
        let row_bytes = nb * bb;
        let mask = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NA]; RW];
        let mut bias = [[0f32; NA]; RW];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            for r in 0..RW {
                let blk = wp.add(r * row_bytes + i * bb);
                let d = f16_at(blk);
                // Q4_1: offset m times GGML's rounded `s`; Q4_0: -8 d times
                // the exact integer sum of the activation block.
                let m = if Q41 { f16_at(blk.add(2)) } else { -8.0 * d };
                let qs = _mm_loadu_si128(blk.add(if Q41 { 4 } else { 2 }) as *const __m128i);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                let wq = _mm256_set_m128i(hi, lo);
                for j in 0..NA {
                    let a = &*xp.add(j * nb + i);
                    let aq = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, aq), ones);
                    acc[r][j] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc[r][j]);
                    bias[r][j] += if Q41 { m * a.s } else { m * a.d * a.sum as f32 };
                }
            }
        }
        for r in 0..RW {
            for j in 0..NA {
                out[r][j] = hsum(acc[r][j]) + bias[r][j];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8<const RW: usize, const NA: usize>(
        w: &[u8],
        x: &[BlockQ8A],
        nb: usize,
        out: &mut [[f32; TILE]; ROWS],
    ) {
        let row_bytes = nb * 34;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); NA]; RW];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        for i in 0..nb {
            for r in 0..RW {
                let blk = wp.add(r * row_bytes + i * 34);
                let d = f16_at(blk);
                let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let wabs = _mm256_sign_epi8(wq, wq);
                for j in 0..NA {
                    let a = &*xp.add(j * nb + i);
                    let aq = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(aq, wq));
                    let p = _mm256_madd_epi16(p, ones);
                    acc[r][j] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p), acc[r][j]);
                }
            }
        }
        for r in 0..RW {
            for j in 0..NA {
                out[r][j] = hsum(acc[r][j]);
            }
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
                let away =
                    _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(x, sign), _mm256_set1_ps(1.0)));
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
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn random_matrix(ty: QType, rows: usize, cols: usize, seed: &mut u64) -> QMatrix {
        let n = rows * cols / QK * ty.block_bytes();
        let mut data: Vec<u8> = (0..n).map(|_| (lcg(seed) * 127.0) as i8 as u8).collect();
        // Keep the f16 scales finite and small: rewrite them per block.
        for b in data.chunks_exact_mut(ty.block_bytes()) {
            let d = half::f16::from_f32(0.01 + lcg(seed).abs() * 0.02)
                .to_bits()
                .to_le_bytes();
            b[..2].copy_from_slice(&d);
            if ty == QType::Q4_1 {
                let m = half::f16::from_f32(lcg(seed) * 0.1).to_bits().to_le_bytes();
                b[2..4].copy_from_slice(&m);
            }
        }
        QMatrix::new(ty, rows, cols, data).unwrap()
    }

    #[test]
    fn simd_matmul_equals_scalar_reference() {
        let mut seed = 7;
        for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            for (rows, cols, n_x) in [(1, 32, 1), (37, 64, 3), (64, 576, 5), (200, 160, 9)] {
                let w = random_matrix(ty, rows, cols, &mut seed);
                let x: Vec<f32> = (0..n_x * cols).map(|_| lcg(&mut seed)).collect();
                let mut xq = Vec::new();
                quantize_rows(&x, cols, &mut xq);
                let mut y = vec![0f32; n_x * rows];
                qmatmul(&w, &xq, &mut y);
                let nb = cols / QK;
                for b in 0..n_x {
                    for r in 0..rows {
                        let want = vec_dot_scalar(ty, w.row(r), &xq[b * nb..(b + 1) * nb]);
                        let got = y[b * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{ty:?} {rows}x{cols} b={b} r={r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_dot_is_close_to_the_f32_dot() {
        let mut seed = 11;
        let w = random_matrix(QType::Q4_1, 1, 256, &mut seed);
        let x: Vec<f32> = (0..256).map(|_| lcg(&mut seed)).collect();
        let mut wf = vec![0f32; 256];
        super::super::quant::dequantize_row(QType::Q4_1, w.row(0), &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let mut xq = vec![BlockQ8A::ZERO; 8];
        quantize_row_q8a_scalar(&x, &mut xq);
        let got = vec_dot_scalar(QType::Q4_1, w.row(0), &xq);
        let scale: f32 = wf.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!((got - exact).abs() < 0.01 * scale, "{got} vs {exact}");
        let _ = std::mem::size_of::<BlockQ4_1>();
    }
}
