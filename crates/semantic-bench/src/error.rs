//! Errors of the benchmark library.

use std::path::{Path, PathBuf};

use crate::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A forward pass of the in-process model (codec fidelity).
    #[error("model forward: {0}")]
    Forward(#[from] semantic_model::ModelError),
    /// Saving or loading a cache file in process (codec fidelity).
    #[error(transparent)]
    Cache(#[from] semantic_store::CacheError),
    #[error("{name} did not start: {msg}")]
    ServerStart { name: String, msg: String },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
    #[error("results file {path}: {msg}")]
    Results { path: PathBuf, msg: String },
    /// The server answered, but not what the benchmark needs.
    #[error("{0}")]
    Unexpected(String),
}

impl BenchError {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> BenchError {
        BenchError::Io { what, path: path.to_owned(), source }
    }
}
