//! HTTP integration tests: the real router on 127.0.0.1:0 with the real
//! default model (`SEMANTIC_TEST_MODEL`, else `$SEMANTIC_HOME/models/`, else
//! `~/.cache/semantic/models/`; `cargo run --release -- model pull` fetches it),
//! talked to over plain HTTP/1.1.

mod anthropic;
mod bad_input;
mod client;
mod openai;
mod ops;
mod persist;
