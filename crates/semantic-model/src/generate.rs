//! Single-sequence generation: chunked prefill, then one token per step,
//! stopping on end-of-turn tokens, stop strings or `max_tokens`.
//!
//! The CLI's `generate` and the model tests use it; the server's engine
//! batches many sequences instead (semantic-engine).

use std::time::{Duration, Instant};

use semantic_core::{FinishReason, LogitsWanted, SamplingParams, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};

use crate::error::{ModelError, Result};
use crate::sampling::Sampler;
use crate::{LlamaModel, StreamDecoder, Tokenizer};

/// Prefill chunk: bounds the step's activation memory.
pub const PREFILL_CHUNK: usize = 512;

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first, over the time after the first.
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Finds the earliest stop string in `text`, returning the cut position.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Detokenizes generated tokens into text deltas, holding back a tail that
/// could still be the start of a stop string, and cutting at the first stop
/// string. The deltas (plus [`TextStream::finish`]) concatenate to the reply.
pub struct TextStream {
    dec: StreamDecoder,
    stops: Vec<String>,
    matched: Option<usize>,
    hold: usize,
    text: String,
    emitted: usize,
    /// Where each pushed token's text starts in `text`.
    starts: Vec<usize>,
    /// Tokens at the end whose text lies wholly in or after the matched
    /// stop string (none of it is in the reply).
    hidden: usize,
}

impl TextStream {
    pub fn new(tok: &Tokenizer, stops: &[String]) -> Self {
        let hold = stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        Self {
            dec: tok.stream_decoder(true),
            stops: stops.to_vec(),
            matched: None,
            hold,
            text: String::new(),
            emitted: 0,
            starts: Vec::new(),
            hidden: 0,
        }
    }

    /// Adds a token; returns the text that is now safe to emit and whether a
    /// stop string ended the reply (the text is cut before it).
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        self.starts.push(self.text.len());
        self.text.push_str(&self.dec.push(id)?);
        if let Some(cut) = find_stop(&self.text, &self.stops) {
            self.matched = self.stops.iter().position(|s| self.text.find(s.as_str()) == Some(cut));
            self.hidden = self.starts.iter().rev().take_while(|&&at| at >= cut.max(self.emitted)).count();
            self.text.truncate(cut.max(self.emitted));
            return Ok((self.take(self.text.len()), true));
        }
        let mut safe = self.text.len().saturating_sub(self.hold).max(self.emitted);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        Ok((self.take(safe), false))
    }

    /// Everything still held back (call once, when generation ends without a
    /// stop string).
    pub fn finish(&mut self) -> String {
        self.text.push_str(&self.dec.finish());
        self.take(self.text.len())
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// How many of the last tokens contributed no text to the reply: their
    /// text lies wholly in or after the stop string that ended it (0 when
    /// none did). Their logprobs are not the reply's.
    pub fn hidden_tail(&self) -> usize {
        self.hidden
    }

    /// The stop string that ended the reply, if one did.
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = upto.max(self.emitted);
        let out = self.text[self.emitted..upto].to_owned();
        self.emitted = upto;
        out
    }
}

/// Generates a reply to `prompt` (token ids). `on_text` receives each text
/// delta as it is decoded (held back while it could be a stop string prefix).
pub fn generate(
    model: &LlamaModel,
    tok: &Tokenizer,
    pool: &mut KvPool,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let ctx = model.config().context_length;
    if prompt.is_empty() || prompt.len() >= ctx {
        return Err(ModelError::Plan(format!("prompt of {} tokens does not fit the context of {ctx}", prompt.len())));
    }
    let mut table = BlockTable::default();
    let res = run(model, tok, pool, &mut table, prompt, params, stop_ids, &mut on_text);
    let freed = pool.free_table(table);
    let g = res?;
    freed.map_err(|e| ModelError::Plan(e.to_string()))?;
    Ok(g)
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &LlamaModel,
    tok: &Tokenizer,
    pool: &mut KvPool,
    table: &mut BlockTable,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let ctx = model.config().context_length;
    let max_new = params.max_tokens.min(ctx - prompt.len());
    if !pool.ensure_capacity(table, prompt.len() + max_new) {
        return Err(ModelError::Plan("KV pool too small for prompt + max_tokens".into()));
    }
    let mut sampler = Sampler::new(params.clone());
    let mut history = prompt.to_vec();
    let t0 = Instant::now();
    let mut logits = Vec::new();
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        let last = (i + 1) * PREFILL_CHUNK >= prompt.len();
        let plan =
            step(chunk.to_vec(), i * PREFILL_CHUNK, table, if last { LogitsWanted::Last } else { LogitsWanted::None });
        logits = model.forward(&plan, pool)?;
    }
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut stream = TextStream::new(tok, &params.stop);
    let finish;
    loop {
        let t = sampler.sample(&mut logits, &history).token;
        if stop_ids.contains(&t) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(t);
        history.push(t);
        let (delta, stopped) = stream.push(t)?;
        if !delta.is_empty() {
            on_text(&delta);
        }
        if stopped {
            finish = FinishReason::StopString;
            break;
        }
        if out.len() >= max_new {
            finish = if max_new < params.max_tokens { FinishReason::ContextFull } else { FinishReason::Length };
            break;
        }
        let pos = prompt.len() + out.len() - 1;
        logits = model.forward(&step(vec![t], pos, table, LogitsWanted::Last), pool)?;
    }
    if finish != FinishReason::StopString {
        let tail = stream.finish();
        if !tail.is_empty() {
            on_text(&tail);
        }
    }
    Ok(Generation {
        text: stream.text().to_owned(),
        tokens: out,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: t1.elapsed(),
    })
}

fn step(tokens: Vec<u32>, start_pos: usize, table: &BlockTable, logits: LogitsWanted) -> StepPlan {
    StepPlan { seqs: vec![SeqStep { tokens, start_pos, block_table: table.blocks().to_vec(), logits }] }
}
