//! Linear layers: our quantized kernels where the format has one, candle's
//! `QMatMul` for every other format GGUF can hold (K-quants, F16, ...).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kernels::matmul::{qmatmul, QMatrix};
use crate::kernels::quant::{BlockQ8A, QType};

pub enum Linear {
    /// Native kernel (Q4_0, Q4_1, Q8_0).
    Quant(Arc<QMatrix>),
    /// candle fallback with its output width.
    Candle(QMatMul, usize),
    /// Parts computed one after the other, their outputs side by side.
    Stack(Vec<Linear>),
}

pub(crate) fn native_type(dt: GgmlDType) -> Option<QType> {
    match dt {
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4_1 => Some(QType::Q4_1),
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        _ => None,
    }
}

fn tensor_err(name: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tensor { name: name.into(), reason: e.to_string() }
}

/// Loads a weight `[rows, cols]` as a native matrix when its format allows.
pub(crate) fn load_qmatrix(g: &GgufFile, name: &str) -> Result<Option<QMatrix>> {
    let info = g.tensor_info(name)?;
    let Some(ty) = native_type(info.ggml_dtype) else {
        return Ok(None);
    };
    let dims = info.shape.dims();
    let (rows, cols) = match dims {
        [r, c] => (*r, *c),
        _ => return Err(tensor_err(name, format!("expected 2 dims, got {dims:?}"))),
    };
    let bytes = g.tensor_bytes(name)?.to_vec();
    QMatrix::new(ty, rows, cols, bytes).map(Some).map_err(|e| tensor_err(name, e))
}

impl Linear {
    pub fn load(g: &GgufFile, name: &str) -> Result<Self> {
        if let Some(m) = load_qmatrix(g, name)? {
            return Ok(Linear::Quant(Arc::new(m)));
        }
        let rows = g.tensor_info(name)?.shape.dims()[0];
        let qt = g.qtensor(name)?;
        let mm = QMatMul::from_qtensor(qt).map_err(|e| tensor_err(name, e))?;
        Ok(Linear::Candle(mm, rows))
    }

    /// Several weights that read the same input (Q, K, V; gate, up), fused
    /// into one matrix when they share a native format.
    pub fn load_fused(g: &GgufFile, names: &[&str]) -> Result<Self> {
        let natives: Vec<Option<QMatrix>> = names.iter().map(|n| load_qmatrix(g, n)).collect::<Result<_>>()?;
        if natives.iter().all(Option::is_some) {
            let parts: Vec<QMatrix> = natives.into_iter().flatten().collect();
            if let Some(m) = QMatrix::concat(&parts) {
                return Ok(Linear::Quant(Arc::new(m)));
            }
        }
        let parts = names.iter().map(|n| Linear::load(g, n)).collect::<Result<_>>()?;
        Ok(Linear::Stack(parts))
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Quant(m) => m.rows(),
            Linear::Candle(_, rows) => *rows,
            Linear::Stack(parts) => parts.iter().map(Linear::out_features).sum(),
        }
    }

    /// Weight bytes held in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Quant(m) => m.bytes(),
            Linear::Candle(..) => 0,
            Linear::Stack(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// `out[n, out_features] = x[n, in] W^T`; `xq` is `x` quantized (the caller
    /// quantizes once for all layers that read the same input).
    pub fn forward(&self, x: &[f32], xq: &[BlockQ8A], n: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Linear::Quant(m) => qmatmul(m, xq, out),
            Linear::Candle(mm, rows) => {
                let cols = x.len() / n.max(1);
                let t = Tensor::from_slice(x, (n, cols), &Device::Cpu)
                    .and_then(|t| mm.forward(&t))
                    .and_then(|y| y.flatten_all()?.to_vec1::<f32>())
                    .map_err(|e| tensor_err("candle matmul", e))?;
                debug_assert_eq!(t.len(), n * rows);
                out.copy_from_slice(&t);
            }
            Linear::Stack(parts) => {
                let total = self.out_features();
                let mut col = 0;
                for p in parts {
                    let w = p.out_features();
                    let mut tmp = vec![0f32; n * w];
                    p.forward(x, xq, n, &mut tmp)?;
                    for (dst, src) in out.chunks_exact_mut(total).zip(tmp.chunks_exact(w)) {
                        dst[col..col + w].copy_from_slice(src);
                    }
                    col += w;
                }
            }
        }
        Ok(())
    }

    pub fn needs_quantized_input(&self) -> bool {
        match self {
            Linear::Quant(_) => true,
            Linear::Candle(..) => false,
            Linear::Stack(parts) => parts.iter().any(Linear::needs_quantized_input),
        }
    }
}
