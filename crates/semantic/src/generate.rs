//! `semantic generate`: one chat turn on the model, with timing stats.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use semantic_core::SamplingParams;
use semantic_kv::KvPool;
use semantic_model::generate::generate;
use semantic_model::{ChatMessage, ChatTemplate, GgufFile, LlamaModel, Tokenizer};

use crate::UsageError;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// Optional system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Any llama-family GGUF; default: SmolLM2-135M-Instruct, pulled if missing.
    #[arg(long, env = "SEMANTIC_MODEL")]
    model: Option<PathBuf>,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
}

/// Everything a command needs to run the model. The GGUF mapping is dropped
/// after loading (weights are copied out), so its pages leave the RSS.
pub struct Loaded {
    pub path: PathBuf,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

/// Opens `--model PATH` (errors name the file) or the default model; with
/// `threads`, its steps run on that many threads (default: every core).
pub fn load_model(home: &Path, model: Option<&Path>, threads: Option<usize>) -> Result<Loaded> {
    let path = match model {
        Some(p) => p.to_owned(),
        None => crate::pull::ensure_default(home)?,
    };
    let gguf = GgufFile::open(&path)?;
    let model = match threads {
        Some(n) => LlamaModel::load_with_threads(&gguf, n)?,
        None => LlamaModel::load(&gguf)?,
    };
    let tokenizer = Tokenizer::from_gguf(gguf.content())?;
    let template = ChatTemplate::from_gguf(gguf.content(), &tokenizer)?;
    drop(gguf);
    Ok(Loaded { path, model, tokenizer, template })
}

pub fn run(home: &Path, a: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ..SamplingParams::default()
    };
    params.validate().map_err(|e| UsageError(e.to_string()))?;
    if a.prompt.is_empty() {
        return Err(UsageError("`--prompt` must not be empty".into()).into());
    }
    let m = load_model(home, a.model.as_deref(), None)?;
    let text = if a.raw {
        a.prompt.clone()
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::system(s.clone()));
        }
        msgs.push(ChatMessage::user(a.prompt.clone()));
        m.template.render(&msgs, true, None)?
    };
    let ids = m.tokenizer.encode(&text)?;
    let ctx = m.model.config().context_length;
    if ids.len() >= ctx {
        return Err(UsageError(format!("prompt is {} tokens; the context is {ctx}", ids.len())).into());
    }
    let layout = m.model.kv_layout(16);
    let need = layout.blocks_for((ids.len() + a.max_tokens).min(ctx));
    let mut pool = KvPool::new(layout, need);
    let stop_ids = m.template.stop_token_ids(&m.tokenizer);
    let mut stdout = std::io::stdout();
    let g = generate(&m.model, &m.tokenizer, &mut pool, &ids, &params, &stop_ids, |t| {
        let _ = stdout.write_all(t.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    println!(
        "[prompt tokens: {}, prefill: {:.1} tok/s, generated tokens: {}, decode: {:.1} tok/s, finish: {:?}]",
        g.prompt_tokens,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        g.finish
    );
    Ok(())
}
