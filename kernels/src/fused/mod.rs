//! The element-wise and row-wise steps around the matmuls, fused so that each reads its inputs
//! once and writes its output once (the plain Burn versions in [`reference`] launch several
//! kernels, each a round trip through memory):
//! - `rms_norm`: RMSNorm over the last dimension, with or without a weight;
//! - `rms_norm_add`: the sandwich norm and its residual add, `(residual + rms_norm(x)·w)·scale`
//!   (`scale` carries `layer_scalar` after the feed-forward block, 1 after attention);
//! - `rms_norm_rope`: the q/k norm per head followed by rotate-half RoPE;
//! - `gelu_tanh_mul`: the MLP gate, `gelu_tanh(gate)·up`.
//!
//! [`Gemma4Backend`](crate::Gemma4Backend) exposes each with the reference as its default;
//! [`cube`] holds the CubeCL kernels (wgpu, CUDA), [`cpu`] the loops of the ndarray backend.

pub mod cpu;
pub mod cube;
pub mod reference;
