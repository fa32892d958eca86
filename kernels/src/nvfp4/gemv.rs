//! NVFP4 GEMV / small-M matmul: `y[m, o] = Σ_c x[m, c] · W[o, c]` with W kept packed.
//!
//! Weight layout (see `gemma4_model::nvfp4`): `codes` i32 `[out, in/8]`, nibble k of word w is
//! column 8w + k (E2M1, bit 3 the sign); `scales` i32 `[out, ceil(in/64)]`, byte j of word w is
//! the E4M3 scale of group 4w + j (16 inputs per group). W[o, c] = e2m1 · (e4m3 · global_scale),
//! decoded with integer bit operations (WGSL has no fp4/fp8 types), accumulated in f32.
//!
//! Element type: x and y are the backend's float `F` (f32, f16, bf16); every x element is widened
//! to f32 on load, the weights are decoded and the global / E4M3 scales applied in f32, the dot
//! products accumulate in f32, and y is rounded to `F` once on store.
//!
//! Structure: one cube (workgroup) per output row, `BLOCK` threads per cube. Thread t walks the
//! row's code words t, t + BLOCK, ... (one word = 8 inputs, half a scale group), decodes the 8
//! weights once and applies them to all m activation rows, accumulating into its own slot of a
//! shared `[MAX_M, BLOCK]` buffer; a tree reduction over the slots then gives the m outputs,
//! which threads 0..m write. Cubes past `out` (grid padding) do no loads and write nothing.

use burn::tensor::{DType, Element, Int, Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_dtype, tensor::CubeTensor, BoolElement,
    CubeBackend, CubeRuntime, FloatElement,
};
use cubecl::prelude::*;

/// The backend the kernel runs on: any CubeCL runtime with float element `F` and i32 ints
/// (`burn::backend::Wgpu<F, i32>` without fusion is `CubeBackend<WgpuRuntime, F, i32, u32>`).
pub type Nvfp4Backend<R, F = f32, BT = u32> = CubeBackend<R, F, i32, BT>;

use crate::nvfp4::scale_words_per_row;
pub use crate::nvfp4::GROUP_SIZE;
/// Largest number of activation rows per launch (the shared accumulator is sized for it).
pub const MAX_M: usize = 16;
/// Threads per cube.
const BLOCK: usize = 128;
/// Largest cube count along one grid axis (the WebGPU / Vulkan minimum guarantee).
const MAX_GRID_AXIS: usize = 65_535;

/// Shape and limit errors of [`nvfp4_matmul`], carrying the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("in_features = {in_features} must be a positive multiple of {GROUP_SIZE}")]
    InFeatures { in_features: usize },
    #[error("out_features must be positive (got {out_features})")]
    OutFeatures { out_features: usize },
    #[error("x has {got} columns, expected in_features = {expected}")]
    XColumns { expected: usize, got: usize },
    #[error("x has {m} rows; this kernel takes 1..={max}")]
    Rows { m: usize, max: usize },
    #[error("codes shape {got:?}, expected {expected:?} ([out, in/8])")]
    CodesShape {
        expected: [usize; 2],
        got: [usize; 2],
    },
    #[error("scales shape {got:?}, expected {expected:?} ([out, ceil(in/64)])")]
    ScalesShape {
        expected: [usize; 2],
        got: [usize; 2],
    },
    #[error("{what} has dtype {got:?}, expected {expected}")]
    Dtype {
        what: &'static str,
        got: DType,
        expected: &'static str,
    },
    #[error("{what} has {elements} elements, more than the kernel's 32-bit index range")]
    TooLarge { what: &'static str, elements: usize },
}

/// Builds an E4M3 "fn" byte (bias 7) in f32 exactly: normal (8 + m)·2^e·2^-10, subnormal
/// m·2^-9; every step is an exact integer or a power-of-two scaling. NaN (0x7f) is not handled:
/// the loader excludes it. Shared with the prefill GEMM.
#[cube]
pub(crate) fn e4m3_to_f32(byte: u32) -> f32 {
    let e = (byte >> 3) & 15;
    let man = byte & 7;
    let mut mag = f32::cast_from(man) * 0.001953125f32; // m·2^-9
    if e != 0 {
        // (1 + m/8)·2^(e-7) = (8 + m)·2^e·2^-10; (8 + m) << e < 2^19, exact in f32.
        mag = f32::cast_from((8 + man) << e) * 0.0009765625f32;
    }
    if (byte >> 7) != 0 {
        mag = -mag;
    }
    mag
}

/// E2M1 nibble k of `word` times `scale`. Magnitudes in half units 0,1,2,3,4,6,8,12 are the
/// nibbles of 0xC8643210; bit 3 is the sign.
#[cube]
fn e2m1_scaled(word: u32, #[comptime] k: u32, scale: f32) -> f32 {
    let code = (word >> (4 * k)) & 15;
    let half_units = (0xC864_3210u32 >> ((code & 7) * 4)) & 15;
    let sign = 1.0f32 - 2.0f32 * f32::cast_from(code >> 3);
    (f32::cast_from(half_units) * 0.5f32 * sign) * scale
}

#[cube(launch)]
fn nvfp4_gemv_kernel<F: Float>(
    x: &Tensor<F>,        // [m, in]
    codes: &Tensor<i32>,  // [out, in/8]
    scales: &Tensor<i32>, // [out, spr]
    y: &mut Tensor<F>,    // [m, out]
    global_scale: f32,
    m: u32,
    out_features: u32,
    in_features: u32,
    words: u32,
    spr: u32,
    #[comptime] block: usize,
    #[comptime] max_m: usize,
) {
    let tid = UNIT_POS_X as usize;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let m = m as usize;
    let out_features = out_features as usize;
    let in_features = in_features as usize;
    let words = words as usize;
    let spr = spr as usize;

    let mut acc = SharedMemory::<f32>::new(block * max_m);
    for i in 0..m {
        acc[i * block + tid] = 0.0f32;
    }

    if row < out_features {
        let mut w = tid;
        while w < words {
            let cw = u32::cast_from(codes[row * words + w]);
            // Word w holds inputs 8w..8w+8: group w/2, byte (w/2)%4 of scale word (w/2)/4.
            let g = w / 2;
            let sw = u32::cast_from(scales[row * spr + g / 4]);
            let sbyte = (sw >> (((g % 4) * 8) as u32)) & 255;
            let s = e4m3_to_f32(sbyte) * global_scale;
            let w0 = e2m1_scaled(cw, 0u32, s);
            let w1 = e2m1_scaled(cw, 1u32, s);
            let w2 = e2m1_scaled(cw, 2u32, s);
            let w3 = e2m1_scaled(cw, 3u32, s);
            let w4 = e2m1_scaled(cw, 4u32, s);
            let w5 = e2m1_scaled(cw, 5u32, s);
            let w6 = e2m1_scaled(cw, 6u32, s);
            let w7 = e2m1_scaled(cw, 7u32, s);
            let col = 8 * w;
            for i in 0..m {
                let base = i * in_features + col;
                let part = f32::cast_from(x[base]) * w0
                    + f32::cast_from(x[base + 1]) * w1
                    + f32::cast_from(x[base + 2]) * w2
                    + f32::cast_from(x[base + 3]) * w3
                    + f32::cast_from(x[base + 4]) * w4
                    + f32::cast_from(x[base + 5]) * w5
                    + f32::cast_from(x[base + 6]) * w6
                    + f32::cast_from(x[base + 7]) * w7;
                acc[i * block + tid] += part;
            }
            w += block;
        }
    }
    sync_cube();

    // Tree reduction over the block slots of every row i (block is a power of two). The stride
    // starts from the runtime CUBE_DIM_X (== block): a comptime value would be an immutable const.
    let mut stride = (CUBE_DIM_X as usize) / 2;
    while stride > 0 {
        if tid < stride {
            for i in 0..m {
                acc[i * block + tid] += acc[i * block + tid + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }

    if row < out_features && tid < m {
        y[tid * out_features + row] = F::cast_from(acc[tid * block]);
    }
}

/// The shape checks of every NVFP4 kernel (this GEMV and the GEMM), in one order: in_features
/// a positive multiple of [`GROUP_SIZE`], out_features positive, x `[m, in]` with m in
/// 1..=`max_rows`, codes `[out, in/8]`, scales `[out, ceil(in/64)]`, then x, codes, y and the
/// kernel's own `extra` counts within the 32-bit index range. Returns (m, words, spr).
pub(crate) fn check_packed_shapes(
    x_dims: [usize; 2],
    codes_dims: [usize; 2],
    scales_dims: [usize; 2],
    out_features: usize,
    in_features: usize,
    max_rows: usize,
    extra: &[(&'static str, usize)],
) -> Result<(usize, usize, usize), KernelError> {
    if in_features == 0 || !in_features.is_multiple_of(GROUP_SIZE) {
        return Err(KernelError::InFeatures { in_features });
    }
    if out_features == 0 {
        return Err(KernelError::OutFeatures { out_features });
    }
    let [m, x_in] = x_dims;
    if x_in != in_features {
        return Err(KernelError::XColumns {
            expected: in_features,
            got: x_in,
        });
    }
    if m == 0 || m > max_rows {
        return Err(KernelError::Rows { m, max: max_rows });
    }
    let words = in_features / 8;
    let spr = scale_words_per_row(in_features);
    if codes_dims != [out_features, words] {
        return Err(KernelError::CodesShape {
            expected: [out_features, words],
            got: codes_dims,
        });
    }
    if scales_dims != [out_features, spr] {
        return Err(KernelError::ScalesShape {
            expected: [out_features, spr],
            got: scales_dims,
        });
    }
    let limit = u32::MAX as usize;
    let common = [
        ("x", m * in_features),
        ("codes", out_features * words),
        ("y", m * out_features),
    ];
    for &(what, elements) in common.iter().chain(extra) {
        if elements > limit {
            return Err(KernelError::TooLarge { what, elements });
        }
    }
    Ok((m, words, spr))
}

/// x, codes and scales, ready for a launch.
type PackedInputs<R> = (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>);

/// x, codes and scales as the NVFP4 kernels read them: `F`, i32, i32 on one device, row-major
/// contiguous (a no-op when they already are).
pub(crate) fn packed_inputs<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
) -> Result<PackedInputs<R>, KernelError> {
    let x = x.into_primitive().tensor();
    let codes = codes.into_primitive();
    let scales = scales.into_primitive();
    if x.dtype != <F as Element>::dtype() {
        return Err(KernelError::Dtype {
            what: "x",
            got: x.dtype,
            expected: "the backend's float element",
        });
    }
    for (what, t) in [("codes", &codes), ("scales", &scales)] {
        if !matches!(t.dtype, DType::I32) {
            return Err(KernelError::Dtype {
                what,
                got: t.dtype,
                expected: "i32",
            });
        }
    }
    x.assert_is_on_same_device(&codes);
    x.assert_is_on_same_device(&scales);
    Ok((
        into_contiguous(x),
        into_contiguous(codes),
        into_contiguous(scales),
    ))
}

/// `y = x · Wᵀ` for a packed NVFP4 weight W `[out_features, in_features]`, x `[m, in]` of the
/// backend's float element `F` with m in 1..=[`MAX_M`]; returns y `[m, out_features]` (`F`,
/// accumulated in f32).
pub fn nvfp4_matmul<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
) -> Result<BurnTensor<Nvfp4Backend<R, F, BT>, 2>, KernelError> {
    let grid = out_features.div_ceil(MAX_GRID_AXIS) * MAX_GRID_AXIS;
    let (m, words, spr) = check_packed_shapes(
        x.dims(),
        codes.dims(),
        scales.dims(),
        out_features,
        in_features,
        MAX_M,
        &[("grid", grid)],
    )?;
    let (x, codes, scales) = packed_inputs(x, codes, scales)?;

    let client = x.client.clone();
    let y = empty_device_dtype::<R>(
        client.clone(),
        x.device.clone(),
        Shape::new([m, out_features]),
        <F as Element>::dtype(),
    );

    let grid_x = out_features.min(MAX_GRID_AXIS);
    let grid_y = out_features.div_ceil(grid_x);
    nvfp4_gemv_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(grid_x as u32, grid_y as u32, 1),
        CubeDim::new_1d(BLOCK as u32),
        x.into_tensor_arg(),
        codes.into_tensor_arg(),
        scales.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        global_scale,
        m as u32,
        out_features as u32,
        in_features as u32,
        words as u32,
        spr as u32,
        BLOCK,
        MAX_M,
    );

    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(y)))
}
