//! The benchmark suite: it talks HTTP to a running server (ours, or any
//! OpenAI-compatible one such as llama.cpp's) and measures what each
//! benchmark claims: batching throughput, cache resume, memory.

pub mod batching;
pub mod client;
pub mod server;
pub mod stats;
