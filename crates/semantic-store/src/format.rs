//! The cache file: a plain safetensors file any safetensors reader opens.
//!
//! ```text
//! <cache-dir>/<fingerprint16>/<agent-id>.safetensors
//! [u64 LE header length n][n bytes JSON header, space padded to 8][data section]
//!
//! data section, in this order, with no gaps (T = n_tokens, H = n_kv_heads,
//! D = head_dim, L = n_layers, G = ceil(T * D / 32)):
//!   tokens                        U32 [T]
//!   layers.{i}.{k,v}.scales       F16 [H, G]        (q8_0, q4_0 only; i = 0..L)
//!   layers.{i}.{k,v}              F16 [H, T, D]     (f16)
//!                                 I8  [H, T, D]     (q8_0)
//!                                 U8  [H, T, D/2]   (q4_0)
//! ```
//!
//! Tokens first, then 2-byte scales, then values: every tensor is aligned to
//! its element size and a reader streams the file front to back. Rows are
//! position major and carry no block padding: the format does not depend on
//! the pool's block size.
//!
//! `__metadata__` (all strings): `format_version`, `model_fingerprint`,
//! `agent_id`, `kv_codec`, `n_tokens`, `n_layers`, `n_kv_heads`, `head_dim`,
//! `checksum` (`xxh64:<16 hex>` of the whole data section), `created_at`,
//! `updated_at` (unix seconds).
//!
//! Invariant: [`read_header`] accepts a file only if its tensor table is
//! exactly the one [`plan`] derives from the metadata and the file length is
//! exactly header + data; everything else is [`CacheError::Corrupt`]. So the
//! loader never trusts an offset or a shape it did not compute itself.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use semantic_core::AgentId;
use semantic_kv::KvLayout;
use serde_json::{json, Value};

use crate::codec::GROUP;
use crate::{CacheError, KvCodec, ModelFingerprint};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name suffix of a cache file.
pub const CACHE_SUFFIX: &str = ".safetensors";
/// Marker in temporary file names: `<agent>.safetensors.tmp.<pid>.<n>`.
pub(crate) const TEMP_MARKER: &str = ".tmp.";
const MAX_HEADER_BYTES: u64 = 16 << 20;
const CHECKSUM_PREFIX: &str = "xxh64:";
/// Checksum placeholder written first and patched once the data is hashed.
pub(crate) const CHECKSUM_PLACEHOLDER: &str = "xxh64:0000000000000000";

/// The shape of a model's KV cache that the file records; unlike
/// [`KvLayout`] it has no block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvDims {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl From<&KvLayout> for KvDims {
    fn from(l: &KvLayout) -> Self {
        Self { n_layers: l.n_layers, n_kv_heads: l.n_kv_heads, head_dim: l.head_dim }
    }
}

/// `<dir>/<fingerprint>/<agent>.safetensors`.
pub fn cache_path(dir: &Path, fingerprint: &ModelFingerprint, agent: &AgentId) -> PathBuf {
    dir.join(fingerprint.as_str()).join(format!("{agent}{CACHE_SUFFIX}"))
}

/// The writer's pid if `name` is a temp file name
/// (`<agent>.safetensors.tmp.<pid>.<n>`). Agent ids may contain `.tmp.`, but
/// a temp name ends in two numbers and never in `.safetensors`.
pub(crate) fn temp_file_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    let stem = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let agent = stem.strip_suffix(TEMP_MARKER.trim_end_matches('.'))?.strip_suffix(CACHE_SUFFIX)?;
    (digits(n) && AgentId::new(agent).is_ok()).then(|| pid.parse().ok()).flatten()
}

/// One tensor of a file: name, dtype, shape and its byte range in the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TensorSpec {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// The complete tensor table of a file, in data order.
#[derive(Debug)]
pub(crate) struct Plan {
    pub tensors: Vec<TensorSpec>,
    pub data_len: u64,
}

/// Scales per row (`n_tokens * head_dim` values in groups of 32).
pub(crate) fn groups_per_row(dims: &KvDims, n_tokens: usize) -> usize {
    (n_tokens * dims.head_dim).div_ceil(GROUP)
}

/// The tensor table of a file; `None` if the sizes overflow (a bad header).
pub(crate) fn plan(codec: KvCodec, dims: &KvDims, n_tokens: usize) -> Option<Plan> {
    let (l, h, d, t) = (dims.n_layers, dims.n_kv_heads, dims.head_dim, n_tokens);
    let mut tensors = Vec::with_capacity(1 + 4 * l);
    let mut at = 0u64;
    let mut push = |name: String, dtype: &'static str, shape: Vec<usize>, elem: usize| {
        let bytes = shape.iter().try_fold(elem as u64, |acc, &s| acc.checked_mul(s as u64))?;
        let end = at.checked_add(bytes)?;
        tensors.push(TensorSpec { name, dtype, shape, start: at, end });
        at = end;
        Some(())
    };
    push("tokens".into(), "U32", vec![t], 4)?;
    if codec.has_scales() {
        let g = t.checked_mul(d)?.div_ceil(GROUP);
        for i in 0..l {
            for kv in ["k", "v"] {
                push(format!("layers.{i}.{kv}.scales"), "F16", vec![h, g], 2)?;
            }
        }
    }
    let (dtype, last, elem) = (codec.values_dtype(), codec.values_last_dim(d), codec.values_elem_bytes());
    for i in 0..l {
        for kv in ["k", "v"] {
            push(format!("layers.{i}.{kv}"), dtype, vec![h, t, last], elem)?;
        }
    }
    Some(Plan { tensors, data_len: at })
}

/// What the writer records in `__metadata__`.
pub(crate) struct NewHeader<'a> {
    pub agent: &'a AgentId,
    pub fingerprint: &'a ModelFingerprint,
    pub codec: KvCodec,
    pub dims: KvDims,
    pub n_tokens: usize,
    pub created_at: u64,
    pub updated_at: u64,
}

/// The header bytes (JSON padded so the data starts 8-aligned) with the
/// checksum placeholder, and the offset of its 16 hex digits in the file.
pub(crate) fn build_header(h: &NewHeader<'_>, plan: &Plan) -> (Vec<u8>, u64) {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".into(),
        json!({
            "format_version": FORMAT_VERSION.to_string(),
            "model_fingerprint": h.fingerprint.as_str(),
            "agent_id": h.agent.as_str(),
            "kv_codec": h.codec.name(),
            "n_tokens": h.n_tokens.to_string(),
            "n_layers": h.dims.n_layers.to_string(),
            "n_kv_heads": h.dims.n_kv_heads.to_string(),
            "head_dim": h.dims.head_dim.to_string(),
            "checksum": CHECKSUM_PLACEHOLDER,
            "created_at": h.created_at.to_string(),
            "updated_at": h.updated_at.to_string(),
        }),
    );
    for t in &plan.tensors {
        map.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [t.start, t.end]}));
    }
    let mut json = serde_json::to_vec(&Value::Object(map)).expect("a JSON map serializes");
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let needle = format!("\"{CHECKSUM_PLACEHOLDER}\"");
    let at = json.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("placeholder is in the header");
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    (bytes, (8 + at + 1 + CHECKSUM_PREFIX.len()) as u64)
}

/// The validated header of a cache file.
#[derive(Clone, Debug)]
pub struct CacheHeader {
    pub path: PathBuf,
    pub agent: AgentId,
    pub fingerprint: ModelFingerprint,
    pub codec: KvCodec,
    pub dims: KvDims,
    pub n_tokens: usize,
    /// XXH64 of the data section.
    pub checksum: u64,
    /// Unix seconds of the first and of the latest save of this agent.
    pub created_at: u64,
    pub updated_at: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Modification time: the last save (the warm tier's "last use").
    pub mtime: SystemTime,
    /// Where the data section starts in the file.
    pub(crate) data_offset: u64,
}

/// Reads and validates the header of a cache file (one open, one or two
/// reads of the first 16 KiB; never the data).
pub fn read_header(path: &Path) -> Result<CacheHeader, CacheError> {
    let mut file = File::open(path).map_err(|e| CacheError::io("open", path, e))?;
    read_header_from(&mut file, path)
}

/// [`read_header`] of an open file; leaves the file position unspecified.
pub(crate) fn read_header_from(file: &mut File, path: &Path) -> Result<CacheHeader, CacheError> {
    let meta = file.metadata().map_err(|e| CacheError::io("stat", path, e))?;
    let len = meta.len();
    let mtime = meta.modified().map_err(|e| CacheError::io("stat", path, e))?;
    let mut buf = vec![0u8; (16 << 10).min(len as usize)];
    file.read_exact(&mut buf).map_err(|e| CacheError::read(path, e))?;
    if len < 8 {
        return Err(CacheError::corrupt(path, format!("{len} bytes: shorter than a header")));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES || 8 + n > len {
        return Err(CacheError::corrupt(path, format!("header length {n} does not fit a file of {len} bytes")));
    }
    let end = 8 + n as usize;
    if buf.len() < end {
        let have = buf.len();
        buf.resize(end, 0);
        file.read_exact(&mut buf[have..]).map_err(|e| CacheError::read(path, e))?;
    }
    let map: BTreeMap<String, Value> = serde_json::from_slice(&buf[8..end])
        .map_err(|e| CacheError::corrupt(path, format!("header is not JSON: {e}")))?;
    let fields = parse_fields(path, &map)?;
    let header = CacheHeader { path: path.to_owned(), bytes: len, mtime, data_offset: end as u64, ..fields };
    check_tensors(path, &header, map)?;
    check_file_name(path, &header.agent)?;
    Ok(header)
}

fn parse_fields(path: &Path, map: &BTreeMap<String, Value>) -> Result<CacheHeader, CacheError> {
    let bad = |reason: String| CacheError::corrupt(path, reason);
    let meta = match map.get("__metadata__") {
        Some(Value::Object(m)) => m,
        _ => return Err(bad("no __metadata__ object".into())),
    };
    let get = |key: &str| -> Result<&str, CacheError> {
        match meta.get(key) {
            Some(Value::String(s)) => Ok(s.as_str()),
            _ => Err(bad(format!("metadata {key:?} missing or not a string"))),
        }
    };
    let num = |key: &str| -> Result<u64, CacheError> {
        get(key)?.parse::<u64>().map_err(|_| bad(format!("metadata {key:?} is not a number")))
    };
    // The version first: a newer file may lack or change any other field.
    let version = get("format_version")?;
    if version != FORMAT_VERSION.to_string() {
        return Err(CacheError::Version {
            path: path.to_owned(),
            found: version.to_owned(),
            supported: FORMAT_VERSION,
        });
    }
    let fingerprint = ModelFingerprint::new(get("model_fingerprint")?).map_err(|e| bad(e.to_string()))?;
    let agent = AgentId::new(get("agent_id")?).map_err(|e| bad(e.to_string()))?;
    let codec = get("kv_codec")?.parse::<KvCodec>().map_err(|e| bad(e.to_string()))?;
    let size = |key: &str| -> Result<usize, CacheError> {
        usize::try_from(num(key)?).map_err(|_| bad(format!("metadata {key:?} is too large")))
    };
    let dims = KvDims { n_layers: size("n_layers")?, n_kv_heads: size("n_kv_heads")?, head_dim: size("head_dim")? };
    if dims.n_layers == 0 || dims.n_kv_heads == 0 || dims.head_dim == 0 {
        return Err(bad(format!("empty dimensions {dims:?}")));
    }
    if !codec.supports_head_dim(dims.head_dim) {
        return Err(bad(format!("{codec} cannot store head_dim {}", dims.head_dim)));
    }
    let checksum = get("checksum")?
        .strip_prefix(CHECKSUM_PREFIX)
        .filter(|h| h.len() == 16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad("checksum is not xxh64:<16 hex>".into()))?;
    Ok(CacheHeader {
        path: path.to_owned(),
        agent,
        fingerprint,
        codec,
        dims,
        n_tokens: size("n_tokens")?,
        checksum,
        created_at: num("created_at")?,
        updated_at: num("updated_at")?,
        bytes: 0,
        mtime: SystemTime::UNIX_EPOCH,
        data_offset: 0,
    })
}

#[derive(serde::Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The tensor table must be exactly the planned one, and the file exactly
/// header + data long.
fn check_tensors(path: &Path, h: &CacheHeader, mut map: BTreeMap<String, Value>) -> Result<(), CacheError> {
    let bad = |reason: String| CacheError::corrupt(path, reason);
    map.remove("__metadata__");
    let per_layer = if h.codec.has_scales() { 4 } else { 2 };
    let expected = h.dims.n_layers.checked_mul(per_layer).and_then(|n| n.checked_add(1));
    if expected != Some(map.len()) {
        return Err(bad(format!("{} tensors for {} layers", map.len(), h.dims.n_layers)));
    }
    let plan = plan(h.codec, &h.dims, h.n_tokens).ok_or_else(|| bad("sizes overflow".into()))?;
    for spec in &plan.tensors {
        let value = map.remove(&spec.name).ok_or_else(|| bad(format!("tensor {} missing", spec.name)))?;
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| bad(format!("tensor {}: {e}", spec.name)))?;
        let shape_ok =
            info.shape.len() == spec.shape.len() && info.shape.iter().zip(&spec.shape).all(|(&a, &b)| a == b as u64);
        if info.dtype != spec.dtype || !shape_ok || info.data_offsets != [spec.start, spec.end] {
            return Err(bad(format!(
                "tensor {} is {} {:?} at {:?}, expected {} {:?} at {:?}",
                spec.name,
                info.dtype,
                info.shape,
                info.data_offsets,
                spec.dtype,
                spec.shape,
                [spec.start, spec.end]
            )));
        }
    }
    let want = h.data_offset + plan.data_len;
    if h.bytes != want {
        let what = if h.bytes < want { "truncated" } else { "trailing bytes" };
        return Err(bad(format!("{what}: file has {} bytes, header describes {want}", h.bytes)));
    }
    Ok(())
}

/// A file named `<x>.safetensors` must hold agent `x` (a renamed or copied
/// file is not trusted).
fn check_file_name(path: &Path, agent: &AgentId) -> Result<(), CacheError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name.strip_suffix(CACHE_SUFFIX) {
        Some(stem) if stem != agent.as_str() => {
            Err(CacheError::corrupt(path, format!("file is named for agent {stem:?} but holds agent {agent:?}")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_told_apart_from_agents_that_look_alike() {
        assert_eq!(temp_file_pid("a.safetensors.tmp.123.4"), Some(123));
        assert_eq!(temp_file_pid("x.tmp.5.safetensors.tmp.7.0"), Some(7));
        for not_temp in [
            "x.tmp.5.safetensors",
            "a.safetensors.tmp.1.safetensors",
            "a.safetensors.tmp.x.4",
            "a.safetensors.tmp.1.",
            ".safetensors.tmp.1.2",
            "a.tmp.1.2",
            "notes.txt",
        ] {
            assert_eq!(temp_file_pid(not_temp), None, "{not_temp}");
        }
    }

    #[test]
    fn plans_are_contiguous_and_aligned() {
        let dims = KvDims { n_layers: 3, n_kv_heads: 2, head_dim: 6 };
        for codec in KvCodec::ALL {
            for n in [0, 1, 5, 33] {
                let p = plan(codec, &dims, n).unwrap();
                let mut at = 0;
                for t in &p.tensors {
                    assert_eq!(t.start, at, "{codec} {}", t.name);
                    let elem = match t.dtype {
                        "U32" => 4,
                        "F16" => 2,
                        _ => 1,
                    };
                    assert_eq!(t.start % elem, 0, "{} aligned", t.name);
                    at = t.end;
                }
                assert_eq!(p.data_len, at);
                let per_layer = if codec.has_scales() { 4 } else { 2 };
                assert_eq!(p.tensors.len(), 1 + 3 * per_layer);
            }
        }
        let huge = KvDims { n_layers: 1, n_kv_heads: usize::MAX / 2, head_dim: 64 };
        assert!(plan(KvCodec::F16, &huge, usize::MAX / 4).is_none());
    }
}
