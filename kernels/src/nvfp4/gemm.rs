//! NVFP4 prefill GEMM (any m ≥ 1): `y[m, o] = Σ_c x[m, c] · W[o, c]` with W kept packed.
//!
//! Weight layout as in [`crate::nvfp4`] and [`crate::nvfp4::gemv`]: `codes` i32 `[out, in/8]`
//! (nibble k of word w is column 8w + k, E2M1 with bit 3 the sign), `scales` i32
//! `[out, ceil(in/64)]` (byte j of word w is the E4M3 scale of group 4w + j, 16 inputs per group,
//! rows padded with zero bytes), W = e2m1 · (e4m3 · global_scale), decoded with integer bit
//! operations (WGSL has no fp4/fp8 types) and accumulated in f32.
//!
//! Element type: x and y are the backend's float `F` (f32, f16, bf16); x is widened to f32 as
//! its tile is staged, so the shared tiles, the decode (global and E4M3 scales in f32) and the
//! accumulation are f32, and y is rounded to `F` once on store.
//!
//! The kernel (every CubeCL runtime, so it runs on wgpu/lavapipe): a classic
//! shared-memory tiled GEMM. Each cube owns a `BM × BN` tile of y (BM activation rows, BN output
//! features) and walks K in steps of `BK`. Per step its threads cooperatively
//! - load the `BM × BK` tile of x into shared memory (zeros past m and past in), and
//! - decode the `BN × BK` tile of W from the packed words into shared memory as f32 (one code
//!   word = 8 weights, one E4M3 scale per 16; zeros past out and past in),
//!
//! then synchronise, multiply-accumulate from shared memory into a `TM × TN` register block per
//! thread, and synchronise again. Both shared tiles are k-major and in vec4s of 4 rows / 4
//! features (`[BK][BM/4]`, `[BK][BN/4]`), so a k step costs a thread `TM/4 + TN/4` vec4 reads for
//! `TM · TN` FMAs (as vec4 FMAs). Thread (ty, tx) owns the row quads `ty + q·(BM/TM)` and the
//! feature quads `tx + p·(BN/TN)`: neighbouring threads read neighbouring shared vec4s and write
//! neighbouring y quads. Every global read and write is bounds-checked (edge tiles, `in` not a
//! multiple of BK), so any m ≥ 1, out ≥ 1 and in a multiple of 16 work.
//!
//! Tile: BM = BN = 64, BK = 32, TM = TN = 8 → 64 threads per cube, (64 + 64) · 32 · 4 B =
//! 16 KiB of shared memory (the WebGPU default `maxComputeWorkgroupStorageSize`); one W tile is
//! 256 code words, one (feature quad, word) item of 4 words per thread. Chosen on lavapipe
//! (m = 256, out = in = 1024, best of 5): this shape ≈ Burn's own f32 matmul; scalar (non-vec4)
//! shared tiles were 2.5–3× slower, 4×4 register blocks ~1.3×, BK = 16 or 32-wide tiles slower.
//! Other shapes can be timed through [`nvfp4_gemm_tiled`].

use std::time::{Duration, Instant};

use burn::tensor::{Element, Int, Shape, Tensor as BurnTensor, TensorPrimitive};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_dtype, BoolElement, CubeRuntime,
    FloatElement,
};
use cubecl::prelude::*;

use crate::nvfp4::gemv::{check_packed_shapes, e4m3_to_f32, packed_inputs};

pub use crate::nvfp4::gemv::{KernelError, Nvfp4Backend};

pub use crate::nvfp4::GROUP_SIZE;
/// Activation rows per cube tile.
pub const TILE_M: usize = 64;
/// Output features per cube tile.
pub const TILE_N: usize = 64;
/// Inputs per K step (a multiple of 8: whole code words).
pub const TILE_K: usize = 32;
/// Rows of the per-thread register block.
const THREAD_M: usize = 8;
/// Columns of the per-thread register block.
const THREAD_N: usize = 8;
/// Threads per cube.
pub const THREADS: usize = (TILE_M / THREAD_M) * (TILE_N / THREAD_N);
/// Shared memory of one cube in bytes: the x tile and the decoded W tile, f32 for every `F`.
pub const SHARED_BYTES: usize = (TILE_M + TILE_N) * TILE_K * 4;
/// Largest cube count along one grid axis (the WebGPU / Vulkan minimum guarantee).
const MAX_GRID_AXIS: usize = 65_535;
/// Largest m: the grid's y axis holds `MAX_GRID_AXIS` row tiles.
pub const MAX_ROWS: usize = MAX_GRID_AXIS * TILE_M;
/// Largest out_features: the grid's x axis holds `MAX_GRID_AXIS` feature tiles.
pub const MAX_OUT_FEATURES: usize = MAX_GRID_AXIS * TILE_N;

/// Errors of [`nvfp4_gemm`]: the shape checks it shares with the GEMV, and device limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GemmError {
    #[error(transparent)]
    Shape(#[from] KernelError),
    #[error("the GEMM tile needs {needed} bytes of shared memory per cube; the device allows {available}")]
    SharedMemory { needed: usize, available: usize },
    #[error("y has shape {got:?}, expected {expected:?} ([m, out])")]
    OutputShape {
        expected: [usize; 2],
        got: [usize; 2],
    },
    #[error("the GEMM needs {needed} threads per cube; the device allows {available}")]
    CubeDim { needed: usize, available: usize },
}

/// E2M1 nibble k of `word` times `scale`. Magnitudes in half units 0,1,2,3,4,6,8,12 are the
/// nibbles of 0xC8643210; bit 3 is the sign.
#[cube]
fn e2m1_scaled(word: u32, k: u32, scale: f32) -> f32 {
    let code = (word >> (4 * k)) & 15;
    let half_units = (0xC864_3210u32 >> ((code & 7) * 4)) & 15;
    let sign = 1.0f32 - 2.0f32 * f32::cast_from(code >> 3);
    (f32::cast_from(half_units) * 0.5f32 * sign) * scale
}

type F4 = Vector<f32, Const<4>>;

/// The tiled kernel (see the module doc). Launched unchecked: every global access is
/// guarded by the kernel itself, and every shared / register index is in range by construction.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn nvfp4_gemm_kernel<F: Float>(
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
    #[comptime] bm: usize,
    #[comptime] bn: usize,
    #[comptime] bk: usize,
    #[comptime] tm: usize,
    #[comptime] tn: usize,
) {
    let threads_n = bn / tn;
    let threads_m = bm / tm;
    let threads = threads_m * threads_n;
    let qm = bm / 4; // row quads per tile
    let qn = bn / 4; // column quads per tile
    let vm = tm / 4; // row quads per thread
    let vn = tn / 4; // column quads per thread
    let x_loads = (bk * qm).div_ceil(threads);
    let words_per_row = bk / 8;
    let w_items = qn * words_per_row; // (column quad, word) pairs
    let w_loads = w_items.div_ceil(threads);

    let tid = UNIT_POS_X as usize;
    let tx = tid % threads_n;
    let ty = tid / threads_n;
    let col0 = CUBE_POS_X as usize * bn;
    let row0 = CUBE_POS_Y as usize * bm;
    let m = m as usize;
    let out_features = out_features as usize;
    let in_features = in_features as usize;
    let words = words as usize;
    let spr = spr as usize;

    let mut xs = SharedMemory::<F4>::new(bk * qm); // [bk][bm/4]
    let mut ws = SharedMemory::<F4>::new(bk * qn); // [bk][bn/4]
    let mut acc = Array::<F4>::new(tm * vn); // [tm][tn/4]
    #[unroll]
    for i in 0..tm * vn {
        acc[i] = F4::new(0.0f32);
    }
    let mut a = Array::<F4>::new(vm);
    let mut b = Array::<F4>::new(vn);

    let k_tiles = in_features.div_ceil(bk);
    for kt in 0..k_tiles {
        let k0 = kt * bk;

        // x tile: item (quad, c) -> x[4·quad..4·quad+4, k0 + c]; neighbouring threads, neighbouring c.
        #[unroll]
        for l in 0..x_loads {
            let idx = l * threads + tid;
            if idx < bk * qm {
                let c = idx % bk;
                let quad = idx / bk;
                let gc = k0 + c;
                let mut v = F4::empty();
                #[unroll]
                for e in 0..4usize {
                    let gr = row0 + 4 * quad + e;
                    let mut val = 0.0f32;
                    if gr < m && gc < in_features {
                        val = f32::cast_from(x[gr * in_features + gc]);
                    }
                    v[e] = val;
                }
                xs[c * qm + quad] = v;
            }
        }

        // W tile: item (quad, w) -> the 4 rows' code words w: 8 vec4s of decoded weights.
        #[unroll]
        for l in 0..w_loads {
            let idx = l * threads + tid;
            if idx < w_items {
                let w = idx % words_per_row;
                let quad = idx / words_per_row;
                let gw = k0 / 8 + w;
                let g = gw / 2;
                let mut cws = Array::<u32>::new(4usize);
                let mut ss = Array::<f32>::new(4usize);
                #[unroll]
                for e in 0..4usize {
                    let gr = col0 + 4 * quad + e;
                    let mut cw = 0u32;
                    let mut sc = 0.0f32;
                    if gr < out_features && gw < words {
                        cw = u32::cast_from(codes[gr * words + gw]);
                        // Word gw holds inputs 8gw..8gw+8: group gw/2, byte (gw/2)%4 of word (gw/2)/4.
                        let sw = u32::cast_from(scales[gr * spr + g / 4]);
                        let sbyte = (sw >> (((g % 4) * 8) as u32)) & 255;
                        sc = e4m3_to_f32(sbyte) * global_scale;
                    }
                    cws[e] = cw;
                    ss[e] = sc;
                }
                #[unroll]
                for j in 0..8usize {
                    let mut v = F4::empty();
                    #[unroll]
                    for e in 0..4usize {
                        v[e] = e2m1_scaled(cws[e], j as u32, ss[e]);
                    }
                    ws[(8 * w + j) * qn + quad] = v;
                }
            }
        }
        sync_cube();

        #[unroll]
        for k in 0..bk {
            #[unroll]
            for q in 0..vm {
                a[q] = xs[k * qm + ty + q * threads_m];
            }
            #[unroll]
            for p in 0..vn {
                b[p] = ws[k * qn + tx + p * threads_n];
            }
            #[unroll]
            for q in 0..vm {
                let av = a[q];
                #[unroll]
                for e in 0..4usize {
                    let ai = F4::new(av[e]);
                    #[unroll]
                    for p in 0..vn {
                        acc[(4 * q + e) * vn + p] += ai * b[p];
                    }
                }
            }
        }
        sync_cube();
    }

    #[unroll]
    for q in 0..vm {
        #[unroll]
        for e in 0..4usize {
            let gr = row0 + 4 * (ty + q * threads_m) + e;
            #[unroll]
            for p in 0..vn {
                let v = acc[(4 * q + e) * vn + p];
                #[unroll]
                for f in 0..4usize {
                    let gc = col0 + 4 * (tx + p * threads_n) + f;
                    if gr < m && gc < out_features {
                        y[gr * out_features + gc] = F::cast_from(v[f]);
                    }
                }
            }
        }
    }
}

/// The NVFP4 shape checks ([`check_packed_shapes`]) with this kernel's row limit and grid;
/// returns (m, words, spr).
fn check_shapes(
    x_dims: [usize; 2],
    codes_dims: [usize; 2],
    scales_dims: [usize; 2],
    out_features: usize,
    in_features: usize,
    cfg: TileConfig,
) -> Result<(usize, usize, usize), KernelError> {
    let m = x_dims[0];
    let grids = [
        ("m grid", m.div_ceil(cfg.bm) * cfg.bm),
        ("out_features grid", out_features.div_ceil(cfg.bn) * cfg.bn),
    ];
    let shapes = check_packed_shapes(
        x_dims,
        codes_dims,
        scales_dims,
        out_features,
        in_features,
        MAX_GRID_AXIS * cfg.bm,
        &grids,
    )?;
    if out_features.div_ceil(cfg.bn) > MAX_GRID_AXIS {
        return Err(KernelError::TooLarge {
            what: "out_features (grid x axis)",
            elements: out_features,
        });
    }
    Ok(shapes)
}

/// `y = x · Wᵀ` for a packed NVFP4 weight W `[out_features, in_features]` and x `[m, in]`,
/// any m in 1..=[`MAX_ROWS`]; returns y `[m, out_features]`. The tiled kernel (x and y of the
/// backend's float element, f32 inside), on any CubeCL runtime.
pub fn nvfp4_gemm<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
) -> Result<BurnTensor<Nvfp4Backend<R, F, BT>, 2>, GemmError> {
    launch(
        x,
        codes,
        scales,
        global_scale,
        out_features,
        in_features,
        None,
        TileConfig::DEFAULT,
    )
}

/// Tile shape of the portable kernel (exposed for tuning benches only; see [`nvfp4_gemm_tiled`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Activation rows per cube (multiple of `tm`).
    pub bm: usize,
    /// Output features per cube (multiple of `tn`).
    pub bn: usize,
    /// Inputs per K step (multiple of 8).
    pub bk: usize,
    /// Rows per thread (multiple of 4).
    pub tm: usize,
    /// Columns per thread (multiple of 4).
    pub tn: usize,
}

impl TileConfig {
    pub const DEFAULT: TileConfig = TileConfig {
        bm: TILE_M,
        bn: TILE_N,
        bk: TILE_K,
        tm: THREAD_M,
        tn: THREAD_N,
    };
    pub fn threads(&self) -> usize {
        (self.bm / self.tm) * (self.bn / self.tn)
    }
    pub fn shared_bytes(&self) -> usize {
        (self.bm + self.bn) * self.bk * 4
    }
    fn valid(&self) -> bool {
        self.tm > 0
            && self.tn > 0
            && self.tm.is_multiple_of(4)
            && self.tn.is_multiple_of(4)
            && self.bm.is_multiple_of(self.tm)
            && self.bn.is_multiple_of(self.tn)
            && self.bk > 0
            && self.bk.is_multiple_of(8)
    }
}

/// [`nvfp4_gemm`] with another tile shape, for tuning benches (panics on an invalid shape).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn nvfp4_gemm_tiled<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    cfg: TileConfig,
) -> Result<BurnTensor<Nvfp4Backend<R, F, BT>, 2>, GemmError> {
    assert!(cfg.valid(), "{cfg:?}");
    launch(
        x,
        codes,
        scales,
        global_scale,
        out_features,
        in_features,
        None,
        cfg,
    )
}

/// [`nvfp4_gemm`] writing into a given y `[m, out_features]` (every element is written), and
/// returning it: for tests that fill y with NaN first, so that an element the kernel misses shows.
#[doc(hidden)]
pub fn nvfp4_gemm_into<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    y: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
) -> Result<BurnTensor<Nvfp4Backend<R, F, BT>, 2>, GemmError> {
    launch(
        x,
        codes,
        scales,
        global_scale,
        out_features,
        in_features,
        Some(y),
        TileConfig::DEFAULT,
    )
}

#[allow(clippy::too_many_arguments)]
fn launch<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    y: Option<BurnTensor<Nvfp4Backend<R, F, BT>, 2>>,
    cfg: TileConfig,
) -> Result<BurnTensor<Nvfp4Backend<R, F, BT>, 2>, GemmError> {
    let (m, words, spr) = check_shapes(
        x.dims(),
        codes.dims(),
        scales.dims(),
        out_features,
        in_features,
        cfg,
    )?;
    if let Some(y) = &y {
        if y.dims() != [m, out_features] {
            return Err(GemmError::OutputShape {
                expected: [m, out_features],
                got: y.dims(),
            });
        }
    }

    let (x, codes, scales) = packed_inputs(x, codes, scales)?;

    let client = x.client.clone();
    let hw = &client.properties().hardware;
    let shared = cfg.shared_bytes();
    if hw.max_shared_memory_size < shared {
        return Err(GemmError::SharedMemory {
            needed: shared,
            available: hw.max_shared_memory_size,
        });
    }
    if (hw.max_units_per_cube as usize) < cfg.threads() {
        return Err(GemmError::CubeDim {
            needed: cfg.threads(),
            available: hw.max_units_per_cube as usize,
        });
    }

    let y = match y {
        Some(y) => {
            let y = y.into_primitive().tensor();
            if y.dtype != <F as Element>::dtype() {
                return Err(KernelError::Dtype {
                    what: "y",
                    got: y.dtype,
                    expected: "the backend's float element",
                }
                .into());
            }
            x.assert_is_on_same_device(&y);
            into_contiguous(y)
        }
        None => empty_device_dtype::<R>(
            client.clone(),
            x.device.clone(),
            Shape::new([m, out_features]),
            <F as Element>::dtype(),
        ),
    };

    let count = CubeCount::Static(
        out_features.div_ceil(cfg.bn) as u32,
        m.div_ceil(cfg.bm) as u32,
        1,
    );
    let dim = CubeDim::new_1d(cfg.threads() as u32);
    let (xa, ca, sa, ya) = (
        x.into_tensor_arg(),
        codes.into_tensor_arg(),
        scales.into_tensor_arg(),
        y.clone().into_tensor_arg(),
    );
    let (m32, o32, i32_, w32, s32) = (
        m as u32,
        out_features as u32,
        in_features as u32,
        words as u32,
        spr as u32,
    );
    // SAFETY: the kernel bounds-checks every global read and write against m, out_features,
    // in_features and words (the scale index g/4 < spr follows from gw < words), the buffers are
    // contiguous with the checked shapes, and shared / register indices are below their
    // comptime sizes for any valid TileConfig.
    unsafe {
        nvfp4_gemm_kernel::launch_unchecked::<F, R>(
            &client,
            count,
            dim,
            xa,
            ca,
            sa,
            ya,
            global_scale,
            m32,
            o32,
            i32_,
            w32,
            s32,
            cfg.bm,
            cfg.bn,
            cfg.bk,
            cfg.tm,
            cfg.tn,
        );
    }

    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(y)))
}

/// Times [`nvfp4_gemm`] on one shape, for the bench: one warm-up call (shader compile), then
/// `iters` back-to-back calls closed by a device sync (kernel time, no read-back). Returns the
/// mean per call.
pub fn time_nvfp4_gemm<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    x: &BurnTensor<Nvfp4Backend<R, F, BT>, 2>,
    codes: &BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    scales: &BurnTensor<Nvfp4Backend<R, F, BT>, 2, Int>,
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    iters: usize,
) -> Result<Duration, GemmError> {
    use burn::tensor::backend::Backend;
    let device = x.device();
    let call = || {
        nvfp4_gemm(
            x.clone(),
            codes.clone(),
            scales.clone(),
            global_scale,
            out_features,
            in_features,
        )
    };
    drop(call()?);
    Nvfp4Backend::<R, F, BT>::sync(&device).expect("device sync");
    let iters = iters.max(1);
    let start = Instant::now();
    for _ in 0..iters {
        drop(call()?);
    }
    Nvfp4Backend::<R, F, BT>::sync(&device).expect("device sync");
    Ok(start.elapsed() / iters as u32)
}
