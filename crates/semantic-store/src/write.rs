//! Saving an agent's cache: stream the file, then make it durable atomically.
//!
//! ```text
//! <fp>/<agent>.safetensors.tmp.<pid>.<n>   create_new, header (checksum 0),
//!                                          tokens, scales, rows: one row per
//!                                          (layer, K|V, head), read from the
//!                                          source and encoded into one buffer
//! patch checksum in place -> fsync file -> rename over <agent>.safetensors
//! -> fsync <fp>/
//! ```
//!
//! Invariants:
//! - the final name only ever holds a complete, fsynced file: a crash leaves
//!   the old file or the new one, plus at most an orphaned temp that
//!   [`crate::WarmIndex::scan`] removes;
//! - on any error (disk full included) the temp file is removed before the
//!   error is returned;
//! - no copy of the whole file is built in memory: peak extra memory is one
//!   row (`n_tokens * head_dim` values).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use half::f16;
use semantic_core::{AgentId, BlockId};
use semantic_kv::KvPool;

use crate::checksum::Xxh64;
use crate::format::{build_header, cache_path, plan, read_header, NewHeader, Plan, CACHE_SUFFIX, TEMP_MARKER};
use crate::{CacheError, KvCodec, KvDims, ModelFingerprint};

/// Where the K/V of a save come from: the pool itself (on the engine thread)
/// or a [`KvSnapshot`] handed to a persister thread.
pub trait KvSource {
    fn dims(&self) -> KvDims;
    /// Positions the source holds (at least the number of tokens saved).
    fn n_positions(&self) -> usize;
    /// Copies K (`kv = 0`) or V (`kv = 1`) of one head for positions
    /// `0..out.len() / head_dim`, position major.
    fn copy_row(&self, layer: usize, kv: usize, head: usize, out: &mut [f16]);
}

/// The blocks of one sequence in the pool, read in place.
pub struct PoolSource<'a> {
    pool: &'a KvPool,
    blocks: &'a [BlockId],
}

impl<'a> PoolSource<'a> {
    pub fn new(pool: &'a KvPool, blocks: &'a [BlockId]) -> Self {
        Self { pool, blocks }
    }
}

impl KvSource for PoolSource<'_> {
    fn dims(&self) -> KvDims {
        self.pool.layout().into()
    }

    fn n_positions(&self) -> usize {
        self.blocks.len() * self.pool.layout().block_size
    }

    fn copy_row(&self, layer: usize, kv: usize, head: usize, out: &mut [f16]) {
        let n = out.len() / self.pool.layout().head_dim;
        self.pool.export_head_tokens(self.blocks, layer, kv, head, 0..n, out);
    }
}

/// An owned copy of a sequence's K/V in file row order
/// (`[layer][K|V][head][position][dim]`), so a persister thread can write
/// it while the engine thread keeps the pool. It can be filled one layer
/// at a time to spread the copy over several engine steps.
#[derive(Clone, Debug)]
pub struct KvSnapshot {
    dims: KvDims,
    n_tokens: usize,
    data: Vec<f16>,
}

impl KvSnapshot {
    /// A zeroed snapshot of `n_tokens` positions.
    pub fn new(dims: KvDims, n_tokens: usize) -> Self {
        let len = dims.n_layers * 2 * dims.n_kv_heads * n_tokens * dims.head_dim;
        Self { dims, n_tokens, data: semantic_kv::zeroed_f16(len) }
    }

    /// Copies positions `0..n_tokens` of the sequence with `blocks`.
    pub fn from_pool(pool: &KvPool, blocks: &[BlockId], n_tokens: usize) -> Self {
        let mut s = Self::new(pool.layout().into(), n_tokens);
        for layer in 0..s.dims.n_layers {
            s.copy_layer_from_pool(pool, blocks, layer);
        }
        s
    }

    /// Copies one layer (K and V of every head) from the pool.
    pub fn copy_layer_from_pool(&mut self, pool: &KvPool, blocks: &[BlockId], layer: usize) {
        let per_layer = 2 * self.dims.n_kv_heads;
        for run in layer * per_layer..(layer + 1) * per_layer {
            self.copy_run_from_pool(pool, blocks, run);
        }
    }

    /// Runs (K or V of one head of one layer, every token): the unit of a
    /// copy in slices.
    pub fn n_runs(&self) -> usize {
        self.dims.n_layers * 2 * self.dims.n_kv_heads
    }

    /// Bytes of one run.
    pub fn run_bytes(&self) -> usize {
        self.n_tokens * self.dims.head_dim * 2
    }

    /// Copies run `run` (`layer`, then K/V, then head) from the pool.
    pub fn copy_run_from_pool(&mut self, pool: &KvPool, blocks: &[BlockId], run: usize) {
        let h = self.dims.n_kv_heads;
        let (layer, kv, head) = (run / (2 * h), run / h % 2, run % h);
        let n = self.n_tokens;
        pool.export_head_tokens(blocks, layer, kv, head, 0..n, self.row_mut(layer, kv, head));
    }

    /// Stores the snapshot into the blocks of a sequence (positions
    /// `0..n_tokens`); the inverse of [`KvSnapshot::from_pool`].
    pub fn write_to_pool(&self, pool: &mut KvPool, blocks: &[BlockId]) {
        for layer in 0..self.dims.n_layers {
            for kv in 0..2 {
                for head in 0..self.dims.n_kv_heads {
                    pool.import_head_tokens(blocks, layer, kv, head, 0, self.row(layer, kv, head));
                }
            }
        }
    }

    pub fn dims(&self) -> KvDims {
        self.dims
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// K/V bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn row_range(&self, layer: usize, kv: usize, head: usize) -> std::ops::Range<usize> {
        let len = self.n_tokens * self.dims.head_dim;
        let start = ((layer * 2 + kv) * self.dims.n_kv_heads + head) * len;
        start..start + len
    }

    pub fn row(&self, layer: usize, kv: usize, head: usize) -> &[f16] {
        &self.data[self.row_range(layer, kv, head)]
    }

    pub fn row_mut(&mut self, layer: usize, kv: usize, head: usize) -> &mut [f16] {
        let r = self.row_range(layer, kv, head);
        &mut self.data[r]
    }
}

impl KvSource for KvSnapshot {
    fn dims(&self) -> KvDims {
        self.dims
    }

    fn n_positions(&self) -> usize {
        self.n_tokens
    }

    fn copy_row(&self, layer: usize, kv: usize, head: usize, out: &mut [f16]) {
        out.copy_from_slice(&self.row(layer, kv, head)[..out.len()]);
    }
}

/// Knobs of a save. The default is what production uses.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Fault injection for tests: the writer fails with ENOSPC once this
    /// many bytes of the file are written (the file keeps the prefix until
    /// the writer removes it), as a full disk would.
    pub fail_after_bytes: Option<u64>,
}

/// What a save did.
#[derive(Clone, Debug)]
pub struct SaveStats {
    pub agent: AgentId,
    pub path: PathBuf,
    pub codec: KvCodec,
    pub n_tokens: usize,
    /// File size.
    pub bytes: u64,
    /// The whole save, fsyncs included.
    pub duration: Duration,
    /// The part of `duration` spent in fsync of the file and the directory.
    pub fsync: Duration,
}

/// Saves tokens and K/V positions `0..tokens.len()` of `source` as
/// `<dir>/<fingerprint>/<agent>.safetensors`, atomically. See the module docs.
pub fn write_agent_cache(
    dir: &Path,
    agent: &AgentId,
    fingerprint: &ModelFingerprint,
    codec: KvCodec,
    tokens: &[u32],
    source: &dyn KvSource,
) -> Result<SaveStats, CacheError> {
    write_agent_cache_with(&WriteOptions::default(), dir, agent, fingerprint, codec, tokens, source)
}

/// [`write_agent_cache`] with explicit [`WriteOptions`].
pub fn write_agent_cache_with(
    opts: &WriteOptions,
    dir: &Path,
    agent: &AgentId,
    fingerprint: &ModelFingerprint,
    codec: KvCodec,
    tokens: &[u32],
    source: &dyn KvSource,
) -> Result<SaveStats, CacheError> {
    write_agent_cache_unless(opts, dir, agent, fingerprint, codec, tokens, source, &|| false)
}

/// [`write_agent_cache_with`], called off when `cancelled()` turns true
/// before the file is published (it is asked before the temp file is
/// created and again just before the rename): the temp file is removed
/// and the result is [`CacheError::Cancelled`]. A deleted agent's save that
/// was already queued then leaves nothing behind.
#[allow(clippy::too_many_arguments)]
pub fn write_agent_cache_unless(
    opts: &WriteOptions,
    dir: &Path,
    agent: &AgentId,
    fingerprint: &ModelFingerprint,
    codec: KvCodec,
    tokens: &[u32],
    source: &dyn KvSource,
    cancelled: &dyn Fn() -> bool,
) -> Result<SaveStats, CacheError> {
    let start = Instant::now();
    let dims = source.dims();
    let plan = check_request(dims, codec, tokens.len(), source.n_positions())?;
    let path = cache_path(dir, fingerprint, agent);
    if cancelled() {
        return Err(CacheError::Cancelled(path));
    }
    let sub = path.parent().expect("cache_path has a parent");
    let new_dir = !sub.is_dir();
    fs::create_dir_all(sub).map_err(|e| CacheError::io("create dir", sub, e))?;
    let now = unix_now();
    let created_at = read_header(&path).ok().filter(|h| h.agent == *agent).map_or(now, |h| h.created_at);
    let (header, checksum_at) = build_header(
        &NewHeader { agent, fingerprint, codec, dims, n_tokens: tokens.len(), created_at, updated_at: now },
        &plan,
    );

    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = sub.join(format!(
        "{agent}{CACHE_SUFFIX}{TEMP_MARKER}{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file =
        OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| CacheError::io("create", &tmp, e))?;
    let mut sink = Sink { file, written: 0, limit: opts.fail_after_bytes };
    let written = write_body(&mut sink, &header, checksum_at, codec, dims, tokens, source);
    let sync_start = Instant::now();
    publish(written, sink.file, &tmp, &path, cancelled)?;
    if new_dir {
        sync_dir(dir)?;
    }
    let bytes = header.len() as u64 + plan.data_len;
    Ok(SaveStats {
        agent: agent.clone(),
        path,
        codec,
        n_tokens: tokens.len(),
        bytes,
        duration: start.elapsed(),
        fsync: sync_start.elapsed(),
    })
}

/// Refuses saves that cannot describe a cache; returns the file's plan.
fn check_request(dims: KvDims, codec: KvCodec, n_tokens: usize, n_positions: usize) -> Result<Plan, CacheError> {
    let invalid = |why: String| Err(CacheError::Invalid(why));
    if n_positions < n_tokens {
        return invalid(format!("{n_tokens} tokens but the source holds {n_positions} positions"));
    }
    if dims.n_layers == 0 || dims.n_kv_heads == 0 || dims.head_dim == 0 {
        return invalid(format!("empty dimensions {dims:?}"));
    }
    if !codec.supports_head_dim(dims.head_dim) {
        return invalid(format!("{codec} needs an even head_dim, got {}", dims.head_dim));
    }
    plan(codec, &dims, n_tokens).map_or_else(|| invalid("cache size overflows".into()), Ok)
}

/// fsync the written temp file, rename it over `path`, fsync the directory.
/// Any failure (or a cancel) before the rename removes the temp file.
fn publish(
    written: io::Result<()>,
    file: File,
    tmp: &Path,
    path: &Path,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), CacheError> {
    let durable = written.and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = durable {
        let _ = fs::remove_file(tmp);
        return Err(CacheError::io("write", path, e));
    }
    if cancelled() {
        let _ = fs::remove_file(tmp);
        return Err(CacheError::Cancelled(path.to_path_buf()));
    }
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(CacheError::io("rename", tmp, e));
    }
    sync_dir(path.parent().expect("cache files live in a directory"))
}

/// Header with a zero checksum, the data section, then the real checksum
/// patched into the header (same length, so nothing moves).
fn write_body(
    sink: &mut Sink,
    header: &[u8],
    checksum_at: u64,
    codec: KvCodec,
    dims: KvDims,
    tokens: &[u32],
    source: &dyn KvSource,
) -> io::Result<()> {
    sink.write(header)?;
    let mut hash = Xxh64::new(0);
    let mut bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    sink.write_hashed(&bytes, &mut hash)?;

    let n = tokens.len();
    let mut row = vec![f16::ZERO; n * dims.head_dim];
    let (mut scratch, mut scales) = (Vec::new(), Vec::new());
    let rows = || {
        (0..dims.n_layers).flat_map(move |l| (0..2).flat_map(move |kv| (0..dims.n_kv_heads).map(move |h| (l, kv, h))))
    };
    if codec.has_scales() {
        // All scales precede all values (alignment, streaming reads), so the
        // source is read twice; `encode` recomputes each group's scale,
        // bit-identical, rather than keeping them.
        for (layer, kv, head) in rows() {
            source.copy_row(layer, kv, head, &mut row);
            codec.push_scales(&row, &mut scratch, &mut scales);
            if head + 1 == dims.n_kv_heads {
                bytes.clear();
                bytes.extend(scales.drain(..).flat_map(|s| s.to_bits().to_le_bytes()));
                sink.write_hashed(&bytes, &mut hash)?;
            }
        }
    }
    bytes.clear();
    bytes.resize(n * codec.values_last_dim(dims.head_dim) * codec.values_elem_bytes(), 0);
    for (layer, kv, head) in rows() {
        source.copy_row(layer, kv, head, &mut row);
        codec.encode(&row, &mut scratch, &mut bytes);
        sink.write_hashed(&bytes, &mut hash)?;
    }
    let hex = format!("{:016x}", hash.digest());
    sink.file.write_all_at(hex.as_bytes(), checksum_at)
}

/// The temp file, with the optional injected ENOSPC.
struct Sink {
    file: File,
    written: u64,
    limit: Option<u64>,
}

impl Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Some(limit) = self.limit {
            let room = limit.saturating_sub(self.written);
            if (buf.len() as u64) > room {
                self.file.write_all(&buf[..room as usize])?;
                self.written += room;
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
        }
        self.file.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn write_hashed(&mut self, buf: &[u8], hash: &mut Xxh64) -> io::Result<()> {
        hash.update(buf);
        self.write(buf)
    }
}

fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| CacheError::io("fsync dir", dir, e))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
