//! The OpenAI dialect: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//!
//! Errors are `{"error":{"message","type","param","code"}}` ([`crate::error::OpenAiError`]).
//! Streams are `data: {chunk}` events ending with `data: [DONE]`.

mod chat;
mod completions;
pub mod request;
pub mod response;

pub use chat::chat_completions;
pub use completions::{completions, model, models};
