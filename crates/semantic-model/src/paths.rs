//! Where the default model lives: `$SEMANTIC_HOME/models/` (default
//! `~/.cache/semantic/models/`). The CLI pulls it there; tests find it there.

use std::path::PathBuf;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SEMANTIC_HOME`, else `~/.cache/semantic`.
pub fn semantic_home() -> PathBuf {
    if let Some(h) = std::env::var_os("SEMANTIC_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("semantic")
}

/// The model tests run on: `SEMANTIC_TEST_MODEL` if set, else the default
/// model under [`semantic_home`]. Panics with how to get it when missing, so
/// a test fails instead of silently skipping.
pub fn test_model_path() -> PathBuf {
    let p = std::env::var_os("SEMANTIC_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| semantic_home().join("models").join(DEFAULT_MODEL_FILE));
    assert!(p.exists(), "model missing at {}: run `cargo run --release -- model pull`", p.display());
    p
}
