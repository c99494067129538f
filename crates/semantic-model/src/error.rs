//! Typed errors of the model crate. Each names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path} is not a GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2, smollm)")]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("step plan: {0}")]
    Plan(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
