//! Llama-family forward pass over the paged KV pool (llama, mistral, smollm,
//! qwen2 with q/k/v bias).
//!
//! One step runs every new token of every sequence in the plan through each
//! weight matmul together, so weights are read once per step whatever the
//! number of sequences. Attention is per sequence through its block table.
//! The model keeps no per-sequence state: everything a sequence owns is in
//! the plan and the pool.
//!
//! ```text
//! x = embed(tokens)                                  [n, dim]
//! for layer:
//!     qkv = norm(x) Wqkv (+ bias)                    one fused matmul
//!     rope(q, k); pool[layer] <- k, v                at each token's slot
//!     x += paged_attention(q, pool) Wo
//!     x += (silu(norm(x) Wg) * norm(x) Wu) Wd        gate/up fused
//! logits = norm(x[rows wanted]) Wout                 only sampled rows
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use semantic_core::{LogitsWanted, StepPlan};
use semantic_kv::{KvLayout, KvPool};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, ModelConfig};
use crate::kernels::attention::{paged_attention, paged_attention_q, quantizes_in_items, AttnSeq, AttnShape};
use crate::kernels::matmul::{qmatmul_swiglu, quantize_rows, swiglu_fits};
use crate::kernels::ops::{add_assign, rms_norm, Rope};
use crate::kernels::quant::{dequantize_row, quantize_row_q8a, BlockQ8A, QK};
use crate::kernels::team::{self, Team};
use crate::kernels::vmath::silu_mul;
use crate::kernels::SendPtr;
use crate::linear::{load_qmatrix, Linear};

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
}

enum Embedding {
    Quant(Arc<crate::kernels::matmul::QMatrix>),
    Dense(Vec<f32>),
}

pub struct LlamaModel {
    config: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: Rope,
    /// The kernels' threads: the caller of `forward` and its helpers
    /// (see `kernels::team`).
    team: Team,
    /// A step's activation buffers, kept for the next step.
    scratch: std::sync::Mutex<Scratch>,
}

/// Activation buffers of one step, kept between steps (at most a full
/// step's worth: ~17 MB at 512 tokens). Allocated per step, the buffers
/// over the server's mmap threshold (4 MiB) are fresh pages every time: a
/// ~400-token prefill in the server took 141-143 ms in 3 of 6 runs and
/// 122-125 ms in the others; with the buffers kept, 119-125 ms in 5 of 5
/// (forward time from the step trace, 10 requests per run).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    hq: Vec<BlockQ8A>,
    /// The down projection's input blocks when SwiGLU runs in the gate/up
    /// matmul (which reads `hq`).
    act_q: Vec<BlockQ8A>,
}

/// `buf` as `n` values, reusing its allocation. What the last step left
/// stays: every buffer of a step is written whole before it is read (the
/// model tests pass with the buffers filled with NaN each step), so zeroing
/// them was wasted: a 512-token prefill 147 -> 144 ms (medians of 5,
/// interleaved `decode_steps`); decode steps unchanged.
fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    buf
}

impl LlamaModel {
    /// Loads the model with one kernel thread per core this process may
    /// use.
    pub fn load(g: &GgufFile) -> Result<Self> {
        Self::load_with_threads(g, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// Loads the model; its steps run on `threads` threads (the caller and
    /// `threads - 1` helpers; at least 1).
    pub fn load_with_threads(g: &GgufFile, threads: usize) -> Result<Self> {
        let config = ModelConfig::from_gguf(g)?;
        let (embed, tied) = match load_qmatrix(g, "token_embd.weight")? {
            Some(m) => {
                let m = Arc::new(m);
                (Embedding::Quant(m.clone()), Linear::Quant(m))
            }
            None => (Embedding::Dense(g.f32_vec("token_embd.weight")?), Linear::load(g, "token_embd.weight")?),
        };
        let output = if g.has_tensor("output.weight") { Linear::load(g, "output.weight")? } else { tied };
        let layers = (0..config.n_layers).map(|i| load_layer(g, i)).collect::<Result<Vec<_>>>()?;
        let rope = Rope::new(config.n_rot, config.rope_base, config.rope_neox);
        let team = Team::new(threads).map_err(|e| ModelError::Plan(format!("cannot start kernel threads: {e}")))?;
        let model = Self {
            embed,
            layers,
            norm: g.f32_vec("output_norm.weight")?,
            output,
            rope,
            config,
            team,
            scratch: Default::default(),
        };
        model.check_shapes()?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        let qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
        for (i, l) in self.layers.iter().enumerate() {
            let bad = |what: &str, got: usize, want: usize| ModelError::Tensor {
                name: format!("blk.{i}.{what}"),
                reason: format!("{got} outputs, expected {want}"),
            };
            if l.qkv.out_features() != qkv {
                return Err(bad("attn_qkv", l.qkv.out_features(), qkv));
            }
            if l.gate_up.out_features() != 2 * c.ff_dim {
                return Err(bad("ffn_gate_up", l.gate_up.out_features(), 2 * c.ff_dim));
            }
            if l.wo.out_features() != c.dim || l.down.out_features() != c.dim {
                return Err(bad("attn_output/ffn_down", l.down.out_features(), c.dim));
            }
        }
        if self.output.out_features() != c.vocab_size {
            return Err(ModelError::Tensor {
                name: "output.weight".into(),
                reason: format!("{} rows, vocab is {}", self.output.out_features(), c.vocab_size),
            });
        }
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The KV layout this model needs, for a given block size.
    pub fn kv_layout(&self, block_size: usize) -> KvLayout {
        KvLayout {
            n_layers: self.config.n_layers,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    /// Bytes of weights held by the model (native formats).
    pub fn weight_bytes(&self) -> usize {
        let l: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        l + self.output.bytes()
    }

    fn validate(&self, plan: &StepPlan, pool: &KvPool) -> Result<()> {
        let bs = pool.layout().block_size;
        if *pool.layout() != self.kv_layout(bs) {
            return Err(ModelError::Plan("KV pool layout does not match the model".into()));
        }
        for (i, s) in plan.seqs.iter().enumerate() {
            let end = s.start_pos + s.tokens.len();
            if s.tokens.is_empty() {
                return Err(ModelError::Plan(format!("sequence {i} has no new tokens")));
            }
            if end > self.config.context_length {
                return Err(ModelError::Plan(format!(
                    "sequence {i} reaches position {end}, past the context of {}",
                    self.config.context_length
                )));
            }
            if s.block_table.len() * bs < end {
                return Err(ModelError::Plan(format!(
                    "sequence {i}: block table covers {} slots, needs {end}",
                    s.block_table.len() * bs
                )));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                return Err(ModelError::Plan(format!("token id {t} is outside the vocabulary")));
            }
        }
        Ok(())
    }

    /// Threads a step runs on (the caller and the kernel helpers).
    pub fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Runs one step. Returns `plan.n_logit_rows()` rows of `vocab_size`
    /// logits, in plan order.
    pub fn forward(&self, plan: &StepPlan, pool: &mut KvPool) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(plan, pool, &mut logits)?;
        Ok(logits)
    }

    /// [`forward`](Self::forward) into a buffer the caller keeps from step
    /// to step (resized to `plan.n_logit_rows() * vocab_size`).
    ///
    /// A fresh logits vector per step (1.5 MiB at 8 rows) went back to the
    /// OS when freed, from the engine thread's malloc arena, and was faulted
    /// in again, zeroed, at the next step (page faults and TLB-shootdown
    /// IPIs to the other core in `perf`). Reused, 8-agent decode steps in
    /// the server went from 4.78-5.14 to 3.98-4.23 ms (engine trace of the
    /// batching sweep, two alternating runs each); 1-5 agents within noise.
    pub fn forward_into(&self, plan: &StepPlan, pool: &mut KvPool, logits: &mut Vec<f32>) -> Result<()> {
        self.validate(plan, pool)?;
        self.team.install(|| self.forward_in_pool(plan, pool, logits))
    }

    fn forward_in_pool(&self, plan: &StepPlan, pool: &mut KvPool, logits: &mut Vec<f32>) -> Result<()> {
        let mut laps = Laps::start();
        let c = &self.config;
        let n = plan.n_tokens();
        let (dim, hd) = (c.dim, c.head_dim);
        let (q_w, kv_w) = (c.n_heads * hd, c.n_kv_heads * hd);
        let qkv_w = q_w + 2 * kv_w;

        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { x, h, qkv, q, att, proj, gu, act, hq, act_q } = &mut *guard;
        let x = sized(x, n * dim);
        let mut angles = Vec::with_capacity(n * self.rope.n_freqs());
        let mut attn_seqs = Vec::with_capacity(plan.seqs.len());
        // (sequence, position) of every row.
        let mut row_pos = Vec::with_capacity(n);
        let mut row = 0;
        for s in &plan.seqs {
            for j in 0..s.tokens.len() {
                self.rope.push_angles(s.start_pos + j, &mut angles);
                row_pos.push((attn_seqs.len(), s.start_pos + j));
            }
            attn_seqs.push(AttnSeq {
                block_table: &s.block_table,
                start_pos: s.start_pos,
                n_new: s.tokens.len(),
                first_row: row,
            });
            row += s.tokens.len();
        }
        let nf = self.rope.n_freqs();
        let shape =
            AttnShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd, scale: 1.0 / (hd as f32).sqrt() };

        let h = sized(h, n * dim);
        let qkv = sized(qkv, n * qkv_w);
        let q = sized(q, n * q_w);
        let att = sized(att, n * q_w);
        let proj = sized(proj, n * dim);
        let act = sized(act, n * c.ff_dim);
        hq.resize(n * dim.max(q_w).max(c.ff_dim) / QK, BlockQ8A::ZERO);
        act_q.resize(n * c.ff_dim / QK, BlockQ8A::ZERO);
        let rows = row_chunk(n);
        let eps = c.rms_eps;
        // Row-wise work between the matmuls runs as one region per gap,
        // each task doing every op of its rows (norm, quantize, ...).
        let (xs, hs, qkvs, qs) =
            (RowsMut::new(x, dim), RowsMut::new(h, dim), RowsMut::new(qkv, qkv_w), RowsMut::new(q, q_w));
        let (atts, acts) = (RowsMut::new(att, q_w), RowsMut::new(act, c.ff_dim));
        let hq_p = SendPtr(hq.as_mut_ptr());
        let hq_rows = |cols: usize| RowsMut { p: hq_p, w: cols / QK };
        // `h = norm(x)`, quantized for `next` when it wants that.
        let norm_rows = |r: usize, w: &[f32], next: &Linear, hqs: RowsMut<BlockQ8A>| {
            // SAFETY (here and in every row task below): a task touches
            // only its own rows of each buffer.
            let h = unsafe { hs.row(r) };
            rms_norm(unsafe { xs.row(r) }, w, eps, h);
            if next.needs_quantized_input() {
                quantize_row_q8a(h, unsafe { hqs.row(r) });
            }
        };
        let first = &self.layers[0];
        let hqs = hq_rows(dim);
        each_row(n, rows, |r| {
            let (si, pos) = row_pos[r];
            let s = &plan.seqs[si];
            self.embed_token(s.tokens[pos - s.start_pos], unsafe { xs.row(r) });
            norm_rows(r, &first.attn_norm, &first.qkv, hqs);
        });
        laps.lap(Phase::Embed);
        for (li, l) in self.layers.iter().enumerate() {
            l.qkv.forward(h, &hq[..n * dim / QK], n, &mut *qkv)?;
            laps.lap(Phase::Qkv);
            let writer = pool.token_writer();
            each_row(n, rows, |r| {
                let (rowv, qr) = unsafe { (qkvs.row(r), qs.row(r)) };
                if let Some(b) = &l.qkv_bias {
                    add_assign(rowv, b);
                }
                self.rope.apply(&mut rowv[..q_w + kv_w], hd, &angles[r * nf..(r + 1) * nf]);
                qr.copy_from_slice(&rowv[..q_w]);
                let (k, v) = rowv[q_w..].split_at(kv_w);
                let (si, pos) = row_pos[r];
                // SAFETY: every row of a step is its own (block, slot): the
                // positions of one sequence differ, and the sequences of a
                // step write only blocks they own alone.
                unsafe { writer.write(&plan.seqs[si].block_table, li, pos, k, v) };
            });
            laps.lap(Phase::RowOps);
            if l.wo.needs_quantized_input() && quantizes_in_items(shape) {
                // The output projection's input blocks come from the items.
                paged_attention_q(q, &mut *att, &mut hq[..n * q_w / QK], pool, li, &attn_seqs, shape);
                laps.lap(Phase::Attention);
            } else {
                paged_attention(q, &mut *att, pool, li, &attn_seqs, shape);
                laps.lap(Phase::Attention);
                if l.wo.needs_quantized_input() {
                    let hqs = hq_rows(q_w);
                    each_row(n, rows, |r| quantize_row_q8a(unsafe { atts.row(r) }, unsafe { hqs.row(r) }));
                }
                laps.lap(Phase::RowOps);
            }
            l.wo.forward(att, &hq[..n * q_w / QK], n, &mut *proj)?;
            laps.lap(Phase::O);
            let hqs = hq_rows(dim);
            each_row(n, rows, |r| {
                add_assign(unsafe { xs.row(r) }, &proj[r * dim..(r + 1) * dim]);
                norm_rows(r, &l.ffn_norm, &l.gate_up, hqs);
            });
            laps.lap(Phase::RowOps);
            let down_q = match (&l.gate_up, l.down.needs_quantized_input()) {
                // SwiGLU and the down input's quantization in the matmul's tasks.
                (Linear::Quant(m), true) if swiglu_fits(m) => {
                    qmatmul_swiglu(m, &hq[..n * dim / QK], &mut act[..], &mut act_q[..]);
                    laps.lap(Phase::GateUp);
                    &act_q[..]
                }
                _ => {
                    // Only this path holds the `[n, 2 ff]` products (6 MiB at 512 rows).
                    let gu = sized(gu, n * 2 * c.ff_dim);
                    l.gate_up.forward(h, &hq[..n * dim / QK], n, &mut *gu)?;
                    laps.lap(Phase::GateUp);
                    let hqs = hq_rows(c.ff_dim);
                    each_row(n, rows, |r| {
                        let a = unsafe { acts.row(r) };
                        silu_mul(&gu[r * 2 * c.ff_dim..(r + 1) * 2 * c.ff_dim], c.ff_dim, a);
                        if l.down.needs_quantized_input() {
                            quantize_row_q8a(a, unsafe { hqs.row(r) });
                        }
                    });
                    laps.lap(Phase::RowOps);
                    &hq[..n * c.ff_dim / QK]
                }
            };
            l.down.forward(act, down_q, n, &mut *proj)?;
            laps.lap(Phase::Down);
            let next = self.layers.get(li + 1);
            let hqs = hq_rows(dim);
            each_row(n, rows, |r| {
                add_assign(unsafe { xs.row(r) }, &proj[r * dim..(r + 1) * dim]);
                if let Some(nl) = next {
                    norm_rows(r, &nl.attn_norm, &nl.qkv, hqs);
                }
            });
            laps.lap(Phase::RowOps);
        }
        self.logits(plan, x, logits)?;
        laps.lap(Phase::Logits);
        Ok(())
    }

    fn logits(&self, plan: &StepPlan, x: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let dim = self.config.dim;
        let mut rows = Vec::new();
        let mut r0 = 0;
        for s in &plan.seqs {
            let n = s.tokens.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(r0 + n - 1),
                LogitsWanted::All => rows.extend(r0..r0 + n),
            }
            r0 += n;
        }
        // Every value is overwritten: only a longer buffer writes zeros.
        out.resize(rows.len() * self.config.vocab_size, 0.0);
        if rows.is_empty() {
            return Ok(());
        }
        let mut sel = Vec::with_capacity(rows.len() * dim);
        for &r in &rows {
            sel.extend_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let mut normed = vec![0f32; sel.len()];
        rms_norm(&sel, &self.norm, self.config.rms_eps, &mut normed);
        let mut q = Vec::new();
        quantize_if(&self.output, &normed, dim, &mut q);
        self.output.forward(&normed, &q, rows.len(), out)
    }

    fn embed_token(&self, t: u32, out: &mut [f32]) {
        let dim = self.config.dim;
        match &self.embed {
            Embedding::Quant(m) => dequantize_row(m.qtype(), &m.row(t as usize), out),
            Embedding::Dense(v) => out.copy_from_slice(&v[t as usize * dim..(t as usize + 1) * dim]),
        }
    }
}

/// Rows per task for the row-wise ops (norms, quantization, RoPE and K/V
/// writes, SwiGLU, residuals): one row per task for a handful of rows (a
/// decode batch), else two tasks per thread. Each gap between two matmuls
/// is one region whose tasks do all of its row ops, so a layer has five
/// regions of row work, not ten, and the two threads share them (three
/// with native weights: SwiGLU runs in the gate/up matmul's tasks, see
/// [`qmatmul_swiglu`], and the attention items quantize their outputs,
/// see [`paged_attention_q`]).
///
/// With rayon, whose fork/join cost more than these ops, a decode ran
/// them on one thread, ten passes per layer: 0.54 ms of a 4.0 ms 5-row
/// step (`SEMANTIC_FORWARD_PROFILE`). This way (with the team and the
/// parallel K/V writes) a 5-row decode step went from 3.96 to 3.60 ms and
/// a 512-token prefill from 162 to 149 ms (interleaved medians of 5
/// `decode_steps` runs).
fn row_chunk(n: usize) -> usize {
    const PARALLEL_FROM: usize = 32;
    if n < PARALLEL_FROM {
        1
    } else {
        n.div_ceil(2 * team::threads())
    }
}

/// `f(r)` for every row `r < n`, `rows` rows per task of the current team.
fn each_row(n: usize, rows: usize, f: impl Fn(usize) + Sync) {
    team::for_each(n.div_ceil(rows), |c| (c * rows..((c + 1) * rows).min(n)).for_each(&f));
}

/// A buffer of rows of width `w` that row tasks write, each its own rows.
struct RowsMut<T> {
    p: SendPtr<T>,
    w: usize,
}

impl<T> Clone for RowsMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for RowsMut<T> {}

impl<T> RowsMut<T> {
    fn new(buf: &mut [T], w: usize) -> Self {
        RowsMut { p: SendPtr(buf.as_mut_ptr()), w }
    }

    /// Row `r`.
    ///
    /// # Safety
    /// The buffer outlives the use, `r` is in range, and no other live
    /// reference covers row `r`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.p.get().add(r * self.w), self.w)
    }
}

fn quantize_if(l: &Linear, x: &[f32], cols: usize, q: &mut Vec<BlockQ8A>) {
    if l.needs_quantized_input() {
        quantize_rows(x, cols, q);
    }
}

fn load_layer(g: &GgufFile, i: usize) -> Result<Layer> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let (q, k, v) = (p("attn_q.weight"), p("attn_k.weight"), p("attn_v.weight"));
    let qkv_bias = if g.has_tensor(&p("attn_q.bias")) {
        let mut b = g.f32_vec(&p("attn_q.bias"))?;
        b.extend(g.f32_vec(&p("attn_k.bias"))?);
        b.extend(g.f32_vec(&p("attn_v.bias"))?);
        Some(b)
    } else {
        None
    };
    Ok(Layer {
        attn_norm: g.f32_vec(&p("attn_norm.weight"))?,
        qkv: Linear::load_fused(g, &[&q, &k, &v])?,
        qkv_bias,
        wo: Linear::load(g, &p("attn_output.weight"))?,
        ffn_norm: g.f32_vec(&p("ffn_norm.weight"))?,
        gate_up: Linear::load_fused(g, &[&p("ffn_gate.weight"), &p("ffn_up.weight")])?,
        down: Linear::load(g, &p("ffn_down.weight"))?,
    })
}

/// Parts of a forward step, for [`forward_profile`].
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    /// Embedding lookups, RoPE angles, buffers (and the first norm).
    Embed,
    /// Norms, activation quantization, RoPE and K/V writes, SwiGLU,
    /// residual adds.
    RowOps,
    Attention,
    Qkv,
    O,
    GateUp,
    Down,
    /// Final norm and the output matmul.
    Logits,
}

const PHASES: [(Phase, &str); 8] = [
    (Phase::Embed, "embed"),
    (Phase::RowOps, "row ops"),
    (Phase::Attention, "attention"),
    (Phase::Qkv, "qkv matmul"),
    (Phase::O, "o matmul"),
    (Phase::GateUp, "gate+up matmul"),
    (Phase::Down, "down matmul"),
    (Phase::Logits, "logits"),
];

/// Set `SEMANTIC_FORWARD_PROFILE` in the environment to time the phases
/// of every forward step (off, a lap is one branch).
static PROFILE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("SEMANTIC_FORWARD_PROFILE").is_some());
static PHASE_NS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];

struct Laps(Option<Instant>);

impl Laps {
    fn start() -> Laps {
        Laps(PROFILE.then(Instant::now))
    }

    /// Adds the time since the last lap to `phase`.
    fn lap(&mut self, phase: Phase) {
        if let Some(t) = &mut self.0 {
            let now = Instant::now();
            PHASE_NS[phase as usize].fetch_add((now - *t).as_nanos() as u64, Relaxed);
            *t = now;
        }
    }
}

/// Time spent in each phase of the forward steps since the last call
/// (all zero unless `SEMANTIC_FORWARD_PROFILE` is set), and resets it.
pub fn forward_profile() -> Vec<(&'static str, Duration)> {
    PHASES.iter().map(|&(p, name)| (name, Duration::from_nanos(PHASE_NS[p as usize].swap(0, Relaxed)))).collect()
}
