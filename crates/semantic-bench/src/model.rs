//! The model under test, read from its GGUF: shape (for the theoretical KV
//! size), fingerprint (for the report), and the tokenizer and chat template
//! (to build prompts of an exact templated token count).

use std::path::{Path, PathBuf};

use semantic_model::{ChatMessage, ChatTemplate, GgufFile, ModelConfig, Tokenizer};
use semantic_store::ModelFingerprint;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// What the KV size depends on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ModelShape {
    pub arch: String,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
}

impl ModelShape {
    /// K and V of every layer in f16: `n_layers x 2 x n_kv_heads x head_dim x 2`.
    pub fn kv_bytes_per_token_f16(&self) -> u64 {
        (self.n_layers * 2 * self.n_kv_heads * self.head_dim * 2) as u64
    }
}

/// A chat prompt: system and user text, and its templated token count.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub system: String,
    pub user: String,
    pub tokens: usize,
}

pub struct ModelInfo {
    pub path: PathBuf,
    pub fingerprint: String,
    pub file_bytes: u64,
    pub shape: ModelShape,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

const WORDS: [&str; 24] = [
    "river", "stone", "garden", "window", "paper", "light", "table", "music", "forest", "engine", "silver", "market",
    "winter", "orange", "planet", "bridge", "letter", "mirror", "castle", "animal", "circle", "doctor", "island",
    "pocket",
];

/// `n` plain English words, distinct per `seed` from the first word on (so
/// two seeds share no cached prefix beyond the template's first tokens).
pub fn filler(n: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = format!("Note {seed}:");
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(' ');
        out.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
    }
    out
}

pub const USER_TURN: &str = "Continue the notes above with a long story.";

impl ModelInfo {
    pub fn open(path: &Path) -> Result<ModelInfo, BenchError> {
        let bad = |msg: String| BenchError::Model { path: path.to_owned(), msg };
        let g = GgufFile::open(path).map_err(|e| bad(e.to_string()))?;
        let cfg = ModelConfig::from_gguf(&g).map_err(|e| bad(e.to_string()))?;
        let tokenizer = Tokenizer::from_gguf(g.content()).map_err(|e| bad(e.to_string()))?;
        let template = ChatTemplate::from_gguf(g.content(), &tokenizer).map_err(|e| bad(e.to_string()))?;
        let fingerprint = ModelFingerprint::of_file(path).map_err(|e| bad(e.to_string()))?;
        let file_bytes = std::fs::metadata(path).map_err(|e| BenchError::io("reading", path, e))?.len();
        let shape = ModelShape {
            arch: cfg.arch,
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            context_length: cfg.context_length,
        };
        Ok(ModelInfo {
            path: path.to_owned(),
            fingerprint: fingerprint.to_string(),
            file_bytes,
            shape,
            tokenizer,
            template,
        })
    }

    /// Token ids of a system + user chat through the chat template, with the
    /// assistant turn opened, as the server tokenizes it.
    pub fn chat_tokens(&self, system: &str, user: &str) -> Result<Vec<u32>, BenchError> {
        let bad = |msg: String| BenchError::Model { path: self.path.clone(), msg };
        let text = self
            .template
            .render(&[ChatMessage::system(system), ChatMessage::user(user)], true, None)
            .map_err(|e| bad(e.to_string()))?;
        self.tokenizer.encode(&text).map_err(|e| bad(e.to_string()))
    }

    /// Templated token count of a system + user chat, as the server counts it.
    pub fn count(&self, system: &str, user: &str) -> Result<usize, BenchError> {
        Ok(self.chat_tokens(system, user)?.len())
    }

    /// A prompt of at most `tokens` templated tokens (exactly, as far as the
    /// tokenizer allows), unique per `seed`.
    pub fn prompt(&self, tokens: usize, seed: u64) -> Result<Prompt, BenchError> {
        let overhead = self.count(&filler(0, seed), USER_TURN)?;
        let mut words = tokens.saturating_sub(overhead);
        let mut best = None;
        for _ in 0..6 {
            let system = filler(words, seed);
            let n = self.count(&system, USER_TURN)?;
            if n <= tokens {
                best = Some(Prompt { system, user: USER_TURN.into(), tokens: n });
            }
            if n == tokens {
                break;
            }
            let step = n.abs_diff(tokens).max(1);
            words = if n > tokens { words.saturating_sub(step) } else { words + step };
        }
        match best {
            Some(p) => Ok(p),
            None => Ok(Prompt { system: filler(0, seed), user: USER_TURN.into(), tokens: overhead }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_bytes_of_the_default_model_shape() {
        let s = ModelShape { arch: "llama".into(), n_layers: 30, n_kv_heads: 3, head_dim: 64, context_length: 8192 };
        assert_eq!(s.kv_bytes_per_token_f16(), 23_040);
    }

    #[test]
    fn filler_is_deterministic_and_distinct_per_seed() {
        assert_eq!(filler(5, 7), filler(5, 7));
        assert_ne!(filler(5, 7), filler(5, 8));
        assert_eq!(filler(5, 7).split(' ').count(), 7);
    }

    #[test]
    fn prompts_hit_the_token_count_on_the_default_model() {
        let path =
            semantic_model::paths::semantic_home().join("models").join(semantic_model::paths::DEFAULT_MODEL_FILE);
        if !path.exists() {
            eprintln!("skipped: no default model at {}", path.display());
            return;
        }
        let m = ModelInfo::open(&path).unwrap();
        assert_eq!(m.shape.kv_bytes_per_token_f16(), 23_040);
        assert_eq!(m.fingerprint, "b179c9523d0e6a0f");
        for n in [128, 2048] {
            let p = m.prompt(n, 42).unwrap();
            assert!(p.tokens <= n && p.tokens + 2 >= n, "{} for {n}", p.tokens);
            assert_eq!(m.count(&p.system, &p.user).unwrap(), p.tokens);
        }
    }
}
