//! Vector math shared by the kernels: a polynomial `exp`, SwiGLU, and the
//! softmax weights that sampling draws from.
//!
//! SwiGLU with a libm `expf` per element was ~0.25 ms of every decoded
//! row (30 layers x 1536 elements), serial between the parallel matmuls:
//! about half the cost of an extra row in a batched decode step.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// exp(x) for x <= 0 (Cephes polynomial, ~1 ulp), 8 lanes; inputs below
/// -87.3 give ~1e-38 rather than 0. 50x faster than a libm call per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let fx = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0)));
    let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// [`exp256`] in 16 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.3));
    let n = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let fx = _mm512_cvtepi32_ps(n);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0)));
    let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127)));
    _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
}

/// SwiGLU on rows laid out `[gate (ff) | up (ff)]`: `out = silu(gate) * up`.
pub fn silu_mul(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        if super::matmul::avx2::has_avx512() {
            // SAFETY: AVX-512 F/BW/DQ/VL checked by has_avx512().
            unsafe { silu_mul_512(gate_up, ff, out) };
        } else {
            // SAFETY: AVX2/FMA/F16C checked by simd_available().
            unsafe { silu_mul_avx2(gate_up, ff, out) };
        }
        return;
    }
    silu_mul_scalar(gate_up, ff, out);
}

pub fn silu_mul_scalar(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    for (gu, o) in gate_up.chunks_exact(2 * ff).zip(out.chunks_exact_mut(ff)) {
        let (g, u) = gu.split_at(ff);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// silu(g) = g * sigmoid(g), with `e = exp(-|g|) <= 1` so the exp never
/// overflows: sigmoid = 1 / (1 + e) for g >= 0, e / (1 + e) below.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_mul_avx2(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    let n8 = ff / 8 * 8;
    let sign = _mm256_set1_ps(-0.0);
    let one = _mm256_set1_ps(1.0);
    for (gu, o) in gate_up.chunks_exact(2 * ff).zip(out.chunks_exact_mut(ff)) {
        let (g, u) = gu.split_at(ff);
        for i in (0..n8).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = exp256(_mm256_or_ps(gv, sign));
            let neg = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
            let num = _mm256_blendv_ps(one, e, neg);
            let sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
            let r = _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(o.as_mut_ptr().add(i), r);
        }
        for i in n8..ff {
            o[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        }
    }
}

/// [`silu_mul_avx2`] in 16 lanes, the tail masked: 0.344 -> 0.180 ns per
/// value (5 rows of 1536, best of 20 x 2000, against the AVX2 version).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn silu_mul_512(gate_up: &[f32], ff: usize, out: &mut [f32]) {
    let one = _mm512_set1_ps(1.0);
    for (gu, o) in gate_up.chunks_exact(2 * ff).zip(out.chunks_exact_mut(ff)) {
        let (g, u) = gu.split_at(ff);
        for i in (0..ff).step_by(16) {
            let m: __mmask16 = if ff - i >= 16 { !0 } else { (1u16 << (ff - i)) - 1 };
            let gv = _mm512_maskz_loadu_ps(m, g.as_ptr().add(i));
            let e = exp512(_mm512_or_ps(gv, _mm512_set1_ps(-0.0)));
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(gv, _mm512_setzero_ps());
            let num = _mm512_mask_blend_ps(neg, one, e);
            let sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
            let r = _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_maskz_loadu_ps(m, u.as_ptr().add(i)));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), m, r);
        }
    }
}

/// Scaled values below this weigh exactly 0 (banned tokens, NaN).
const EXP_FLOOR: f32 = -87.0;

/// `out[i] = exp((x[i] - max) * scale)` and their sum: the unnormalized
/// softmax a sampler draws from (`max` the largest finite `x`, `scale` the
/// inverse temperature). Values scaled below -87 (`-inf`, NaN) weigh 0.
///
/// With libm `expf` per logit and a fresh 384 KiB candidate vector per
/// round, sampling at the OpenAI default (`temperature` 1, `top_p` 1) cost
/// 2967 us per token of SmolLM2's 49152 logits (`sample_steps`; now 10.5),
/// serial on the engine thread between steps: one agent over HTTP took 5.4
/// ms per token at the defaults against 1.8 greedy.
pub fn exp_scaled(x: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        // SAFETY: AVX-512 F/BW/DQ/VL or AVX2/FMA checked.
        return unsafe {
            if super::matmul::avx2::has_avx512() {
                exp_scaled_512(x, max, scale, out)
            } else {
                exp_scaled_avx2(x, max, scale, out)
            }
        };
    }
    exp_scaled_scalar(x, max, scale, out)
}

pub fn exp_scaled_scalar(x: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        let y = (v - max) * scale;
        *o = if y >= EXP_FLOOR { y.exp() } else { 0.0 };
        sum += *o;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_scaled_avx2(x: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
    let n8 = x.len() / 8 * 8;
    let (m, s, floor) = (_mm256_set1_ps(max), _mm256_set1_ps(scale), _mm256_set1_ps(EXP_FLOOR));
    let mut acc = _mm256_setzero_ps();
    for i in (0..n8).step_by(8) {
        let y = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), m), s);
        let e = _mm256_and_ps(exp256(y), _mm256_cmp_ps(y, floor, _CMP_GE_OQ));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), e);
        acc = _mm256_add_ps(acc, e);
    }
    super::matmul::avx2::hsum(acc) + exp_scaled_scalar(&x[n8..], max, scale, &mut out[n8..])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma")]
unsafe fn exp_scaled_512(x: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f32 {
    let (m, s, floor) = (_mm512_set1_ps(max), _mm512_set1_ps(scale), _mm512_set1_ps(EXP_FLOOR));
    let mut acc = _mm512_setzero_ps();
    for i in (0..x.len()).step_by(16) {
        let k: __mmask16 = if x.len() - i >= 16 { !0 } else { (1u16 << (x.len() - i)) - 1 };
        let y = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), m), s);
        let live = k & _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, floor);
        let e = _mm512_maskz_mov_ps(live, exp512(y));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, e);
        acc = _mm512_add_ps(acc, e);
    }
    _mm512_reduce_add_ps(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_silu_equals_scalar() {
        let ff = 37;
        let gu: Vec<f32> =
            (0..3 * 2 * ff).map(|i| (i as f32 * 0.731).sin() * 12.0 + if i == 5 { 95.0 } else { 0.0 }).collect();
        let (mut a, mut b) = (vec![0f32; 3 * ff], vec![0f32; 3 * ff]);
        silu_mul(&gu, ff, &mut a);
        silu_mul_scalar(&gu, ff, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
        // Both SIMD widths, whichever `silu_mul` picks.
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd_available() {
            let mut widths = vec![vec![0f32; 3 * ff]];
            // SAFETY: AVX2/FMA/F16C checked above.
            unsafe { silu_mul_avx2(&gu, ff, &mut widths[0]) };
            if crate::kernels::matmul::avx2::has_avx512() {
                let mut d = vec![0f32; 3 * ff];
                // SAFETY: AVX-512 checked above.
                unsafe { silu_mul_512(&gu, ff, &mut d) };
                widths.push(d);
            }
            for c in &widths {
                for (x, y) in c.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn simd_softmax_weights_equal_scalar() {
        let mut x: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        x[7] = f32::NEG_INFINITY;
        x[500] = f32::NAN;
        x[999] = -200.0;
        let max = 30.0;
        let (mut a, mut b) = (vec![1f32; x.len()], vec![1f32; x.len()]);
        let (sa, sb) = (exp_scaled(&x, max, 0.8, &mut a), exp_scaled_scalar(&x, max, 0.8, &mut b));
        assert!((sa - sb).abs() <= 1e-4 * sb, "{sa} vs {sb}");
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 1e-6 * q.max(1e-30) + 1e-37, "{i}: {p} vs {q}");
        }
        for i in [7, 500, 999] {
            assert_eq!((a[i], b[i]), (0.0, 0.0), "{i} weighs nothing");
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd_available() {
            let mut c = vec![1f32; x.len()];
            // SAFETY: AVX2/FMA checked above.
            let sc = unsafe { exp_scaled_avx2(&x, max, 0.8, &mut c) };
            assert!((sc - sb).abs() <= 1e-4 * sb);
            for (p, q) in c.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-6 * q.max(1e-30) + 1e-37);
            }
        }
    }
}
