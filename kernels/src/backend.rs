//! The operations the model asks of its backend, beyond Burn's: each has a plain-tensor-ops
//! default (the reference), and the backends with fast kernels override it. The model is
//! generic over `B: Gemma4Backend`, so one model serves the CPU reference, wgpu and CUDA.

use burn::backend::NdArray;
use burn::prelude::*;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};

use crate::attention::{self, flash, reference, AttentionParams};
use crate::cpu_dense;
use crate::fused::{cpu as fused_cpu, cube as fused, reference as fused_ref};
use crate::nvfp4::{cpu as nvfp4_cpu, Nvfp4Weight};
use crate::{nvfp4_gemm, nvfp4_gemv};

pub trait Gemma4Backend: Backend {
    /// y = x · Wᵀ for a packed NVFP4 weight; x `[n, in]` -> `[n, out]`.
    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        w.forward_reference(x)
    }

    /// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]` (see [`crate::attention`]).
    fn attention(q: Tensor<Self, 3>, k: Tensor<Self, 3>, v: Tensor<Self, 3>, params: &AttentionParams) -> Tensor<Self, 2> {
        reference::attention(q, k, v, params)
    }

    /// x · w for an unquantized weight stored transposed, `[in, out]`; x `[n, in]` -> `[n, out]`.
    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// RMSNorm over the last dimension of x `[rows, dim]` (see [`crate::fused`]).
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        fused_ref::rms_norm(x, weight, eps)
    }

    /// `(residual + rms_norm(x) · weight) · scale` (see [`crate::fused`]).
    fn rms_norm_add(residual: Tensor<Self, 2>, x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64, scale: f32) -> Tensor<Self, 2> {
        fused_ref::rms_norm_add(residual, x, weight, eps, scale)
    }

    /// Per-head RMSNorm then rotate-half RoPE: x `[t, heads, d]`, cos/sin `[t, d]`.
    fn rms_norm_rope(x: Tensor<Self, 3>, weight: Option<Tensor<Self, 1>>, eps: f64, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 3> {
        fused_ref::rms_norm_rope(x, weight, eps, cos, sin)
    }

    /// `gelu_tanh(gate) · up`, both `[rows, width]`.
    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused_ref::gelu_tanh_mul(gate, up)
    }
}

/// The CPU backend: the NVFP4 matmul of [`crate::nvfp4::cpu`] and the dense matmul of
/// [`crate::cpu_dense`] on the tensors' own buffers (no copy of a weight; x is copied only when it
/// is not contiguous); the reference elsewhere.
impl Gemma4Backend for NdArray<f32, i32> {
    fn dense_linear(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        use burn::backend::ndarray::NdArrayTensor;
        use burn::tensor::{TensorData, TensorPrimitive};

        let ([m, inp], [w_in, out]) = (x.dims(), w.dims());
        assert_eq!(inp, w_in, "dense_linear: x has {inp} features, the weight {w_in}");
        let device = x.device();
        let (TensorPrimitive::Float(NdArrayTensor::F32(xs)), TensorPrimitive::Float(NdArrayTensor::F32(ws))) =
            (x.clone().into_primitive(), w.clone().into_primitive())
        else {
            return x.matmul(w);
        };
        let (xv, wv) = (xs.view(), ws.view());
        // The loader's weights are contiguous [in, out]; any other layout takes Burn's matmul.
        let Some(wd) = wv.as_slice() else {
            return x.matmul(w);
        };
        let xd = contiguous(xv.as_slice(), || xv.iter().copied().collect());
        let mut y = vec![0f32; m * out];
        cpu_dense::dense_matmul(&xd, m, wd, inp, out, &mut y);
        Tensor::from_data(TensorData::new(y, [m, out]), &device)
    }

    fn attention(q: Tensor<Self, 3>, k: Tensor<Self, 3>, v: Tensor<Self, 3>, params: &AttentionParams) -> Tensor<Self, 2> {
        let ([t, heads, d], [kv_heads, s, dk]) = (q.dims(), k.dims());
        if dk != d || v.dims() != k.dims() || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return reference::attention(q, k, v, params);
        }
        let mut out = vec![0f32; t * heads * d];
        with_host(&q, |qs| with_host(&k, |ks| with_host(&v, |vs| attention::cpu::attention(qs, ks, vs, t, heads, kv_heads, s, d, params, &mut out))));
        Tensor::from_data(TensorData::new(out, [t, heads * d]), &q.device())
    }

    // The fused steps as single passes over the rows (see `fused::cpu`).
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        let [rows, dim] = x.dims();
        if rows * dim == 0 {
            return fused_ref::rms_norm(x, weight, eps);
        }
        let mut out = vec![0f32; rows * dim];
        with_host(&x, |xs| with_host_opt(weight.as_ref(), |ws| fused_cpu::rms_norm(xs, dim, ws, eps, None, &mut out)));
        Tensor::from_data(TensorData::new(out, [rows, dim]), &x.device())
    }

    fn rms_norm_add(residual: Tensor<Self, 2>, x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64, scale: f32) -> Tensor<Self, 2> {
        let [rows, dim] = x.dims();
        if rows * dim == 0 || residual.dims() != x.dims() {
            return fused_ref::rms_norm_add(residual, x, weight, eps, scale);
        }
        let mut out = vec![0f32; rows * dim];
        with_host(&x, |xs| with_host(&weight, |ws| with_host(&residual, |hs| fused_cpu::rms_norm(xs, dim, Some(ws), eps, Some((hs, scale)), &mut out))));
        Tensor::from_data(TensorData::new(out, [rows, dim]), &x.device())
    }

    fn rms_norm_rope(x: Tensor<Self, 3>, weight: Option<Tensor<Self, 1>>, eps: f64, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 3> {
        let [t, heads, d] = x.dims();
        if t * heads * d == 0 || d % 2 != 0 || cos.dims() != [t, d] || sin.dims() != [t, d] {
            return fused_ref::rms_norm_rope(x, weight, eps, cos, sin);
        }
        let mut out = vec![0f32; t * heads * d];
        with_host(&x, |xs| {
            with_host(&cos, |cs| with_host(&sin, |ss| with_host_opt(weight.as_ref(), |ws| fused_cpu::rms_norm_rope(xs, heads, d, ws, eps, cs, ss, &mut out))))
        });
        Tensor::from_data(TensorData::new(out, [t, heads, d]), &x.device())
    }

    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let dims = gate.dims();
        if up.dims() != dims {
            return fused_ref::gelu_tanh_mul(gate, up);
        }
        let mut out = vec![0f32; dims[0] * dims[1]];
        with_host(&gate, |gs| with_host(&up, |us| fused_cpu::gelu_tanh_mul(gs, us, &mut out)));
        Tensor::from_data(TensorData::new(out, dims), &gate.device())
    }

    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        use burn::backend::ndarray::NdArrayTensor;
        use burn::tensor::{TensorData, TensorPrimitive};

        let [m, inp] = x.dims();
        assert_eq!(inp, w.in_features, "nvfp4_linear: x has {inp} features, the weight {}", w.in_features);
        let device = x.device();
        // Cloning a tensor clones an Arc; the views below borrow the shared buffers.
        let (TensorPrimitive::Float(NdArrayTensor::F32(xs)), NdArrayTensor::I32(cs), NdArrayTensor::I32(ss)) =
            (x.clone().into_primitive(), w.codes.clone().into_primitive(), w.scales.clone().into_primitive())
        else {
            return w.forward_reference(x);
        };
        let (xv, cv, sv) = (xs.view(), cs.view(), ss.view());
        let (Some(codes), Some(scales)) = (cv.as_slice(), sv.as_slice()) else {
            // Weights the loader built are contiguous; anything else takes the reference path.
            return w.forward_reference(x);
        };
        let xd = contiguous(xv.as_slice(), || xv.iter().copied().collect());
        let mut y = vec![0f32; m * w.out_features];
        nvfp4_cpu::nvfp4_matmul(&xd, m, codes, scales, w.global_scale, w.out_features, w.in_features, &mut y);
        Tensor::from_data(TensorData::new(y, [m, w.out_features]), &device)
    }
}

/// [`with_host`] for an optional tensor (a norm's weight).
fn with_host_opt<const D: usize, R>(t: Option<&Tensor<NdArray<f32, i32>, D>>, f: impl FnOnce(Option<&[f32]>) -> R) -> R {
    match t {
        Some(t) => with_host(t, |s| f(Some(s))),
        None => f(None),
    }
}

/// Runs `f` on an ndarray tensor's f32 elements in row-major order: its own buffer when it is
/// contiguous, else a copy.
fn with_host<const D: usize, R>(t: &Tensor<NdArray<f32, i32>, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    use burn::backend::ndarray::NdArrayTensor;
    use burn::tensor::TensorPrimitive;
    match t.clone().into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(a)) => {
            let v = a.view();
            f(&contiguous(v.as_slice(), || v.iter().copied().collect()))
        }
        _ => f(&t.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()),
    }
}

/// An ndarray view's elements in row-major order: its slice when it is contiguous, else a copy.
fn contiguous<'a>(slice: Option<&'a [f32]>, copy: impl FnOnce() -> Vec<f32>) -> std::borrow::Cow<'a, [f32]> {
    match slice {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(copy()),
    }
}

/// wgpu and CUDA: the CubeCL kernels where their limits allow, the reference elsewhere.
impl<R: CubeRuntime, BT: BoolElement> Gemma4Backend for CubeBackend<R, f32, i32, BT> {
    fn nvfp4_linear(x: Tensor<Self, 2>, w: &Nvfp4Weight<Self>) -> Tensor<Self, 2> {
        // Decode rows: the GEMV (codes decoded in registers); prefill: the tiled GEMM (weight
        // tiles decoded into shared memory). Both read the loader's packed words as they are.
        let m = x.dims()[0];
        let (codes, scales) = (w.codes.clone(), w.scales.clone());
        if m <= nvfp4_gemv::MAX_M {
            nvfp4_gemv::nvfp4_matmul(x, codes, scales, w.global_scale, w.out_features, w.in_features)
                .unwrap_or_else(|e| panic!("NVFP4 GEMV on a loader-checked weight: {e}"))
        } else {
            nvfp4_gemm::nvfp4_gemm(x.clone(), codes, scales, w.global_scale, w.out_features, w.in_features)
                .unwrap_or_else(|_| w.forward_reference(x))
        }
    }

    fn attention(q: Tensor<Self, 3>, k: Tensor<Self, 3>, v: Tensor<Self, 3>, params: &AttentionParams) -> Tensor<Self, 2> {
        // Every refusal (shape or limit outside the kernel's) happens before a launch.
        flash::fused_attention(q.clone(), k.clone(), v.clone(), params).unwrap_or_else(|_| reference::attention(q, k, v, params))
    }

    // The fused steps: one kernel each instead of a chain of element-wise launches.
    fn rms_norm(x: Tensor<Self, 2>, weight: Option<Tensor<Self, 1>>, eps: f64) -> Tensor<Self, 2> {
        fused::rms_norm(x.clone(), weight.clone(), eps, None).unwrap_or_else(|_| fused_ref::rms_norm(x, weight, eps))
    }

    fn rms_norm_add(residual: Tensor<Self, 2>, x: Tensor<Self, 2>, weight: Tensor<Self, 1>, eps: f64, scale: f32) -> Tensor<Self, 2> {
        fused::rms_norm_add(residual.clone(), x.clone(), weight.clone(), eps, scale, None)
            .unwrap_or_else(|_| fused_ref::rms_norm_add(residual, x, weight, eps, scale))
    }

    fn rms_norm_rope(x: Tensor<Self, 3>, weight: Option<Tensor<Self, 1>>, eps: f64, cos: Tensor<Self, 2>, sin: Tensor<Self, 2>) -> Tensor<Self, 3> {
        fused::rms_norm_rope(x.clone(), weight.clone(), eps, cos.clone(), sin.clone(), None)
            .unwrap_or_else(|_| fused_ref::rms_norm_rope(x, weight, eps, cos, sin))
    }

    fn gelu_tanh_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        fused::gelu_tanh_mul(gate.clone(), up.clone(), None).unwrap_or_else(|_| fused_ref::gelu_tanh_mul(gate, up))
    }
}
