//! The operations the model asks of its backend, beyond Burn's: each has a plain-tensor-ops
//! default (the reference), and the backends with fast kernels override it. The model is
//! generic over `B: Gemma4Backend`, so one model serves the CPU reference, wgpu and CUDA.

use burn::backend::NdArray;
use burn::prelude::*;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};

use crate::attention::{reference, AttentionParams};
use crate::nvfp4::Nvfp4Weight;
use crate::nvfp4_gemv;

pub trait Gemma4Backend: Backend {
    /// y = x · Wᵀ for a packed NVFP4 weight; x `[n, in]` -> `[n, out]`.
    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        w.forward_reference(x)
    }

    /// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]` (see [`crate::attention`]).
    fn attention(q: Tensor<Self, 3>, k: Tensor<Self, 3>, v: Tensor<Self, 3>, params: &AttentionParams) -> Tensor<Self, 2> {
        reference::attention(q, k, v, params)
    }
}

/// The CPU reference backend.
impl Gemma4Backend for NdArray<f32, i32> {}

/// wgpu and CUDA: the CubeCL kernels where their limits allow, the reference elsewhere.
impl<R: CubeRuntime, BT: BoolElement> Gemma4Backend for CubeBackend<R, f32, i32, BT> {
    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        let m = x.dims()[0];
        if m > nvfp4_gemv::MAX_M {
            return w.forward_reference(x);
        }
        nvfp4_gemv::nvfp4_matmul(x, w.codes.clone(), w.scales.clone(), w.global_scale, w.out_features, w.in_features)
            .unwrap_or_else(|e| panic!("NVFP4 GEMV on a loader-checked weight: {e}"))
    }
}
