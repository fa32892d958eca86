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
//! bidirectional spans), scale, optional tanh softcap; and for a paged ragged batch
//! ([`paged_attention`]) those of [`super::reference::paged_attention`], per sequence.
//!
//! # Structure
//! One kernel serves both entry points: a launch takes a ragged batch of sequences, each with its
//! own rows of q, positions, window and spans; [`fused_attention`] is the batch of one sequence
//! whose keys are rows `0..s` of k and v, [`paged_attention`] reads key j of a sequence from pool
//! row `blocks[j / block_size] · block_size + j % block_size` of its block table (the `paged`
//! comptime flag: the contiguous kernel has no table lookup). The whole batch is one launch
//! (plus the split reduction): grid x = row tiles of all sequences, y = KV heads, z = key splits.
//! The host describes each tile in a small i32 metadata tensor ([`META`] fields: its sequence's
//! first q row and row count, the tile's first row, q_start, k_start, causal, window, the tile's
//! visible key range, keys per split, the offsets of its sequence's block table and spans in the
//! concatenated tables, the span count), so the kernel needs no per-sequence scan.
//!
//! A cube (128 threads) owns `bq` *rows* of one KV head of one sequence (`bq` = 1, 2, 4, 8 or
//! 16); row r of a sequence is its query r / groups, query head kv · groups + r % groups, so every
//! K/V tile a cube loads serves all query heads of its GQA group at once (GQA by index, K/V never
//! copied). A paged cube first computes the pool rows of the tile's 32 keys into shared memory
//! (one block-table read per key per tile), then stages K and V rows from there. The cube walks
//! its key range in tiles of `BK` = 32 keys with an online softmax in f32:
//! - S = Q·Kᵀ: the `bq × 32` dot products are spread over the threads; q and k are staged in
//!   shared memory in chunks of `dc` columns (`dc` = d for d ≤ 72, else 64; k rows padded by one
//!   against bank conflicts); q stays resident when d ≤ 72;
//! - scale, softcap, mask, then the row max and P = exp(S − m) in place in shared memory;
//! - O += P·V: thread (r, lane) owns row r's output columns lane, lane + tpr, ... in registers
//!   (`tpr` = 128 / bq threads per row, at most 64 floats each); V rows are staged whole in K's
//!   buffer, `v_keys(d)` keys at a time (4 at d = 512, 8 at 256, 32 at ≤ 72).
//!
//! Shared memory per cube: 4 · (bq·dc + max(32·(dc+1), v_keys·d) + 32·bq) bytes, at most 16 000
//! (d = 72, bq = 16) and 14 464 at d = 64/256/512 with bq = 16: within WebGPU's 16 KiB default;
//! 128 bytes more for the paged kernel's pool rows.
//!
//! Key tiles outside the union of the visible ranges of the cube's queries (causal bound,
//! window, spans; computed per tile on the host) are never loaded. Rows without any visible key produce zeros (the reference
//! gives NaN; causal text always sees its own position).
//!
//! Split-K ("flash decoding"): with few cubes (decode: t ≤ a few, 4 KV heads on the full layers;
//! a batch of decode rows) each tile's visible key range is cut into `splits` chunks along grid z
//! (a tile with fewer keys leaves its later splits empty); each cube writes its unnormalised
//! output with its running max and sum, and [`split_reduce_kernel`] combines them.
//!
//! A paged batch shares one `bq` (that of its longest sequence: a decode row in a batch with a
//! prefill chunk fills 1..8 of 16 rows), one scale and one softcap (a mix is refused).
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

use super::fp8::{self, KvScales};
use super::{AttentionParams, PagedBatch};
use crate::nvfp4::gemv::e4m3_to_f32;

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
    #[error("paged batch: {0}")]
    Batch(String),
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
    visible_keys(p, p.q_start, p.q_start + t - 1, s)
}

/// The key index range `[lo, hi)` of keys `0..s` that some query at absolute positions
/// `q_lo..=q_hi` may see (causal bound, window, spans), or (0, 0).
fn visible_keys(p: &AttentionParams, q_lo: usize, q_hi: usize, s: usize) -> (usize, usize) {
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

/// Key splits for `cubes` cubes whose longest visible key range is `keys`: enough to give the
/// device about [`TARGET_CUBES`] cubes, each at least [`MIN_KEYS_PER_SPLIT`] keys.
fn choose_splits(cubes: usize, keys: usize) -> usize {
    let mut splits = 1;
    if cubes < TARGET_CUBES && keys >= 2 * MIN_KEYS_PER_SPLIT {
        splits = TARGET_CUBES
            .div_ceil(cubes.max(1))
            .min(keys / MIN_KEYS_PER_SPLIT)
            .min(MAX_SPLITS);
    }
    splits.max(1)
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
    FlashPlan {
        rows_per_cube,
        splits: choose_splits(cubes, hi - lo),
    }
}

/// The plan [`paged_attention`] uses: the row tile of the sequence with the most rows (as
/// [`plan`]; a tile never spans two sequences), and key splits when all tiles of all sequences
/// make too few cubes (a decode batch), sized by the longest visible key range.
pub fn paged_plan(batch: &PagedBatch, heads: usize, kv_heads: usize) -> FlashPlan {
    let groups = (heads / kv_heads.max(1)).max(1);
    let most = batch.seqs.iter().map(|s| s.rows.len()).max().unwrap_or(0);
    let rows_per_cube = (most * groups).next_power_of_two().min(MAX_BQ);
    let tiles: usize = batch
        .seqs
        .iter()
        .map(|s| (s.rows.len() * groups).div_ceil(rows_per_cube))
        .sum();
    let keys = batch
        .seqs
        .iter()
        .filter(|s| !s.rows.is_empty() && s.keys > 0)
        .map(|s| {
            let (lo, hi) = visible_key_range(&s.params, s.rows.len(), s.keys);
            hi - lo
        })
        .max()
        .unwrap_or(0);
    FlashPlan {
        rows_per_cube,
        splits: choose_splits(tiles * kv_heads, keys),
    }
}

/// Whether the query at absolute position `qa` sees the key at `ka`: [`AttentionParams::visible`]
/// with window 0 = none and `n_spans` bidirectional spans `[start, end)` in `spans`, from pair
/// `span0` on.
#[allow(clippy::collapsible_if)] // `has_spans` is comptime: the outer `if` is resolved at expansion.
#[cube]
fn sees(
    qa: usize,
    ka: usize,
    causal: u32,
    window: usize,
    spans: &Tensor<i32>,
    span0: usize,
    n_spans: usize,
    #[comptime] has_spans: bool,
) -> bool {
    let window_ok = window == 0 || ka + window > qa;
    let mut causal_ok = causal == 0 || ka <= qa;
    if has_spans {
        if !causal_ok {
            for sp in span0..span0 + n_spans {
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

/// Stages columns `col0 .. col0 + dc` of the cube's q rows into `qs` (`[bq, dc]`, zero padded);
/// the cube's sequence starts at row `q_row` of q.
#[cube]
fn load_q_chunk<F: Float>(
    q: &Tensor<F>,
    qs: &mut SharedMemory<f32>,
    tid: usize,
    q_row: usize,
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
                let i = q_row + rg / groups;
                let h = kvh * groups + rg % groups;
                val = f32::cast_from(q[(i * heads + h) * d + col]);
            }
            qs[x] = val;
        }
    }
}

/// Stages keys `jt + jb .. jt + jb + nkeys` of KV head `kvh` (those below `j_hi`, zero
/// elsewhere), columns `col0 .. col0 + width`, from `src` into `dst` with row stride `stride`.
/// `src` is `[kv_heads, s, d]` with any head and key strides (the KV cache is a view of a larger
/// buffer, or a paged pool), columns contiguous. Contiguous keys: key j is row j of `src`; paged
/// (`paged`): key `jt + x` of the tile starting at `jt` is in row `slots[x]`. With `fp8`, `src`
/// holds E4M3 codes packed 4 per i32 word along the row (see [`super::fp8`]): column `col` is
/// byte `col % 4` of word `col / 4`, decoded and multiplied by `kv_scale` as it is staged.
#[cube]
fn load_kv<KV: Numeric>(
    src: &Tensor<KV>,
    dst: &mut SharedMemory<f32>,
    slots: &SharedMemory<u32>,
    tid: usize,
    kvh: usize,
    jt: usize,
    jb: usize,
    j_hi: usize,
    col0: usize,
    #[comptime] d: usize,
    #[comptime] nkeys: usize,
    #[comptime] width: usize,
    #[comptime] stride: usize,
    #[comptime] nt: usize,
    #[comptime] paged: bool,
    kv_scale: f32,
    #[comptime] fp8: bool,
) {
    #[unroll]
    for it in 0..(nkeys * width).div_ceil(nt) {
        let x = tid + it * nt;
        if x < nkeys * width {
            let jj = x / width;
            let cc = x % width;
            let col = col0 + cc;
            let key = jt + jb + jj;
            let mut val = 0.0f32;
            if key < j_hi && col < d {
                let mut at = key;
                if paged {
                    at = slots[jb + jj] as usize;
                }
                let row = kvh * src.stride(0) + at * src.stride(1);
                if fp8 {
                    let word = u32::cast_from(src[row + col / 4]);
                    let code = (word >> (((col % 4) * 8) as u32)) & 0xff;
                    val = e4m3_to_f32(code) * kv_scale;
                } else {
                    val = f32::cast_from(src[row + col]);
                }
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

/// The attention kernel, for a ragged batch of sequences (a contiguous call is a batch of one).
/// Grid: x = row tiles (`meta` row x, see [`Meta`]), y = KV heads, z = key splits. A tile holds
/// `bq` rows (query × query head of a KV group) of one sequence. Keys are read from K/V rows
/// `0..s` directly, or (`paged`) through the sequence's block table in `blocks`: key j is row
/// `blocks[table + j / block_size] · block_size + j % block_size`.
/// Direct mode (`split` false): `out` is `[rows, heads · d]`, normalised, of the element `O` = `F`.
/// Split mode: `out` is `[splits, rows · heads, d]` unnormalised, `O` = f32, and `part_ml`
/// `[splits, rows · heads, 2]` holds (max, sum).
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn flash_attention_kernel<F: Float, O: Float, KV: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<KV>,
    v: &Tensor<KV>,
    out: &mut Tensor<O>,
    part_ml: &mut Tensor<f32>,
    meta: &Tensor<i32>,
    spans: &Tensor<i32>,
    blocks: &Tensor<i32>,
    heads: u32,
    groups: u32,
    rows_out: u32,
    block_size: u32,
    scale: f32,
    softcap: f32,
    k_scale: f32,
    v_scale: f32,
    #[comptime] d: usize,
    #[comptime] bq: usize,
    #[comptime] split: bool,
    #[comptime] has_spans: bool,
    #[comptime] paged: bool,
    #[comptime] fp8: bool,
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
    let heads = heads as usize;
    let groups = groups as usize;
    let block_size = block_size as usize;

    // This tile's sequence and key range (see `Meta`).
    let mb = CUBE_POS_X as usize * comptime!(META);
    let q_row = meta[mb] as usize;
    let rows_total = meta[mb + 1] as usize;
    let row0 = meta[mb + 2] as usize;
    let q_start = meta[mb + 3] as usize;
    let k_start = meta[mb + 4] as usize;
    let causal = meta[mb + 5] as u32;
    let window = meta[mb + 6] as usize;
    let key_lo = meta[mb + 7] as usize;
    let key_hi = meta[mb + 8] as usize;
    let keys_per_split = meta[mb + 9] as usize;
    let table = meta[mb + 10] as usize;
    let span0 = meta[mb + 11] as usize;
    let n_spans = meta[mb + 12] as usize;

    // The row this thread accumulates, and its lane among the row's tpr threads.
    let r = tid / tpr;
    let lane = tid % tpr;

    // Keys of this cube: its split's chunk of the tile's visible range (computed on the host).
    let j_lo = key_lo + split_idx * keys_per_split;
    let mut j_hi = j_lo + keys_per_split;
    j_hi = select(j_hi < key_hi, j_hi, key_hi);

    // Pool rows of the current key tile (paged only).
    let mut slot_s = SharedMemory::<u32>::new(comptime!(if paged { BK } else { 1 }));
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
            q, &mut qs, tid, q_row, row0, rows_total, groups, heads, kvh, 0, d, dc, bq, nt,
        );
    }

    let mut j0 = j_lo;
    while j0 < j_hi {
        if paged {
            // The tile's pool rows, read by the loads below (after their first sync; every
            // load of the previous tile is behind the sync that followed it).
            if tid < bk {
                let key = j0 + tid;
                let mut at = 0u32;
                if key < j_hi {
                    let b = blocks[table + key / block_size] as usize;
                    at = (b * block_size + key % block_size) as u32;
                }
                slot_s[tid] = at;
            }
        }
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
                    q, &mut qs, tid, q_row, row0, rows_total, groups, heads, kvh, c0, d, dc, bq, nt,
                );
            }
            load_kv(
                k,
                &mut kv,
                &slot_s,
                tid,
                kvh,
                j0,
                0,
                j_hi,
                c0,
                d,
                bk,
                dc,
                dc + 1,
                nt,
                paged,
                k_scale,
                fp8,
            );
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
                        span0,
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
            load_kv(
                v, &mut kv, &slot_s, tid, kvh, j0, jb, j_hi, 0, d, bkv, d, d, nt, paged, v_scale,
                fp8,
            );
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
        let i = q_row + rg / groups;
        let h = kvh * groups + rg % groups;
        let row = i * heads + h;
        if split {
            let base = (split_idx * rows_out as usize + row) * d;
            #[unroll]
            for x in 0..cpd {
                let c = lane + x * tpr;
                if c < d {
                    out[base + c] = O::cast_from(o[x]);
                }
            }
            if lane == 0 {
                let ml = (split_idx * rows_out as usize + row) * 2;
                part_ml[ml] = m_run;
                part_ml[ml + 1] = l_run;
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
/// and exclusively owned (the tests poison it first), else into a new tensor. The same kernel as
/// [`paged_attention`]: one sequence whose keys are rows `0..s` of k and v.
pub fn fused_attention_with_plan<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    v: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    p: &AttentionParams,
    pl: FlashPlan,
    out: Option<BurnTensor<AttentionBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let [t, _, _] = q.dims();
    let s = k.dims()[1];
    let seqs = vec![Seq {
        row: 0,
        t,
        keys: s,
        p,
        table: 0,
    }];
    let (k, v) = (k.into_primitive().tensor(), v.into_primitive().tensor());
    launch_flash(q, k, v, None, &seqs, None, pl, out)
}

/// Paged attention of a ragged batch (see [`PagedBatch`]): q `[rows, heads, d]`, this layer's K
/// and V pools `[kv_heads, slots, d]` -> `[rows, heads · d]`, in one launch for all sequences
/// (plus the split reduction), with the plan of [`paged_plan`]. Keys are read from the pools
/// through each sequence's block table, never gathered. Errors (nothing launched) as
/// [`fused_attention`], and for a batch that does not fit q or the pools.
pub fn paged_attention<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k_pool: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    v_pool: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    batch: &PagedBatch,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let pl = paged_plan(batch, q.dims()[1], k_pool.dims()[0]);
    paged_attention_with_plan(q, k_pool, v_pool, batch, pl, None)
}

/// [`paged_attention`] with an explicit plan, writing into `out` (`[rows, heads · d]`) when given
/// and exclusively owned, else into a new tensor.
pub fn paged_attention_with_plan<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k_pool: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    v_pool: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    batch: &PagedBatch,
    pl: FlashPlan,
    out: Option<BurnTensor<AttentionBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let (k, v) = (
        k_pool.into_primitive().tensor(),
        v_pool.into_primitive().tensor(),
    );
    paged_launch(q, k, v, None, batch, pl, out)
}

/// [`paged_attention`] over fp8 pools `[kv_heads, slots, d / 4]` of packed E4M3 words with
/// per-tensor `scales` (see [`super::fp8`]): the same kernel, decoding each K and V element as
/// it stages the tile in shared memory (a comptime flag: the float kernel is unchanged).
pub fn paged_attention_fp8<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k_pool: BurnTensor<AttentionBackend<R, F, BT>, 3, Int>,
    v_pool: BurnTensor<AttentionBackend<R, F, BT>, 3, Int>,
    scales: KvScales,
    batch: &PagedBatch,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let pl = paged_plan(batch, q.dims()[1], k_pool.dims()[0]);
    let (k, v) = (k_pool.into_primitive(), v_pool.into_primitive());
    paged_launch(q, k, v, Some(scales), batch, pl, None)
}

fn paged_launch<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k_pool: CubeTensor<R>,
    v_pool: CubeTensor<R>,
    fp8: Option<KvScales>,
    batch: &PagedBatch,
    pl: FlashPlan,
    out: Option<BurnTensor<AttentionBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    let rows = q.dims()[0];
    if rows != batch.rows() {
        return Err(AttentionError::Batch(format!(
            "q has {rows} rows, the batch {}",
            batch.rows()
        )));
    }
    if let Some(why) = batch.check(k_pool.meta.shape().dims::<3>()[1]) {
        return Err(AttentionError::Batch(why));
    }
    // Every sequence's block table (the blocks holding its keys), one after the other.
    let mut table = Vec::new();
    let mut seqs = Vec::with_capacity(batch.seqs.len());
    for s in &batch.seqs {
        seqs.push(Seq {
            row: s.rows.start,
            t: s.rows.len(),
            keys: s.keys,
            p: &s.params,
            table: table.len(),
        });
        let n = s.keys.div_ceil(batch.block_size);
        table.extend(s.blocks[..n].iter().map(|&b| b as i32));
    }
    launch_flash(
        q,
        k_pool,
        v_pool,
        fp8,
        &seqs,
        Some((table, batch.block_size)),
        pl,
        out,
    )
}

/// One sequence of a launch: its rows of q, its keys, what it sees.
struct Seq<'a> {
    /// Its first row of q.
    row: usize,
    /// Its query rows.
    t: usize,
    /// Its keys: `0..keys`.
    keys: usize,
    p: &'a AttentionParams,
    /// Where its block table starts in the concatenated table (paged launches).
    table: usize,
}

/// i32 fields per row tile in the kernel's metadata: first q row of the tile's sequence, its
/// rows (queries × group), the tile's first row among them, q_start, k_start, causal, window
/// (0 = none), the tile's visible key range `[lo, hi)`, keys per split, the offset of the
/// sequence's block table, of its spans (in pairs) and their count.
const META: usize = 13;

/// The kernel's metadata: [`META`] i32 per row tile, the bidirectional spans of every sequence
/// (i32 pairs, one sequence after the other), and the key splits of the grid (1: direct mode).
/// `windows` are the sequences' windows, 0 for none.
fn tile_meta(
    seqs: &[Seq],
    windows: &[usize],
    groups: usize,
    bq: usize,
    splits: usize,
) -> (Vec<i32>, Vec<i32>, usize) {
    let mut meta = Vec::new();
    let mut spans = Vec::new();
    let mut grid_z = 1;
    for (s, &window) in seqs.iter().zip(windows) {
        if s.t == 0 {
            continue;
        }
        let p = s.p;
        // Bidirectional spans (only causal attention consults them).
        let span0 = spans.len() / 2;
        if p.causal {
            for r in p.bidirectional.iter().filter(|r| r.start < r.end) {
                spans.extend([r.start as i32, r.end as i32]);
            }
        }
        let n_spans = spans.len() / 2 - span0;
        let rows = s.t * groups;
        for row0 in (0..rows).step_by(bq) {
            let last = (row0 + bq).min(rows) - 1;
            let (lo, hi) = if s.keys == 0 {
                (0, 0)
            } else {
                visible_keys(
                    p,
                    p.q_start + row0 / groups,
                    p.q_start + last / groups,
                    s.keys,
                )
            };
            // The tile's keys cut into the splits, tile-aligned from its range start.
            let keys = hi - lo;
            let per_split = keys.div_ceil(BK).max(1).div_ceil(splits) * BK;
            if splits > 1 {
                grid_z = grid_z.max(keys.div_ceil(per_split));
            }
            meta.extend(
                [
                    s.row,
                    rows,
                    row0,
                    p.q_start,
                    p.k_start,
                    p.causal as usize,
                    window,
                    lo,
                    hi,
                    per_split,
                    s.table,
                    span0,
                    n_spans,
                ]
                .map(|x| x as i32),
            );
        }
    }
    (meta, spans, grid_z)
}

/// An i32 tensor of `v` on `device` (one element when `v` is empty: the kernel does not read it).
fn int_tensor<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    mut v: Vec<i32>,
    device: &R::Device,
) -> CubeTensor<R> {
    if v.is_empty() {
        v.push(0);
    }
    let n = v.len();
    BurnTensor::<AttentionBackend<R, F, BT>, 1, Int>::from_data(TensorData::new(v, [n]), device)
        .into_primitive()
}

/// The launch behind [`fused_attention_with_plan`] (`paged` None: keys are rows `0..s` of k and
/// v) and [`paged_attention_with_plan`] (`paged`: the concatenated block tables and the block
/// size). Checks everything before launching anything.
#[allow(clippy::too_many_arguments)]
fn launch_flash<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    q: BurnTensor<AttentionBackend<R, F, BT>, 3>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    fp8: Option<KvScales>,
    seqs: &[Seq],
    paged: Option<(Vec<i32>, usize)>,
    pl: FlashPlan,
    out: Option<BurnTensor<AttentionBackend<R, F, BT>, 2>>,
) -> Result<BurnTensor<AttentionBackend<R, F, BT>, 2>, AttentionError> {
    for s in seqs {
        if s.p.bidirectional.len() > MAX_SPANS {
            return Err(AttentionError::Spans {
                spans: s.p.bidirectional.len(),
                max: MAX_SPANS,
            });
        }
        if s.p.window == Some(0) {
            return Err(AttentionError::ZeroWindow);
        }
    }
    let [t, heads, d] = q.dims();
    // fp8 pools hold 4 codes per word: `kw` words per row stand for `dk` = 4 · kw columns.
    let (kdims, vdims) = (k.meta.shape().dims::<3>(), v.meta.shape().dims::<3>());
    let [kv_heads, s, kw] = kdims;
    let dk = if fp8.is_some() {
        kw * fp8::PER_WORD
    } else {
        kw
    };
    if dk != d {
        return Err(AttentionError::KeyDim { q: d, k: dk });
    }
    if vdims != kdims {
        return Err(AttentionError::ValueShape { k: kdims, v: vdims });
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
    // Scale and softcap are arguments of the launch: one value for every sequence.
    let live: Vec<&Seq> = seqs.iter().filter(|s| s.t > 0).collect();
    let (scale, softcap) = (live[0].p.scale, live[0].p.softcap);
    if live
        .iter()
        .any(|s| s.p.scale != scale || s.p.softcap != softcap)
    {
        return Err(AttentionError::Plan(
            "the sequences of a batch must share scale and softcap",
        ));
    }
    let groups = heads / kv_heads;
    // Positions and every index the kernels form stay below 2^31 (u32 arithmetic, no wrap).
    let limit = (i32::MAX as usize) / 2;
    let mut far_window = 0;
    let windows: Vec<usize> = seqs
        .iter()
        .map(|s| {
            let span_max = s.p.bidirectional.iter().map(|r| r.end).max().unwrap_or(0);
            let far = s.p.q_start.max(s.p.k_start).max(span_max) + s.t + s.keys;
            // A window wider than every distance is no window.
            let window = match s.p.window {
                Some(w) if w <= far => w,
                _ => 0,
            };
            far_window = far_window.max(far + window);
            window
        })
        .collect();
    let (meta, spans, splits) = tile_meta(seqs, &windows, groups, pl.rows_per_cube, pl.splits);
    let row_tiles = meta.len() / META;
    let table_len = paged.as_ref().map_or(0, |(b, _)| b.len());
    for (what, value, lim) in [
        ("positions", far_window, limit),
        ("q elements", t * heads * d, limit),
        ("k elements", kv_heads * s * kw, limit),
        ("split partials", pl.splits * t * heads * d, limit),
        ("block table", table_len, limit),
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
    let dtype = <F as Element>::dtype();
    // fp8 pools are i32 words.
    let kv_dtype = if fp8.is_some() { DType::I32 } else { dtype };
    for (what, x, expected) in [("q", &q, dtype), ("k", &k, kv_dtype), ("v", &v, kv_dtype)] {
        if x.dtype != expected {
            return Err(AttentionError::Dtype {
                what,
                got: x.dtype,
                expected,
            });
        }
    }
    let client = q.client.clone();
    let available = client.properties().hardware.max_shared_memory_size;
    let slot_bytes = if paged.is_some() { 4 * BK } else { 0 };
    let needed = (pl.shared_bytes(d) + slot_bytes).max(4 * MAX_SPLITS);
    if needed > available {
        return Err(AttentionError::SharedMemory { needed, available });
    }
    q.assert_is_on_same_device(&k);
    q.assert_is_on_same_device(&v);
    let q = into_contiguous(q);
    // K and V are read through their strides (a view of the KV cache's buffer, or the pool, is
    // not copied); only the columns must be contiguous, and every index must stay in 32 bits.
    let k = rows_contiguous(k);
    let v = rows_contiguous(v);
    for (what, x) in [("k span", &k), ("v span", &v)] {
        let st = x.meta.strides();
        let span = (kv_heads - 1) * st[0] + (s - 1) * st[1] + kw;
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

    let split = splits > 1;
    let has_spans = !spans.is_empty();
    let is_paged = paged.is_some();
    let (table, block_size) = paged.unwrap_or((Vec::new(), 1));
    let meta_t = int_tensor::<R, F, BT>(meta, &device);
    let spans_t = int_tensor::<R, F, BT>(spans, &device);
    let table_t = int_tensor::<R, F, BT>(table, &device);

    let rows_out = t * heads;
    // Split mode's f32 (max, sum) per row; direct mode does not read it.
    let ml_shape = if split {
        Shape::new([splits, rows_out, 2])
    } else {
        Shape::new([2])
    };
    let part_ml = empty_device_dtype::<R>(client.clone(), device.clone(), ml_shape, DType::F32);
    // Direct mode writes the normalised output (`F`); split mode the f32 partials.
    let scales = fp8.unwrap_or_default();
    macro_rules! launch_attention {
        ($o:ty, $kv:ty, $out:expr) => {
            flash_attention_kernel::launch::<F, $o, $kv, R>(
                &client,
                CubeCount::Static(row_tiles as u32, kv_heads as u32, splits as u32),
                CubeDim::new_1d(NT as u32),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                $out.into_tensor_arg(),
                part_ml.clone().into_tensor_arg(),
                meta_t.into_tensor_arg(),
                spans_t.into_tensor_arg(),
                table_t.into_tensor_arg(),
                heads as u32,
                groups as u32,
                rows_out as u32,
                block_size as u32,
                scale,
                softcap.unwrap_or(0.0),
                scales.k,
                scales.v,
                d,
                pl.rows_per_cube,
                split,
                has_spans,
                is_paged,
                fp8.is_some(),
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
        if fp8.is_some() {
            launch_attention!(f32, i32, part_o.clone());
        } else {
            launch_attention!(f32, F, part_o.clone());
        }
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
        if fp8.is_some() {
            launch_attention!(F, i32, out.clone());
        } else {
            launch_attention!(F, F, out.clone());
        }
    }
    Ok(BurnTensor::from_primitive(TensorPrimitive::Float(out)))
}
