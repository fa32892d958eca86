//! The fused steps of [`super`] in CubeCL, for any CubeCL runtime (wgpu now, CUDA later) and any
//! float element `F` of the backend (f32, f16, bf16): inputs and output are `F`, every value is
//! widened to f32 on load (the norm's sum of squares, the scaling, the rotation and the gelu math
//! run in f32) and the result is rounded to `F` once on store.
//! Semantics are those of [`super::reference`]; every entry point checks dtypes, shapes and
//! limits first and returns a [`FusedError`] without launching anything (the backend's
//! [`crate::fallback`] policy decides what a refusal does: panic, or the reference).
//!
//! # Kernels
//! - `rms_norm_rows_kernel` serves [`rms_norm`] and [`rms_norm_add`]: `out = x · r · w` or
//!   `out = (residual + x · r · w) · scale`, with `r = (Σx²/dim + eps)^-½` per row. A cube of
//!   `NT` = 256 threads handles `256 / tpr` rows, `tpr` (threads per row) the smallest power of
//!   two ≥ the row's vector count, at most 256: hidden rows (5376) get a whole cube, q/k head rows
//!   (256) share one four to a cube, rows of 1..8 floats go 32..256 to a cube. Thread `lane` of a
//!   row reads vectors `lane, lane + tpr, …` twice: once for Σx², once to write the output (the
//!   second read hits the cache; a 21 504-float row does not fit in shared memory).
//! - `rms_norm_rope_kernel` serves [`rms_norm_rope`]: per (token, head) row the same norm, then
//!   rotate-half RoPE. A thread owns the *pairs* (i, i + d/2), so the rotation needs no exchange
//!   between threads: out[i] = n[i]·cos[i] − n[i+d/2]·sin[i], out[i+d/2] = n[i+d/2]·cos[i+d/2] +
//!   n[i]·sin[i+d/2]. `tpr` is chosen as above over the d/2 pair vectors.
//! - `gelu_tanh_mul_kernel` serves [`gelu_tanh_mul`]: element-wise, one vector per thread,
//!   `NT` threads per cube. gelu_tanh(x) = 0.5·x·(1 + tanh(z)) = x / (1 + e^(−2z)) with
//!   z = √(2/π)·(x + 0.044715·x³); the exponent is clamped at 88 (e^88 < f32::MAX), so no
//!   inf/inf or 0·inf appears for any finite x (±1e4 included): large positive x gives x, large
//!   negative x gives a vanishing x/e^88 (only x = −∞ differs: −∞ here, NaN in the reference).
//!
//! # Launch shape and memory
//! Cubes are numbered `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X` on a 2-D grid of at most 65 535
//! per axis (the WebGPU / Vulkan minimum guarantee); surplus cubes and threads of the last cube
//! load and write nothing. The row kernels use one shared `[256]` f32 buffer (1 KiB) for a tree
//! reduction of the per-thread partial sums within each row's segment of `tpr` slots (portable:
//! no plane/subgroup operations). Accumulation is f32. Vectors of 4 elements are used when every
//! row (for RoPE: every half row) is a multiple of 4 and the device loads 4 elements at once,
//! else single elements.
//!
//! Inputs may be any strided views: they are made contiguous first (a copy only when they are
//! not). Each entry point takes an optional `out` tensor of the result's shape and writes into it
//! when it is exclusively owned and contiguous (the tests poison it with NaN first), else into a
//! new tensor.
//!
//! # lavapipe
//! Mesa's lavapipe caps an invocation at 65 535 loop iterations in total; a thread here runs at
//! most 2 · ⌈dim / (vector · 256)⌉ + 8 loop iterations (176 for a 21 504-float row read as single
//! floats), far below the cap for any row the model has.

use burn::tensor::{DType, Element, Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_dtype, tensor::CubeTensor, BoolElement,
    CubeBackend, CubeRuntime, FloatElement,
};
use cubecl::prelude::*;

/// The backend of the kernels: any CubeCL runtime with float element `F` and i32 ints.
pub type FusedBackend<R, F = f32, BT = u32> = CubeBackend<R, F, i32, BT>;

/// Threads per cube of every kernel here.
const NT: usize = 256;
/// Largest cube count along one grid axis (the WebGPU / Vulkan minimum guarantee).
const MAX_GRID_AXIS: usize = 65_535;
/// Largest element count of any tensor (indices are 32-bit; half the range keeps every sum of
/// an index and a row length below 2^32).
const MAX_ELEMENTS: usize = i32::MAX as usize;
/// Widest vector the kernels use (4 elements: 16-byte loads in f32, 8-byte in f16).
const VECTOR: usize = 4;
/// √(2/π), as burn's `gelu_approximate` forms it.
const SQRT_2_OVER_PI: f64 = core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2;

/// Why a fused kernel did not run (see [`crate::fallback`] for what the backend does then).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FusedError {
    #[error("{what} has dtype {got:?}, expected the backend's float element {expected:?}")]
    Dtype {
        what: &'static str,
        got: DType,
        expected: DType,
    },
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    Shape {
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("empty input: {what} has shape {shape:?}")]
    Empty {
        what: &'static str,
        shape: Vec<usize>,
    },
    #[error("head_dim {d} must be even for rotate-half RoPE")]
    OddHeadDim { d: usize },
    #[error("{what} is on another device than x")]
    Device { what: &'static str },
    #[error("{what} = {value} exceeds the kernel's limit {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
}

/// Threads per row: the smallest power of two ≥ `units` (vectors a thread walks), at most [`NT`].
fn threads_per_row(units: usize) -> usize {
    units.next_power_of_two().min(NT)
}

/// A 2-D grid of `cubes` cubes, at most [`MAX_GRID_AXIS`] per axis.
fn grid(cubes: usize) -> Result<CubeCount, FusedError> {
    let limit = MAX_GRID_AXIS * MAX_GRID_AXIS;
    if cubes > limit {
        return Err(FusedError::TooLarge {
            what: "cubes",
            value: cubes,
            limit,
        });
    }
    let x = cubes.clamp(1, MAX_GRID_AXIS);
    Ok(CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1))
}

/// 4 when `len` is a multiple of 4 and the device loads 4 elements of `F` at once, else 1.
fn vector_size<R: CubeRuntime, F: FloatElement>(client: &ComputeClient<R>, len: usize) -> usize {
    let widest = client
        .io_optimized_vector_sizes(size_of::<F>())
        .max()
        .unwrap_or(1);
    if widest >= VECTOR && len.is_multiple_of(VECTOR) {
        VECTOR
    } else {
        1
    }
}

/// `dims` must equal `expected`.
fn expect_shape(what: &'static str, dims: &[usize], expected: &[usize]) -> Result<(), FusedError> {
    if dims != expected {
        return Err(FusedError::Shape {
            what,
            expected: expected.to_vec(),
            got: dims.to_vec(),
        });
    }
    Ok(())
}

/// Every count must fit the kernels' 32-bit indices.
fn check_sizes(counts: &[(&'static str, usize)]) -> Result<(), FusedError> {
    for &(what, value) in counts {
        if value > MAX_ELEMENTS {
            return Err(FusedError::TooLarge {
                what,
                value,
                limit: MAX_ELEMENTS,
            });
        }
    }
    Ok(())
}

/// The primitive of a float tensor, refused unless of the backend's element `F`.
fn float_primitive<R: CubeRuntime, F: FloatElement, BT: BoolElement, const D: usize>(
    what: &'static str,
    t: BurnTensor<FusedBackend<R, F, BT>, D>,
) -> Result<CubeTensor<R>, FusedError> {
    let t = t.into_primitive().tensor();
    let expected = <F as Element>::dtype();
    if t.dtype != expected {
        return Err(FusedError::Dtype {
            what,
            got: t.dtype,
            expected,
        });
    }
    Ok(t)
}

/// Refuses `t` unless it lives on `like`'s device.
fn same_device<R: CubeRuntime>(
    what: &'static str,
    t: &CubeTensor<R>,
    like: &CubeTensor<R>,
) -> Result<(), FusedError> {
    if t.device != like.device {
        return Err(FusedError::Device { what });
    }
    Ok(())
}

/// The output primitive: `out` when given (`F`, shape `dims`, on x's device) and writable in
/// place, else a new tensor. Only checks here; allocation happens after every refusal.
fn check_out<R: CubeRuntime, F: FloatElement, BT: BoolElement, const D: usize>(
    out: Option<BurnTensor<FusedBackend<R, F, BT>, D>>,
    dims: [usize; D],
    x: &CubeTensor<R>,
) -> Result<Option<CubeTensor<R>>, FusedError> {
    let Some(o) = out else { return Ok(None) };
    expect_shape("out", &o.dims(), &dims)?;
    let o = float_primitive("out", o)?;
    same_device("out", &o, x)?;
    Ok(if o.can_mut() && o.is_contiguous() {
        Some(o)
    } else {
        None
    })
}

/// `out`, or a new tensor of x's dtype and the given shape.
fn new_output<R: CubeRuntime>(
    out: Option<CubeTensor<R>>,
    x: &CubeTensor<R>,
    dims: &[usize],
) -> CubeTensor<R> {
    out.unwrap_or_else(|| {
        empty_device_dtype::<R>(
            x.client.clone(),
            x.device.clone(),
            Shape::from(dims.to_vec()),
            x.dtype,
        )
    })
}

/// Sum of a vector's lanes.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = 0.0f32;
    #[unroll]
    for k in 0..N::value() {
        s += v[k];
    }
    s
}

/// Tree reduction of `acc[seg_base .. seg_base + tpr]` (tpr a power of two, the same for every
/// thread of the cube); every thread returns its segment's total. All threads must call it.
#[cube]
fn segment_sum(
    acc: &mut SharedMemory<f32>,
    tid: usize,
    lane: usize,
    seg_base: usize,
    tpr: usize,
    partial: f32,
) -> f32 {
    acc[tid] = partial;
    sync_cube();
    let mut stride = tpr / 2;
    while stride > 0 {
        if lane < stride {
            acc[tid] += acc[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    acc[seg_base]
}

/// RMSNorm of rows `[rows, units]` (in vectors), optionally times `w` and added to `res` then
/// scaled. `w` and `res` are ignored (any binding) when their flag is off.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn rms_norm_rows_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    w: &Tensor<Vector<F, N>>,
    res: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    rows: u32,
    units: u32,
    tpr: u32,
    dim: f32,
    eps: f32,
    scale: f32,
    #[comptime] has_weight: bool,
    #[comptime] has_residual: bool,
) {
    let tid = UNIT_POS_X as usize;
    let tpr = tpr as usize;
    let units = units as usize;
    let lane = tid % tpr;
    let seg = tid / tpr;
    let rows_per_cube = comptime!(NT) / tpr;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * rows_per_cube + seg;
    let valid = row < rows as usize;
    let base = row * units;

    let mut acc = SharedMemory::<f32>::new(comptime!(NT));
    let mut sq = Vector::<f32, N>::new(0.0f32);
    if valid {
        let mut i = lane;
        while i < units {
            let v = Vector::<f32, N>::cast_from(x[base + i]);
            sq += v * v;
            i += tpr;
        }
    }
    let total = segment_sum(&mut acc, tid, lane, seg * tpr, tpr, lane_sum::<N>(sq));
    let r = Vector::<f32, N>::new(1.0f32 / f32::sqrt(total / dim + eps));

    if valid {
        let mut i = lane;
        while i < units {
            let mut v = Vector::<f32, N>::cast_from(x[base + i]) * r;
            if has_weight {
                v *= Vector::<f32, N>::cast_from(w[i]);
            }
            if has_residual {
                v = (Vector::<f32, N>::cast_from(res[base + i]) + v) * Vector::new(scale);
            }
            out[base + i] = Vector::<F, N>::cast_from(v);
            i += tpr;
        }
    }
}

/// RMSNorm per row of `x` `[t · heads, d]` (optionally times `w`), then rotate-half RoPE with
/// `cos`/`sin` `[t, d]` of the row's token; `half` is d/2 in vectors.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn rms_norm_rope_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    w: &Tensor<Vector<F, N>>,
    cos: &Tensor<Vector<F, N>>,
    sin: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    rows: u32,
    heads: u32,
    half: u32,
    tpr: u32,
    dim: f32,
    eps: f32,
    #[comptime] has_weight: bool,
) {
    let tid = UNIT_POS_X as usize;
    let tpr = tpr as usize;
    let half = half as usize;
    let lane = tid % tpr;
    let seg = tid / tpr;
    let rows_per_cube = comptime!(NT) / tpr;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * rows_per_cube + seg;
    let valid = row < rows as usize;
    let base = row * 2 * half;
    let tbase = (row / heads as usize) * 2 * half;

    let mut acc = SharedMemory::<f32>::new(comptime!(NT));
    let mut sq = Vector::<f32, N>::new(0.0f32);
    if valid {
        let mut i = lane;
        while i < half {
            let a = Vector::<f32, N>::cast_from(x[base + i]);
            let b = Vector::<f32, N>::cast_from(x[base + half + i]);
            sq += a * a + b * b;
            i += tpr;
        }
    }
    let total = segment_sum(&mut acc, tid, lane, seg * tpr, tpr, lane_sum::<N>(sq));
    let r = Vector::<f32, N>::new(1.0f32 / f32::sqrt(total / dim + eps));

    if valid {
        let mut i = lane;
        while i < half {
            let mut a = Vector::<f32, N>::cast_from(x[base + i]) * r;
            let mut b = Vector::<f32, N>::cast_from(x[base + half + i]) * r;
            if has_weight {
                a *= Vector::<f32, N>::cast_from(w[i]);
                b *= Vector::<f32, N>::cast_from(w[half + i]);
            }
            let (c_lo, s_lo) = (
                Vector::<f32, N>::cast_from(cos[tbase + i]),
                Vector::<f32, N>::cast_from(sin[tbase + i]),
            );
            let c_hi = Vector::<f32, N>::cast_from(cos[tbase + half + i]);
            let s_hi = Vector::<f32, N>::cast_from(sin[tbase + half + i]);
            out[base + i] = Vector::<F, N>::cast_from(a * c_lo - b * s_lo);
            out[base + half + i] = Vector::<F, N>::cast_from(b * c_hi + a * s_hi);
            i += tpr;
        }
    }
}

/// `out = gelu_tanh(gate) · up`, element-wise over `units` vectors.
#[cube(launch)]
fn gelu_tanh_mul_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    units: u32,
) {
    let idx =
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(NT) + UNIT_POS_X as usize;
    if idx < units as usize {
        let g = Vector::<f32, N>::cast_from(gate[idx]);
        let z = (g + g * g * g * Vector::new(0.044715f32))
            * Vector::new(comptime!(SQRT_2_OVER_PI as f32));
        // 0.5·(1 + tanh(z)) = 1 / (1 + e^(−2z)); the clamp keeps e^(−2z) finite.
        let e = Vector::exp(min(z * Vector::new(-2.0f32), Vector::new(88.0f32)));
        out[idx] = Vector::<F, N>::cast_from(
            g / (Vector::new(1.0f32) + e) * Vector::<f32, N>::cast_from(up[idx]),
        );
    }
}

/// `rms_norm` of x `[rows, dim]` (times `weight` `[dim]` when given), fused: see
/// [`super::reference::rms_norm`]. `out` (`[rows, dim]`), when given and exclusively owned,
/// receives the result.
pub fn rms_norm<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<FusedBackend<R, F, BT>, 2>,
    weight: Option<BurnTensor<FusedBackend<R, F, BT>, 1>>,
    eps: f64,
    out: Option<BurnTensor<FusedBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<FusedBackend<R, F, BT>, 2>, FusedError> {
    let [_, dim] = x.dims();
    if let Some(w) = &weight {
        expect_shape("weight", &w.dims(), &[dim])?;
    }
    norm_rows(x, weight, None, eps, 1.0, out)
}

/// `(residual + rms_norm(x) · weight) · scale`, all `[rows, dim]`, weight `[dim]`, fused: see
/// [`super::reference::rms_norm_add`]. `out` as in [`rms_norm`].
pub fn rms_norm_add<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    residual: BurnTensor<FusedBackend<R, F, BT>, 2>,
    x: BurnTensor<FusedBackend<R, F, BT>, 2>,
    weight: BurnTensor<FusedBackend<R, F, BT>, 1>,
    eps: f64,
    scale: f32,
    out: Option<BurnTensor<FusedBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<FusedBackend<R, F, BT>, 2>, FusedError> {
    let [_, dim] = x.dims();
    expect_shape("residual", &residual.dims(), &x.dims())?;
    expect_shape("weight", &weight.dims(), &[dim])?;
    norm_rows(x, Some(weight), Some(residual), eps, scale, out)
}

/// The shared body of [`rms_norm`] and [`rms_norm_add`] (weight and residual shapes checked).
fn norm_rows<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<FusedBackend<R, F, BT>, 2>,
    weight: Option<BurnTensor<FusedBackend<R, F, BT>, 1>>,
    residual: Option<BurnTensor<FusedBackend<R, F, BT>, 2>>,
    eps: f64,
    scale: f32,
    out: Option<BurnTensor<FusedBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<FusedBackend<R, F, BT>, 2>, FusedError> {
    let [rows, dim] = x.dims();
    if rows == 0 || dim == 0 {
        return Err(FusedError::Empty {
            what: "x",
            shape: vec![rows, dim],
        });
    }
    check_sizes(&[("x elements", rows * dim)])?;
    let x = float_primitive("x", x)?;
    let w = weight.map(|w| float_primitive("weight", w)).transpose()?;
    let res = residual
        .map(|r| float_primitive("residual", r))
        .transpose()?;
    for (what, t) in [("weight", &w), ("residual", &res)] {
        if let Some(t) = t {
            same_device(what, t, &x)?;
        }
    }
    let out = check_out(out, [rows, dim], &x)?;
    let client = x.client.clone();
    let vs = vector_size::<R, F>(&client, dim);
    let units = dim / vs;
    let tpr = threads_per_row(units);
    let count = grid(rows.div_ceil(NT / tpr))?;

    let x = into_contiguous(x);
    let w = w.map(into_contiguous);
    let res = res.map(into_contiguous);
    let out = new_output(out, &x, &[rows, dim]);
    let (has_weight, has_residual) = (w.is_some(), res.is_some());
    // Unused bindings get x (read-only aliasing is allowed); the kernel never reads them.
    let w = w.unwrap_or_else(|| x.clone());
    let res = res.unwrap_or_else(|| x.clone());
    rms_norm_rows_kernel::launch::<F, R>(
        &client,
        count,
        CubeDim::new_1d(NT as u32),
        vs,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        res.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        units as u32,
        tpr as u32,
        dim as f32,
        eps as f32,
        scale,
        has_weight,
        has_residual,
    );
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}

/// RMSNorm per head of x `[t, heads, d]` (times `weight` `[d]` when given), then rotate-half
/// RoPE with `cos`/`sin` `[t, d]`, fused: see [`super::reference::rms_norm_rope`]. d must be even.
/// `out` (`[t, heads, d]`) as in [`rms_norm`].
pub fn rms_norm_rope<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<FusedBackend<R, F, BT>, 3>,
    weight: Option<BurnTensor<FusedBackend<R, F, BT>, 1>>,
    eps: f64,
    cos: BurnTensor<FusedBackend<R, F, BT>, 2>,
    sin: BurnTensor<FusedBackend<R, F, BT>, 2>,
    out: Option<BurnTensor<FusedBackend<R, F, BT>, 3>>,
) -> Result<BurnTensor<FusedBackend<R, F, BT>, 3>, FusedError> {
    let [t, heads, d] = x.dims();
    if t == 0 || heads == 0 || d == 0 {
        return Err(FusedError::Empty {
            what: "x",
            shape: vec![t, heads, d],
        });
    }
    if !d.is_multiple_of(2) {
        return Err(FusedError::OddHeadDim { d });
    }
    if let Some(w) = &weight {
        expect_shape("weight", &w.dims(), &[d])?;
    }
    expect_shape("cos", &cos.dims(), &[t, d])?;
    expect_shape("sin", &sin.dims(), &[t, d])?;
    let rows = t * heads;
    check_sizes(&[("x elements", rows * d)])?;
    let x = float_primitive("x", x)?;
    let w = weight.map(|w| float_primitive("weight", w)).transpose()?;
    let cos = float_primitive("cos", cos)?;
    let sin = float_primitive("sin", sin)?;
    if let Some(w) = &w {
        same_device("weight", w, &x)?;
    }
    same_device("cos", &cos, &x)?;
    same_device("sin", &sin, &x)?;
    let out = check_out(out, [t, heads, d], &x)?;
    let client = x.client.clone();
    let vs = vector_size::<R, F>(&client, d / 2);
    let half = d / 2 / vs;
    let tpr = threads_per_row(half);
    let count = grid(rows.div_ceil(NT / tpr))?;

    let x = into_contiguous(x);
    let w = w.map(into_contiguous);
    let cos = into_contiguous(cos);
    let sin = into_contiguous(sin);
    let out = new_output(out, &x, &[t, heads, d]);
    let has_weight = w.is_some();
    let w = w.unwrap_or_else(|| x.clone());
    rms_norm_rope_kernel::launch::<F, R>(
        &client,
        count,
        CubeDim::new_1d(NT as u32),
        vs,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        heads as u32,
        half as u32,
        tpr as u32,
        d as f32,
        eps as f32,
        has_weight,
    );
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}

/// `gelu_tanh(gate) · up`, both `[rows, width]`, fused: see
/// [`super::reference::gelu_tanh_mul`]. `out` (`[rows, width]`) as in [`rms_norm`].
pub fn gelu_tanh_mul<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    gate: BurnTensor<FusedBackend<R, F, BT>, 2>,
    up: BurnTensor<FusedBackend<R, F, BT>, 2>,
    out: Option<BurnTensor<FusedBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<FusedBackend<R, F, BT>, 2>, FusedError> {
    let dims = gate.dims();
    expect_shape("up", &up.dims(), &dims)?;
    let n = dims[0] * dims[1];
    if n == 0 {
        return Err(FusedError::Empty {
            what: "gate",
            shape: dims.to_vec(),
        });
    }
    check_sizes(&[("gate elements", n)])?;
    let gate = float_primitive("gate", gate)?;
    let up = float_primitive("up", up)?;
    same_device("up", &up, &gate)?;
    let out = check_out(out, dims, &gate)?;
    let client = gate.client.clone();
    let vs = vector_size::<R, F>(&client, n);
    let units = n / vs;
    let count = grid(units.div_ceil(NT))?;

    let gate = into_contiguous(gate);
    let up = into_contiguous(up);
    let out = new_output(out, &gate, &dims);
    gelu_tanh_mul_kernel::launch::<F, R>(
        &client,
        count,
        CubeDim::new_1d(NT as u32),
        vs,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        units as u32,
    );
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}
