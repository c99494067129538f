//! CPU kernels: batched quantized matmul, paged attention, norms, RoPE, SwiGLU.
//!
//! Every SIMD kernel has a scalar reference beside it and a test that checks
//! one against the other. The SIMD paths are chosen at run time
//! ([`simd_available`]), so a portable build still uses AVX2/FMA/F16C.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod team;
pub mod vmath;

/// True when the AVX2 + FMA + F16C paths can run on this CPU.
#[inline]
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw pointer that may cross into team tasks. Each task writes a disjoint
/// part of the buffer; the caller states that in a `SAFETY` comment.
pub(crate) struct SendPtr<T>(pub *mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Method access makes closures capture the whole (Send) wrapper.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
