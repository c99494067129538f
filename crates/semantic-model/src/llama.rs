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

use std::sync::Arc;

use rayon::prelude::*;
use semantic_core::{LogitsWanted, StepPlan};
use semantic_kv::{KvLayout, KvPool};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, ModelConfig};
use crate::kernels::attention::{paged_attention, AttnSeq, AttnShape};
use crate::kernels::matmul::quantize_rows;
use crate::kernels::ops::{add_assign, rms_norm, Rope};
use crate::kernels::quant::{dequantize_row, BlockQ8A};
use crate::kernels::vmath::silu_mul;
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
    /// Worker threads of the kernels. A step runs entirely inside the pool,
    /// so each matmul's fork/join stays between workers; forking from an
    /// outside thread cost a cross-thread wake-up per matmul (30% of decode).
    threads: rayon::ThreadPool,
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
}

/// `buf` as `n` zeros, reusing its allocation.
fn zeroed(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.clear();
    buf.resize(n, 0.0);
    buf
}

impl LlamaModel {
    pub fn load(g: &GgufFile) -> Result<Self> {
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
        let n_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .thread_name(|i| format!("semantic-kernel-{i}"))
            .build()
            .map_err(|e| ModelError::Plan(format!("cannot start kernel threads: {e}")))?;
        let model = Self {
            embed,
            layers,
            norm: g.f32_vec("output_norm.weight")?,
            output,
            rope,
            config,
            threads,
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

    /// Runs one step. Returns `plan.n_logit_rows()` rows of `vocab_size`
    /// logits, in plan order.
    pub fn forward(&self, plan: &StepPlan, pool: &mut KvPool) -> Result<Vec<f32>> {
        self.validate(plan, pool)?;
        self.threads.install(|| self.forward_in_pool(plan, pool))
    }

    fn forward_in_pool(&self, plan: &StepPlan, pool: &mut KvPool) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = plan.n_tokens();
        let (dim, hd) = (c.dim, c.head_dim);
        let (q_w, kv_w) = (c.n_heads * hd, c.n_kv_heads * hd);
        let qkv_w = q_w + 2 * kv_w;

        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let Scratch { x, h, qkv, q, att, proj, gu, act, hq } = &mut *guard;
        let x = zeroed(x, n * dim);
        let mut angles = Vec::with_capacity(n * self.rope.n_freqs());
        let mut attn_seqs = Vec::with_capacity(plan.seqs.len());
        let mut row = 0;
        for s in &plan.seqs {
            for (j, &t) in s.tokens.iter().enumerate() {
                self.embed_token(t, &mut x[(row + j) * dim..(row + j + 1) * dim]);
                self.rope.push_angles(s.start_pos + j, &mut angles);
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

        let h = zeroed(h, n * dim);
        let qkv = zeroed(qkv, n * qkv_w);
        let q = zeroed(q, n * q_w);
        let att = zeroed(att, n * q_w);
        let proj = zeroed(proj, n * dim);
        let gu = zeroed(gu, n * 2 * c.ff_dim);
        let act = zeroed(act, n * c.ff_dim);
        let rows = row_chunk(n);
        for (li, l) in self.layers.iter().enumerate() {
            by_rows(rows, (x, dim), (&mut *h, dim), |x, h| rms_norm(x, &l.attn_norm, c.rms_eps, h));
            quantize_if(&l.qkv, h, dim, &mut *hq);
            l.qkv.forward(h, hq, n, &mut *qkv)?;
            let rope = |(r, (rowv, qr)): (usize, (&mut [f32], &mut [f32]))| {
                if let Some(b) = &l.qkv_bias {
                    add_assign(rowv, b);
                }
                let ang = &angles[r * nf..(r + 1) * nf];
                self.rope.apply(&mut rowv[..q_w + kv_w], hd, ang);
                qr.copy_from_slice(&rowv[..q_w]);
            };
            if rows < n {
                qkv.par_chunks_exact_mut(qkv_w).zip(q.par_chunks_exact_mut(q_w)).enumerate().for_each(rope);
            } else {
                qkv.chunks_exact_mut(qkv_w).zip(q.chunks_exact_mut(q_w)).enumerate().for_each(rope);
            }
            for (si, s) in plan.seqs.iter().enumerate() {
                let r0 = attn_seqs[si].first_row;
                for j in 0..s.tokens.len() {
                    let rowv = &qkv[(r0 + j) * qkv_w..(r0 + j + 1) * qkv_w];
                    let (k, v) = rowv[q_w..].split_at(kv_w);
                    pool.write_token(&s.block_table, li, s.start_pos + j, k, v);
                }
            }
            paged_attention(q, &mut *att, pool, li, &attn_seqs, shape);
            quantize_if(&l.wo, att, q_w, &mut *hq);
            l.wo.forward(att, hq, n, &mut *proj)?;
            by_rows(rows, (proj, dim), (&mut *x, dim), |p, x| add_assign(x, p));

            by_rows(rows, (x, dim), (&mut *h, dim), |x, h| rms_norm(x, &l.ffn_norm, c.rms_eps, h));
            quantize_if(&l.gate_up, h, dim, &mut *hq);
            l.gate_up.forward(h, hq, n, &mut *gu)?;
            by_rows(rows, (gu, 2 * c.ff_dim), (&mut *act, c.ff_dim), |g, a| silu_mul(g, c.ff_dim, a));
            quantize_if(&l.down, act, c.ff_dim, &mut *hq);
            l.down.forward(act, hq, n, &mut *proj)?;
            by_rows(rows, (proj, dim), (&mut *x, dim), |p, x| add_assign(x, p));
        }
        self.logits(plan, x)
    }

    fn logits(&self, plan: &StepPlan, x: &[f32]) -> Result<Vec<f32>> {
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
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut sel = Vec::with_capacity(rows.len() * dim);
        for &r in &rows {
            sel.extend_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let mut normed = vec![0f32; sel.len()];
        rms_norm(&sel, &self.norm, self.config.rms_eps, &mut normed);
        let mut q = Vec::new();
        quantize_if(&self.output, &normed, dim, &mut q);
        let mut out = vec![0f32; rows.len() * self.config.vocab_size];
        self.output.forward(&normed, &q, rows.len(), &mut out)?;
        Ok(out)
    }

    fn embed_token(&self, t: u32, out: &mut [f32]) {
        let dim = self.config.dim;
        match &self.embed {
            Embedding::Quant(m) => dequantize_row(m.qtype(), &m.row(t as usize), out),
            Embedding::Dense(v) => out.copy_from_slice(&v[t as usize * dim..(t as usize + 1) * dim]),
        }
    }
}

/// Rows per task for the row-wise ops (norms, RoPE, SwiGLU, residuals):
/// all of them on one thread when there are few rows (a decode), else
/// spread over the pool's threads. On one thread they were ~10% of a
/// 512-token prefill.
fn row_chunk(n: usize) -> usize {
    const PARALLEL_FROM: usize = 32;
    if n < PARALLEL_FROM {
        n.max(1)
    } else {
        n.div_ceil(2 * rayon::current_num_threads())
    }
}

/// `f(src rows, dst rows)` over chunks of `rows` rows of widths `sw`, `dw`.
fn by_rows(rows: usize, src: (&[f32], usize), dst: (&mut [f32], usize), f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let ((s, sw), (d, dw)) = (src, dst);
    if rows * dw >= d.len() {
        return f(s, d);
    }
    s.par_chunks(rows * sw).zip(d.par_chunks_mut(rows * dw)).for_each(|(s, d)| f(s, d));
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
