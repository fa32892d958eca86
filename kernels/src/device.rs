//! What a CubeCL device can compute, asked before a backend of that float type is chosen (a
//! half-precision backend on a device without it would fail on its first kernel).

use burn_cubecl::CubeRuntime;
use cubecl::ir::{ElemType, FloatKind};

/// Whether the device computes in f16 (wgpu: the adapter's `SHADER_F16`; Mesa's lavapipe has it).
pub fn supports_f16<R: CubeRuntime>(device: &R::Device) -> bool {
    R::client(device)
        .properties()
        .supports_type(ElemType::Float(FloatKind::F16))
}

/// Whether the device computes in bf16 (CUDA does; WGSL has no bf16).
pub fn supports_bf16<R: CubeRuntime>(device: &R::Device) -> bool {
    R::client(device)
        .properties()
        .supports_type(ElemType::Float(FloatKind::BF16))
}
