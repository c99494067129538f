//! Element-wise kernels: RMSNorm, rotary embeddings, residual add. They are
//! a small share of a step; plain loops that the compiler vectorizes, except
//! RoPE's pair rotation, which it does not (an AVX-512 twin, bit-exact).
//! SwiGLU needs `exp`, which does not vectorize: it is in [`super::vmath`].

/// Row-wise RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = sum_squares(xr) / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// `sum(x^2)` in 16 partial sums, which vectorize: a plain `.sum()` is
/// one serial chain of adds (float addition does not reorder), 576
/// dependent adds per row of the default model, on the serial path of
/// every decoded row twice per layer.
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    chunks.remainder().iter().map(|v| v * v).sum::<f32>() + acc.iter().sum::<f32>()
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary position embedding.
///
/// GGUF `llama` weights are permuted for the interleaved variant (pairs
/// `x[2i], x[2i+1]`, llama.cpp's `ROPE_TYPE_NORM`); `qwen2` uses the NeoX
/// variant (pairs `x[i], x[i + n_rot/2]`). Angles are computed per position
/// (no fixed table), so any position up to the context length works.
#[derive(Clone, Debug)]
pub struct Rope {
    n_rot: usize,
    neox: bool,
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(n_rot: usize, base: f32, neox: bool) -> Self {
        let inv_freq = (0..n_rot / 2).map(|i| 1.0 / (base as f64).powf(2.0 * i as f64 / n_rot as f64)).collect();
        Self { n_rot, neox, inv_freq }
    }

    /// `(cos, sin)` of every frequency at `pos`, appended to `table`.
    pub fn push_angles(&self, pos: usize, table: &mut Vec<(f32, f32)>) {
        table.extend(self.inv_freq.iter().map(|f| {
            let a = pos as f64 * f;
            (a.cos() as f32, a.sin() as f32)
        }));
    }

    /// Rotates every head of one token in place; `angles` from `push_angles`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        #[cfg(target_arch = "x86_64")]
        if !self.neox && self.n_rot == head_dim && head_dim.is_multiple_of(16) && super::matmul::avx2::has_avx512() {
            // SAFETY: AVX-512 F/BW/DQ/VL checked by has_avx512(); every
            // head is `head_dim` values and `angles` has `head_dim / 2`.
            unsafe { apply_pairs_512(x, head_dim, &angles[..head_dim / 2]) };
            return;
        }
        self.apply_scalar(x, head_dim, angles)
    }

    /// The reference for [`Rope::apply`].
    pub fn apply_scalar(&self, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        let half = self.n_rot / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in angles.iter().enumerate().take(half) {
                let (a, b) = if self.neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }

    pub fn n_freqs(&self) -> usize {
        self.n_rot / 2
    }
}

/// The interleaved variant over whole heads in 16 lanes, bit for bit the
/// scalar one: each pair is `(x0 c - x1 s, x1 c + x0 s)` from the same
/// rounded products (no FMA). The scalar loop does not vectorize; with this
/// the row ops of a 5-row decode step went from 0.25-0.26 to 0.23-0.24 ms,
/// of a 512-token prefill from 28-30 to 23-26 ms (`decode_steps` with
/// `SEMANTIC_FORWARD_PROFILE`, interleaved runs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn apply_pairs_512(x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
    use std::arch::x86_64::*;
    // (c, s) pairs are laid out as the dimension pairs they rotate.
    let cs = angles.as_ptr() as *const f32;
    let even_sign = _mm512_castsi512_ps(_mm512_set_epi32(
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
        0,
        i32::MIN,
    ));
    for head in x.chunks_exact_mut(head_dim) {
        for k in (0..head_dim).step_by(16) {
            let a = _mm512_loadu_ps(cs.add(k));
            let (c, s) = (_mm512_moveldup_ps(a), _mm512_movehdup_ps(a));
            let v = _mm512_loadu_ps(head.as_ptr().add(k));
            let swapped = _mm512_permute_ps::<0b10_11_00_01>(v);
            let p = _mm512_mul_ps(v, c);
            let q = _mm512_xor_ps(_mm512_mul_ps(swapped, s), even_sign);
            _mm512_storeu_ps(head.as_mut_ptr().add(k), _mm512_add_ps(p, q));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalizes() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
        // Wider than the 16 partial sums, with a remainder.
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let plain: f32 = x.iter().map(|v| v * v).sum();
        assert!((sum_squares(&x) - plain).abs() < 1e-4 * plain);
    }

    #[test]
    fn rope_preserves_norm_and_is_identity_at_zero() {
        for neox in [false, true] {
            let rope = Rope::new(8, 10000.0, neox);
            let x0: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
            let mut t = Vec::new();
            rope.push_angles(0, &mut t);
            let mut x = x0.clone();
            rope.apply(&mut x, 8, &t);
            assert_eq!(x, x0);
            t.clear();
            rope.push_angles(1234, &mut t);
            rope.apply(&mut x, 8, &t);
            let n0: f32 = x0.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            assert_ne!(x, x0);
        }
        // The SIMD twin, bit for bit, on several heads of head_dim 64.
        let rope = Rope::new(64, 10000.0, false);
        let x0: Vec<f32> = (0..3 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for pos in [0, 1, 77, 4095] {
            let mut t = Vec::new();
            rope.push_angles(pos, &mut t);
            let (mut a, mut b) = (x0.clone(), x0.clone());
            rope.apply(&mut a, 64, &t);
            rope.apply_scalar(&mut b, 64, &t);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "pos {pos}"
            );
        }
    }
}
