//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, seeded (same seed and logits, same tokens).
//!
//! Order (as llama.cpp's default chain): repetition penalty over the recent
//! tokens, then greedy if `temperature == 0`, else top-k, softmax with
//! temperature, top-p, min-p, and a draw from what is left. The softmax
//! weights are one vectorized pass; the filters sort only the tokens above
//! a weight cut that holds what they keep, so top-k and top-p stay exact
//! without sorting the whole vocabulary every token.

use semantic_core::SamplingParams;

use crate::kernels::vmath::exp_scaled;

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
    /// `exp((logit - max) / T)` of every token, reused from token to token.
    weights: Vec<f32>,
    /// `(token, weight)` of the tokens the filters may keep, reused.
    cands: Vec<(u32, f32)>,
    /// How often each token was sampled (presence and frequency penalties).
    counts: std::collections::HashMap<u32, u32>,
}

/// A sampled token and its log-probability under the final distribution
/// (0 for greedy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

/// Weight (relative to the top token's 1) above which the candidates for
/// top-k, top-p and min-p are first collected; divided by `CUT_STEP` while
/// they do not hold what the filters keep, down to every token.
const FIRST_CUT: f32 = 1e-4;
/// Refused picks of [`Sampler::sample_where`] before it checks every token.
pub const MAX_REJECTS: usize = 32;
const CUT_STEP: f32 = 1e-4;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            t.map(|d| d.as_nanos() as u64).unwrap_or(0)
        });
        Self { params, rng: Rng::new(seed), weights: Vec::new(), cands: Vec::new(), counts: Default::default() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `recent` is the sequence so far (prompt and
    /// output); only its last [`PENALTY_WINDOW`] tokens are penalized.
    ///
    /// Every token's weight is computed once, vectorized; plain temperature
    /// sampling draws from them directly. The filters sort only the
    /// candidates above a weight cut that provably holds what they keep
    /// (the top k, the top-p nucleus, the min-p survivors), not the whole
    /// vocabulary.
    ///
    /// `logit_bias` is added first; then presence and frequency penalties
    /// count this sampler's own picks (the generated tokens, as OpenAI and
    /// vLLM do).
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> Sampled {
        self.sample_where(logits, recent, |_| true)
    }

    /// [`sample`](Self::sample) among the tokens `allowed` accepts: a pick
    /// it refuses is masked out and the draw repeated (a draw from the
    /// distribution restricted to the allowed tokens, filters applied after
    /// the mask). After [`MAX_REJECTS`] refusals every token is checked
    /// once and the refused ones masked. When no token is allowed, the last
    /// draw is returned; the caller checks it.
    pub fn sample_where(&mut self, logits: &mut [f32], recent: &[u32], allowed: impl Fn(u32) -> bool) -> Sampled {
        self.adjust(logits, recent);
        let mut picked = self.draw(logits);
        let mut rejects = 0;
        while !allowed(picked.token) {
            rejects += 1;
            if rejects > MAX_REJECTS {
                for (t, l) in logits.iter_mut().enumerate() {
                    if !allowed(t as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                picked = self.draw(logits);
                break;
            }
            if let Some(l) = logits.get_mut(picked.token as usize) {
                *l = f32::NEG_INFINITY;
            }
            picked = self.draw(logits);
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(picked.token).or_insert(0) += 1;
        }
        picked
    }

    /// `logit_bias`, then the presence and frequency penalties over this
    /// sampler's own picks (the generated tokens, as OpenAI and vLLM count
    /// them), then the repetition penalty over `recent`.
    fn adjust(&self, logits: &mut [f32], recent: &[u32]) {
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
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
    }

    /// One draw from the adjusted logits.
    fn draw(&mut self, logits: &mut [f32]) -> Sampled {
        let p = &self.params;
        let max = max_logit(logits);
        // Greedy, or nothing to weigh (every logit -inf or NaN, or an inf).
        if p.is_greedy() || !max.is_finite() {
            return Sampled { token: first_of(logits, max), logprob: 0.0 };
        }
        let n = logits.len();
        self.weights.resize(n, 0.0);
        let total = exp_scaled(logits, max, 1.0 / p.temperature, &mut self.weights);
        let k = if p.top_k > 0 { p.top_k.min(n) } else { n };
        if k == n && p.top_p >= 1.0 && p.min_p <= 0.0 {
            return self.draw_any(total);
        }
        self.collect(k, total);
        let cands = &mut self.cands;
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if cands.len() > k {
            cands.select_nth_unstable_by(k - 1, order);
            cands.truncate(k);
        }
        cands.sort_unstable_by(order);
        // Top-k renormalizes over the k; else over the whole vocabulary.
        let z = if k < n { cands.iter().map(|c| c.1).sum() } else { total };
        self.draw_filtered(z)
    }

    /// Fills `cands` with every token whose weight is at least a cut, the
    /// cut lowered until the candidates surely hold the top `k` (top-k),
    /// the top-p nucleus of `total`, or every min-p survivor. A token with
    /// weight 0 is never a candidate (the top token weighs 1).
    fn collect(&mut self, k: usize, total: f32) {
        let p = &self.params;
        // Min-p keeps nothing under its floor (the top token weighs 1).
        let mut cut = if p.min_p > 0.0 { FIRST_CUT.max(p.min_p) } else { FIRST_CUT };
        loop {
            self.cands.clear();
            let floor = cut.max(f32::MIN_POSITIVE);
            self.cands
                .extend(self.weights.iter().enumerate().filter(|(_, &w)| w >= floor).map(|(i, &w)| (i as u32, w)));
            let enough = if k < self.weights.len() {
                self.cands.len() >= k
            } else {
                let mass: f32 = self.cands.iter().map(|c| c.1).sum();
                mass >= p.top_p * total || (p.min_p > 0.0 && p.min_p >= cut)
            };
            if enough || cut == 0.0 {
                return;
            }
            cut = if cut > 1e-30 { cut * CUT_STEP } else { 0.0 };
        }
    }

    /// A draw from every token's weight (no filter): the first token whose
    /// running sum passes `u * total`, found a block of sums at a time.
    fn draw_any(&mut self, total: f32) -> Sampled {
        const BLOCK: usize = 256;
        let r = self.rng.next_f32() * total;
        let w = &self.weights;
        let mut acc = 0f32;
        for (b, block) in w.chunks(BLOCK).enumerate() {
            let s = sum(block);
            if acc + s > r {
                // A running sum of its own: when rounding keeps it under `r`
                // (the block sum is taken in lanes), `acc` moves on by `s`
                // once, not by the block twice.
                let mut run = acc;
                for (i, &v) in block.iter().enumerate() {
                    run += v;
                    if run > r {
                        let t = b * BLOCK + i;
                        return Sampled { token: t as u32, logprob: (v / total).ln() };
                    }
                }
            }
            acc += s;
        }
        // Rounding left `r` past the sum: the last token with weight.
        let t = w.iter().rposition(|&v| v > 0.0).unwrap_or(0);
        Sampled { token: t as u32, logprob: (w[t] / total).ln() }
    }

    /// Top-p, then min-p, over the sorted candidates (probabilities
    /// `weight / z`), and a draw from what is left.
    fn draw_filtered(&mut self, z: f32) -> Sampled {
        let p = &self.params;
        let cands = &self.cands;
        let mut keep = cands.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, c) in cands.iter().enumerate() {
                cum += c.1 / z;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = cands[0].1 * p.min_p;
            keep = keep.min(cands.iter().take_while(|c| c.1 >= floor).count().max(1));
        }
        let kept = &cands[..keep];
        let sum: f32 = kept.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f32() * sum;
        for (i, c) in kept.iter().enumerate() {
            if r < c.1 || i + 1 == keep {
                return Sampled { token: c.0, logprob: (c.1 / sum).ln() };
            }
            r -= c.1;
        }
        unreachable!("keep >= 1")
    }
}

/// `log softmax(logits)[token]`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = max_logit(logits);
    let mut sum = 0f32;
    // A block at a time on the stack: no vocabulary-sized buffer per call.
    let mut buf = [0f32; 1024];
    for c in logits.chunks(buf.len()) {
        sum += exp_scaled(c, max, 1.0, &mut buf[..c.len()]);
    }
    logits[token as usize] - max - sum.ln()
}

/// The largest logit, NaNs skipped (-inf when there is none): a 16-lane
/// max, which vectorizes.
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = logits.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sum in 16 lanes (vectorizes; a running sum is one dependent chain).
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in lanes.iter_mut().zip(c) {
            *a += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// The first index of the largest logit (NaNs never win; 0 when all are
/// NaN). Two passes, a 16-lane max then a search, so both vectorize: the
/// one-pass running argmax was ~40 us per row of SmolLM2's 49152 logits,
/// a tenth of what each extra agent adds to a batched decode step.
pub fn argmax(logits: &[f32]) -> u32 {
    first_of(logits, max_logit(logits))
}

/// The first index holding `max` (0 when none does).
fn first_of(logits: &[f32], max: f32) -> u32 {
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
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
    fn sample_where_draws_only_allowed_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let best = first_of(&logits, max_logit(&logits));
        let mut g = Sampler::new(SamplingParams::default());
        let second = g.sample_where(&mut logits.clone(), &[], |t| t != best).token;
        assert_ne!(second, best);
        assert_eq!(
            logits[second as usize],
            logits.iter().filter(|&&l| l < logits[best as usize]).fold(f32::MIN, |a, &b| a.max(b))
        );
        // Past MAX_REJECTS refusals: one token of the worst allowed.
        let worst = (0..1000u32).min_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize])).unwrap();
        assert_eq!(g.sample_where(&mut logits.clone(), &[], |t| t == worst).token, worst);
        for params in [
            SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 0.7, top_p: 0.9, top_k: 50, seed: Some(4), ..Default::default() },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..200 {
                let t = s.sample_where(&mut logits.clone(), &[], |t| t % 3 == 0).token;
                assert_eq!(t % 3, 0);
            }
        }
    }

    #[test]
    fn logit_bias_and_openai_penalties_move_the_greedy_pick() {
        let logits = [1.0f32, 3.0, 2.5, 0.0];
        let greedy = |p: SamplingParams, steps: usize| {
            let mut s = Sampler::new(p);
            (0..steps).map(|_| s.sample(&mut logits.clone(), &[]).token).collect::<Vec<_>>()
        };
        assert_eq!(greedy(SamplingParams::default(), 3), [1, 1, 1]);
        let bias = SamplingParams { logit_bias: vec![(3, 100.0), (1, -100.0)], ..Default::default() };
        assert_eq!(greedy(bias, 2), [3, 3]);
        // Token 1 loses 0.6 once picked: 2.4 < 2.5, so token 2 next; then
        // both are penalized once and 1 leads again.
        let presence = SamplingParams { presence_penalty: 0.6, ..Default::default() };
        assert_eq!(greedy(presence, 3), [1, 2, 1]);
        // Frequency grows with each pick: 3 - 0.3 n against 2.5 - 0.3 m.
        let frequency = SamplingParams { frequency_penalty: 0.3, ..Default::default() };
        assert_eq!(greedy(frequency, 4), [1, 1, 2, 1]);
        // Out-of-vocabulary ids in a bias are ignored here (the API rejects them).
        let far = SamplingParams { logit_bias: vec![(99, 5.0)], ..Default::default() };
        assert_eq!(greedy(far, 1), [1]);
    }

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down() {
        let mut l = vec![1.0f32, 0.9, -1.0];
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..Default::default() });
        assert_eq!(s.sample(&mut l, &[0, 2]).token, 1);
        assert!((l[0] - 1.0 / 1.5).abs() < 1e-6 && (l[2] + 1.5).abs() < 1e-6);
    }

    /// The reference: probabilities of every token after the filters, by a
    /// full sort of the vocabulary (the order of the filters above).
    fn reference(l: &[f32], p: &SamplingParams) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
        let k = if p.top_k > 0 { p.top_k.min(l.len()) } else { l.len() };
        let max = l[idx[0]] as f64;
        let w: Vec<f64> = idx[..k].iter().map(|&i| ((l[i] as f64 - max) / p.temperature as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut keep = k;
        let mut cum = 0.0;
        for (i, wi) in w.iter().enumerate() {
            cum += wi / z;
            if p.top_p < 1.0 && cum >= p.top_p as f64 - 1e-6 {
                keep = i + 1;
                break;
            }
        }
        if p.min_p > 0.0 {
            keep = keep.min(w.iter().take_while(|&&v| v >= w[0] * p.min_p as f64).count());
        }
        let kept: f64 = w[..keep].iter().sum();
        let mut probs = vec![0.0; l.len()];
        for (j, &i) in idx[..keep].iter().enumerate() {
            probs[i] = w[j] / kept;
        }
        probs
    }

    /// Draws against the reference: no token outside it, and the
    /// frequency of every token within 5 standard deviations of its
    /// probability (plus a small slack for rounding at the cut).
    fn check_against_reference(l: &[f32], p: SamplingParams, draws: usize) {
        let want = reference(l, &p);
        let mut s = Sampler::new(p.clone());
        let mut counts = vec![0usize; l.len()];
        for _ in 0..draws {
            let got = s.sample(&mut l.to_vec(), &[]);
            assert!(want[got.token as usize] > 0.0, "{p:?}: token {} is filtered out", got.token);
            let lp = want[got.token as usize].ln();
            assert!((got.logprob as f64 - lp).abs() < 1e-3, "{p:?}: logprob {} vs {lp}", got.logprob);
            counts[got.token as usize] += 1;
        }
        let within = |c: usize, q: f64| {
            let (mean, sd) = (q * draws as f64, (q * (1.0 - q) * draws as f64).sqrt());
            (c as f64 - mean).abs() <= 5.0 * sd + 2.0
        };
        for (i, (&c, &q)) in counts.iter().zip(&want).enumerate() {
            assert!(within(c, q), "{p:?}: token {i} drawn {c}x, expected {:.1}", q * draws as f64);
        }
        // The unlikely tokens together (each alone is too rare to check).
        let tail = |x: f64| x > 0.0 && x < 0.01;
        let c: usize = counts.iter().zip(&want).filter(|(_, &q)| tail(q)).map(|(c, _)| c).sum();
        let q: f64 = want.iter().filter(|&&q| tail(q)).sum();
        assert!(within(c, q), "{p:?}: the tail drawn {c}x, expected {:.1}", q * draws as f64);
    }

    #[test]
    fn every_filter_draws_what_a_full_sort_gives() {
        // A long-tailed vocabulary: a few likely tokens, many unlikely ones
        // (so the first weight cut does not hold every filter's keep).
        let n = 5000;
        let mut l: Vec<f32> = (0..n).map(|i| -((i * 7919 % n) as f32).sqrt() * 0.35).collect();
        l[4321] = 3.0;
        l[17] = 2.5;
        l[99] = f32::NEG_INFINITY;
        let base = SamplingParams { temperature: 1.0, seed: Some(9), ..Default::default() };
        let cases = [
            SamplingParams { ..base.clone() },
            SamplingParams { temperature: 0.6, ..base.clone() },
            SamplingParams { temperature: 2.5, top_p: 0.9, ..base.clone() },
            SamplingParams { top_p: 0.5, ..base.clone() },
            SamplingParams { top_p: 0.995, ..base.clone() },
            SamplingParams { top_k: 40, ..base.clone() },
            SamplingParams { top_k: 3000, temperature: 0.2, ..base.clone() },
            SamplingParams { min_p: 0.05, ..base.clone() },
            SamplingParams { min_p: 1e-9, temperature: 3.0, ..base.clone() },
            SamplingParams { top_k: 200, top_p: 0.8, min_p: 0.01, ..base.clone() },
        ];
        for p in cases {
            check_against_reference(&l, p, 4000);
        }
        // One likely token and a long flat tail holding ~5% of the mass,
        // every tail token far under the first weight cut.
        let mut l: Vec<f32> = (0..n).map(|i| -11.5 - i as f32 * 1e-4).collect();
        l[0] = 0.0;
        let cases = [
            SamplingParams { top_p: 0.99, ..base.clone() },
            SamplingParams { top_k: 3000, ..base.clone() },
            SamplingParams { min_p: 1e-6, ..base.clone() },
            SamplingParams { ..base.clone() },
        ];
        for p in cases {
            check_against_reference(&l, p, 4000);
        }
    }

    #[test]
    fn a_banned_token_is_never_drawn() {
        // Every token but one is banned; any filter must pick that one.
        let mut l = vec![f32::NEG_INFINITY; 3000];
        l[2999] = -5.0;
        for p in [
            SamplingParams { temperature: 1.0, ..Default::default() },
            SamplingParams { temperature: 1.0, top_k: 50, ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 0.3, ..Default::default() },
        ] {
            let mut s = Sampler::new(SamplingParams { seed: Some(1), ..p });
            for _ in 0..50 {
                let got = s.sample(&mut l.clone(), &[]);
                assert_eq!((got.token, got.logprob), (2999, 0.0));
            }
        }
    }

    #[test]
    fn log_prob_is_the_log_softmax() {
        let l: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.013).cos() * 4.0).collect();
        let max = l.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let z: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum();
        for t in [0u32, 1234, 3000] {
            let want = l[t as usize] as f64 - max - z.ln();
            assert!((log_prob(&l, t) as f64 - want).abs() < 1e-4);
        }
    }
}
