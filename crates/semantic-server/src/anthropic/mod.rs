//! The Anthropic dialect: `/v1/messages` and `/v1/messages/count_tokens`.
//!
//! Errors are `{"type":"error","error":{"type","message"}}`
//! ([`crate::error::AnthropicError`]). Streams carry the full event sequence:
//! `message_start`, `content_block_start`, `ping`, `content_block_delta`...,
//! `content_block_stop`, `message_delta` (stop reason, usage), `message_stop`.

mod messages;
pub mod request;

pub use messages::{count_tokens, messages};
