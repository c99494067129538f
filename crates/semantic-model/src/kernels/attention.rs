//! Paged attention over the f16 KV pool: causal, grouped-query, online softmax.
//!
//! Each new token at position `p` attends to slots `0..=p` of its sequence,
//! found through the sequence's block table. One work item is one
//! (token, kv head) pair and computes all `group = n_heads / n_kv_heads`
//! query heads that share that kv head, so each K/V block is converted from
//! f16 once per group:
//!
//! ```text
//! for block in table[..]:              # block_size slots of one kv head
//!     K, V <- f16 -> f32 scratch       # once per block per item
//!     for head in group:
//!         s = scale * q_head . K       # block_size scores
//!         m' = max(m, max s); acc = acc * e^(m - m') + sum e^(s - m') V
//! out = acc / l
//! ```
//!
//! Checked against [`attend_scalar`] (plain two-loop softmax on the same
//! inputs) in the tests.

use rayon::prelude::*;
use semantic_core::BlockId;
use semantic_kv::KvPool;

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
    let group = shape.n_heads / shape.n_kv_heads;
    let width = shape.n_heads * shape.head_dim;
    let items: Vec<(usize, usize, usize)> = seqs
        .iter()
        .flat_map(|s| {
            (0..s.n_new).flat_map(move |t| {
                (0..shape.n_kv_heads).map(move |g| (s.first_row + t, s.start_pos + t, g))
            })
        })
        .collect();
    let table_of = |row: usize| {
        seqs.iter()
            .find(|s| row >= s.first_row && row < s.first_row + s.n_new)
            .map(|s| s.block_table)
            .unwrap_or(&[])
    };
    let simd = super::simd_available();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |&(row, pos, g): &(usize, usize, usize)| {
        let off = row * width + g * group * shape.head_dim;
        let len = group * shape.head_dim;
        let qh = &q[off..off + len];
        // SAFETY: each (row, kv head) item owns a disjoint range of `out`.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(off), len) };
        let args = Keys { pool, layer, kv_head: g, table: table_of(row), n_keys: pos + 1 };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2/FMA/F16C checked by simd_available().
            unsafe { avx2::attend(qh, o, &args, shape) };
            return;
        }
        attend_scalar(qh, o, &args, shape);
    };
    if items.len() >= 2 {
        items.par_iter().with_max_len(1).for_each(run);
    } else {
        items.iter().for_each(run);
    }
}

/// Where the keys of one work item live.
pub struct Keys<'a> {
    pub pool: &'a KvPool,
    pub layer: usize,
    pub kv_head: usize,
    pub table: &'a [BlockId],
    pub n_keys: usize,
}

/// Scalar reference: two-pass softmax over all keys, for each query head of
/// the group (`q`, `out`: `[group, head_dim]`).
pub fn attend_scalar(q: &[f32], out: &mut [f32], keys: &Keys<'_>, shape: AttnShape) {
    let hd = shape.head_dim;
    let bs = keys.pool.layout().block_size;
    let key = |j: usize, kv: usize| -> Vec<f32> {
        let run = keys.pool.run(keys.table[j / bs], keys.layer, kv, keys.kv_head);
        run[(j % bs) * hd..(j % bs + 1) * hd].iter().map(|v| v.to_f32()).collect()
    };
    for (qh, oh) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        let scores: Vec<f32> = (0..keys.n_keys)
            .map(|j| key(j, 0).iter().zip(qh).map(|(k, q)| k * q).sum::<f32>() * shape.scale)
            .collect();
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
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::matmul::avx2::hsum;
    use super::{AttnShape, Keys};

    const MAX_BLOCK: usize = 64;
    const MAX_HD: usize = 256;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn to_f32(src: &[half::f16], dst: &mut [f32]) {
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        for i in n8..src.len() {
            dst[i] = src[i].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..a.len()).step_by(8) {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc,
            );
        }
        hsum(acc)
    }

    /// `acc = acc * c + p * v` over one head_dim row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpby(acc: &mut [f32], c: f32, p: f32, v: &[f32]) {
        let (c, p) = (_mm256_set1_ps(c), _mm256_set1_ps(p));
        for i in (0..acc.len()).step_by(8) {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let x = _mm256_loadu_ps(v.as_ptr().add(i));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(p, x, _mm256_mul_ps(a, c)));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend(q: &[f32], out: &mut [f32], keys: &Keys<'_>, shape: AttnShape) {
        let hd = shape.head_dim;
        let bs = keys.pool.layout().block_size;
        if hd % 8 != 0 || hd > MAX_HD || bs > MAX_BLOCK {
            return super::attend_scalar(q, out, keys, shape);
        }
        let group = q.len() / hd;
        let mut kbuf = [0f32; MAX_BLOCK * MAX_HD];
        let mut vbuf = [0f32; MAX_BLOCK * MAX_HD];
        let mut m = [f32::NEG_INFINITY; 16];
        let mut l = [0f32; 16];
        debug_assert!(group <= 16);
        out.fill(0.0);
        let mut scores = [0f32; MAX_BLOCK];
        for (bi, &block) in keys.table.iter().enumerate() {
            let first = bi * bs;
            if first >= keys.n_keys {
                break;
            }
            let n = (keys.n_keys - first).min(bs);
            let kr = keys.pool.run(block, keys.layer, 0, keys.kv_head);
            let vr = keys.pool.run(block, keys.layer, 1, keys.kv_head);
            to_f32(&kr[..n * hd], &mut kbuf[..n * hd]);
            to_f32(&vr[..n * hd], &mut vbuf[..n * hd]);
            for h in 0..group {
                let qh = &q[h * hd..(h + 1) * hd];
                let mut bmax = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(n) {
                    *s = dot(qh, &kbuf[j * hd..(j + 1) * hd]) * shape.scale;
                    bmax = bmax.max(*s);
                }
                let m_new = m[h].max(bmax);
                let mut c = (m[h] - m_new).exp();
                let acc = &mut out[h * hd..(h + 1) * hd];
                let mut lsum = l[h] * c;
                for (j, s) in scores.iter().enumerate().take(n) {
                    let p = (s - m_new).exp();
                    lsum += p;
                    axpby(acc, c, p, &vbuf[j * hd..(j + 1) * hd]);
                    c = 1.0;
                }
                m[h] = m_new;
                l[h] = lsum;
            }
        }
        for h in 0..group {
            let inv = 1.0 / l[h];
            for o in &mut out[h * hd..(h + 1) * hd] {
                *o *= inv;
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
    fn simd_attention_equals_scalar_reference() {
        let mut seed = 3;
        let cases = [(1, 1, 8, 4, 1), (9, 3, 64, 16, 1), (9, 3, 64, 16, 37), (8, 2, 32, 8, 100), (4, 4, 128, 16, 17), (6, 1, 16, 32, 70)];
        for (n_heads, n_kv, hd, bs, n_tok) in cases {
            let layout = KvLayout { n_layers: 2, n_kv_heads: n_kv, head_dim: hd, block_size: bs };
            let mut pool = KvPool::new(layout, 16);
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
            let n_new = n_tok.min(5);
            let q: Vec<f32> = (0..n_new * n_heads * hd).map(|_| lcg(&mut seed)).collect();
            let mut out = vec![0f32; q.len()];
            let seq = AttnSeq { block_table: table.blocks(), start_pos: n_tok - n_new, n_new, first_row: 0 };
            paged_attention(&q, &mut out, &pool, 1, &[seq], shape);
            let group = n_heads / n_kv;
            for t in 0..n_new {
                for g in 0..n_kv {
                    let off = t * n_heads * hd + g * group * hd;
                    let len = group * hd;
                    let keys = Keys { pool: &pool, layer: 1, kv_head: g, table: table.blocks(), n_keys: n_tok - n_new + t + 1 };
                    let mut want = vec![0f32; len];
                    attend_scalar(&q[off..off + len], &mut want, &keys, shape);
                    for (a, b) in out[off..off + len].iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4, "{n_heads}/{n_kv}x{hd} bs={bs}: {a} vs {b}");
                    }
                }
            }
            pool.free_table(table).unwrap();
        }
    }
}
