//! The model side of `semantic`: GGUF loading, the tokenizer and chat template
//! taken from GGUF metadata, a llama-family forward pass over the paged KV pool
//! of `semantic-kv`, our CPU kernels, and sampling.
//!
//! The model holds no per-sequence state: [`LlamaModel::forward`] takes a
//! [`semantic_core::StepPlan`] (plain data: token ids, positions, block tables)
//! and the pool, and returns logits only for the positions the plan asks for.

pub mod chat;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod json;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod paths;
pub mod sampling;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::ModelError;
pub use gguf::{GgufFile, ModelConfig};
pub use llama::LlamaModel;
pub use sampling::Sampler;
pub use tokenizer::{StreamDecoder, Tokenizer};
