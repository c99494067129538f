//! GGML block formats of the weights we run natively, our activation format,
//! and the scalar reference dot products.
//!
//! Weights (as stored in GGUF, 32 values per block):
//! - `Q4_0`: `d: f16, qs: [u8; 16]`, value `(q - 8) * d`
//! - `Q4_1`: `d: f16, m: f16, qs: [u8; 16]`, value `q * d + m`
//! - `Q8_0`: `d: f16, qs: [i8; 32]`, value `q * d`
//!
//! For 4-bit blocks, value `j < 16` is the low nibble of `qs[j]` and value
//! `j >= 16` the high nibble of `qs[j - 16]`.
//!
//! Activations are quantized per row to [`BlockQ8A`], bit for bit as GGML's
//! `Q8_1` (and, without `s`, `Q8_0`): `d = max|x| / 127`, `q = round(x / d)`
//! (half away from zero), `d` stored rounded to f16, `s = f16(f16(sum q) * d)`.
//! Matching GGML's rounding keeps our logits within float-summation noise of
//! llama.cpp and candle instead of a second, different quantization error.
//! The offset term of Q4_0/Q4_1 costs one multiply per block:
//!
//! ```text
//! dot(Q4_1 w, Q8A a) = d_w * d_a * sum(q_w * q_a) + m_w * s_a
//! dot(Q4_0 w, Q8A a) = d_w * d_a * (sum(q_w * q_a) - 8 * sum(q_a))
//! ```

use half::f16;

pub const QK: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// One quantized block of an activation row.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8A {
    /// Scale, an f16 value widened to f32.
    pub d: f32,
    /// `d * sum(qs)` rounded as GGML's Q8_1 does (for Q4_1's offset).
    pub s: f32,
    /// `sum(qs)`, exact (for Q4_0's offset).
    pub sum: i32,
    _pad: i32,
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8A>() == 48);

impl BlockQ8A {
    pub const ZERO: Self = Self { d: 0.0, s: 0.0, sum: 0, _pad: 0, qs: [0; 32] };

    /// Fills `d`, `s` and `sum` from the unrounded scale and the quants.
    #[inline(always)]
    pub fn set_scales(&mut self, d: f32, sum: i32) {
        let d16 = f16::from_f32(d);
        self.d = d16.to_f32();
        self.s = (f16::from_f32(sum as f32) * d16).to_f32();
        self.sum = sum;
    }
}

/// Quantized weight formats with a native kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl QType {
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }
}

/// Reads block `i` of a byte buffer of blocks (GGUF data is only 1-aligned
/// for our purposes, so blocks are read unaligned).
#[inline(always)]
pub fn read_block<T: Copy>(bytes: &[u8], i: usize) -> T {
    let size = std::mem::size_of::<T>();
    let b = &bytes[i * size..(i + 1) * size];
    // SAFETY: `b` holds exactly size_of::<T>() bytes and T is a plain
    // repr(C) block of integers and f16 values, valid for any bit pattern.
    unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) }
}

/// Dequantizes one row of `n` values (a multiple of 32).
pub fn dequantize_row(ty: QType, row: &[u8], out: &mut [f32]) {
    for (i, chunk) in out.chunks_exact_mut(QK).enumerate() {
        match ty {
            QType::Q4_0 => {
                let b: BlockQ4_0 = read_block(row, i);
                let d = b.d.to_f32();
                for j in 0..16 {
                    chunk[j] = ((b.qs[j] & 0xf) as f32 - 8.0) * d;
                    chunk[j + 16] = ((b.qs[j] >> 4) as f32 - 8.0) * d;
                }
            }
            QType::Q4_1 => {
                let b: BlockQ4_1 = read_block(row, i);
                let (d, m) = (b.d.to_f32(), b.m.to_f32());
                for j in 0..16 {
                    chunk[j] = (b.qs[j] & 0xf) as f32 * d + m;
                    chunk[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
                }
            }
            QType::Q8_0 => {
                let b: BlockQ8_0 = read_block(row, i);
                let d = b.d.to_f32();
                for (o, q) in chunk.iter_mut().zip(b.qs) {
                    *o = q as f32 * d;
                }
            }
        }
    }
}

/// Scalar reference: quantizes one activation row (length a multiple of 32).
pub fn quantize_row_q8a_scalar(x: &[f32], out: &mut [BlockQ8A]) {
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.set_scales(d, sum);
    }
}

/// Quantizes one activation row, with AVX2 where available.
pub fn quantize_row_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        if super::matmul::avx2::has_avx512() {
            // SAFETY: AVX-512 F/BW/VL checked by has_avx512().
            unsafe { super::matmul::avx2::quantize_row_q8a_512(x, out) };
        } else {
            // SAFETY: the CPU supports AVX2/FMA/F16C (checked above).
            unsafe { super::matmul::avx2::quantize_row_q8a(x, out) };
        }
        return;
    }
    quantize_row_q8a_scalar(x, out)
}

/// Scalar reference: dot product of one weight row with one activation row.
pub fn vec_dot_scalar(ty: QType, w: &[u8], a: &[BlockQ8A]) -> f32 {
    let mut sum = 0f32;
    for (i, ab) in a.iter().enumerate() {
        let (isum, d, m) = match ty {
            QType::Q4_0 => {
                let b: BlockQ4_0 = read_block(w, i);
                (nibble_dot(&b.qs, &ab.qs) - 8 * ab.sum, b.d.to_f32(), 0.0)
            }
            QType::Q4_1 => {
                let b: BlockQ4_1 = read_block(w, i);
                (nibble_dot(&b.qs, &ab.qs), b.d.to_f32(), b.m.to_f32())
            }
            QType::Q8_0 => {
                let b: BlockQ8_0 = read_block(w, i);
                let isum = b.qs.iter().zip(&ab.qs).map(|(&x, &y)| x as i32 * y as i32).sum();
                (isum, b.d.to_f32(), 0.0)
            }
        };
        sum += d * ab.d * isum as f32 + m * ab.s;
    }
    sum
}

fn nibble_dot(qs: &[u8; 16], a: &[i8; 32]) -> i32 {
    (0..16).map(|j| (qs[j] & 0xf) as i32 * a[j] as i32 + (qs[j] >> 4) as i32 * a[j + 16] as i32).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        // Includes exact ties (x / d = k + 0.5) that must round away from zero.
        let mut x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        x[3] = 0.5;
        let mut q = vec![BlockQ8A::ZERO; 3];
        quantize_row_q8a_scalar(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / 32];
            assert!((b.qs[i % 32] as f32 * b.d - v).abs() <= b.d * 0.5 + 1e-3);
        }
        assert_eq!(&q[0].qs[..4], &[127, 3, -4, 1]);
        // Every SIMD variant this CPU has, on the ties above and on random rows.
        let mut rows = vec![x];
        // Rows of 18 and 48 blocks (the 16-block path and its remainder),
        // with a zero block, tiny values (subnormal f16 scales) and ties.
        for len in [576, 1536] {
            let mut r: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 17.0).collect();
            r[64..96].fill(0.0);
            r[96..128].iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 - 16.0) * 1e-7);
            r[160] = 127.0;
            r[161] = 2.5;
            r[162] = -3.5;
            r[163] = 0.5;
            r[200] = -127.0;
            r[201] = 63.5;
            rows.push(r);
        }
        let mut seed = 5u64;
        for scale in [1e-3f32, 1.0, 300.0] {
            rows.push(
                (0..1056)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                    })
                    .collect(),
            );
        }
        for x in &rows {
            let n = x.len() / QK;
            let mut want = vec![BlockQ8A::ZERO; n];
            quantize_row_q8a_scalar(x, &mut want);
            let mut got = vec![BlockQ8A::ZERO; n];
            quantize_row_q8a(x, &mut got);
            #[cfg(target_arch = "x86_64")]
            let mut variants = vec![got];
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::simd_available() {
                let mut v = vec![BlockQ8A::ZERO; n];
                // SAFETY: AVX2/FMA/F16C checked above.
                unsafe { crate::kernels::matmul::avx2::quantize_row_q8a(x, &mut v) };
                variants.push(v);
                if crate::kernels::matmul::avx2::has_avx512() {
                    let mut v = vec![BlockQ8A::ZERO; n];
                    // SAFETY: AVX-512 checked above.
                    unsafe { crate::kernels::matmul::avx2::quantize_row_q8a_512(x, &mut v) };
                    variants.push(v);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let variants = vec![got];
            for v in &variants {
                for (a, b) in want.iter().zip(v) {
                    assert_eq!(a.qs, b.qs);
                    assert_eq!((a.d, a.s, a.sum), (b.d, b.s, b.sum));
                }
            }
        }
    }
}
