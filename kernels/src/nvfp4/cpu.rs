//! NVFP4 matmul on the CPU: y[m, out] = x[m, in] · Wᵀ with W decoded on the fly from the packed
//! words of [`crate::nvfp4`] (never materialized), f32 accumulation.
//!
//! Layout of the work. A row of W is `in/8` code words; the kernels take `L` words at a time (a
//! "chunk", L = 16 on AVX-512, 8 on AVX2 and the portable path), one word per SIMD lane, and
//! decode nibble k of every lane at once (shift by 4k, table lookup). Lane j then holds column
//! 8j + k of the chunk, so x is permuted once per call into the matching order
//! (`xp[chunk][k][j] = x[8(L·chunk + j) + k]`, zero padded to whole chunks, 64-byte aligned). Each
//! lane sums the 8 products of its word, and that sum is multiplied by the block scale of the
//! word's group (the two words of a 16-input group are two lanes): the scale is applied once per 8
//! products, not per element as the reference does, so results differ from the reference in
//! rounding only (the tests see at most 2.8e-7 of Σ|x·w| over all paths).
//!
//! Decoding: AVX-512 looks up all 16 E2M1 codes with one `vpermps` (the low 4 bits of each lane);
//! AVX2 looks up the magnitude (`vpermps` reads the low 3 bits) and xors in bit 3 as the sign; the
//! portable path computes 2·|v| = m + relu(m−4) + 2·relu(m−6) in f32 (exact small integers, the
//! ½ folded into the scale, exact as a power of two) in loops that LLVM vectorizes with the
//! baseline SSE2. AVX2/FMA and AVX-512 are chosen at run time (`is_x86_feature_detected!`).
//! Block scales `e4m3(byte) · global` of a row segment are decoded once per block of weight rows
//! and panel of x into a small scratch (SIMD paths: branch-free bit arithmetic that vectorizes;
//! portable: the 256-entry [`E4M3_TABLE`]); both round `e4m3 · global` once, like the reference.
//!
//! Blocking: each thread takes a contiguous range of output rows (the kernels' rayon pool, split in
//! `available_parallelism` ranges when the work pays for the hand-off). Below `GEMM_MIN_M` x rows
//! (decode), a kernel call takes up to 4 weight rows × up to 4 x rows and keeps the decoded
//! weights in registers: each decoded weight vector serves every x row, and each loaded x vector
//! every weight row (at m = 1, 4 weight rows share each load of x, which has 8× the bytes of the
//! packed weight per column); the input dimension is blocked so that the x rows stay in L2, and
//! each call prefetches the same place in the next block of weight rows. From `GEMM_MIN_M` x rows
//! on (prefill), tiles of 8 weight rows × 512 inputs are decoded to f32 (the reference's W values
//! exactly) into an L1-sized buffer and reused for a panel of 64 x rows by a register-blocked
//! micro-kernel (8 weight rows × 32 x rows on AVX-512) over x transposed: W is never decoded
//! beyond one tile at a time.

use crate::nvfp4::{scale_words_per_row, GROUP_SIZE};
use crate::pool::threads;
use crate::simd::{prefetch, AlignedBuf, Isa, Kernel, Simd};

/// E4M3 ("fn": bias 7, no infinities, NaN at 0x7f/0xff) to f32 for every byte, built at compile time.
pub static E4M3_TABLE: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0usize;
    while b < 256 {
        let exp = ((b >> 3) & 0xf) as u32;
        let man = (b & 7) as u32;
        let mag = if exp == 0xf && man == 7 {
            f32::NAN
        } else if exp == 0 {
            man as f32 / 512.0
        } else {
            // (1 + m/8) · 2^(e−7): f32 exponent field e − 7 + 127, the 3 mantissa bits on top.
            f32::from_bits(((exp + 120) << 23) | (man << 20))
        };
        t[b] = if b & 0x80 != 0 { -mag } else { mag };
        b += 1;
    }
    t
}

/// The NVFP4 kernels' shapes per path.
impl Isa {
    /// Code words per chunk (one per SIMD lane).
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }

    /// x rows that share one decode of a weight segment (bounded by the register file; more x
    /// rows per weight row would move the bottleneck to the loads of x).
    fn rows_per_block(self) -> usize {
        4
    }

    /// Weight rows that share each load of x, for `rx` x rows (few x rows: several weight rows,
    /// so that x, 8× the bytes of the packed weight per column, is not reloaded for each).
    fn weight_rows_for(self, rx: usize) -> usize {
        match (self, rx) {
            (Isa::Avx512, 1..=2) => 4,
            (Isa::Avx512, 3..=4) => 2,
            (Isa::Avx2, 1) => 2,
            _ => 1,
        }
    }

    fn max_weight_rows(self) -> usize {
        self.weight_rows_for(1)
    }

    /// x rows per call of the tiled path's micro-kernel (its accumulators fill the registers).
    fn gemm_lanes(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Portable => 8,
        }
    }
}

/// x rows per panel (the outer blocking over m).
const PANEL_ROWS: usize = 64;
/// Target size of one panel's slice of permuted x (kept in L2 while the weight rows stream by).
const X_BLOCK_BYTES: usize = 256 * 1024;
/// From this many x rows on, weight tiles are decoded to f32 once and reused ([`run_rows_tiled`]).
const GEMM_MIN_M: usize = 32;
/// x rows per panel of the tiled path (a multiple of every `gemm_lanes`).
const GEMM_PANEL: usize = 64;
/// Weight rows per decoded tile (the micro-kernel's rows).
const TILE_ROWS: usize = 8;
/// Input columns per block of the tiled path: the x panel (`GEMM_PANEL` rows) is 128 KB, a tile 16 KB.
const GEMM_BLOCK_COLS: usize = 512;
/// Below this many multiply-adds a call runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 19;

/// y[m, out] = x[m, in] · Wᵀ for a packed NVFP4 weight (see [`crate::nvfp4`] for the layout), on the
/// best instruction set of this CPU.
#[allow(clippy::too_many_arguments)]
pub fn nvfp4_matmul(
    x: &[f32],
    m: usize,
    codes: &[i32],
    scales: &[i32],
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    y: &mut [f32],
) {
    nvfp4_matmul_with(
        Isa::detect(),
        threads(),
        x,
        m,
        codes,
        scales,
        global_scale,
        out_features,
        in_features,
        y,
    )
}

/// [`nvfp4_matmul`] on a chosen path and at most `max_threads` threads (tests and benchmarks).
/// Panics if `isa` is not available on this CPU or the slice lengths do not match the shape.
#[allow(clippy::too_many_arguments)]
pub fn nvfp4_matmul_with(
    isa: Isa,
    max_threads: usize,
    x: &[f32],
    m: usize,
    codes: &[i32],
    scales: &[i32],
    global_scale: f32,
    out_features: usize,
    in_features: usize,
    y: &mut [f32],
) {
    assert!(isa.supported(), "{isa:?} is not supported by this CPU");
    let (out, inp) = (out_features, in_features);
    assert_eq!(
        inp % GROUP_SIZE,
        0,
        "in_features must be a multiple of {GROUP_SIZE}"
    );
    let nw = inp / 8;
    let spr = scale_words_per_row(inp);
    assert_eq!(codes.len(), out * nw, "codes must be [out, in/8] words");
    assert_eq!(
        scales.len(),
        out * spr,
        "scales must be [out, ceil(in/64)] words"
    );
    assert_eq!(x.len(), m * inp, "x must be [m, in]");
    assert_eq!(y.len(), m * out, "y must be [m, out]");
    if m == 0 || out == 0 {
        return;
    }
    // The kernels accumulate into y.
    y.fill(0.0);
    if inp == 0 {
        return;
    }

    let lanes = isa.lanes();
    let nc = nw.div_ceil(lanes);
    let tiled = m >= GEMM_MIN_M;
    // x in the kernels' column order: row-major panels for the small-m kernels, transposed
    // panels for the tiled path.
    let xp = if tiled {
        transpose_x(x, m, inp, lanes, nc)
    } else {
        permute_x(x, m, inp, lanes, nc)
    };
    let p = Problem {
        isa,
        xp: xp.as_slice(),
        m,
        codes,
        scales,
        global_scale,
        nw,
        spr,
        nc,
        lanes,
    };

    let macs = m * out * inp;
    let n_threads = if macs >= PARALLEL_MIN_MACS {
        max_threads.clamp(1, out)
    } else {
        1
    };
    // Rows r0..r1 into `part`: laid out [m, r1 − r0] by the small-m kernels, [r1 − r0, m] by the
    // tiled path (contiguous in m, as its micro-kernel produces them).
    let run = |r0: usize, r1: usize, part: &mut [f32]| {
        if tiled {
            run_rows_tiled(&p, r0, r1, part)
        } else {
            run_rows(&p, r0, r1, part)
        }
    };
    if n_threads == 1 && !tiled {
        // One thread: its [m, out] block is y itself.
        return run(0, out, y);
    }

    // Contiguous row ranges; each thread writes its own block, copied into y after.
    let bounds: Vec<usize> = (0..=n_threads).map(|t| t * out / n_threads).collect();
    let mut parts: Vec<Vec<f32>> = (0..n_threads)
        .map(|t| vec![0f32; m * (bounds[t + 1] - bounds[t])])
        .collect();
    if n_threads == 1 {
        run(0, out, &mut parts[0]);
    } else {
        crate::pool::scope(|s| {
            let mut rest = parts.iter_mut().enumerate();
            let (_, first) = rest.next().expect("at least one thread");
            for (t, part) in rest {
                let (r0, r1, run) = (bounds[t], bounds[t + 1], &run);
                s.spawn(move |_| run(r0, r1, part));
            }
            run(bounds[0], bounds[1], first);
        });
    }
    for (t, part) in parts.iter().enumerate() {
        let (r0, r1) = (bounds[t], bounds[t + 1]);
        let n = r1 - r0;
        if tiled {
            // [n, m] -> y[m, out] columns r0..r1, in 8 × 8 blocks.
            for rb in (0..n).step_by(8) {
                let nrb = 8.min(n - rb);
                for ib in (0..m).step_by(8) {
                    let nib = 8.min(m - ib);
                    for r in rb..rb + nrb {
                        for i in ib..ib + nib {
                            y[i * out + r0 + r] = part[r * m + i];
                        }
                    }
                }
            }
        } else {
            for i in 0..m {
                y[i * out + r0..i * out + r1].copy_from_slice(&part[i * n..(i + 1) * n]);
            }
        }
    }
}

struct Problem<'a> {
    isa: Isa,
    /// x in kernel order: [`permute_x`] (small m) or [`transpose_x`] (tiled path).
    xp: &'a [f32],
    m: usize,
    codes: &'a [i32],
    scales: &'a [i32],
    global_scale: f32,
    /// Code words per row, scale words per row, chunks per row, words per chunk.
    nw: usize,
    spr: usize,
    nc: usize,
    lanes: usize,
}

/// x rows in kernel order: for each chunk of `lanes` words, `[k][j] = x[8(chunk·lanes + j) + k]`.
fn permute_x(x: &[f32], m: usize, inp: usize, lanes: usize, nc: usize) -> AlignedBuf {
    let cf = lanes * 8;
    let stride = nc * cf;
    let nw = inp / 8;
    let mut xp = AlignedBuf::zeroed(m * stride);
    for (xr, dst) in x
        .chunks_exact(inp)
        .zip(xp.as_mut_slice().chunks_exact_mut(stride))
    {
        for (w, cols) in xr.chunks_exact(8).enumerate().take(nw) {
            let base = (w / lanes) * cf + w % lanes;
            for (k, &v) in cols.iter().enumerate() {
                dst[base + k * lanes] = v;
            }
        }
    }
    xp
}

/// x for the tiled path: panels of `GEMM_PANEL` rows, each `[column][row]` (columns in kernel
/// order, as in [`permute_x`]; rows past m and padded columns zero).
fn transpose_x(x: &[f32], m: usize, inp: usize, lanes: usize, nc: usize) -> AlignedBuf {
    let cf = lanes * 8;
    let cols = nc * cf;
    let mut xt = AlignedBuf::zeroed(m.div_ceil(GEMM_PANEL) * cols * GEMM_PANEL);
    // Column c of x goes to kernel position perm[c].
    let perm: Vec<usize> = (0..inp)
        .map(|col| (col / 8 / lanes) * cf + (col % 8) * lanes + (col / 8) % lanes)
        .collect();
    for (q, panel) in xt
        .as_mut_slice()
        .chunks_exact_mut(cols * GEMM_PANEL)
        .enumerate()
    {
        let rows = GEMM_PANEL.min(m - q * GEMM_PANEL);
        // Blocks of 8 rows × 64 columns through a local buffer: contiguous reads of x, and 8
        // contiguous floats per write (strided access over many rows of x at a power-of-two
        // stride would thrash the L1 sets).
        for i0 in (0..rows).step_by(8) {
            let nr = 8.min(rows - i0);
            for c0 in (0..inp).step_by(64) {
                let nc = 64.min(inp - c0);
                let mut blk = [[0f32; 8]; 64];
                for ii in 0..nr {
                    let xr = &x[(q * GEMM_PANEL + i0 + ii) * inp + c0..][..nc];
                    for (b, &v) in blk.iter_mut().zip(xr) {
                        b[ii] = v;
                    }
                }
                for (cc, b) in blk.iter().enumerate().take(nc) {
                    let d = perm[c0 + cc] * GEMM_PANEL + i0;
                    panel[d..d + nr].copy_from_slice(&b[..nr]);
                }
            }
        }
    }
    xt
}

/// Output rows r0..r1 into `y` laid out [m, r1 − r0].
fn run_rows(p: &Problem, r0: usize, r1: usize, y: &mut [f32]) {
    let isa = p.isa;
    let l = p.lanes;
    let cf = l * 8;
    let gpc = l / 2; // groups per chunk
    let xstride = p.nc * cf;
    let nrows = r1 - r0;
    let nb = isa.max_weight_rows();
    let panel = p.m.min(PANEL_ROWS);
    // Chunks per block of the input dimension, so that panel · block of x is about X_BLOCK_BYTES.
    let kcc = (X_BLOCK_BYTES / (4 * panel * cf)).max(1).min(p.nc);
    let gpb = kcc * gpc;
    let mut sg = AlignedBuf::zeroed(nb * gpb);
    let sg = sg.as_mut_slice();
    for p0 in (0..p.m).step_by(PANEL_ROWS) {
        let p1 = p.m.min(p0 + PANEL_ROWS);
        for c0 in (0..p.nc).step_by(kcc) {
            let c1 = p.nc.min(c0 + kcc);
            let (w0, w1) = (c0 * l, p.nw.min(c1 * l));
            let (g0, g1) = (w0 / 2, w1 / 2);
            for rb in (r0..r1).step_by(nb) {
                let nr = nb.min(r1 - rb);
                // The next block's scale rows, fetched while this block computes.
                prefetch_bytes(
                    p.scales.as_ptr().wrapping_add((rb + nb) * p.spr),
                    nb * p.spr * 4,
                );
                // Block scales of these rows' segments, decoded once for every x row of the panel.
                for n in 0..nr {
                    let srow = &p.scales[(rb + n) * p.spr..(rb + n + 1) * p.spr];
                    group_scales(
                        isa,
                        &mut sg[n * gpb..n * gpb + (c1 - c0) * gpc],
                        srow,
                        g0,
                        g1,
                        p.global_scale,
                    );
                }
                let mut i = p0;
                while i < p1 {
                    let rx = isa.rows_per_block().min(p1 - i);
                    let xs = &p.xp[i * xstride + c0 * cf..];
                    let mut n0 = 0;
                    while n0 < nr {
                        // Weight rows per kernel call: as many as the registers allow for rx x rows.
                        let nk = match isa.weight_rows_for(rx).min(nr - n0) {
                            3 => 2,
                            n => n,
                        };
                        let codes = &p.codes[(rb + n0) * p.nw + w0..];
                        let mut acc = [0f32; 8];
                        let seg = Segment {
                            codes,
                            prefetch_ahead: nb * p.nw,
                            nw_seg: w1 - w0,
                            code_stride: p.nw,
                            scales: &sg[n0 * gpb..],
                            scale_stride: gpb,
                            xs,
                            xstride,
                        };
                        dot(isa, nk, rx, &seg, &mut acc[..nk * rx]);
                        for n in 0..nk {
                            for t in 0..rx {
                                y[(i + t) * nrows + (rb + n0 + n - r0)] += acc[n * rx + t];
                            }
                        }
                        n0 += nk;
                    }
                    i += rx;
                }
            }
        }
    }
}

/// Large m: for each block of `TILE_ROWS` weight rows and of the input dimension, the weights are
/// decoded once into a small f32 tile (the reference's W values exactly: e2m1 · (e4m3 · global),
/// in the permuted column order of x) and multiplied with a panel of x rows, transposed so that
/// the micro-kernel broadcasts one weight and multiplies it into a vector of x rows (no horizontal
/// sums). Only a tile of W is ever decoded, and each decoded tile serves `GEMM_PANEL` x rows.
fn run_rows_tiled(p: &Problem, r0: usize, r1: usize, y: &mut [f32]) {
    let isa = p.isa;
    let l = p.lanes;
    let cf = l * 8;
    let gpc = l / 2;
    let cols = p.nc * cf;
    let kcc = (GEMM_BLOCK_COLS / cf).max(1).min(p.nc);
    let kcols = kcc * cf;
    let gpb = kcc * gpc;
    let mut sg = AlignedBuf::zeroed(TILE_ROWS * gpb);
    let mut tile = AlignedBuf::zeroed(TILE_ROWS * kcols);
    let (sg, tile) = (sg.as_mut_slice(), tile.as_mut_slice());
    for (q, panel) in p.xp.chunks_exact(cols * GEMM_PANEL).enumerate() {
        let (p0, p1) = (q * GEMM_PANEL, p.m.min((q + 1) * GEMM_PANEL));
        for c0 in (0..p.nc).step_by(kcc) {
            let c1 = p.nc.min(c0 + kcc);
            let (w0, w1) = (c0 * l, p.nw.min(c1 * l));
            let kc = (c1 - c0) * cf;
            let xt = &panel[c0 * cf * GEMM_PANEL..];
            for rt in (r0..r1).step_by(TILE_ROWS) {
                let nr = TILE_ROWS.min(r1 - rt);
                for n in 0..nr {
                    let srow = &p.scales[(rt + n) * p.spr..(rt + n + 1) * p.spr];
                    group_scales(
                        isa,
                        &mut sg[n * gpb..n * gpb + (c1 - c0) * gpc],
                        srow,
                        w0 / 2,
                        w1 / 2,
                        p.global_scale,
                    );
                    let codes = &p.codes[(rt + n) * p.nw + w0..(rt + n) * p.nw + w1];
                    decode_row(
                        isa,
                        codes,
                        &sg[n * gpb..],
                        &mut tile[n * kcols..n * kcols + kc],
                    );
                }
                tile[nr * kcols..].fill(0.0);
                for i0 in (0..p1 - p0).step_by(isa.gemm_lanes()) {
                    let mut acc = [[0f32; 32]; TILE_ROWS];
                    gemm_micro(isa, kc, tile, kcols, &xt[i0..], &mut acc);
                    let lw = isa.gemm_lanes().min(p1 - p0 - i0);
                    for (n, a) in acc.iter().enumerate().take(nr) {
                        let o = (rt + n - r0) * p.m + p0 + i0;
                        for (d, v) in y[o..o + lw].iter_mut().zip(a) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// Decodes one row segment (codes of whole chunks, the last possibly partial) into `out` in the
/// permuted column order, with its group scales `sg` (per element: the reference's W values).
fn decode_row(isa: Isa, codes: &[i32], sg: &[f32], out: &mut [f32]) {
    let l = isa.lanes();
    let nch = codes.len().div_ceil(l);
    assert!(sg.len() >= nch * l / 2 && out.len() >= nch * l * 8);
    match isa {
        Isa::Portable => {
            for c in 0..nch {
                let seg = &codes[c * l..codes.len().min(c * l + l)];
                for k in 0..8 {
                    for j in 0..l {
                        // 2·e2m1 times the halved portable scale: exactly e2m1 · (e4m3 · global).
                        let v = seg
                            .get(j)
                            .map_or(0.0, |&w| e2m1_times_two(w as u32 >> (4 * k)));
                        out[c * l * 8 + k * l + j] = v * sg[c * l / 2 + j / 2];
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked against the CPU's features, and the bounds above.
        Isa::Avx2 => unsafe { x86::decode_row_avx2(codes, sg, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { x86::decode_row_avx512(codes, sg, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path exists on this architecture"),
    }
}

/// acc[n][t] = Σ_c tile[n][c] · xt[c][t] for the `TILE_ROWS` tile rows and `gemm_lanes` x rows.
fn gemm_micro(
    isa: Isa,
    kc: usize,
    tile: &[f32],
    kcols: usize,
    xt: &[f32],
    acc: &mut [[f32; 32]; TILE_ROWS],
) {
    assert!(tile.len() >= (TILE_ROWS - 1) * kcols + kc && kc <= kcols);
    assert!(kc == 0 || xt.len() >= (kc - 1) * GEMM_PANEL + isa.gemm_lanes());
    // Not through `Isa::dispatch`: with the slices inside a kernel struct, LLVM kept the
    // accumulators in memory and ran scalar FMAs (14× slower at m = 64 on AVX-512); as
    // arguments of a `#[target_feature]` function, they vectorize.
    match isa {
        Isa::Portable => gemm_micro_generic::<false, 8>(kc, tile, kcols, xt, acc),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is supported (checked at the entry point).
        Isa::Avx2 => unsafe { x86::gemm_micro_avx2(kc, tile, kcols, xt, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { x86::gemm_micro_avx512(kc, tile, kcols, xt, acc) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path exists on this architecture"),
    }
}

/// The micro-kernel in plain Rust, for LLVM to vectorize over the `LW` x rows (one or two vectors
/// per tile row, `TILE_ROWS` · LW / width accumulator registers). `FMA`: fused multiply-add (only
/// where the CPU has it; elsewhere `mul_add` would be a library call).
#[inline(always)]
fn gemm_micro_generic<const FMA: bool, const LW: usize>(
    kc: usize,
    tile: &[f32],
    kcols: usize,
    xt: &[f32],
    acc: &mut [[f32; 32]; TILE_ROWS],
) {
    let rows: [&[f32]; TILE_ROWS] = std::array::from_fn(|n| &tile[n * kcols..n * kcols + kc]);
    let mut a = [[0f32; LW]; TILE_ROWS];
    for c in 0..kc {
        let xv: &[f32; LW] = xt[c * GEMM_PANEL..c * GEMM_PANEL + LW].try_into().unwrap();
        for n in 0..TILE_ROWS {
            let w = rows[n][c];
            for t in 0..LW {
                a[n][t] = if FMA {
                    w.mul_add(xv[t], a[n][t])
                } else {
                    a[n][t] + w * xv[t]
                };
            }
        }
    }
    for (d, s) in acc.iter_mut().zip(&a) {
        d[..LW].copy_from_slice(s);
    }
}

/// One kernel call's operands: `nw_seg` code words of consecutive weight rows (`code_stride`
/// words apart), their group scales (`scale_stride` apart, padded with zeros to whole chunks), and
/// consecutive rows of permuted x (`xstride` apart), all starting at the segment's first chunk.
struct Segment<'a> {
    codes: &'a [i32],
    /// Words ahead of each code row to prefetch (the same place in the next block of rows).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    prefetch_ahead: usize,
    nw_seg: usize,
    code_stride: usize,
    scales: &'a [f32],
    scale_stride: usize,
    xs: &'a [f32],
    xstride: usize,
}

/// Prefetch hint (to L1) for `bytes` from `ptr` (no access happens, so any address is fine).
#[inline(always)]
fn prefetch_bytes<T>(ptr: *const T, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        prefetch::<false>((ptr as *const u8).wrapping_add(off) as *const f32);
    }
}

/// Group scales e4m3(byte) · global of groups g0..g1 of one row into `dst`, zeros after.
fn group_scales(isa: Isa, dst: &mut [f32], srow: &[i32], g0: usize, g1: usize, global: f32) {
    match isa {
        Isa::Portable => {
            // Table lookups; the portable kernel sums 2·e2m1, so its scales are halved (exact).
            let n = g1 - g0;
            for (gi, d) in dst[..n].iter_mut().enumerate() {
                let g = g0 + gi;
                let b = (srow[g / 4] as u32 >> (8 * (g % 4))) & 0xff;
                *d = E4M3_TABLE[b as usize] * global * 0.5;
            }
            dst[n..].fill(0.0);
        }
        // The branch-free decode, vectorized for the path.
        Isa::Avx2 | Isa::Avx512 => isa.dispatch(GroupScales {
            dst,
            srow,
            g0,
            g1,
            global,
        }),
    }
}

/// [`group_scales_generic`] as a kernel, compiled for the path that runs it.
struct GroupScales<'a> {
    dst: &'a mut [f32],
    srow: &'a [i32],
    g0: usize,
    g1: usize,
    global: f32,
}

impl Kernel for GroupScales<'_> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        group_scales_generic(self.dst, self.srow, self.g0, self.g1, self.global)
    }
}

/// Branch-free (vectorizable) E4M3 decode times `global`, rounded once like the reference's
/// `e4m3 · global`: normal bytes rebias the exponent (e − 7 + 127) and keep the 3 mantissa bits;
/// subnormal ones are m · (global · 2^-9). The NaN bytes (0x7f, 0xff), which the loader rejects,
/// decode as ±480 · global here.
#[inline(always)]
fn e4m3_times(b: u32, global: f32, global_sub: f32) -> f32 {
    let em = b & 0x7f;
    let normal = f32::from_bits((em << 20) + (120 << 23)) * global;
    let sub = (em as i32) as f32 * global_sub;
    let v = if em >= 8 { normal } else { sub };
    f32::from_bits(v.to_bits() ^ ((b & 0x80) << 24))
}

#[inline(always)]
fn group_scales_generic(dst: &mut [f32], srow: &[i32], g0: usize, g1: usize, global: f32) {
    debug_assert!(g0.is_multiple_of(4) && g1 - g0 <= dst.len());
    let global_sub = global / 512.0;
    let words = &srow[g0 / 4..g1.div_ceil(4)];
    let n = g1 - g0;
    if cfg!(target_endian = "little") {
        // SAFETY: any i32 is 4 valid bytes, u8 has alignment 1; little-endian byte j of a word is
        // bits 8j..8j+8, the scale of group 4w + j.
        let bytes =
            unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
        for (d, &b) in dst[..n].iter_mut().zip(bytes) {
            *d = e4m3_times(b as u32, global, global_sub);
        }
    } else {
        for (gi, d) in dst[..n].iter_mut().enumerate() {
            let b = (words[gi / 4] as u32 >> (8 * (gi % 4))) & 0xff;
            *d = e4m3_times(b, global, global_sub);
        }
    }
    dst[n..].fill(0.0);
}

/// out[n·rx + t] = Σ over the segment of (weight row n) · (x row t), for nk weight rows and rx x rows.
fn dot(isa: Isa, nk: usize, rx: usize, s: &Segment, out: &mut [f32]) {
    let l = isa.lanes();
    let nch = s.nw_seg.div_ceil(l);
    // The kernels index without bounds checks within these limits.
    assert!(
        nk >= 1
            && rx >= 1
            && rx <= isa.rows_per_block()
            && nk <= isa.weight_rows_for(rx)
            && out.len() == nk * rx
    );
    assert!(s.codes.len() >= (nk - 1) * s.code_stride + s.nw_seg);
    assert!(s.scales.len() >= (nk - 1) * s.scale_stride + nch * l / 2);
    assert!(s.xs.len() >= (rx - 1) * s.xstride + nch * l * 8);
    macro_rules! by_shape {
        ($f:ident; $(($n:literal, $r:literal, $c:literal))*) => {
            match (nk, rx) {
                $(($n, $r) => $f::<$n, $r, $c>(s, out),)*
                _ => unreachable!("no kernel for {nk} weight rows x {rx} x rows"),
            }
        };
    }
    match isa {
        Isa::Portable => by_shape!(dot_portable; (1, 1, 2) (1, 2, 2) (1, 3, 1) (1, 4, 1)),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` was checked against the CPU's features, and the bounds above.
        Isa::Avx2 => unsafe {
            by_shape!(dot_avx2; (2, 1, 2) (1, 1, 2) (1, 2, 2) (1, 3, 1) (1, 4, 1))
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe {
            by_shape!(dot_avx512;
                (4, 1, 1) (2, 1, 2) (1, 1, 2)
                (4, 2, 1) (2, 2, 1) (1, 2, 2)
                (2, 3, 1) (1, 3, 1) (2, 4, 1) (1, 4, 1))
        },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable path exists on this architecture"),
    }
}

/// 2·|e2m1| of the low nibble of `n` with its sign: m + relu(m − 4) + 2·relu(m − 6) for m = n & 7.
#[inline(always)]
fn e2m1_times_two(n: u32) -> f32 {
    let m = (n & 7) as f32;
    let a = m - 4.0;
    let b = m - 6.0;
    let t = m + (if a > 0.0 { a } else { 0.0 }) + 2.0 * (if b > 0.0 { b } else { 0.0 });
    f32::from_bits(t.to_bits() | ((n & 8) << 28))
}

/// Portable kernel: one weight row (NR = 1), 8 words per chunk, `CH` accumulator chains.
fn dot_portable<const NR: usize, const R: usize, const CH: usize>(s: &Segment, out: &mut [f32]) {
    const L: usize = 8;
    debug_assert!(NR == 1);
    let nw = s.nw_seg;
    let mut tot = [[0f32; L]; R];
    for c in 0..nw.div_ceil(L) {
        let mut w = [0u32; L];
        for (d, &v) in w.iter_mut().zip(&s.codes[c * L..nw.min(c * L + L)]) {
            *d = v as u32;
        }
        let g: &[f32; L / 2] = s.scales[c * L / 2..c * L / 2 + L / 2].try_into().unwrap();
        let mut acc = [[[0f32; L]; R]; CH];
        for k in 0..8 {
            let mut v = [0f32; L];
            for j in 0..L {
                v[j] = e2m1_times_two(w[j] >> (4 * k));
            }
            for (t, a) in acc[k % CH].iter_mut().enumerate() {
                let o = t * s.xstride + c * L * 8 + k * L;
                let xv: &[f32; L] = s.xs[o..o + L].try_into().unwrap();
                for j in 0..L {
                    a[j] += v[j] * xv[j];
                }
            }
        }
        for (t, tt) in tot.iter_mut().enumerate() {
            for j in 0..L {
                let a = if CH == 2 {
                    acc[0][t][j] + acc[CH - 1][t][j]
                } else {
                    acc[0][t][j]
                };
                tt[j] += a * g[j / 2];
            }
        }
    }
    for (o, tt) in out.iter_mut().zip(&tot) {
        *o = ((tt[0] + tt[4]) + (tt[2] + tt[6])) + ((tt[1] + tt[5]) + (tt[3] + tt[7]));
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{dot_avx2, dot_avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Segment;
    use crate::nvfp4::E2M1_VALUES;

    /// Safety: the CPU has avx512f and fma; `gemm_micro`'s bounds hold.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gemm_micro_avx512(
        kc: usize,
        tile: &[f32],
        kcols: usize,
        xt: &[f32],
        acc: &mut [[f32; 32]; super::TILE_ROWS],
    ) {
        super::gemm_micro_generic::<true, 32>(kc, tile, kcols, xt, acc)
    }

    /// Safety: the CPU has avx2 and fma; `gemm_micro`'s bounds hold.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_micro_avx2(
        kc: usize,
        tile: &[f32],
        kcols: usize,
        xt: &[f32],
        acc: &mut [[f32; 32]; super::TILE_ROWS],
    ) {
        super::gemm_micro_generic::<true, 16>(kc, tile, kcols, xt, acc)
    }

    /// One row segment to f32 in the permuted order, 16 words per chunk. Safety: avx512f; the
    /// bounds of `decode_row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_row_avx512(codes: &[i32], sg: &[f32], out: &mut [f32]) {
        let nw = codes.len();
        let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
        let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let (cp, sp, op) = (codes.as_ptr(), sg.as_ptr(), out.as_mut_ptr());
        for c in 0..nw.div_ceil(16) {
            let w = if c * 16 + 16 <= nw {
                _mm512_loadu_si512(cp.add(c * 16) as *const __m512i)
            } else {
                _mm512_maskz_loadu_epi32(((1u32 << (nw - c * 16)) - 1) as __mmask16, cp.add(c * 16))
            };
            let g =
                _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(sp.add(c * 8))));
            macro_rules! step {
                ($k:literal) => {
                    let v = _mm512_permutexvar_ps(_mm512_srli_epi32::<{ 4 * $k }>(w), table);
                    _mm512_storeu_ps(op.add(c * 128 + $k * 16), _mm512_mul_ps(v, g));
                };
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            step!(4);
            step!(5);
            step!(6);
            step!(7);
        }
    }

    /// One row segment to f32 in the permuted order, 8 words per chunk. Safety: avx2; the bounds
    /// of `decode_row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode_row_avx2(codes: &[i32], sg: &[f32], out: &mut [f32]) {
        let nw = codes.len();
        let mag = _mm256_loadu_ps(E2M1_VALUES.as_ptr());
        let sign = _mm256_set1_epi32(i32::MIN);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let (cp, sp, op) = (codes.as_ptr(), sg.as_ptr(), out.as_mut_ptr());
        for c in 0..nw.div_ceil(8) {
            let w = if c * 8 + 8 <= nw {
                _mm256_loadu_si256(cp.add(c * 8) as *const __m256i)
            } else {
                let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((nw - c * 8) as i32), lane);
                _mm256_maskload_epi32(cp.add(c * 8), live)
            };
            let g =
                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sp.add(c * 4))), dup);
            macro_rules! step {
                ($k:literal) => {
                    let m = _mm256_permutevar8x32_ps(mag, _mm256_srli_epi32::<{ 4 * $k }>(w));
                    let sg = _mm256_and_si256(_mm256_slli_epi32::<{ 28 - 4 * $k }>(w), sign);
                    let v = _mm256_xor_ps(m, _mm256_castsi256_ps(sg));
                    _mm256_storeu_ps(op.add(c * 64 + $k * 8), _mm256_mul_ps(v, g));
                };
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            step!(4);
            step!(5);
            step!(6);
            step!(7);
        }
    }

    /// AVX2 + FMA, 8 words (4 groups) per chunk, NR weight rows × R x rows, CH chains.
    /// Safety: the CPU has avx2 and fma; `dot`'s bounds hold.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2<const NR: usize, const R: usize, const CH: usize>(
        s: &Segment,
        out: &mut [f32],
    ) {
        let nw = s.nw_seg;
        let (cp, sp, xp) = (s.codes.as_ptr(), s.scales.as_ptr(), s.xs.as_ptr());
        // vpermps reads the low 3 bits of each index: the magnitudes; bit 3 becomes the sign.
        let mag = _mm256_loadu_ps(E2M1_VALUES.as_ptr());
        let sign = _mm256_set1_epi32(i32::MIN);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let mut tot = [[_mm256_setzero_ps(); R]; NR];
        for c in 0..nw.div_ceil(8) {
            let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((nw - c * 8) as i32), lane);
            let w: [__m256i; NR] = std::array::from_fn(|n| {
                let p = cp.add(n * s.code_stride + c * 8);
                if c % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(s.prefetch_ahead) as *const i8);
                }
                if c * 8 + 8 <= nw {
                    _mm256_loadu_si256(p as *const __m256i)
                } else {
                    _mm256_maskload_epi32(p, live)
                }
            });
            let xc = xp.add(c * 64);
            let mut acc = [[[_mm256_setzero_ps(); R]; NR]; CH];
            macro_rules! step {
                ($k:literal) => {{
                    let v: [__m256; NR] = std::array::from_fn(|n| {
                        let m =
                            _mm256_permutevar8x32_ps(mag, _mm256_srli_epi32::<{ 4 * $k }>(w[n]));
                        let sg = _mm256_and_si256(_mm256_slli_epi32::<{ 28 - 4 * $k }>(w[n]), sign);
                        _mm256_xor_ps(m, _mm256_castsi256_ps(sg))
                    });
                    for t in 0..R {
                        let xv = _mm256_loadu_ps(xc.add(t * s.xstride + $k * 8));
                        for n in 0..NR {
                            acc[$k % CH][n][t] = _mm256_fmadd_ps(v[n], xv, acc[$k % CH][n][t]);
                        }
                    }
                }};
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            step!(4);
            step!(5);
            step!(6);
            step!(7);
            for n in 0..NR {
                // Lane j (word j) takes the scale of group j / 2.
                let g = _mm256_castps128_ps256(_mm_loadu_ps(sp.add(n * s.scale_stride + c * 4)));
                let g = _mm256_permutevar8x32_ps(g, dup);
                for t in 0..R {
                    let a = if CH == 2 {
                        _mm256_add_ps(acc[0][n][t], acc[CH - 1][n][t])
                    } else {
                        acc[0][n][t]
                    };
                    tot[n][t] = _mm256_fmadd_ps(a, g, tot[n][t]);
                }
            }
        }
        for n in 0..NR {
            for t in 0..R {
                let tt = tot[n][t];
                let h = _mm_add_ps(_mm256_castps256_ps128(tt), _mm256_extractf128_ps::<1>(tt));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
                out[n * R + t] = _mm_cvtss_f32(h);
            }
        }
    }

    /// AVX-512F, 16 words (8 groups) per chunk, NR weight rows × R x rows, CH chains.
    /// Safety: the CPU has avx512f; `dot`'s bounds hold.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512<const NR: usize, const R: usize, const CH: usize>(
        s: &Segment,
        out: &mut [f32],
    ) {
        let nw = s.nw_seg;
        let (cp, sp, xp) = (s.codes.as_ptr(), s.scales.as_ptr(), s.xs.as_ptr());
        // vpermps on zmm reads the low 4 bits of each index: all 16 E2M1 codes, sign included.
        let table = _mm512_loadu_ps(E2M1_VALUES.as_ptr());
        let dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let mut tot = [[_mm512_setzero_ps(); R]; NR];
        for c in 0..nw.div_ceil(16) {
            let w: [__m512i; NR] = std::array::from_fn(|n| {
                let p = cp.add(n * s.code_stride + c * 16);
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(s.prefetch_ahead) as *const i8);
                if c * 16 + 16 <= nw {
                    _mm512_loadu_si512(p as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi32(((1u32 << (nw - c * 16)) - 1) as __mmask16, p)
                }
            });
            let xc = xp.add(c * 128);
            let mut acc = [[[_mm512_setzero_ps(); R]; NR]; CH];
            macro_rules! step {
                ($k:literal) => {{
                    let v: [__m512; NR] = std::array::from_fn(|n| {
                        _mm512_permutexvar_ps(_mm512_srli_epi32::<{ 4 * $k }>(w[n]), table)
                    });
                    for t in 0..R {
                        let xv = _mm512_loadu_ps(xc.add(t * s.xstride + $k * 16));
                        for n in 0..NR {
                            acc[$k % CH][n][t] = _mm512_fmadd_ps(v[n], xv, acc[$k % CH][n][t]);
                        }
                    }
                }};
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            step!(4);
            step!(5);
            step!(6);
            step!(7);
            for n in 0..NR {
                // Lane j (word j) takes the scale of group j / 2.
                let g = _mm512_castps256_ps512(_mm256_loadu_ps(sp.add(n * s.scale_stride + c * 8)));
                let g = _mm512_permutexvar_ps(dup, g);
                for t in 0..R {
                    let a = if CH == 2 {
                        _mm512_add_ps(acc[0][n][t], acc[CH - 1][n][t])
                    } else {
                        acc[0][n][t]
                    };
                    tot[n][t] = _mm512_fmadd_ps(a, g, tot[n][t]);
                }
            }
        }
        for n in 0..NR {
            for t in 0..R {
                out[n * R + t] = _mm512_reduce_add_ps(tot[n][t]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvfp4::{e4m3_to_f32, Nvfp4Weight, PackedNvfp4, E2M1_VALUES};
    use crate::testing::{every_code_and_scale, finite_e4m3_bytes, random_packed, Cpu, Lcg};
    use burn::prelude::*;
    use burn::tensor::TensorData;

    /// Relative tolerance on |y − y_exact| / Σ|x·w| (f32 accumulation over up to a few thousand terms).
    const RTOL: f64 = 2e-6;

    /// Max of |y − exact| / (Σ_c |x_c w_c| + tiny) against an f64 matmul of the dequantized weight.
    fn max_rel_err(packed: &PackedNvfp4, x: &[f32], m: usize, y: &[f32]) -> f64 {
        let (out, inp) = (packed.out_features, packed.in_features);
        let w = packed.dequantize();
        let mut worst = 0f64;
        for i in 0..m {
            for o in 0..out {
                let (mut e, mut a) = (0f64, 0f64);
                for c in 0..inp {
                    let p = x[i * inp + c] as f64 * w[o * inp + c] as f64;
                    e += p;
                    a += p.abs();
                }
                let err = (y[i * out + o] as f64 - e).abs() / (a + 1e-30);
                // NaN-safe: a NaN error counts as infinite (f64::max would drop it).
                worst = if err <= worst {
                    worst
                } else if err.is_nan() {
                    f64::INFINITY
                } else {
                    err
                };
            }
        }
        worst
    }

    const SHAPES: [(usize, usize); 9] = [
        (1, 16),     // one group, one padded scale word
        (5, 80),     // in not a multiple of 64
        (7, 112),    // tiny fixture's hidden size: no whole AVX-512 chunk
        (9, 240),    // tiny fixture's intermediate size
        (3, 208),    // 26 words: AVX-512 tail of 10 words
        (33, 1040),  // 130 words: tails everywhere
        (64, 1024),  // whole chunks
        (1, 4096),   // out = 1
        (130, 2048), // multi-threaded at m >= 2
    ];

    #[test]
    fn all_paths_match_exact_matmul() {
        let mut worst = 0f64;
        for (si, &(out, inp)) in SHAPES.iter().enumerate() {
            for &m in &[1usize, 2, 3, 6, 16, 40] {
                let mut rng = Lcg::new(1000 * si as u64 + m as u64);
                let gs = 0.25 + rng.next_f32();
                let packed = random_packed(&mut rng, out, inp, gs);
                let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
                for isa in Isa::available() {
                    for th in [1usize, 2] {
                        let mut y = vec![f32::NAN; m * out];
                        nvfp4_matmul_with(
                            isa,
                            th,
                            &x,
                            m,
                            &packed.codes,
                            &packed.scales,
                            gs,
                            out,
                            inp,
                            &mut y,
                        );
                        let err = max_rel_err(&packed, &x, m, &y);
                        assert!(
                            err <= RTOL,
                            "{isa:?} threads {th} m {m} [{out}, {inp}]: rel err {err:e} > {RTOL:e}"
                        );
                        worst = worst.max(err);
                    }
                }
            }
        }
        eprintln!(
            "paths {:?}: max rel err {worst:e} (tolerance {RTOL:e})",
            Isa::available()
        );
    }

    #[test]
    fn large_m_blocks_match() {
        // Several panels and several blocks of the input dimension (m·in large).
        let (m, out, inp) = (150usize, 24usize, 3072usize);
        let mut rng = Lcg::new(77);
        let packed = random_packed(&mut rng, out, inp, 0.6);
        let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; m * out];
            nvfp4_matmul_with(
                isa,
                2,
                &x,
                m,
                &packed.codes,
                &packed.scales,
                0.6,
                out,
                inp,
                &mut y,
            );
            let err = max_rel_err(&packed, &x, m, &y);
            assert!(err <= 4e-6, "{isa:?}: rel err {err:e}");
        }
    }

    #[test]
    fn e4m3_arithmetic_decode_matches_table() {
        for g in [1.0f32, 0.37, 3.1e-4, 7.5] {
            for b in (0..=255u32).filter(|b| b & 0x7f != 0x7f) {
                let (got, want) = (e4m3_times(b, g, g / 512.0), E4M3_TABLE[b as usize] * g);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "byte {b:#04x} global {g}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn e4m3_table_matches_decoder() {
        for b in 0..=255u8 {
            let (t, d) = (E4M3_TABLE[b as usize], e4m3_to_f32(b));
            assert!(
                t.to_bits() == d.to_bits() || (t.is_nan() && d.is_nan()),
                "byte {b:#04x}: {t} vs {d}"
            );
        }
    }

    /// Every code under every finite E4M3 scale byte, read back through one-hot rows of x, equals
    /// E2M1_VALUES[code] · (e4m3(byte) · global) bit for bit on every path.
    #[test]
    fn every_code_and_scale_decodes_exactly() {
        // Row r: codes 0..15 in columns 0..15, scale byte bytes[r].
        let bytes = finite_e4m3_bytes();
        let PackedNvfp4 {
            codes,
            scales,
            out_features: out,
            in_features: inp,
            ..
        } = every_code_and_scale(1.0);
        // x rows 0..15 one-hot; m = 48 (zero rows after) takes the tiled path, m = 16 the other.
        let x: Vec<f32> = (0..48 * 16)
            .map(|i| if i / 16 == i % 16 { 1.0 } else { 0.0 })
            .collect();
        for isa in Isa::available() {
            for m in [16usize, 48] {
                for gs in [1.0f32, 0.37] {
                    let mut y = vec![f32::NAN; m * out];
                    nvfp4_matmul_with(
                        isa,
                        1,
                        &x[..m * 16],
                        m,
                        &codes,
                        &scales,
                        gs,
                        out,
                        inp,
                        &mut y,
                    );
                    for (r, &b) in bytes.iter().enumerate() {
                        for c in 0..16 {
                            let e = E2M1_VALUES[c] * (e4m3_to_f32(b) * gs);
                            let g = y[c * out + r];
                            assert!(
                                g == e,
                                "{isa:?} m {m} code {c} byte {b:#04x} global {gs}: {g} vs {e}"
                            );
                        }
                    }
                    assert!(y[16 * out..].iter().all(|&v| v == 0.0));
                }
            }
        }
    }

    /// Through the backend trait on NdArray, against the plain Burn reference, including an x that
    /// is not contiguous (a transposed view).
    #[test]
    fn trait_path_matches_reference() {
        use crate::Gemma4Backend;
        let device = Default::default();
        for &(m, out, inp) in &[(1usize, 37usize, 80usize), (16, 64, 1040), (40, 130, 208)] {
            let mut rng = Lcg::new(m as u64 * 7 + out as u64);
            let packed = random_packed(&mut rng, out, inp, 0.8);
            let w: Nvfp4Weight<Cpu> = packed.to_device(&device);
            let x: Vec<f32> = (0..m * inp).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let xt = Tensor::<Cpu, 2>::from_data(TensorData::new(x.clone(), [m, inp]), &device);
            // The same values through a transposed (strided) view.
            let xt_strided = Tensor::<Cpu, 2>::from_data(
                TensorData::new(
                    (0..inp * m)
                        .map(|i| x[(i % m) * inp + i / m])
                        .collect::<Vec<f32>>(),
                    [inp, m],
                ),
                &device,
            )
            .transpose();
            let expected = w
                .forward_reference(xt.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            for xin in [xt, xt_strided] {
                let y = Cpu::nvfp4_linear(xin, &w);
                assert_eq!(y.dims(), [m, out]);
                let y = y.into_data().to_vec::<f32>().unwrap();
                let wd = packed.dequantize();
                for i in 0..m {
                    for o in 0..out {
                        let a: f64 = (0..inp)
                            .map(|c| (x[i * inp + c] as f64 * wd[o * inp + c] as f64).abs())
                            .sum();
                        let d = (y[i * out + o] - expected[i * out + o]).abs() as f64;
                        assert!(
                            d <= 4e-6 * a + 1e-30,
                            "m {m} [{out}, {inp}] y[{i},{o}]: {} vs {}",
                            y[i * out + o],
                            expected[i * out + o]
                        );
                    }
                }
            }
        }
    }
}
