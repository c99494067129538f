//! Our forward pass against candle-transformers' `quantized_llama` on the real
//! default model, and batching/chunking invariance.

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use semantic_core::{LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::sampling::argmax;
use semantic_model::{LlamaModel, Tokenizer};

const PROMPTS: [&str; 3] = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,",
];

/// Max |ours - candle| over all logits. Activations are quantized bit for bit
/// as candle does (GGML Q8_1/Q8_0), but our KV cache is f16 where candle's is
/// f32, and 8-bit activation rounding turns that small difference into
/// quantization-sized noise: measured against candle with dequantized f32
/// weights (`CANDLE_DEQUANTIZE_ALL=1`), candle's own quantized path is off by
/// rms 0.29 (max 1.65) and ours by rms 0.40 (max 1.66); ours vs candle: max
/// 1.68 over these prompts. The max is a tail statistic: summation order
/// alone (a new attention kernel) moved one prompt's max from 2.36 to 2.57,
/// with rms 0.3-0.4 either way. A real bug (RoPE, layout, scales) gives
/// errors of several units at every position (a flipped RoPE variant: max
/// 4.8, argmax agreement 6/24; tiny_models.rs).
const MAX_LOGIT_DIFF: f32 = 3.5;
/// RMS of |ours - candle| over all logits of a prompt.
const RMS_LOGIT_DIFF: f32 = 0.6;
/// Top-2 gaps below this are within that noise: either token is a valid argmax.
const NEAR_TIE: f32 = 0.25;

fn candle_logits(path: &std::path::Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut w = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let x = Tensor::new(&[t], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            w.forward(&x, i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

fn greedy(model: &LlamaModel, pool: &mut KvPool, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, prompt.len() + n));
    let mut next = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let plan = StepPlan {
            seqs: vec![SeqStep {
                tokens: next.clone(),
                start_pos: pos,
                block_table: table.blocks().to_vec(),
                logits: LogitsWanted::Last,
            }],
        };
        let l = model.forward(&plan, pool).unwrap();
        pos += next.len();
        let t = argmax(&l);
        tokens.push(t);
        next = vec![t];
    }
    pool.free_table(table).unwrap();
    tokens[prompt.len()..].to_vec()
}

#[test]
fn logits_match_candle_quantized_llama() {
    let path = common::model_path();
    let (g, model) = common::load();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let mut pool = KvPool::new(model.kv_layout(16), 64);
    for prompt in PROMPTS {
        let ids = tok.encode(prompt).unwrap();
        // 32-token greedy continuation from our model; candle scores the
        // whole sequence (prompt + continuation) token by token.
        let cont = greedy(&model, &mut pool, &ids, 32);
        let all: Vec<u32> = ids.iter().chain(&cont).copied().collect();
        let ours = common::logits_in_chunks(&model, &mut pool, &all, 512);
        let theirs = candle_logits(&path, &all);
        let (mut max_diff, mut sq, mut n) = (0f32, 0f64, 0usize);
        for (pos, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            max_diff = max_diff.max(d);
            sq += a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
            n += a.len();
            let (ta, tb) = (argmax(a), argmax(b));
            if ta != tb {
                let mut s = b.clone();
                s.sort_by(|x, y| y.total_cmp(x));
                assert!(s[0] - s[1] < NEAR_TIE, "{prompt:?} pos {pos}: argmax {ta} vs candle {tb}");
            }
        }
        // Candle's greedy choice at every generated position equals ours
        // (checked above, near-ties aside); count the exact agreements.
        let agree = theirs[ids.len() - 1..all.len() - 1].iter().zip(&cont).filter(|(l, &t)| argmax(l) == t).count();
        assert!(agree >= 30, "{prompt:?}: only {agree}/32 greedy tokens agree");
        let rms = (sq / n as f64).sqrt() as f32;
        eprintln!("{prompt:?}: {} tokens, max |logit diff| = {max_diff:.4}, rms {rms:.4}", all.len());
        assert!(max_diff < MAX_LOGIT_DIFF, "{prompt:?}: max logit diff {max_diff}");
        assert!(rms < RMS_LOGIT_DIFF, "{prompt:?}: rms logit diff {rms}");
    }
    assert_eq!(pool.n_free(), 64);
}

#[test]
fn batched_and_chunked_steps_equal_single_runs() {
    let (g, model) = common::load();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let mut pool = KvPool::new(model.kv_layout(16), 128);
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tok.encode(p).unwrap()).collect();
    let alone: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| common::logits_in_chunks(&model, &mut pool, s, 512)).collect();
    // One step with all three sequences of different lengths.
    let mut tables: Vec<BlockTable> = Vec::new();
    let mut plan = StepPlan::default();
    for s in &seqs {
        let mut t = BlockTable::default();
        assert!(pool.ensure_capacity(&mut t, s.len()));
        plan.seqs.push(SeqStep {
            tokens: s.clone(),
            start_pos: 0,
            block_table: t.blocks().to_vec(),
            logits: LogitsWanted::All,
        });
        tables.push(t);
    }
    let vocab = model.config().vocab_size;
    let batched = model.forward(&plan, &mut pool).unwrap();
    let mut rows = batched.chunks_exact(vocab);
    for (i, single) in alone.iter().enumerate() {
        for (pos, want) in single.iter().enumerate() {
            let row = rows.next().unwrap();
            let d = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "seq {i} pos {pos}: batched differs by {d}");
        }
    }
    for t in tables {
        pool.free_table(t).unwrap();
    }
    // Chunked prefill equals one-shot prefill.
    for chunk in [1, 7, 64] {
        let chunked = common::logits_in_chunks(&model, &mut pool, &seqs[2], chunk);
        for (pos, (a, b)) in chunked.iter().zip(&alone[2]).enumerate() {
            let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d < 1e-4, "chunk {chunk} pos {pos}: differs by {d}");
        }
    }
    assert_eq!(pool.n_free(), 128);
}

#[test]
#[ignore = "diagnostic"]
fn dump_logits() {
    let path = common::model_path();
    let (g, model) = common::load();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let ids = tok.encode(PROMPTS[0]).unwrap();
    let mut pool = KvPool::new(model.kv_layout(16), 64);
    let ours = common::logits_in_chunks(&model, &mut pool, &ids, 512);
    let theirs = candle_logits(&path, &ids);
    let tag = std::env::var("TAG").unwrap_or_default();
    let dump = |name: &str, l: &[Vec<f32>]| {
        let bytes: Vec<u8> = l.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(format!("/tmp/{name}{tag}.bin"), bytes).unwrap();
    };
    dump("ours", &ours);
    dump("candle", &theirs);
}

/// One kernel thread or several: the same bits (every output is computed
/// whole by one task; key ranges split only past 512 keys).
#[test]
fn thread_counts_give_identical_logits() {
    let g = semantic_model::GgufFile::open(&common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(g.content()).unwrap();
    let tokens: Vec<u32> = PROMPTS.iter().flat_map(|p| tok.encode(p).unwrap()).collect();
    let runs: Vec<Vec<Vec<f32>>> = [1, 2, 3]
        .iter()
        .map(|&n| {
            let model = LlamaModel::load_with_threads(&g, n).unwrap();
            assert_eq!(model.threads(), n);
            let mut pool = KvPool::new(model.kv_layout(16), 64);
            // A multi-row prefill chunk, then single-token steps.
            let mut out = common::logits_in_chunks(&model, &mut pool, &tokens[..40], 20);
            out.extend(common::logits_in_chunks(&model, &mut pool, &tokens, 1).into_iter().skip(40));
            out
        })
        .collect();
    for (n, run) in runs.iter().enumerate().skip(1) {
        for (pos, (a, b)) in run.iter().zip(&runs[0]).enumerate() {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{} threads, position {pos}", n + 1);
        }
    }
}
