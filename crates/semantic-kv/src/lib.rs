//! The KV side of `semantic`: the block pool (ids, refcounts, free queue), the
//! paged K/V storage the model reads and writes, and block tables.
//!
//! Knows nothing about model weights or HTTP.

mod block_pool;
mod kv_pool;
mod prefix;

pub use block_pool::{BlockPool, PoolError};
pub use kv_pool::{zeroed_f16, BlockTable, KvLayout, KvPool, TokenWriter};
pub use prefix::{block_hash, BlockHash};
