//! Tiny random-weight GGUF files written by the test itself: the llama path
//! with Q4_0 and Q4_1 weights and the qwen2 path (q/k/v bias, NeoX RoPE) with
//! Q8_0 weights, each against candle-transformers' reference on the same file.
//! (The real default model is covered by `forward.rs`.)

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use semantic_core::{LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::sampling::argmax;
use semantic_model::{GgufFile, LlamaModel};

const DIM: usize = 64;
const FF: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const VOCAB: usize = 96;

struct Rng(u64);

impl Rng {
    fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn write_model(path: &Path, arch: &str, dtype: GgmlDType) {
    let mut rng = Rng(arch.len() as u64 * 7919 + dtype as u64);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, t: Tensor, dt: GgmlDType| tensors.push((name, QTensor::quantize(&t, dt).unwrap()));
    let hd = DIM / HEADS;
    add("token_embd.weight".into(), rng.tensor(&[VOCAB, DIM], 1.0), dtype);
    add("output_norm.weight".into(), (rng.tensor(&[DIM], 0.2) + 1.0).unwrap(), GgmlDType::F32);
    add("output.weight".into(), rng.tensor(&[VOCAB, DIM], 0.3), dtype);
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        add(p("attn_norm.weight"), (rng.tensor(&[DIM], 0.2) + 1.0).unwrap(), GgmlDType::F32);
        add(p("ffn_norm.weight"), (rng.tensor(&[DIM], 0.2) + 1.0).unwrap(), GgmlDType::F32);
        add(p("attn_q.weight"), rng.tensor(&[DIM, DIM], 0.3), dtype);
        add(p("attn_k.weight"), rng.tensor(&[KV_HEADS * hd, DIM], 0.3), dtype);
        add(p("attn_v.weight"), rng.tensor(&[KV_HEADS * hd, DIM], 0.3), dtype);
        add(p("attn_output.weight"), rng.tensor(&[DIM, DIM], 0.2), dtype);
        add(p("ffn_gate.weight"), rng.tensor(&[FF, DIM], 0.2), dtype);
        add(p("ffn_up.weight"), rng.tensor(&[FF, DIM], 0.2), dtype);
        add(p("ffn_down.weight"), rng.tensor(&[DIM, FF], 0.2), dtype);
        if arch == "qwen2" {
            add(p("attn_q.bias"), rng.tensor(&[DIM], 0.5), GgmlDType::F32);
            add(p("attn_k.bias"), rng.tensor(&[KV_HEADS * hd], 0.5), GgmlDType::F32);
            add(p("attn_v.bias"), rng.tensor(&[KV_HEADS * hd], 0.5), GgmlDType::F32);
        }
    }
    let u = |v: usize| Value::U32(v as u32);
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u(LAYERS)),
        (format!("{arch}.context_length"), u(256)),
        (format!("{arch}.embedding_length"), u(DIM)),
        (format!("{arch}.feed_forward_length"), u(FF)),
        (format!("{arch}.attention.head_count"), u(HEADS)),
        (format!("{arch}.attention.head_count_kv"), u(KV_HEADS)),
        (format!("{arch}.rope.dimension_count"), u(hd)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn candle_logits(path: &Path, arch: &str, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let step = |x: &Tensor, i: usize, m: &mut dyn FnMut(&Tensor, usize) -> Tensor| {
        m(x, i).flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let dev = Device::Cpu;
    let ids = |t: u32| Tensor::new(&[t], &dev).unwrap().unsqueeze(0).unwrap();
    if arch == "qwen2" {
        let mut w = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
        tokens.iter().enumerate().map(|(i, &t)| step(&ids(t), i, &mut |x, p| w.forward(x, p).unwrap())).collect()
    } else {
        let mut w = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &dev).unwrap();
        tokens.iter().enumerate().map(|(i, &t)| step(&ids(t), i, &mut |x, p| w.forward(x, p).unwrap())).collect()
    }
}

fn our_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let model = LlamaModel::load(&GgufFile::open(path).unwrap()).unwrap();
    let mut pool = KvPool::new(model.kv_layout(16), 8);
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, tokens.len()));
    // Two chunks, so the second attends to cached K/V.
    let mut out = Vec::new();
    for (start, chunk) in [(0, &tokens[..7]), (7, &tokens[7..])] {
        let plan = StepPlan {
            seqs: vec![SeqStep {
                tokens: chunk.to_vec(),
                start_pos: start,
                block_table: table.blocks().to_vec(),
                logits: LogitsWanted::All,
            }],
        };
        out.extend(model.forward(&plan, &mut pool).unwrap().chunks_exact(VOCAB).map(<[f32]>::to_vec));
    }
    pool.free_table(table).unwrap();
    out
}

#[test]
fn tiny_llama_and_qwen2_match_candle() {
    let dir = std::env::temp_dir().join(format!("semantic-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % VOCAB as u32).collect();
    for (arch, dtype) in [("llama", GgmlDType::Q4_0), ("llama", GgmlDType::Q4_1), ("qwen2", GgmlDType::Q8_0)] {
        let path = dir.join(format!("{arch}-{dtype:?}.gguf"));
        write_model(&path, arch, dtype);
        let ours = our_logits(&path, &tokens);
        let theirs = candle_logits(&path, arch, &tokens);
        let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let mut max_diff = 0f32;
        let mut agree = 0;
        for (a, b) in ours.iter().zip(&theirs) {
            max_diff = a.iter().zip(b).fold(max_diff, |m, (x, y)| m.max((x - y).abs()));
            agree += usize::from(argmax(a) == argmax(b));
        }
        eprintln!(
            "{arch} {dtype:?}: max |diff| {max_diff:.4} (logits up to {scale:.2}), argmax agrees at {agree}/{}",
            tokens.len()
        );
        // f16 KV (ours) vs f32 (candle) and 8-bit activations: a few % of the
        // logit range; a wrong RoPE variant, bias or layout is off by ~100%.
        assert!(max_diff < 0.08 * scale, "{arch} {dtype:?}: {max_diff} vs scale {scale}");
        assert!(agree >= tokens.len() - 2, "{arch} {dtype:?}: argmax agrees at {agree}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
