//! Fused attention in CubeCL, for any CubeCL runtime (wgpu now, CUDA later) and any float
//! element `F` of the backend (f32, f16, bf16): one flash-style kernel for prefill and decode,
//! plus the small reduction of its split-K mode. q, k, v and the output are `F`; q and k/v are
//! widened to f32 as they are staged in shared memory, so the dot products, the online softmax
//! (max, sum, rescaling) and P·V run in f32, and the output is rounded to `F` once on store. The
//! split-K partials (unnormalised output, max, sum) stay f32.
//!
//! Semantics are those of [`super::reference::attention`]: q `[t, heads, d]`, k and v
//! `[kv_heads, s, d]`, output `[t, heads · d]`, query head h reads KV head h / groups, visibility
//! per [`AttentionParams::visible`] (causal, a window that bounds the past, up to [`MAX_SPANS`]
//! bidirectional spans), scale, optional tanh softcap.
//!
//! # Structure
//! A cube (128 threads) owns `bq` *rows* of one KV head (`bq` = 1, 2, 4, 8 or 16); row r of the
//! launch is query r / groups, query head kv · groups + r % groups, so every K/V tile a cube
//! loads serves all query heads of its GQA group at once (GQA by index, K/V never copied). The
//! cube walks its key range in tiles of `BK` = 32 keys with an online softmax in f32:
//! - S = Q·Kᵀ: the `bq × 32` dot products are spread over the threads; q and k are staged in
//!   shared memory in chunks of `dc` columns (`dc` = d for d ≤ 72, else 64; k rows padded by one
//!   against bank conflicts); q stays resident when d ≤ 72;
//! - scale, softcap, mask, then the row max and P = exp(S − m) in place in shared memory;
//! - O += P·V: thread (r, lane) owns row r's output columns lane, lane + tpr, ... in registers
//!   (`tpr` = 128 / bq threads per row, at most 64 floats each); V rows are staged whole in K's
//!   buffer, `v_keys(d)` keys at a time (4 at d = 512, 8 at 256, 32 at ≤ 72).
//!
//! Shared memory per cube: 4 · (bq·dc + max(32·(dc+1), v_keys·d) + 32·bq) bytes, at most 16 000
//! (d = 72, bq = 16) and 14 464 at d = 64/256/512 with bq = 16: within WebGPU's 16 KiB default.
//!
//! Key tiles outside the union of the visible ranges of the cube's queries (causal bound,
//! window, spans) are never loaded. Rows without any visible key produce zeros (the reference
//! gives NaN; causal text always sees its own position).
//!
//! Split-K ("flash decoding"): with few cubes (decode: t ≤ a few, 4 KV heads on the full layers)
//! the visible key range is cut into `splits` chunks along grid z; each cube writes its
//! unnormalised output with its running max and sum, and [`split_reduce_kernel`] combines them.
//!
//! # lavapipe
//! Mesa's llvmpipe/lavapipe caps every shader invocation at 65 535 loop iterations in total (all
//! loops together; past that every loop exits silently). The inner loops are therefore unrolled
//! in steps (8 columns per dot-product step, about 64 multiply-adds per P·V step); a cube then
//! spends ~130 iterations per key tile at d = 512 and bq = 16, so on lavapipe one cube handles at
//! most ~15 000 keys at d = 512 (measured: 16 000 fails, 8 000 passes), ~60 000+ at d ≤ 256.
//! Real GPUs have no such cap.

use burn::tensor::{DType, Element, Int, Shape, Tensor as BurnTensor, TensorData, TensorPrimitive};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_dtype, tensor::CubeTensor, BoolElement,
    CubeBackend, CubeRuntime, FloatElement,
};
use cubecl::prelude::*;

use super::AttentionParams;

/// The backend of the kernels: any CubeCL runtime with float element `F` and i32 ints.
pub type AttentionBackend<R, F = f32, BT = u32> = CubeBackend<R, F, i32, BT>;

/// Largest head_dim (the output accumulators live in registers).
pub const MAX_HEAD_DIM: usize = 512;
/// Threads per cube of the attention kernel.
const NT: usize = 128;
/// Keys per tile.
const BK: usize = 32;
/// Largest number of rows (query × query head of a KV group) per cube.
const MAX_BQ: usize = 16;
/// Columns of q/k/v staged at once in shared memory when d > [`WHOLE_D_MAX`].
const D_CHUNK: usize = 64;
/// Head dims up to this are staged whole (72: the vision encoder; 16 000 bytes of shared memory).
const WHOLE_D_MAX: usize = 72;
/// Threads per cube of the split reduction.
const REDUCE_NT: usize = 64;
/// Most bidirectional spans (each masked score may scan them all).
pub const MAX_SPANS: usize = 64;
/// Most key splits (the reduction's shared weights are sized for it).
pub const MAX_SPLITS: usize = 128;
/// Split-K aims at about this many cubes per launch.
const TARGET_CUBES: usize = 256;
/// Fewest keys a split handles (two tiles).
const MIN_KEYS_PER_SPLIT: usize = 2 * BK;
/// Largest cube count along one grid axis (the WebGPU / Vulkan minimum guarantee).
const MAX_GRID_AXIS: usize = 65_535;

/// Why [`fused_attention`] did not run (see [`crate::fallback`] for what the backend does then).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttentionError {
    #[error("{spans} bidirectional spans, the kernel takes at most {max}")]
    Spans { spans: usize, max: usize },
    #[error("head_dim {d} unsupported (1..={max})")]
    HeadDim { d: usize, max: usize },
    #[error("k has head_dim {k}, q has {q}")]
    KeyDim { q: usize, k: usize },
    #[error("v has shape {v:?}, expected the shape of k {k:?}")]
    ValueShape { k: [usize; 3], v: [usize; 3] },
    #[error("{heads} query heads are not a positive multiple of {kv_heads} KV heads")]
    Groups { heads: usize, kv_heads: usize },
    #[error("empty input: t = {t}, s = {s}")]
    Empty { t: usize, s: usize },
    #[error("sliding window 0 hides every key")]
    ZeroWindow,
    #[error("{what} has dtype {got:?}, expected the backend's float element {expected:?}")]
    Dtype {
        what: &'static str,
        got: DType,
        expected: DType,
    },
    #[error("{what} = {value} exceeds the kernel's 32-bit range or grid limit {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error("plan needs {needed} bytes of shared memory, the device has {available}")]
    SharedMemory { needed: usize, available: usize },
    #[error("invalid plan: {0}")]
    Plan(&'static str),
}

/// How a launch is cut: rows per cube and key splits. [`plan`] picks one by shape; a bench or
/// test may pass its own to [`fused_attention_with_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashPlan {
    /// Rows (query × query head of a KV group) per cube: 1, 2, 4, 8 or 16.
    pub rows_per_cube: usize,
    /// Key splits along grid z; 1 writes the output directly, more go through the reduction.
    pub splits: usize,
}

impl FlashPlan {
    /// Shared memory bytes per cube of the attention kernel for head_dim `d`.
    pub fn shared_bytes(&self, d: usize) -> usize {
        4 * (self.rows_per_cube * d_chunk(d) + kv_buffer_len(d) + self.rows_per_cube * BK)
    }
}

const fn d_chunk(d: usize) -> usize {
    if d <= WHOLE_D_MAX {
        d
    } else {
        D_CHUNK
    }
}

/// Floats of the shared K/V buffer: a K chunk `[BK, dc + 1]` or a V sub-tile `[v_keys, d]`.
const fn kv_buffer_len(d: usize) -> usize {
    let k = BK * (d_chunk(d) + 1);
    let v = v_keys(d) * d;
    if k > v {
        k
    } else {
        v
    }
}

/// The key index range `[lo, hi)` that some query of `0..t` may see.
fn visible_key_range(p: &AttentionParams, t: usize, s: usize) -> (usize, usize) {
    let (q_lo, q_hi) = (p.q_start, p.q_start + t - 1);
    let mut lo = p.k_start;
    let mut hi = p.k_start + s;
    if let Some(w) = p.window {
        // The window bounds the past only: k + w > q.
        lo = lo.max((q_lo + 1).saturating_sub(w));
    }
    if p.causal {
        // Keys up to the last query, or to the end of a bidirectional span holding a query.
        let span_end = p
            .bidirectional
            .iter()
            .filter(|r| r.start < r.end && r.start <= q_hi && r.end > q_lo)
            .map(|r| r.end)
            .max()
            .unwrap_or(0);
        hi = hi.min((q_hi + 1).max(span_end));
    }
    if hi <= lo {
        (0, 0)
    } else {
        (lo - p.k_start, hi - p.k_start)
    }
}

/// The plan [`fused_attention`] uses: the smallest power-of-two row tile holding t · groups rows
/// (at most 16), and key splits when the cubes would be too few to fill the device (decode).
pub fn plan(t: usize, heads: usize, kv_heads: usize, s: usize, p: &AttentionParams) -> FlashPlan {
    let rows = t * (heads / kv_heads.max(1)).max(1);
    let rows_per_cube = rows.next_power_of_two().min(MAX_BQ);
    let cubes = rows.div_ceil(rows_per_cube) * kv_heads;
    let (lo, hi) = if t == 0 || s == 0 {
        (0, 0)
    } else {
        visible_key_range(p, t, s)
    };
    let keys = hi - lo;
    let mut splits = 1;
    if cubes < TARGET_CUBES && keys >= 2 * MIN_KEYS_PER_SPLIT {
        splits = TARGET_CUBES
            .div_ceil(cubes)
            .min(keys / MIN_KEYS_PER_SPLIT)
            .min(MAX_SPLITS);
    }
    FlashPlan {
        rows_per_cube,
        splits: splits.max(1),
    }
}

/// Whether the query at absolute position `qa` sees the key at `ka`: [`AttentionParams::visible`]
/// with window 0 = none and `n_spans` bidirectional spans `[start, end)` in `spans`.
#[allow(clippy::collapsible_if)] // `has_spans` is comptime: the outer `if` is resolved at expansion.
#[cube]
fn sees(
    qa: usize,
    ka: usize,
    causal: u32,
    window: usize,
    spans: &Tensor<i32>,
    n_spans: usize,
    #[comptime] has_spans: bool,
) -> bool {
    let window_ok = window == 0 || ka + window > qa;
    let mut causal_ok = causal == 0 || ka <= qa;
    if has_spans {
        if !causal_ok {
            for sp in 0..n_spans {
                let a = spans[2 * sp] as usize;
                let b = spans[2 * sp + 1] as usize;
                if qa >= a && qa < b && ka >= a && ka < b {
                    causal_ok = true;
                }
            }
        }
    }
    window_ok && causal_ok
}

/// Stages columns `col0 .. col0 + dc` of the cube's q rows into `qs` (`[bq, dc]`, zero padded).
#[cube]
fn load_q_chunk<F: Float>(
    q: &Tensor<F>,
    qs: &mut SharedMemory<f32>,
    tid: usize,
    row0: usize,
    rows_total: usize,
    groups: usize,
    heads: usize,
    kvh: usize,
    col0: usize,
    #[comptime] d: usize,
    #[comptime] dc: usize,
    #[comptime] bq: usize,
    #[comptime] nt: usize,
) {
    #[unroll]
    for it in 0..(bq * dc).div_ceil(nt) {
        let x = tid + it * nt;
        if x < bq * dc {
            let rr = x / dc;
            let col = col0 + x % dc;
            let rg = row0 + rr;
            let mut val = 0.0f32;
            if rg < rows_total && col < d {
                let i = rg / groups;
                let h = kvh * groups + rg % groups;
                val = f32::cast_from(q[(i * heads + h) * d + col]);
            }
            qs[x] = val;
        }
    }
}

/// Stages keys `j0 .. j0 + nkeys` of KV head `kvh` (those below `j_hi`, zero elsewhere), columns
/// `col0 .. col0 + width`, from `src` into `dst` with row stride `stride`. `src` is `[kv_heads, s, d]`
/// with any head and key strides (the KV cache is a view of a larger buffer), columns contiguous.
#[cube]
fn load_kv<F: Float>(
    src: &Tensor<F>,
    dst: &mut SharedMemory<f32>,
    tid: usize,
    kvh: usize,
    j0: usize,
    j_hi: usize,
    col0: usize,
    #[comptime] d: usize,
    #[comptime] nkeys: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] nt: usize,
) {
    #[unroll]
    for it in 0..(nkeys * width).div_ceil(nt) {
        let x = tid + it * nt;
        if x < nkeys * width {
            let jj = x / width;
            let cc = x % width;
            let col = col0 + cc;
            let key = j0 + jj;
            let mut val = 0.0f32;
            if key < j_hi && col < d {
                val = f32::cast_from(src[kvh * src.stride(0) + key * src.stride(1) + col]);
            }
            dst[jj * stride + cc] = val;
        }
    }
}

/// Columns per unrolled step of a dot product over a chunk of `dc` columns.
const fn dot_step(dc: usize) -> usize {
    if dc.is_multiple_of(8) {
        8
    } else if dc.is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// Keys per unrolled step of P · V: about 64 multiply-adds per step.
const fn pv_step(d: usize, tpr: usize) -> usize {
    let cpd = d.div_ceil(tpr);
    let mut u = v_keys(d);
    while u > 1 && u * cpd > 64 {
        u /= 2;
    }
    u
}

/// Keys per V sub-tile: V rows are staged whole (all d columns) in K's buffer.
const fn v_keys(d: usize) -> usize {
    let room = BK * (d_chunk(d) + 1);
    let mut n = BK;
    while n > 1 && n * d > room {
        n /= 2;
    }
    n
}

/// The attention kernel. Grid: x = row tiles of `bq` rows, y = KV heads, z = key splits.
/// Direct mode (`split` false): `out` is `[t, heads · d]`, normalised, of the element `O` = `F`.
/// Split mode: `out` is `[splits, t · heads, d]` unnormalised, `O` = f32, and `part_ml`
/// `[splits, t · heads, 2]` holds (max, sum).
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn flash_attention_kernel<F: Float, O: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<O>,
    part_ml: &mut Tensor<f32>,
    spans: &Tensor<i32>,
    t: u32,
    heads: u32,
    groups: u32,
    q_start: u32,
    k_start: u32,
    causal: u32,
    window: u32,
    scale: f32,
    softcap: f32,
    key_base: u32,
    key_end: u32,
    keys_per_split: u32,
    n_spans: u32,
    #[comptime] d: usize,
    #[comptime] bq: usize,
    #[comptime] split: bool,
    #[comptime] has_spans: bool,
) {
    let nt = comptime!(NT);
    let bk = comptime!(BK);
    let dc = comptime!(d_chunk(d));
    let tpr = comptime!(NT / bq);
    // Output columns per thread: lane, lane + tpr, ...
    let cpd = comptime!(d.div_ceil(NT / bq));
    let spt = comptime!((bq * BK).div_ceil(NT));
    let bkv = comptime!(v_keys(d));
    let kv_len = comptime!(kv_buffer_len(d));
    let q_resident = comptime!(d == d_chunk(d));
    // Columns per unrolled step of the dot products, keys per unrolled step of P · V.
    let ud = comptime!(dot_step(d_chunk(d)));
    let uj = comptime!(pv_step(d, NT / bq));

    let tid = UNIT_POS_X as usize;
    let kvh = CUBE_POS_Y as usize;
    let split_idx = CUBE_POS_Z as usize;
    let t = t as usize;
    let heads = heads as usize;
    let groups = groups as usize;
    let q_start = q_start as usize;
    let k_start = k_start as usize;
    let window = window as usize;
    let n_spans = n_spans as usize;

    let rows_total = t * groups;
    let row0 = CUBE_POS_X as usize * bq;
    // The row this thread accumulates, and its lane among the row's tpr threads.
    let r = tid / tpr;
    let lane = tid % tpr;

    // Keys of this cube: its split's chunk, narrowed to what its queries can see.
    let last_row = select(row0 + bq - 1 < rows_total, row0 + bq - 1, rows_total - 1);
    let qa_lo = q_start + row0 / groups;
    let qa_hi = q_start + last_row / groups;
    let mut j_lo = key_base as usize + split_idx * keys_per_split as usize;
    let mut j_hi = j_lo + keys_per_split as usize;
    j_hi = select(j_hi < key_end as usize, j_hi, key_end as usize);
    if window > 0 && qa_lo + 1 > window + k_start {
        let lo = qa_lo + 1 - window - k_start;
        j_lo = select(lo > j_lo, lo, j_lo);
    }
    if causal != 0 {
        // Keys up to the last query, or to the end of a bidirectional span holding a query.
        let mut hi_abs = qa_hi + 1;
        if has_spans {
            for sp in 0..n_spans {
                let a = spans[2 * sp] as usize;
                let b = spans[2 * sp + 1] as usize;
                if a < b && a <= qa_hi && b > qa_lo && b > hi_abs {
                    hi_abs = b;
                }
            }
        }
        let hi = select(hi_abs > k_start, hi_abs - k_start, 0);
        j_hi = select(hi < j_hi, hi, j_hi);
    }

    let mut qs = SharedMemory::<f32>::new(bq * dc);
    // K chunks [BK, dc + 1] (padded rows against bank conflicts), then V sub-tiles [bkv, d].
    let mut kv = SharedMemory::<f32>::new(kv_len);
    let mut ss = SharedMemory::<f32>::new(bq * bk);

    let mut o = Array::<f32>::new(cpd);
    #[unroll]
    for x in 0..cpd {
        o[x] = 0.0f32;
    }
    let mut sc = Array::<f32>::new(spt);
    let mut m_run = f32::new(-1.0e30);
    let mut l_run = 0.0f32;

    if q_resident {
        load_q_chunk(
            q, &mut qs, tid, row0, rows_total, groups, heads, kvh, 0, d, dc, bq, nt,
        );
    }

    let mut j0 = j_lo;
    while j0 < j_hi {
        // S = Q · Kᵀ over the d chunks.
        #[unroll]
        for m in 0..spt {
            sc[m] = 0.0f32;
        }
        let mut c0 = 0;
        while c0 < d {
            sync_cube();
            if !q_resident {
                load_q_chunk(
                    q, &mut qs, tid, row0, rows_total, groups, heads, kvh, c0, d, dc, bq, nt,
                );
            }
            load_kv(k, &mut kv, tid, kvh, j0, j_hi, c0, d, bk, dc, dc + 1, nt);
            sync_cube();
            // Runtime loop over the chunk in steps of `ud` columns, unrolled within a step: short
            // code, and few loop iterations (lavapipe caps them, see the module docs).
            let mut cb = 0;
            while cb < dc {
                #[unroll]
                for m in 0..spt {
                    let e = tid + m * nt;
                    if e < bq * bk {
                        let qb = (e / bk) * dc + cb;
                        let kb = (e % bk) * (dc + 1) + cb;
                        let mut acc = 0.0f32;
                        #[unroll]
                        for c in 0..ud {
                            acc += qs[qb + c] * kv[kb + c];
                        }
                        sc[m] += acc;
                    }
                }
                cb += ud;
            }
            c0 += dc;
        }
        // Scale, softcap, mask; into shared memory.
        #[unroll]
        for m in 0..spt {
            let e = tid + m * nt;
            if e < bq * bk {
                let rg = row0 + e / bk;
                let key = j0 + e % bk;
                let mut val = sc[m] * scale;
                if softcap > 0.0f32 {
                    val = f32::tanh(val / softcap) * softcap;
                }
                let vis = rg < rows_total
                    && key < j_hi
                    && sees(
                        q_start + rg / groups,
                        k_start + key,
                        causal,
                        window,
                        spans,
                        n_spans,
                        has_spans,
                    );
                ss[e] = select(vis, val, f32::new(-1.0e30));
            }
        }
        sync_cube();
        // Online softmax: every thread of row r computes the same running max.
        let mut m_tile = f32::new(-1.0e30);
        #[unroll]
        for j in 0..bk {
            m_tile = max(m_tile, ss[r * bk + j]);
        }
        let m_new = max(m_run, m_tile);
        let alpha = f32::exp(m_run - m_new);
        sync_cube();
        #[unroll]
        for n in 0..bk.div_ceil(tpr) {
            let jj = lane + n * tpr;
            if jj < bk {
                let sv = ss[r * bk + jj];
                ss[r * bk + jj] = select(sv > -5.0e29f32, f32::exp(sv - m_new), 0.0f32);
            }
        }
        l_run *= alpha;
        #[unroll]
        for x in 0..cpd {
            o[x] *= alpha;
        }
        m_run = m_new;
        // O += P · V, V staged bkv whole rows at a time in K's buffer.
        let mut jb = 0;
        while jb < bk {
            sync_cube();
            load_kv(v, &mut kv, tid, kvh, j0 + jb, j_hi, 0, d, bkv, d, d, nt);
            sync_cube();
            let mut j = 0;
            while j < bkv {
                #[unroll]
                for u in 0..uj {
                    let pj = ss[r * bk + jb + j + u];
                    l_run += pj;
                    #[unroll]
                    for x in 0..cpd {
                        let c = lane + x * tpr;
                        if c < d {
                            o[x] += pj * kv[(j + u) * d + c];
                        }
                    }
                }
                j += uj;
            }
            jb += bkv;
        }
        j0 += bk;
    }

    let rg = row0 + r;
    if rg < rows_total {
        let i = rg / groups;
        let h = kvh * groups + rg % groups;
        let row = i * heads + h;
        if split {
            let base = (split_idx * t * heads + row) * d;
            #[unroll]
            for x in 0..cpd {
                let c = lane + x * tpr;
                if c < d {
                    out[base + c] = O::cast_from(o[x]);
                }
            }
            if lane == 0 {
                let mb = (split_idx * t * heads + row) * 2;
                part_ml[mb] = m_run;
                part_ml[mb + 1] = l_run;
            }
        } else {
            let inv = select(l_run > 0.0f32, 1.0f32 / l_run, 0.0f32);
            #[unroll]
            for x in 0..cpd {
                let c = lane + x * tpr;
                if c < d {
                    out[row * d + c] = O::cast_from(o[x] * inv);
                }
            }
        }
    }
}

/// Combines the splits: one cube per output row (query × head), threads over d.
#[cube(launch)]
fn split_reduce_kernel<F: Float>(
    part_o: &Tensor<f32>,  // [splits, rows, d]
    part_ml: &Tensor<f32>, // [splits, rows, 2]
    out: &mut Tensor<F>,   // [rows, d]
    rows: u32,
    splits: u32,
    #[comptime] d: usize,
) {
    let nt = comptime!(REDUCE_NT);
    let tid = UNIT_POS_X as usize;
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let rows = rows as usize;
    let splits = splits as usize;
    let mut w = SharedMemory::<f32>::new(comptime!(MAX_SPLITS));

    let valid = row < rows;
    let mut mx = f32::new(-1.0e30);
    if valid {
        for sp in 0..splits {
            mx = max(mx, part_ml[(sp * rows + row) * 2]);
        }
    }
    let mut sp = tid;
    while sp < splits {
        let mut wv = 0.0f32;
        if valid {
            wv = f32::exp(part_ml[(sp * rows + row) * 2] - mx);
        }
        w[sp] = wv;
        sp += nt;
    }
    sync_cube();
    if valid {
        let mut l = 0.0f32;
        for sp in 0..splits {
            l += w[sp] * part_ml[(sp * rows + row) * 2 + 1];
        }
        let inv = select(l > 0.0f32, 1.0f32 / l, 0.0f32);
        let mut c = tid;
        while c < d {
            let mut acc = 0.0f32;
            for sp in 0..splits {
                acc += w[sp] * part_o[(sp * rows + row) * d + c];
            }
            out[row * d + c] = F::cast_from(acc * inv);
            c += nt;
        }
    }
}

/// `x` itself when its last dimension is contiguous, else a contiguous copy.
fn rows_contiguous<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides()[2] == 1 {
        x
    } else {
        into_contiguous(x)
    }
}

/// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]`, fused, with the plan of
/// [`plan`]. Errors (nothing launched) for what the kernels do not cover; the backend's
/// [`crate::fallback`] policy then panics or runs [`super::reference::attention`].
pub fn fused_attention<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    v: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    p: &AttentionParams,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let [t, heads, _] = q.dims();
    let [kv_heads, s, _] = k.dims();
    let pl = plan(t, heads, kv_heads, s, p);
    fused_attention_with_plan(q, k, v, p, pl, None)
}

/// [`fused_attention`] with an explicit plan, writing into `out` (`[t, heads · d]`) when given
/// and exclusively owned (the tests poison it first), else into a new tensor.
pub fn fused_attention_with_plan<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    v: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    p: &AttentionParams,
    pl: FlashPlan,
    out: Option<BurnTensor<AttentionBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    if p.bidirectional.len() > MAX_SPANS {
        return Err(AttentionError::Spans {
            spans: p.bidirectional.len(),
            max: MAX_SPANS,
        });
    }
    if p.window == Some(0) {
        return Err(AttentionError::ZeroWindow);
    }
    let [t, heads, d] = q.dims();
    let [kv_heads, s, dk] = k.dims();
    if dk != d {
        return Err(AttentionError::KeyDim { q: d, k: dk });
    }
    if v.dims() != k.dims() {
        return Err(AttentionError::ValueShape {
            k: k.dims(),
            v: v.dims(),
        });
    }
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(AttentionError::HeadDim {
            d,
            max: MAX_HEAD_DIM,
        });
    }
    if kv_heads == 0 || heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(AttentionError::Groups { heads, kv_heads });
    }
    if t == 0 || s == 0 {
        return Err(AttentionError::Empty { t, s });
    }
    if !pl.rows_per_cube.is_power_of_two() || pl.rows_per_cube > MAX_BQ {
        return Err(AttentionError::Plan(
            "rows_per_cube must be 1, 2, 4, 8 or 16",
        ));
    }
    if pl.splits == 0 || pl.splits > MAX_SPLITS {
        return Err(AttentionError::Plan("splits must be in 1..=MAX_SPLITS"));
    }
    let groups = heads / kv_heads;
    let rows = t * groups;
    let row_tiles = rows.div_ceil(pl.rows_per_cube);
    // Positions and every index the kernels form stay below 2^31 (u32 arithmetic, no wrap).
    let limit = (i32::MAX as usize) / 2;
    let span_max = p.bidirectional.iter().map(|r| r.end).max().unwrap_or(0);
    let far = p.q_start.max(p.k_start).max(span_max) + t + s;
    // A window wider than every distance is no window.
    let window = match p.window {
        Some(w) if w <= far => w,
        _ => 0,
    };
    for (what, value, lim) in [
        ("positions", far + window, limit),
        ("q elements", t * heads * d, limit),
        ("k elements", kv_heads * s * d, limit),
        ("split partials", pl.splits * t * heads * d, limit),
        ("row tiles", row_tiles, MAX_GRID_AXIS),
        ("kv heads", kv_heads, MAX_GRID_AXIS),
        (
            "reduce rows",
            if pl.splits > 1 { t * heads } else { 0 },
            MAX_GRID_AXIS * MAX_GRID_AXIS,
        ),
    ] {
        if value > lim {
            return Err(AttentionError::TooLarge {
                what,
                value,
                limit: lim,
            });
        }
    }

    let q = q.into_primitive().tensor();
    let k = k.into_primitive().tensor();
    let v = v.into_primitive().tensor();
    let dtype = <F as Element>::dtype();
    for (what, x) in [("q", &q), ("k", &k), ("v", &v)] {
        if x.dtype != dtype {
            return Err(AttentionError::Dtype {
                what,
                got: x.dtype,
                expected: dtype,
            });
        }
    }
    let client = q.client.clone();
    let available = client.properties().hardware.max_shared_memory_size;
    let needed = pl.shared_bytes(d).max(4 * MAX_SPLITS);
    if needed > available {
        return Err(AttentionError::SharedMemory { needed, available });
    }
    q.assert_is_on_same_device(&k);
    q.assert_is_on_same_device(&v);
    let q = into_contiguous(q);
    // K and V are read through their strides (a view of the KV cache's buffer is not copied);
    // only the columns must be contiguous, and every index must stay in 32 bits.
    let k = rows_contiguous(k);
    let v = rows_contiguous(v);
    for (what, x) in [("k span", &k), ("v span", &v)] {
        let st = x.meta.strides();
        let span = (kv_heads - 1) * st[0] + (s - 1) * st[1] + d;
        if span > limit {
            return Err(AttentionError::TooLarge {
                what,
                value: span,
                limit,
            });
        }
    }
    let device = q.device.clone();

    let out: CubeTensor<R> = match out {
        Some(o) => {
            let o = o.into_primitive().tensor();
            if o.dtype != dtype {
                return Err(AttentionError::Dtype {
                    what: "out",
                    got: o.dtype,
                    expected: dtype,
                });
            }
            let dims = o.meta.shape().clone();
            if dims.num_elements() != t * heads * d || dims.dims::<2>() != [t, heads * d] {
                return Err(AttentionError::Plan("out must be [t, heads * d]"));
            }
            o.assert_is_on_same_device(&q);
            if o.can_mut() && o.is_contiguous() {
                o
            } else {
                empty_device_dtype::<R>(
                    client.clone(),
                    device.clone(),
                    Shape::new([t, heads * d]),
                    dtype,
                )
            }
        }
        None => empty_device_dtype::<R>(
            client.clone(),
            device.clone(),
            Shape::new([t, heads * d]),
            dtype,
        ),
    };

    // Keys any query sees, cut into the splits (tile-aligned from the range start).
    let (key_lo, key_hi) = visible_key_range(p, t, s);
    let keys = key_hi - key_lo;
    let tiles = keys.div_ceil(BK).max(1);
    let keys_per_split = tiles.div_ceil(pl.splits) * BK;
    let splits = if pl.splits > 1 {
        keys.div_ceil(keys_per_split).max(1)
    } else {
        1
    };
    let split = splits > 1;

    // Bidirectional spans as i32 pairs (only causal attention consults them).
    let spans: Vec<i32> = if p.causal {
        p.bidirectional
            .iter()
            .filter(|r| r.start < r.end)
            .flat_map(|r| [r.start as i32, r.end as i32])
            .collect()
    } else {
        Vec::new()
    };
    let n_spans = spans.len() / 2;
    let has_spans = n_spans > 0;
    let spans_t: CubeTensor<R> = if has_spans {
        BurnTensor::<AttentionBackend<R, F, BT>, 1, Int>::from_data(
            TensorData::new(spans, [2 * n_spans]),
            &device,
        )
        .into_primitive()
    } else {
        empty_device_dtype::<R>(client.clone(), device.clone(), Shape::new([2]), DType::I32)
    };

    let rows_out = t * heads;
    // Split mode's f32 (max, sum) per row; direct mode does not read it.
    let ml_shape = if split {
        Shape::new([splits, rows_out, 2])
    } else {
        Shape::new([2])
    };
    let part_ml = empty_device_dtype::<R>(client.clone(), device.clone(), ml_shape, DType::F32);
    // Direct mode writes the normalised output (`F`); split mode the f32 partials.
    macro_rules! launch_attention {
        ($o:ty, $out:expr) => {
            flash_attention_kernel::launch::<F, $o, R>(
                &client,
                CubeCount::Static(row_tiles as u32, kv_heads as u32, splits as u32),
                CubeDim::new_1d(NT as u32),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                $out.into_tensor_arg(),
                part_ml.clone().into_tensor_arg(),
                spans_t.into_tensor_arg(),
                t as u32,
                heads as u32,
                groups as u32,
                p.q_start as u32,
                p.k_start as u32,
                p.causal as u32,
                window as u32,
                p.scale,
                p.softcap.unwrap_or(0.0),
                key_lo as u32,
                key_hi as u32,
                keys_per_split as u32,
                n_spans as u32,
                d,
                pl.rows_per_cube,
                split,
                has_spans,
            );
        };
    }
    if split {
        let part_o = empty_device_dtype::<R>(
            client.clone(),
            device.clone(),
            Shape::new([splits, rows_out, d]),
            DType::F32,
        );
        launch_attention!(f32, part_o.clone());
        let grid_x = rows_out.min(MAX_GRID_AXIS);
        let grid_y = rows_out.div_ceil(grid_x);
        split_reduce_kernel::launch::<F, R>(
            &client,
            CubeCount::Static(grid_x as u32, grid_y as u32, 1),
            CubeDim::new_1d(REDUCE_NT as u32),
            part_o.into_tensor_arg(),
            part_ml.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows_out as u32,
            splits as u32,
            d,
        );
    } else {
        launch_attention!(F, out.clone());
    }
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}
