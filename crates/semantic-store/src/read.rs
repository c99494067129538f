//! Loading an agent's cache straight into pool blocks, and quarantine.
//!
//! The header is validated first ([`crate::read_header`]: version, exact
//! tensor table, exact length), then the fingerprint and dimensions against
//! the running model, then the data section is streamed front to back, one
//! row at a time, hashed and decoded into the sequence's blocks. Only when
//! the checksum matches does the caller get the tokens; on any error the
//! blocks taken for the load are freed again and the table is left empty.
//! Nothing is deserialized into owned tensors first.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use half::f16;
use semantic_kv::{BlockTable, KvPool};

use crate::checksum::Xxh64;
use crate::format::{groups_per_row, read_header_from};
use crate::write::unix_now;
use crate::{CacheError, CacheHeader, KvDims, KvSnapshot, ModelFingerprint};

/// A loaded cache: its header and its tokens (the K/V are in the pool).
#[derive(Clone, Debug)]
pub struct LoadedCache {
    pub header: CacheHeader,
    pub tokens: Vec<u32>,
    /// Open to verified, K/V in place.
    pub duration: Duration,
}

/// Loads the cache file at `path` into `table`, which must be empty and is
/// grown by `ceil(n_tokens / block_size)` blocks of `pool`. The file's
/// dimensions must match `pool.layout()`; its block size does not matter.
/// The blocks are freshly allocated (so dropped from the prefix index by
/// `ensure_capacity`) and private; registering full blocks in the prefix
/// index afterwards is the caller's call.
///
/// Errors: [`CacheError::Corrupt`], [`CacheError::ForeignModel`],
/// [`CacheError::Version`] (quarantine the file), [`CacheError::PoolFull`],
/// [`CacheError::Io`]. On error `table` is empty and the pool unchanged.
pub fn load_agent_cache(
    path: &Path,
    expected: &ModelFingerprint,
    pool: &mut KvPool,
    table: &mut BlockTable,
) -> Result<LoadedCache, CacheError> {
    let start = Instant::now();
    if !table.is_empty() {
        return Err(CacheError::Invalid("load into a non-empty block table".into()));
    }
    let (mut file, header) = open_checked(path, expected, &pool.layout().into())?;
    let needed = pool.layout().blocks_for(header.n_tokens);
    if !pool.ensure_capacity(table, header.n_tokens) {
        return Err(CacheError::PoolFull { needed, free: pool.n_free() });
    }
    let read = read_body(&mut file, &header, |layer, kv, head, row| {
        pool.import_head_tokens(table.blocks(), layer, kv, head, 0, row)
    });
    match read {
        Ok(tokens) => Ok(LoadedCache { header, tokens, duration: start.elapsed() }),
        Err(e) => {
            pool.free_table(std::mem::take(table)).expect("blocks allocated by this load are live");
            Err(e)
        }
    }
}

/// Loads the cache file into an owned [`KvSnapshot`] (for a loader thread;
/// the engine thread then calls [`KvSnapshot::write_to_pool`]). Same checks
/// and errors as [`load_agent_cache`].
pub fn load_agent_snapshot(
    path: &Path,
    expected: &ModelFingerprint,
    dims: &KvDims,
) -> Result<(LoadedCache, KvSnapshot), CacheError> {
    let start = Instant::now();
    let (mut file, header) = open_checked(path, expected, dims)?;
    let mut snap = KvSnapshot::new(*dims, header.n_tokens);
    let tokens =
        read_body(&mut file, &header, |layer, kv, head, row| snap.row_mut(layer, kv, head).copy_from_slice(row))?;
    let loaded = LoadedCache { header, tokens, duration: start.elapsed() };
    Ok((loaded, snap))
}

fn open_checked(path: &Path, expected: &ModelFingerprint, dims: &KvDims) -> Result<(File, CacheHeader), CacheError> {
    let mut file = File::open(path).map_err(|e| CacheError::io("open", path, e))?;
    let header = read_header_from(&mut file, path)?;
    if header.fingerprint != *expected {
        return Err(CacheError::ForeignModel {
            path: path.to_owned(),
            expected: *expected,
            found: header.fingerprint.to_string(),
        });
    }
    if header.dims != *dims {
        return Err(CacheError::corrupt(
            path,
            format!("dimensions {:?} differ from the model's {dims:?}", header.dims),
        ));
    }
    Ok((file, header))
}

/// Streams the data section: tokens, scales, then one values row per
/// (layer, K|V, head), decoded and handed to `sink`. Verifies the checksum.
fn read_body(
    file: &mut File,
    h: &CacheHeader,
    mut sink: impl FnMut(usize, usize, usize, &[f16]),
) -> Result<Vec<u32>, CacheError> {
    let path = &h.path;
    file.seek(SeekFrom::Start(h.data_offset)).map_err(|e| CacheError::io("seek", path, e))?;
    let mut hash = Xxh64::new(0);
    let mut read = |buf: &mut [u8], hash: &mut Xxh64| -> Result<(), CacheError> {
        file.read_exact(buf).map_err(|e| CacheError::read(path, e))?;
        hash.update(buf);
        Ok(())
    };
    let (n, dims, codec) = (h.n_tokens, h.dims, h.codec);

    let mut bytes = vec![0u8; n * 4];
    read(&mut bytes, &mut hash)?;
    let tokens = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();

    let n_rows = dims.n_layers * 2 * dims.n_kv_heads;
    let groups = groups_per_row(&dims, n);
    let mut scales = Vec::new();
    if codec.has_scales() {
        let mut raw = vec![0u8; n_rows * groups * 2];
        for tensor in raw.chunks_mut((dims.n_kv_heads * groups * 2).max(1)) {
            read(tensor, &mut hash)?;
        }
        scales = raw.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
    }

    bytes.resize(n * codec.values_last_dim(dims.head_dim) * codec.values_elem_bytes(), 0);
    let mut row = vec![f16::ZERO; n * dims.head_dim];
    let mut scratch = Vec::new();
    for r in 0..n_rows {
        read(&mut bytes, &mut hash)?;
        let row_scales = scales.get(r * groups..(r + 1) * groups).unwrap_or(&[]);
        codec.decode(&bytes, row_scales, &mut scratch, &mut row);
        let (layer, kv, head) = (r / (2 * dims.n_kv_heads), r / dims.n_kv_heads % 2, r % dims.n_kv_heads);
        sink(layer, kv, head, &row);
    }
    if hash.digest() != h.checksum {
        return Err(CacheError::corrupt(
            path,
            format!("checksum mismatch: header {:016x}, data {:016x}", h.checksum, hash.digest()),
        ));
    }
    Ok(tokens)
}

/// Moves a bad cache file out of the way, to
/// `<cache-dir>/quarantine/<fingerprint>/<file>.<unix-seconds>[.<n>]`, and
/// returns the new path. `path` is `<cache-dir>/<fingerprint>/<file>`.
pub fn quarantine(path: &Path) -> Result<PathBuf, CacheError> {
    let name = path.file_name().ok_or_else(|| CacheError::Invalid(format!("{} has no file name", path.display())))?;
    let parent = path.parent().unwrap_or(Path::new("."));
    let root = parent.parent().unwrap_or(parent);
    let mut dir = root.join("quarantine");
    if let Some(fp) = parent.file_name() {
        dir.push(fp);
    }
    fs::create_dir_all(&dir).map_err(|e| CacheError::io("create dir", &dir, e))?;
    let stamp = format!("{}.{}", name.to_string_lossy(), unix_now());
    let mut dest = dir.join(&stamp);
    let mut i = 1;
    while dest.exists() {
        dest = dir.join(format!("{stamp}.{i}"));
        i += 1;
    }
    fs::rename(path, &dest).map_err(|e| CacheError::io("quarantine", path, e))?;
    Ok(dest)
}
