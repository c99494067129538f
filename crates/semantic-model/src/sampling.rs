//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, seeded (same seed and logits, same tokens).
//!
//! Order (as llama.cpp's default chain): repetition penalty over the recent
//! tokens, then greedy if `temperature == 0`, else top-k, softmax with
//! temperature, top-p, min-p, and a draw from what is left. Candidates are
//! found with partial selection (64, 512, 4096, all) so top-p stays exact
//! without sorting the whole vocabulary every token.

use semantic_core::SamplingParams;

/// Tokens the repetition penalty looks back over.
pub const PENALTY_WINDOW: usize = 256;

/// xoshiro256** seeded by splitmix64: small, fast and reproducible.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// A sampled token and its log-probability under the final distribution
/// (0 for greedy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            t.map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        Self { params, rng: Rng::new(seed) }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `recent` is the sequence so far (prompt and
    /// output); only its last [`PENALTY_WINDOW`] tokens are penalized.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> Sampled {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let window = &recent[recent.len().saturating_sub(PENALTY_WINDOW)..];
            let mut seen = std::collections::HashSet::with_capacity(window.len());
            for &t in window {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.is_greedy() {
            return Sampled { token: argmax(logits), logprob: 0.0 };
        }
        let mut want = if p.top_k > 0 { p.top_k.min(logits.len()) } else { 64.min(logits.len()) };
        loop {
            let cands = top_candidates(logits, want);
            let max = cands[0].1;
            let mut probs: Vec<f32> = cands.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
            // Normalize over the whole (top-k limited) distribution.
            let total: f32 = if p.top_k > 0 || want == logits.len() {
                probs.iter().sum()
            } else {
                logits.iter().map(|l| ((l - max) / p.temperature).exp()).sum()
            };
            let covered: f32 = probs.iter().sum::<f32>() / total;
            if covered < p.top_p && want < logits.len() && p.top_k == 0 {
                want = (want * 8).min(logits.len());
                continue;
            }
            probs.iter_mut().for_each(|v| *v /= total);
            return self.draw(&cands, &mut probs);
        }
    }

    fn draw(&mut self, cands: &[(u32, f32)], probs: &mut Vec<f32>) -> Sampled {
        let p = &self.params;
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&v| v >= floor).count().max(1));
        }
        probs.truncate(keep);
        let sum: f32 = probs.iter().sum();
        let mut r = self.rng.next_f32() * sum;
        for (i, pr) in probs.iter().enumerate() {
            if r < *pr || i + 1 == keep {
                return Sampled { token: cands[i].0, logprob: (pr / sum).ln() };
            }
            r -= pr;
        }
        unreachable!("keep >= 1")
    }
}

/// `log softmax(logits)[token]`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
    logits[token as usize] - max - sum.ln()
}

/// The first index of the largest logit (NaNs never win; 0 when all are
/// NaN). Two passes, a 16-lane max then a search, so both vectorize: the
/// one-pass running argmax was ~40 us per row of SmolLM2's 49152 logits,
/// a tenth of what each extra agent adds to a batched decode step.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = logits.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// The `k` largest logits as `(token, logit)`, sorted descending, ties by id.
fn top_candidates(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < all.len() {
        all.select_nth_unstable_by(k - 1, cmp);
        all.truncate(k);
    }
    all.sort_unstable_by(cmp);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, seed: Some(42), ..Default::default() };
        f(&mut p);
        p
    }

    fn logits() -> Vec<f32> {
        (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        let mut l = logits();
        let best = argmax(&l);
        assert_eq!(s.sample(&mut l, &[]).token, best);
    }

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nans() {
        let reference = |l: &[f32]| {
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut l: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32).sin()).collect();
        assert_eq!(argmax(&l), reference(&l));
        l[998] = 5.0;
        assert_eq!(argmax(&l), 998, "in the tail past the last 16");
        l[17] = 5.0;
        assert_eq!(argmax(&l), 17, "ties: the first");
        l[3] = f32::NAN;
        assert_eq!(argmax(&l), 17);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[1.0, 2.0, 3.0]), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let run = || {
            let mut s = Sampler::new(params(|_| {}));
            (0..50).map(|_| s.sample(&mut logits(), &[]).token).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 5, "it samples");
    }

    #[test]
    fn top_k_and_min_p_restrict_the_candidates() {
        let l = logits();
        let mut sorted: Vec<u32> = (0..1000).collect();
        sorted.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let mut s = Sampler::new(params(|p| p.top_k = 3));
        for _ in 0..200 {
            assert!(sorted[..3].contains(&s.sample(&mut l.clone(), &[]).token));
        }
        // min_p = 0.5 at T=1 keeps logits within ln 2 of the max.
        let mut s = Sampler::new(params(|p| p.min_p = 0.5));
        for _ in 0..200 {
            let t = s.sample(&mut l.clone(), &[]).token;
            assert!(l[t as usize] >= 9.99 - 2f32.ln() - 1e-4);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities 0.5, 0.3, 0.2 (logits = ln p).
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(params(|p| p.top_p = 0.7));
        let mut counts = [0; 3];
        for _ in 0..2000 {
            counts[s.sample(&mut l.to_vec(), &[]).token as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0] > counts[1] && counts[1] > 500, "{counts:?}");
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut l = vec![1.0f32, 0.9, -1.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..Default::default() });
        assert_eq!(s.sample(&mut l, &[0, 2]).token, 1);
        assert!((l[0] - 1.0 / 1.5).abs() < 1e-6 && (l[2] + 1.5).abs() < 1e-6);
    }
}
