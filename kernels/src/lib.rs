//! CubeCL kernels for the Gemma 4 NVFP4 engine.

pub mod nvfp4_gemv;
