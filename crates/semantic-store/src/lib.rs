//! Agent cache files on disk: one safetensors file per agent per model,
//! written atomically, verified on load, indexed at start-up from headers.
//!
//! ```text
//! <cache-dir>/
//!   <fingerprint16>/<agent-id>.safetensors     the warm tier (format: [`format`])
//!   <fingerprint16>/<agent-id>.safetensors.tmp.<pid>.<n>   a save in flight
//!   quarantine/<fingerprint16>/<file>.<unix-s> files that failed to load
//! ```
//!
//! Invariants (DESIGN.md, "Agent caches", "Invariants"):
//! - a cache file is reused only for the model whose GGUF sha256 it names
//!   ([`ModelFingerprint`]) and only after its format version, tensor table,
//!   length and data checksum verify; a bad file is a typed [`CacheError`]
//!   and a cache miss, never a panic and never partial K/V in a live table;
//! - the final name holds only complete, fsynced files (temp, fsync, rename,
//!   directory fsync); a failed save, disk full included, leaves no file;
//! - file names come from validated [`semantic_core::AgentId`]s and
//!   fingerprints (hex), never from raw input;
//! - the format does not depend on the pool's block size; `f16` round-trips
//!   every bit, `q8_0`/`q4_0` stay within [`KvCodec::max_abs_error`].
//!
//! Everything here is synchronous and owns no threads: the engine calls it
//! from its persister (saves) and from the engine thread or a loader (loads).

mod checksum;
mod codec;
mod error;
mod fingerprint;
pub mod format;
mod read;
mod warm;
mod write;

pub use checksum::{xxh64, Xxh64};
pub use codec::{CodecParseError, KvCodec, GROUP};
pub use error::CacheError;
pub use fingerprint::{FingerprintError, ModelFingerprint};
pub use format::{cache_path, read_header, CacheHeader, KvDims, FORMAT_VERSION};
pub use read::{load_agent_cache, load_agent_snapshot, quarantine, LoadedCache};
pub use warm::{Quarantined, ScanReport, WarmEntry, WarmIndex};
pub use write::{
    write_agent_cache, write_agent_cache_unless, write_agent_cache_with, KvSnapshot, KvSource, PoolSource, SaveStats,
    WriteOptions,
};
