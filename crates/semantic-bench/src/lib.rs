//! The benchmark suite: it talks HTTP to a running server (ours, started
//! from the real binary, or any OpenAI-compatible one such as llama.cpp's)
//! and measures what each benchmark claims: batching throughput, cache
//! save/load/resume with the server's own disk timings, memory.
//!
//! ```text
//! Suite (suite.rs) -- starts/restarts `semantic serve` and llama-server (server.rs)
//!   batching.rs  throughput of 1..8 agents, ITL during a prefill
//!   resume.rs    save/load/resume per size and codec (agents API, agents.rs)
//!   memory.rs    RSS and KV per agent, padding, theory, leak check
//!   llama.rs     the same where llama-server has an equivalent
//!   fidelity.rs  q8_0/q4_0 caches vs f16: greedy agreement, logit error
//!                (in process on the model, through the real save/load path)
//!   -> Results (results.rs: benchmark_results.json) -> verdicts (verdict.rs)
//!   -> REPORT.md + SVG charts (report.rs, svg.rs)
//! ```
//! The benchmarks are ignored tests in `tests/` and `semantic bench`.

pub mod agents;
pub mod batching;
pub mod client;
pub mod context;
pub mod error;
pub mod fidelity;
pub mod llama;
pub mod memory;
pub mod meta;
pub mod model;
pub mod mux;
pub mod report;
pub mod results;
pub mod resume;
pub mod server;
pub mod stats;
pub mod suite;
pub mod svg;
pub mod verdict;

pub use context::{Plan, Progress, StderrProgress};
pub use error::BenchError;
pub use results::{Group, Record, Results};
pub use suite::{Suite, SuiteConfig};
