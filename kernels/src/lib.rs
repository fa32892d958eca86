//! The Gemma 4 engine's numeric kernels: the NVFP4 weight format, attention, and the
//! [`Gemma4Backend`] operations through which the model reaches them. Each fast kernel
//! (CubeCL, for wgpu and CUDA) lives beside its plain Burn reference and is tested against it.

pub mod attention;
pub mod backend;
pub mod cpu_dense;
pub mod device;
pub mod fallback;
pub mod fused;
pub mod nvfp4;
pub mod pool;
pub mod simd;
pub mod topk;

#[doc(hidden)]
pub mod testing;

pub use backend::Gemma4Backend;
