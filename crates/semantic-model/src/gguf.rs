//! GGUF files: metadata (parsed by candle) and raw tensor bytes (memory-mapped).
//!
//! candle parses the header; the tensor data of the formats we run natively
//! (Q4_0, Q4_1, Q8_0, F32) is read straight from the mapping, and candle loads
//! every other format as a `QTensor`.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{ModelError, Result};

pub struct GgufFile {
    path: PathBuf,
    content: Content,
    map: memmap2::Mmap,
}

impl GgufFile {
    /// Opens and parses the header. A missing file, a file without the GGUF
    /// magic or a malformed header is an error that names the path.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |err| ModelError::Io { path: path.to_owned(), err };
        let mut file = File::open(path).map_err(io)?;
        let mut magic = [0u8; 4];
        let n = file.read(&mut magic).map_err(io)?;
        if n < 4 || &magic != b"GGUF" {
            return Err(ModelError::NotGguf { path: path.to_owned(), reason: "missing GGUF magic".into() });
        }
        file.rewind().map_err(io)?;
        let content = Content::read(&mut BufReader::new(&file))
            .map_err(|e| ModelError::NotGguf { path: path.to_owned(), reason: e.to_string() })?;
        // SAFETY: the file is opened read-only; we never write through the map.
        // A concurrent truncation by another process is outside our control,
        // as with every mmap-based loader (llama.cpp, candle).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(Self { path: path.to_owned(), content, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_u32(&self, key: &str) -> Result<u32> {
        let v = self.meta(key).ok_or_else(|| missing(key))?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| bad(key, e))
    }

    pub fn meta_f32(&self, key: &str) -> Result<f32> {
        let v = self.meta(key).ok_or_else(|| missing(key))?;
        v.to_f32().or_else(|_| v.to_f64().map(|x| x as f32)).map_err(|e| bad(key, e))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        let v = self.meta(key).ok_or_else(|| missing(key))?;
        v.to_string().map(|s| s.as_str()).map_err(|e| bad(key, e))
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::Tensor { name: name.into(), reason: "missing from the GGUF file".into() })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The raw bytes of a tensor, straight from the mapping.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name)?;
        let n = info.shape.elem_count();
        let dt = info.ggml_dtype;
        let len = n / dt.block_size() * dt.type_size();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        self.map.get(start..start + len).ok_or_else(|| ModelError::Tensor {
            name: name.into(),
            reason: format!("data {start}..{} lies past the end of the file", start + len),
        })
    }

    /// A tensor loaded by candle (formats without a native kernel).
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let mut reader = std::io::Cursor::new(&self.map[..]);
        self.content
            .tensor(&mut reader, name, &candle_core::Device::Cpu)
            .map_err(|e| ModelError::Tensor { name: name.into(), reason: e.to_string() })
    }

    /// An F32 (or F16, dequantized) vector such as a norm weight.
    pub fn f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor_info(name)?;
        if info.ggml_dtype == GgmlDType::F32 {
            let bytes = self.tensor_bytes(name)?;
            return Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
        }
        let t = self.qtensor(name)?.dequantize(&candle_core::Device::Cpu);
        t.and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| ModelError::Tensor { name: name.into(), reason: e.to_string() })
    }
}

fn missing(key: &str) -> ModelError {
    ModelError::Metadata { key: key.into(), reason: "missing".into() }
}

fn bad(key: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Metadata { key: key.into(), reason: e.to_string() }
}

/// Model hyper-parameters from `{arch}.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub n_layers: usize,
    pub dim: usize,
    pub ff_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub rope_base: f32,
    /// NeoX-style rotation (qwen2) instead of interleaved pairs (llama).
    pub rope_neox: bool,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

pub const SUPPORTED_ARCHS: [&str; 4] = ["llama", "mistral", "qwen2", "smollm"];

impl ModelConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.meta_str("general.architecture")?.to_owned();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let u = |s: &str| g.meta_u32(&k(s)).map(|v| v as usize);
        let n_heads = u("attention.head_count")?;
        let dim = u("embedding_length")?;
        let head_dim = u("attention.key_length").unwrap_or(dim / n_heads.max(1));
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(ModelError::Metadata {
                key: k("attention.head_count_kv"),
                reason: format!("{n_heads} heads do not split into {n_kv_heads} kv heads"),
            });
        }
        let vocab_size = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.tensor_info("token_embd.weight")?.shape.dims()[0],
        };
        Ok(Self {
            n_layers: u("block_count")?,
            dim,
            ff_dim: u("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            n_rot: u("rope.dimension_count").unwrap_or(head_dim),
            rope_base: g.meta_f32(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_neox: arch == "qwen2",
            rms_eps: g.meta_f32(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            context_length: u("context_length").unwrap_or(4096),
            vocab_size,
            arch,
        })
    }
}
