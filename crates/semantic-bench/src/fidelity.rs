//! KV codec fidelity: how far a cache saved with a lossy codec and loaded
//! back drifts from the f16 original, on the real model, in process (no
//! server: it measures the model's outputs, not time).
//!
//! Per prompt (chat-templated, `n` tokens), through the real save/load path:
//! ```text
//! prefill prompt[..n-1] into the reference table (the pool's own f16 K/V)
//! per codec: write_agent_cache -> load_agent_cache, twice: a free lane and a
//!            teacher-forced lane
//! step 0:    every lane gets prompt[n-1] at n-1 (the step a resume runs)
//! step i:    reference and forced lanes get the reference's greedy token
//!            i-1, free lanes their own
//! ```
//! All lanes run in one batched step; rows of a step do not mix, so the f16
//! lanes are the control (lossless: the same tokens, zero logit error).
//!
//! Per codec and prompt: greedy-token agreement and identical prefix of the
//! free lane; the first step's logit error (max and rms over the vocabulary,
//! argmax, and the reference's top-2 margin: a flip on a near-tie says
//! little); the forced lane's mean rms and top-1 agreement over all steps;
//! the K/V round-trip error on the real K/V, as a fraction of the codec's
//! stated bound ([`KvCodec::max_abs_error`]; at most 1 when it holds).

use std::path::Path;

use half::f16;
use semantic_core::{AgentId, LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::sampling::argmax;
use semantic_model::{GgufFile, LlamaModel};
use semantic_store::{load_agent_cache, write_agent_cache, KvCodec, KvSnapshot, ModelFingerprint, PoolSource, GROUP};

use crate::context::Ctx;
use crate::error::BenchError;
use crate::results::{Group, Record};

pub const NAME: &str = "codec_fidelity";

/// A fixed chat prompt.
pub struct FidelityPrompt {
    pub name: &'static str,
    pub system: &'static str,
    pub user: &'static str,
}

const HELPFUL: &str = "You are a helpful assistant.";

const SUPPORT_POLICY: &str = "You are the support assistant of Northwind Outfitters, an online shop for \
hiking and camping gear. Follow these rules. Greet the customer once, then answer in plain, friendly \
English. Orders ship within two business days from our warehouse in Denver; standard shipping takes three \
to five business days inside the continental United States and costs $6.95, free above $75. Express \
shipping takes one to two business days and costs $19.95. We do not ship to P.O. boxes or outside the \
United States and Canada. Customers may return unused items within 30 days of delivery for a full refund; \
worn footwear and opened fuel canisters cannot be returned. Defective items are covered by a one-year \
warranty: ask for the order number and a photo of the defect, then offer a replacement or a refund. Never \
promise delivery dates for back-ordered items, and never share another customer's information. If a \
customer is upset, apologize once, state what you can do, and offer to escalate to a human agent by email \
at help@northwind.example. Keep answers under 150 words unless the customer asks for detail, and end with \
a short question that checks whether the problem is solved.";

/// Varied prompts: code, a fact, a long system prompt, a list, a story.
pub const PROMPTS: [FidelityPrompt; 5] = [
    FidelityPrompt {
        name: "coding",
        system: HELPFUL,
        user: "Write a Python function that checks whether a string is a palindrome, ignoring case, spaces \
               and punctuation. Then explain how it works, step by step, and give three test cases.",
    },
    FidelityPrompt {
        name: "long system + question",
        system: SUPPORT_POLICY,
        user: "Hi, my tent pole snapped on the second night of a trip, about four months after I bought it. \
               I also want to send back a pair of boots I wore once. What can you do?",
    },
    FidelityPrompt {
        name: "factual",
        system: HELPFUL,
        user: "Why does the Earth have seasons? Explain the role of the axial tilt, and say why it is not \
               because of the distance to the Sun.",
    },
    FidelityPrompt {
        name: "list continuation",
        system: HELPFUL,
        user: "Continue this list with ten more countries in the same format, one per line:\n\
               France - Paris\nJapan - Tokyo\nBrazil - Brasilia\nKenya - Nairobi\nCanada - Ottawa\n",
    },
    FidelityPrompt {
        name: "story",
        system: HELPFUL,
        user: "Write a short story about an old lighthouse keeper who finds a message in a bottle on the \
               morning of his last day at work.",
    },
];

/// A row of logits against the reference row of the same step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitError {
    pub max_abs: f64,
    pub rms: f64,
    pub argmax_same: bool,
}

impl LogitError {
    pub fn of(reference: &[f32], row: &[f32]) -> LogitError {
        let (mut max_abs, mut sum_sq) = (0.0f64, 0.0f64);
        for (&a, &b) in reference.iter().zip(row) {
            let d = f64::from(a - b).abs();
            max_abs = max_abs.max(d);
            sum_sq += d * d;
        }
        let rms = (sum_sq / reference.len().max(1) as f64).sqrt();
        LogitError { max_abs, rms, argmax_same: argmax(reference) == argmax(row) }
    }
}

/// The largest logit minus the second largest.
pub fn top2_margin(row: &[f32]) -> f64 {
    let (a, b) = row.iter().fold(
        (f32::NEG_INFINITY, f32::NEG_INFINITY),
        |(a, b), &x| {
            if x > a {
                (x, a)
            } else {
                (a, b.max(x))
            }
        },
    );
    f64::from(a - b)
}

/// Fraction of positions where `tokens` has the reference's token, and the
/// length of the identical prefix.
pub fn agreement(reference: &[u32], tokens: &[u32]) -> (f64, usize) {
    let same = reference.iter().zip(tokens).filter(|(a, b)| a == b).count();
    let prefix = reference.iter().zip(tokens).take_while(|(a, b)| a == b).count();
    (same as f64 / reference.len().max(1) as f64, prefix)
}

/// Round-trip error of K/V values: the worst |x - x'| as a fraction of the
/// codec's bound for x's group, and the rms of x - x'.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KvError {
    pub worst_over_bound: f64,
    sum_sq: f64,
    n: usize,
}

impl KvError {
    /// Adds a row (position-major values of one head), grouped as the codec
    /// groups it.
    pub fn add_row(&mut self, codec: KvCodec, original: &[f16], decoded: &[f16]) {
        for (g, d) in original.chunks(GROUP).zip(decoded.chunks(GROUP)) {
            let m = g.iter().fold(0.0f32, |m, x| m.max(x.to_f32().abs()));
            let bound = f64::from(codec.max_abs_error(m));
            for (x, y) in g.iter().zip(d) {
                let err = f64::from((x.to_f32() - y.to_f32()).abs());
                self.sum_sq += err * err;
                let ratio = if err == 0.0 { 0.0 } else { err / bound };
                self.worst_over_bound = self.worst_over_bound.max(ratio);
            }
            self.n += g.len();
        }
    }

    pub fn rms(&self) -> f64 {
        (self.sum_sq / self.n.max(1) as f64).sqrt()
    }

    fn of(codec: KvCodec, original: &KvSnapshot, decoded: &KvSnapshot) -> KvError {
        let d = original.dims();
        let mut e = KvError::default();
        for layer in 0..d.n_layers {
            for kv in 0..2 {
                for head in 0..d.n_kv_heads {
                    e.add_row(codec, original.row(layer, kv, head), decoded.row(layer, kv, head));
                }
            }
        }
        e
    }
}

/// One sequence of the batched decode.
struct Lane {
    table: BlockTable,
    /// `None`: the reference (the K/V the model wrote).
    codec: Option<KvCodec>,
    /// Fed the reference's tokens rather than its own (teacher forcing).
    forced: bool,
    /// Greedy pick of every step.
    tokens: Vec<u32>,
    /// Logit error of every step against the reference.
    errors: Vec<LogitError>,
    /// Top-1 minus top-2 logit of the first step: how close a call its
    /// first greedy pick was.
    first_margin: f64,
}

impl Lane {
    fn new(codec: Option<KvCodec>, forced: bool) -> Lane {
        Lane { table: BlockTable::default(), codec, forced, tokens: Vec::new(), errors: Vec::new(), first_margin: 0.0 }
    }
}

/// Every codec (f16 as the control) on the first `plan.fidelity_prompts`
/// prompts, `plan.fidelity_gen` steps each; cache files go to `dir`.
pub fn codec_fidelity(ctx: &mut Ctx, dir: &Path) -> Result<Vec<Record>, BenchError> {
    let path = &ctx.model.path;
    let bad = |msg: String| BenchError::Model { path: path.clone(), msg };
    let gguf = GgufFile::open(path).map_err(|e| bad(e.to_string()))?;
    let run = Run {
        model: LlamaModel::load(&gguf).map_err(|e| bad(e.to_string()))?,
        fingerprint: ModelFingerprint::new(&ctx.model.fingerprint).map_err(|e| bad(e.to_string()))?,
        agent: AgentId::new(NAME).expect("a valid agent id"),
        dir,
        gen: ctx.plan.fidelity_gen,
    };
    drop(gguf);
    let mut out = Vec::new();
    for p in PROMPTS.iter().take(ctx.plan.fidelity_prompts) {
        let prompt = ctx.model.chat_tokens(p.system, p.user)?;
        let (lanes, kv) = run.prompt(&prompt)?;
        let recs = records(p, prompt.len(), run.gen, &lanes, &kv);
        let agree: Vec<String> = recs
            .iter()
            .map(|r| {
                let codec = r.param_str("codec").unwrap_or("?");
                format!("{codec} {:.0}%", 100.0 * r.get("token_agreement").unwrap_or(f64::NAN))
            })
            .collect();
        ctx.progress.step(&format!("{} ({} tokens): greedy agreement {}", p.name, prompt.len(), agree.join(", ")));
        out.extend(recs);
    }
    Ok(out)
}

/// The model and the cache-file settings every prompt shares.
struct Run<'a> {
    model: LlamaModel,
    fingerprint: ModelFingerprint,
    agent: AgentId,
    dir: &'a Path,
    gen: usize,
}

impl Run<'_> {
    /// The decoded lanes of one prompt (reference first) and the K/V
    /// round-trip error of each codec.
    fn prompt(&self, prompt: &[u32]) -> Result<(Vec<Lane>, Vec<KvError>), BenchError> {
        let layout = self.model.kv_layout(16);
        let n_lanes = 1 + 2 * KvCodec::ALL.len();
        let mut pool = KvPool::new(layout, n_lanes * layout.blocks_for(prompt.len() + self.gen));
        let mut lanes = vec![Lane::new(None, true)];
        let res = self.fill_and_decode(&mut pool, &mut lanes, prompt);
        for l in &mut lanes {
            pool.free_table(std::mem::take(&mut l.table)).expect("blocks of a live table");
        }
        res.map(|kv| (lanes, kv))
    }

    fn fill_and_decode(
        &self,
        pool: &mut KvPool,
        lanes: &mut Vec<Lane>,
        prompt: &[u32],
    ) -> Result<Vec<KvError>, BenchError> {
        let (cached, last) = prompt.split_at(prompt.len() - 1);
        let n = cached.len();
        if !pool.ensure_capacity(&mut lanes[0].table, n) {
            return Err(BenchError::Unexpected(format!("KV pool too small for {n} tokens")));
        }
        let prefill = seq(cached.to_vec(), 0, &lanes[0].table, LogitsWanted::None);
        self.model.forward(&StepPlan { seqs: vec![prefill] }, pool)?;
        let reference = KvSnapshot::from_pool(pool, lanes[0].table.blocks(), n);
        let mut kv_errors = Vec::new();
        for codec in KvCodec::ALL {
            let source = PoolSource::new(pool, lanes[0].table.blocks());
            let saved = write_agent_cache(self.dir, &self.agent, &self.fingerprint, codec, cached, &source)?;
            for forced in [false, true] {
                let mut lane = Lane::new(Some(codec), forced);
                load_agent_cache(&saved.path, &self.fingerprint, pool, &mut lane.table)?;
                lanes.push(lane);
            }
            let decoded = KvSnapshot::from_pool(pool, lanes[lanes.len() - 1].table.blocks(), n);
            kv_errors.push(KvError::of(codec, &reference, &decoded));
        }
        self.decode(pool, lanes, n, last[0])?;
        Ok(kv_errors)
    }

    /// `gen` batched greedy steps of every lane from position `pos`, the
    /// first on token `first`.
    fn decode(&self, pool: &mut KvPool, lanes: &mut [Lane], pos: usize, first: u32) -> Result<(), BenchError> {
        for l in lanes.iter_mut() {
            if !pool.ensure_capacity(&mut l.table, pos + self.gen) {
                return Err(BenchError::Unexpected("KV pool too small for the decode".into()));
            }
        }
        let vocab = self.model.config().vocab_size;
        for i in 0..self.gen {
            let input = |l: &Lane| match i {
                0 => first,
                _ if l.forced => lanes[0].tokens[i - 1],
                _ => l.tokens[i - 1],
            };
            let seqs = lanes.iter().map(|l| seq(vec![input(l)], pos + i, &l.table, LogitsWanted::Last)).collect();
            let logits = self.model.forward(&StepPlan { seqs }, pool)?;
            let reference = &logits[..vocab];
            for (l, row) in lanes.iter_mut().zip(logits.chunks_exact(vocab)) {
                if i == 0 {
                    l.first_margin = top2_margin(row);
                }
                l.errors.push(LogitError::of(reference, row));
                l.tokens.push(argmax(row));
            }
        }
        Ok(())
    }
}

fn seq(tokens: Vec<u32>, start_pos: usize, table: &BlockTable, logits: LogitsWanted) -> SeqStep {
    SeqStep { tokens, start_pos, block_table: table.blocks().to_vec(), logits }
}

/// One record per codec from the lanes of one prompt.
fn records(p: &FidelityPrompt, prompt_tokens: usize, gen: usize, lanes: &[Lane], kv: &[KvError]) -> Vec<Record> {
    let lane = |codec, forced| lanes.iter().find(|l| l.codec == Some(codec) && l.forced == forced);
    KvCodec::ALL
        .iter()
        .zip(kv)
        .filter_map(|(&codec, kv)| {
            let (free, forced) = (lane(codec, false)?, lane(codec, true)?);
            let (agree, prefix) = agreement(&lanes[0].tokens, &free.tokens);
            let first = free.errors.first()?;
            let n = forced.errors.len() as f64;
            let mean_rms = forced.errors.iter().map(|e| e.rms).sum::<f64>() / n;
            let top1 = forced.errors.iter().filter(|e| e.argmax_same).count() as f64 / n;
            Some(
                Record::new(Group::CodecFidelity, NAME, "semantic")
                    .param("codec", codec.name())
                    .param("prompt", p.name)
                    .param("prompt_tokens", prompt_tokens)
                    .param("gen_tokens", gen)
                    .value("token_agreement", "fraction", agree)
                    .value("identical_prefix", "tokens", prefix as f64)
                    .value("first_argmax_same", "bool", f64::from(u8::from(first.argmax_same)))
                    .value("first_top2_margin", "logit", lanes[0].first_margin)
                    .value("first_max_abs_dlogit", "logit", first.max_abs)
                    .value("first_rms_dlogit", "logit", first.rms)
                    .value("forced_mean_rms_dlogit", "logit", mean_rms)
                    .value("forced_top1_agreement", "fraction", top1)
                    .value("kv_worst_err_over_bound", "ratio", kv.worst_over_bound)
                    .value("kv_rms_err", "value", kv.rms()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_counts_positions_and_the_identical_prefix() {
        assert_eq!(agreement(&[1, 2, 3, 4], &[1, 2, 3, 4]), (1.0, 4));
        assert_eq!(agreement(&[1, 2, 3, 4], &[1, 9, 3, 4]), (0.75, 1));
        assert_eq!(agreement(&[1, 2, 3, 4], &[9, 2, 3, 4]), (0.75, 0));
        assert_eq!(agreement(&[], &[]), (0.0, 0));
    }

    #[test]
    fn logit_error_is_max_rms_and_argmax() {
        let e = LogitError::of(&[1.0, 3.0, 0.0, 0.0], &[1.0, 1.0, 2.0, 0.0]);
        assert_eq!(e, LogitError { max_abs: 2.0, rms: 2.0f64.sqrt(), argmax_same: false });
        let same = LogitError::of(&[0.5, 2.0], &[0.5, 2.0]);
        assert_eq!((same.max_abs, same.rms, same.argmax_same), (0.0, 0.0, true));
        assert_eq!(top2_margin(&[1.0, 4.0, 2.5, 4.0]), 0.0);
        assert_eq!(top2_margin(&[1.0, 4.0, 2.5, -9.0]), 1.5);
    }

    #[test]
    fn kv_error_is_relative_to_the_bound_of_each_group() {
        let h = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
        // Group 0: max 127, q8_0 bound 127/200 + 1e-5; group 1: max 1.
        let mut orig = vec![0.0f32; 2 * GROUP];
        let mut dec = orig.clone();
        (orig[0], dec[0]) = (127.0, 127.0);
        (orig[1], dec[1]) = (1.0, 1.25);
        (orig[GROUP], dec[GROUP]) = (1.0, 1.0);
        dec[GROUP + 1] = 0.0025;
        let mut e = KvError::default();
        e.add_row(KvCodec::Q8_0, &h(&orig), &h(&dec));
        let worst = f64::from(f16::from_f32(0.0025).to_f32()) / f64::from(KvCodec::Q8_0.max_abs_error(1.0));
        assert!((e.worst_over_bound - worst).abs() < 1e-9, "{e:?}");
        assert!((e.rms() - ((0.0625 + 0.0025f64.powi(2)) / 64.0).sqrt()).abs() < 1e-6);
        let mut exact = KvError::default();
        exact.add_row(KvCodec::F16, &h(&orig), &h(&orig));
        assert_eq!((exact.worst_over_bound, exact.rms()), (0.0, 0.0));
    }
}
