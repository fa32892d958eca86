//! Dense f32 matmul on the CPU: y[m, out] = x[m, in] · w[in, out], with w row-major `[in, out]`
//! (a linear's weight stored transposed, as the model keeps its unquantized projections), f32
//! accumulation. burn-ndarray's `matmul` (matrixmultiply's sgemm: one thread, AVX2 at best)
//! reads such a weight at about 1.4 GB/s at m = 1; these kernels stream it near the memory
//! bandwidth, and run prefill-sized products near the FMA peak of both cores.
//!
//! Vectors run along `out`: a row of w is contiguous there, and so is a row of y, so a kernel
//! loads a few vectors of w[k, j..], broadcasts x[r, k] for a few rows r, and accumulates
//! y[r, j..] in registers with fused multiply-adds: no horizontal sums, no transposes.
//!
//! Below `GEMM_MIN_M` rows of x (decode), the GEMV path streams w once, straight from the
//! caller's slice. Each thread takes a contiguous range of inputs, i.e. of rows of w: one
//! contiguous stretch of memory per thread, which reads at the full bandwidth, where splitting
//! the columns (each thread reading half of every row) read 28% less (20 against 27.8 GB/s on
//! two threads, plain sums over a 176 MB matrix).
//! Thread 0 sums into y, the others into scratch rows added to y after. Within a thread, for
//! each block of `GEMV_BLOCK_ROWS` rows of w, a kernel call holds y[r, j..j + 64] (AVX-512) for
//! up to 4 rows of x in registers while it walks the block's rows; the calls sweep the columns,
//! and each prefetches (to L2) the same rows `GEMV_PREFETCH_COLS` columns ahead (wrapping into
//! the next block), since the hardware prefetcher does not follow 64 streams at once. The first
//! block of a thread writes its destination, later ones add to it, so y (which may hold
//! anything) is never read before it is written.
//!
//! From `GEMM_MIN_M` rows on (prefill), the work is compute-bound and blocked as in BLIS. Each
//! thread takes a range of columns (a multiple of 64); for each block of `KC` inputs, x is
//! packed into panels of `MR` rows (`[k][r]`, so that the kernel's broadcasts are consecutive); for
//! each block of `NC` columns, w is packed into `NR`-wide panels (`[k][NR]`, 64-byte aligned, zero
//! padded; `KC · NC` floats, half the L2); then an `MR × NR` register tile (6 × 64 on AVX-512:
//! 24 accumulators) runs over every pair of panels. Packing also gives the kernel unit-stride
//! loads whatever `out` is: rows of w a power of two apart (out = 8192: 32 KB) fall on the same
//! L1 sets, which made a kernel reading w in place 1.6× slower at out = 8192 than at 8000.
//!
//! The NT path ([`dense_matmul_nt`]: y = x · wᵀ with w `[out, in]`, the tied embedding read in
//! place as the LM head) runs along `in` instead, where both a row of x and a row of w are
//! contiguous: a kernel call holds 4 rows of w × 4 rows of x of vector accumulators, loads each
//! vector of w once for the 4 rows of x and each of x once for the 4 rows of w, and ends in one
//! horizontal sum per output (per block of 256 inputs when more than 4 rows of x share the rows
//! of w, so that the rows' slices are reread from L1). Each thread takes a contiguous range of rows of w; x is taken in
//! blocks of about 512 KB (kept in L2), so w is read once per block: once in all at decode.
//!
//! The three paths are one generic code over [`crate::simd::Simd`] (AVX-512F, AVX2 + FMA, and
//! plain arrays of 8 lanes that LLVM vectorizes for the baseline), instantiated inside
//! `#[target_feature]` functions chosen at run time by [`Isa::dispatch`]; column tails use masked
//! loads and stores, row tails narrower or zero-padded tiles. Each output is a sum of f32
//! products, one rounding per multiply-add, in blocks added in order (on the GEMV path, the
//! threads' partial sums are added last): the results differ from the exact sum by f32 rounding
//! only.

use crate::pool::threads;
use crate::simd::{prefetch, AlignedBuf, Isa, Kernel, Simd};

/// From this many rows of x on, the blocked GEMM path; below, the GEMV path. Measured on two
/// Zen 4 cores at the 31B q_proj shape ([5376, 8192]), GFLOP/s GEMV vs GEMM: m = 32: 146 vs 109,
/// 48: 151 vs 132, 64: 160 vs 154, 96: 161 vs 174, 128: 164 vs 182.
const GEMM_MIN_M: usize = 64;
/// Rows of w per block of the GEMV path: y (m rows) is reread and rewritten once per block.
const GEMV_BLOCK_ROWS: usize = 64;
/// x rows per GEMV kernel call (registers: 4 rows × 4 vectors of accumulators on AVX-512).
const GEMV_ROWS: usize = 4;
/// How far ahead of the current chunk (in columns, rounded up to whole chunks) the GEMV path
/// prefetches: 512 bytes of each row (with more or less, 64 to 512 columns, measured the same or
/// slower).
const GEMV_PREFETCH_COLS: usize = 128;
/// Rows ahead of the current one that the GEMM path prefetches while packing w.
const PACK_PREFETCH_ROWS: usize = 8;
/// Inputs per block of the GEMM path.
const KC: usize = 256;
/// Columns per packed block of w in the GEMM path: `KC · NC` floats = 512 KB, half the L2.
const NC: usize = 512;
/// GEMM column ranges of the threads are multiples of this (a multiple of every path's panel
/// width, and of a cache line of y).
const COL_ALIGN: usize = 64;
/// Below this many multiply-adds a call runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 19;

/// y[m, out] = x[m, inp] · w[inp, out] (all row-major) on the best instruction set of this CPU and
/// all its threads. y is overwritten (its contents are never read). Panics if the slice lengths
/// do not match the shape.
pub fn dense_matmul(x: &[f32], m: usize, w: &[f32], inp: usize, out: usize, y: &mut [f32]) {
    dense_matmul_with(Isa::detect(), threads(), x, m, w, inp, out, y)
}

/// [`dense_matmul`] on a chosen path and at most `max_threads` threads (tests and benchmarks).
/// Panics if `isa` is not available on this CPU or the slice lengths do not match the shape.
#[allow(clippy::too_many_arguments)]
pub fn dense_matmul_with(
    isa: Isa,
    max_threads: usize,
    x: &[f32],
    m: usize,
    w: &[f32],
    inp: usize,
    out: usize,
    y: &mut [f32],
) {
    if !checked_nonempty(isa, x, m, w, "[in, out]", inp, out, y) {
        return;
    }
    let p = Dense {
        x: x.as_ptr(),
        m,
        w: w.as_ptr(),
        inp,
        out,
        y: y.as_mut_ptr(),
    };
    let n_threads = if m * inp * out >= PARALLEL_MIN_MACS {
        max_threads.max(1)
    } else {
        1
    };
    if m >= GEMM_MIN_M {
        // Column ranges: t·out/n rounded to a multiple of COL_ALIGN, the last one ending at out.
        let n = n_threads.min(out.div_ceil(COL_ALIGN));
        let bounds: Vec<usize> = (0..=n)
            .map(|t| {
                if t == n {
                    out
                } else {
                    (t * out + n * COL_ALIGN / 2) / (n * COL_ALIGN) * COL_ALIGN
                }
            })
            .collect();
        // SAFETY: `p` points into slices whose lengths were checked against the shape above and
        // which outlive the threads; each thread writes only columns c0..c1 of y, disjoint from
        // the other threads' columns, and only reads x and w.
        let run = |t: usize| unsafe { run_part(isa, &p, Part::Cols(bounds[t], bounds[t + 1])) };
        return on_threads(n, &run);
    }
    // Input ranges; thread 0 sums into y, thread t > 0 into scratch t − 1.
    let n = n_threads.min(inp);
    let kb: Vec<usize> = (0..=n).map(|t| t * inp / n).collect();
    let ds = scratch_stride(out);
    let mut scratch: Vec<AlignedBuf> = (1..n).map(|_| AlignedBuf::zeroed(m * ds)).collect();
    let dst: Vec<SendPtr> = std::iter::once(SendPtr(p.y, out))
        .chain(scratch.iter_mut().map(|b| SendPtr(b.as_mut_ptr(), ds)))
        .collect();
    // SAFETY: as above for x and w; thread t writes only dst[t]: y (m·out floats) for thread 0,
    // its own scratch (m·ds floats) for the others.
    let run = |t: usize| unsafe {
        let SendPtr(dst, ds) = dst[t];
        run_part(
            isa,
            &p,
            Part::Rows {
                k0: kb[t],
                k1: kb[t + 1],
                dst,
                ds,
            },
        )
    };
    on_threads(n, &run);
    for b in &mut scratch {
        // SAFETY: the scratch holds m rows of ds ≥ out floats, all written by its thread.
        let part = unsafe { std::slice::from_raw_parts(b.as_mut_ptr(), m * ds) };
        for (yr, pr) in y.chunks_exact_mut(out).zip(part.chunks_exact(ds)) {
            for (d, &v) in yr.iter_mut().zip(pr) {
                *d += v;
            }
        }
    }
}

/// Plain reference: y[i, o] = Σ_k x[i, k] · w[k, o] accumulated in f64, rounded once to f32.
/// Panics if the slice lengths do not match the shape.
pub fn dense_matmul_reference(
    x: &[f32],
    m: usize,
    w: &[f32],
    inp: usize,
    out: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), m * inp, "x must be [m, in]");
    assert_eq!(w.len(), inp * out, "w must be [in, out]");
    assert_eq!(y.len(), m * out, "y must be [m, out]");
    let mut acc = vec![0f64; out];
    for i in 0..m {
        acc.fill(0.0);
        for k in 0..inp {
            let xv = x[i * inp + k] as f64;
            for (a, &wv) in acc.iter_mut().zip(&w[k * out..(k + 1) * out]) {
                *a += xv * wv as f64;
            }
        }
        for (d, &a) in y[i * out..(i + 1) * out].iter_mut().zip(&acc) {
            *d = a as f32;
        }
    }
}

/// y[m, out] = x[m, inp] · wᵀ with w row-major `[out, inp]` (the layout of a tied embedding,
/// `[vocab, hidden]`, used as the LM head), read in place: each row of w is streamed once per
/// block of `NT_X_BLOCK_BYTES` of x rows (once in all for m · inp · 4 ≤ 512 KB), on the best
/// instruction set of this CPU and all its threads. y is overwritten (its contents are never
/// read). Panics if the slice lengths do not match the shape.
pub fn dense_matmul_nt(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize, y: &mut [f32]) {
    dense_matmul_nt_with(Isa::detect(), threads(), x, m, w, out, inp, y)
}

/// [`dense_matmul_nt`] on a chosen path and at most `max_threads` threads (tests and benchmarks).
/// Each output is computed by one thread in one fixed order, so the result does not depend on
/// the thread count. Panics if `isa` is not available on this CPU or the slice lengths do not
/// match the shape.
#[allow(clippy::too_many_arguments)]
pub fn dense_matmul_nt_with(
    isa: Isa,
    max_threads: usize,
    x: &[f32],
    m: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: &mut [f32],
) {
    if !checked_nonempty(isa, x, m, w, "[out, in]", inp, out, y) {
        return;
    }
    let p = DenseNt {
        x: x.as_ptr(),
        m,
        w: w.as_ptr(),
        out,
        inp,
        y: y.as_mut_ptr(),
    };
    let n = if m * inp * out >= PARALLEL_MIN_MACS {
        max_threads.clamp(1, out)
    } else {
        1
    };
    // Contiguous ranges of output rows (rows of w), t·out/n to (t + 1)·out/n.
    // SAFETY: `p` points into slices whose lengths were checked against the shape above and which
    // outlive the threads; thread t writes only columns j0..j1 of y, disjoint from the other
    // threads' columns, and only reads x and w.
    let run = |t: usize| unsafe { run_nt(isa, &p, t * out / n, (t + 1) * out / n) };
    on_threads(n, &run);
}

/// The checks of both dense entry points (panics if `isa` is not available or a slice length does
/// not match the shape; `w_layout` names w's layout in the message). False when there is nothing to
/// multiply: y is then complete (zeros when `inp` is 0).
#[allow(clippy::too_many_arguments)]
fn checked_nonempty(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &[f32],
    w_layout: &str,
    inp: usize,
    out: usize,
    y: &mut [f32],
) -> bool {
    assert!(isa.supported(), "{isa:?} is not supported by this CPU");
    assert_eq!(x.len(), m * inp, "x must be [m, in]");
    assert_eq!(w.len(), inp * out, "w must be {w_layout}");
    assert_eq!(y.len(), m * out, "y must be [m, out]");
    if inp == 0 {
        y.fill(0.0);
    }
    m != 0 && out != 0 && inp != 0
}

/// Plain reference of [`dense_matmul_nt`]: y[i, j] = Σ_k x[i, k] · w[j, k] accumulated in f64,
/// rounded once to f32. Panics if the slice lengths do not match the shape.
pub fn dense_matmul_nt_reference(
    x: &[f32],
    m: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), m * inp, "x must be [m, in]");
    assert_eq!(w.len(), out * inp, "w must be [out, in]");
    assert_eq!(y.len(), m * out, "y must be [m, out]");
    for i in 0..m {
        let xr = &x[i * inp..(i + 1) * inp];
        for j in 0..out {
            let wr = &w[j * inp..(j + 1) * inp];
            y[i * out + j] = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32;
        }
    }
}

/// Target bytes of one block of x rows on the NT path: the block stays in L2 (half of Zen 4's
/// 1 MB) while the thread's rows of w stream past it once.
const NT_X_BLOCK_BYTES: usize = 512 * 1024;
/// Rows of w per NT kernel call: each load of x serves this many rows of w.
const NT_W_ROWS: usize = 4;
/// Rows of x per NT kernel call: each load of w serves this many rows of x (4 × 4 accumulators,
/// 4 vectors of w and one of x: 21 registers).
const NT_X_ROWS: usize = 4;
/// Inputs per block when a group of rows of w serves several calls (m > `NT_X_ROWS`): the
/// group's slice (4 KB) and up to 24 rows of x (24 KB) stay in the 32 KB L1, where whole rows
/// (21 KB each at in = 5376) would be reread from L2 by every call.
const NT_KC: usize = 256;

/// Rows of x per block of the NT path for `inp` inputs: a multiple of `NT_X_ROWS`, at least one
/// kernel call's worth.
fn nt_x_block(inp: usize) -> usize {
    (NT_X_BLOCK_BYTES / (4 * inp) / NT_X_ROWS).max(1) * NT_X_ROWS
}

/// One NT call's operands as raw pointers (see the safety notes in [`dense_matmul_nt_with`]):
/// x [m, inp], w [out, inp], y [m, out], all row-major.
struct DenseNt {
    x: *const f32,
    m: usize,
    w: *const f32,
    out: usize,
    inp: usize,
    y: *mut f32,
}

// SAFETY: the threads only read through `x` and `w`, and write through `y` only the disjoint
// column ranges that `dense_matmul_nt_with` hands them.
unsafe impl Sync for DenseNt {}

/// Output rows j0..j1 (columns of y) on the chosen path. Safety: `isa` is supported; `p` is valid
/// as described in [`dense_matmul_nt_with`]; no other thread writes these columns.
unsafe fn run_nt(isa: Isa, p: &DenseNt, j0: usize, j1: usize) {
    isa.dispatch(NtPart(p, j0, j1))
}

/// [`run_nt`]'s kernel: 4 rows of w × 4 rows of x on every path (AVX-512: 16 of the 32 registers
/// accumulate; AVX2: 16 accumulators, 4 vectors of w and one of x spill a little, as the GEMV
/// chunks do).
struct NtPart<'a>(&'a DenseNt, usize, usize);

impl Kernel for NtPart<'_> {
    type Output = ();
    /// Safety: as [`run_nt`].
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        nt_rows::<S>(self.0, self.1, self.2)
    }
}

/// One NT kernel call: R rows of x against NJ rows of w over `kn` inputs.
struct NtTile {
    /// x[r, k] at `x + r·s + k`, w[n, k] at `w + n·s + k`.
    x: *const f32,
    w: *const f32,
    s: usize,
    kn: usize,
    /// y[r, n] at `y + r·ys + n`.
    y: *mut f32,
    ys: usize,
    /// Overwrite y (first block of inputs) instead of adding to it.
    first: bool,
    /// The rows to prefetch to L2 as this call reads its own (laid out as `w`), or null for none.
    pf: *const f32,
}

/// y[r, n] (+)= Σ_{k < kn} x[r, k] · w[n, k] for R rows of x and NJ rows of w: NJ × R vector
/// accumulators over the inputs (the tail as one partial vector), one horizontal sum each at
/// the end. Safety: the CPU has S's features; the addresses in [`NtTile`] are valid for r < R,
/// n < NJ, k < kn.
#[inline(always)]
unsafe fn nt_tile<S: Simd, const NJ: usize, const R: usize>(t: &NtTile) {
    let mut acc = [[S::zero(); R]; NJ];
    let full = t.kn / S::W * S::W;
    let mut k = 0;
    while k < full {
        if !t.pf.is_null() && k % 16 == 0 {
            for n in 0..NJ {
                prefetch::<true>(t.pf.wrapping_add(n * t.s + k));
            }
        }
        let wv: [S::V; NJ] = std::array::from_fn(|n| S::load(t.w.add(n * t.s + k)));
        for r in 0..R {
            let xv = S::load(t.x.add(r * t.s + k));
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                a[r] = S::fma(wv, xv, a[r]);
            }
        }
        k += S::W;
    }
    if full < t.kn {
        let tail = t.kn - full;
        let wv: [S::V; NJ] = std::array::from_fn(|n| S::load_part(t.w.add(n * t.s + full), tail));
        for r in 0..R {
            let xv = S::load_part(t.x.add(r * t.s + full), tail);
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                a[r] = S::fma(wv, xv, a[r]);
            }
        }
    }
    for (n, a) in acc.iter().enumerate() {
        for (r, &a) in a.iter().enumerate() {
            let yp = t.y.add(r * t.ys + n);
            *yp = if t.first {
                S::hsum(a)
            } else {
                *yp + S::hsum(a)
            };
        }
    }
}

/// [`nt_tile`] for `nj` (1 or `NT_W_ROWS`) rows of w and `rows` (1..=NT_X_ROWS) rows of x.
#[inline(always)]
unsafe fn nt_tile_shape<S: Simd>(nj: usize, rows: usize, t: &NtTile) {
    match (nj, rows) {
        (4, 1) => nt_tile::<S, 4, 1>(t),
        (4, 2) => nt_tile::<S, 4, 2>(t),
        (4, 3) => nt_tile::<S, 4, 3>(t),
        (4, 4) => nt_tile::<S, 4, 4>(t),
        (1, 1) => nt_tile::<S, 1, 1>(t),
        (1, 2) => nt_tile::<S, 1, 2>(t),
        (1, 3) => nt_tile::<S, 1, 3>(t),
        (1, 4) => nt_tile::<S, 1, 4>(t),
        _ => unreachable!(
            "NT tiles take 1 or {NT_W_ROWS} rows of w and 1..={NT_X_ROWS} of x, not {nj} x {rows}"
        ),
    }
}

/// NT path, output rows j0..j1: for each block of x rows, the rows of w in groups of
/// `NT_W_ROWS` (a tail of single rows); with one call's worth of x rows in the block, a call
/// takes all the inputs; with more, the inputs are cut in blocks of `NT_KC`, and each block of
/// the group's rows serves every `NT_X_ROWS` rows of x from L1 (summed into y block by block).
/// The first x rows of a group prefetch the next group. Safety: as [`run_nt`].
#[inline(always)]
unsafe fn nt_rows<S: Simd>(p: &DenseNt, j0: usize, j1: usize) {
    let xb = nt_x_block(p.inp);
    let whole = j0 + (j1 - j0) / NT_W_ROWS * NT_W_ROWS;
    for i0 in (0..p.m).step_by(xb) {
        let i1 = p.m.min(i0 + xb);
        let kc = if i1 - i0 > NT_X_ROWS { NT_KC } else { p.inp };
        let mut j = j0;
        while j < j1 {
            let nj = if j < whole { NT_W_ROWS } else { 1 };
            let w = p.w.add(j * p.inp);
            // The next group's rows (beyond w at the very end: harmless hints).
            let next = w.wrapping_add(nj * p.inp);
            for kb in (0..p.inp).step_by(kc) {
                for g in (i0..i1).step_by(NT_X_ROWS) {
                    let t = NtTile {
                        x: p.x.add(g * p.inp + kb),
                        w: w.add(kb),
                        s: p.inp,
                        kn: kc.min(p.inp - kb),
                        y: p.y.add(g * p.out + j),
                        ys: p.out,
                        first: kb == 0,
                        pf: if g == i0 {
                            next.wrapping_add(kb)
                        } else {
                            std::ptr::null()
                        },
                    };
                    nt_tile_shape::<S>(nj, NT_X_ROWS.min(i1 - g), &t);
                }
            }
            j += nj;
        }
    }
}

/// Runs `run(t)` for t in 0..n on the kernels' pool ([`crate::pool`]), t = 0 on the calling thread.
fn on_threads(n: usize, run: &(impl Fn(usize) + Sync)) {
    if n == 1 {
        return run(0);
    }
    crate::pool::scope(|s| {
        for t in 1..n {
            s.spawn(move |_| run(t));
        }
        run(0);
    });
}

/// Row stride of a GEMV scratch: `out` rounded up to a cache line, plus one line, so that its
/// rows do not all fall on the same L1 sets when `out` is a multiple of 1024.
fn scratch_stride(out: usize) -> usize {
    out.div_ceil(16) * 16 + 16
}

/// One call's operands as raw pointers, shared by the threads (see the safety notes in
/// [`dense_matmul_with`]): x [m, inp], w [inp, out], y [m, out], all row-major.
struct Dense {
    x: *const f32,
    m: usize,
    w: *const f32,
    inp: usize,
    out: usize,
    y: *mut f32,
}

// SAFETY: the threads only read through `x` and `w`, and write through `y` only the disjoint
// column ranges that `dense_matmul_with` hands them.
unsafe impl Sync for Dense {}

/// A destination (pointer, row stride) handed to one thread.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32, usize);

// SAFETY: a carrier only; each destination is written by the one thread it is handed to.
unsafe impl Sync for SendPtr {}

/// What one thread computes.
#[derive(Clone, Copy)]
enum Part {
    /// GEMM path: columns c0..c1 of y, in place.
    Cols(usize, usize),
    /// GEMV path: the sum over inputs k0..k1, for all of y, into `dst` ([m, ds], ds ≥ out).
    Rows {
        k0: usize,
        k1: usize,
        dst: *mut f32,
        ds: usize,
    },
}

/// One thread's part on the chosen path. Safety: `isa` is supported; `p` is valid as described
/// in [`dense_matmul_with`]; `dst` of a `Rows` part is valid for m·ds floats; no other thread
/// writes what this part writes.
unsafe fn run_part(isa: Isa, p: &Dense, part: Part) {
    isa.dispatch(DensePart(p, part))
}

/// [`run_part`]'s kernel. Tiles per path: AVX-512, GEMV chunks of 4 vectors (64 columns) and
/// GEMM tiles of 6 rows × 64 columns (24 of the 32 registers accumulate; 6 × 64 measured 99
/// GFLOP/s on one Zen 4 core, 85% of its FMA peak, against 93-94 for 12 × 32, 8 × 48 and
/// 14 × 32); AVX2, GEMV chunks of 4 vectors (32 columns; measured faster than 2 or 3 at m = 16
/// although 4 rows × 4 vectors fill the 16 registers) and GEMM tiles of 6 rows × 16 columns (12
/// of the 16 registers accumulate); portable, one vector and 4 × 8 tiles.
struct DensePart<'a>(&'a Dense, Part);

impl Kernel for DensePart<'_> {
    type Output = ();
    /// Safety: as [`run_part`].
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let DensePart(p, part) = self;
        // (S::W, S::FMA) names the path: constants, so only one arm survives.
        match (part, S::W, S::FMA) {
            (Part::Cols(c0, c1), 16, _) => gemm_cols::<S, 6, 4>(p, c0, c1),
            (Part::Cols(c0, c1), _, true) => gemm_cols::<S, 6, 2>(p, c0, c1),
            (Part::Cols(c0, c1), _, false) => gemm_cols::<S, 4, 1>(p, c0, c1),
            (Part::Rows { k0, k1, dst, ds }, _, true) => gemv_rows::<S, 4>(p, k0, k1, dst, ds),
            (Part::Rows { k0, k1, dst, ds }, _, false) => gemv_rows::<S, 1>(p, k0, k1, dst, ds),
        }
    }
}

/// One GEMV kernel call: y[r, ..] for R rows of x over `kn` rows of w, NV vectors of columns.
struct GemvTile {
    /// x[r, k] at `x + r·xs + k`.
    x: *const f32,
    xs: usize,
    /// w[k, v·W + j] at `w + k·ws + v·W + j`.
    w: *const f32,
    ws: usize,
    kn: usize,
    /// y[r, v·W + j] at `y + r·ys + v·W + j`.
    y: *mut f32,
    ys: usize,
    /// Overwrite y (first block of rows of w) instead of adding to it.
    first: bool,
    /// With PART: the lanes of the (single) vector that exist.
    n: usize,
    /// Lines to prefetch to L2: the first NV·W columns of rows 0..kn, laid out as `w`; null for
    /// none.
    pf: *const f32,
}

/// y[r, 0..NV·W] (+)= Σ_{k < kn} x[r, k] · w[k, 0..NV·W] for r < R, accumulated in registers.
/// With PART (NV = 1), only the first `t.n` columns are read and written. Safety: the CPU has S's
/// features; every address described in [`GemvTile`] is valid for r < R, k < kn and the columns.
#[inline(always)]
unsafe fn gemv_tile<S: Simd, const R: usize, const NV: usize, const PART: bool>(t: &GemvTile) {
    debug_assert!(!PART || (NV == 1 && t.n <= S::W));
    let mut acc = [[S::zero(); NV]; R];
    if !t.first {
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                let yp = t.y.add(r * t.ys + v * S::W);
                *a = if PART {
                    S::load_part(yp, t.n)
                } else {
                    S::load(yp)
                };
            }
        }
    }
    // Cache lines per row of the chunk.
    let lines = (NV * S::W).div_ceil(16);
    for k in 0..t.kn {
        let wp = t.w.add(k * t.ws);
        if !t.pf.is_null() {
            for l in 0..lines {
                prefetch::<true>(t.pf.wrapping_add(k * t.ws + 16 * l));
            }
        }
        let wv: [S::V; NV] = std::array::from_fn(|v| {
            if PART {
                S::load_part(wp, t.n)
            } else {
                S::load(wp.add(v * S::W))
            }
        });
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = S::splat(t.x.add(r * t.xs + k));
            for (a, &wv) in a.iter_mut().zip(&wv) {
                *a = S::fma(xb, wv, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, &a) in a.iter().enumerate() {
            let yp = t.y.add(r * t.ys + v * S::W);
            if PART {
                S::store_part(yp, a, t.n)
            } else {
                S::store(yp, a)
            }
        }
    }
}

/// [`gemv_tile`] for `rows` (1..=GEMV_ROWS) rows of x.
#[inline(always)]
unsafe fn gemv_tile_rows<S: Simd, const NV: usize, const PART: bool>(rows: usize, t: &GemvTile) {
    match rows {
        1 => gemv_tile::<S, 1, NV, PART>(t),
        2 => gemv_tile::<S, 2, NV, PART>(t),
        3 => gemv_tile::<S, 3, NV, PART>(t),
        4 => gemv_tile::<S, 4, NV, PART>(t),
        _ => unreachable!("GEMV tiles take 1..={GEMV_ROWS} rows, not {rows}"),
    }
}

/// GEMV path: dst[r, 0..out] = Σ_{k0 ≤ k < k1} x[r, k] · w[k, 0..out] for every row r of x, in
/// chunks of NV vectors and a tail of single, possibly partial, vectors (see the module notes).
/// Safety: as [`run_part`].
#[inline(always)]
unsafe fn gemv_rows<S: Simd, const NV: usize>(
    p: &Dense,
    k0: usize,
    k1: usize,
    dst: *mut f32,
    ds: usize,
) {
    let cb = NV * S::W;
    let tail = p.out / cb * cb;
    let pf_cols = GEMV_PREFETCH_COLS.div_ceil(cb) * cb;
    for kb in (k0..k1).step_by(GEMV_BLOCK_ROWS) {
        let kn = GEMV_BLOCK_ROWS.min(k1 - kb);
        let mut t = GemvTile {
            x: p.x,
            xs: p.inp,
            w: p.w,
            ws: p.out,
            kn,
            y: dst,
            ys: ds,
            first: kb == k0,
            n: S::W,
            pf: std::ptr::null(),
        };
        for j in (0..tail).step_by(cb) {
            t.w = p.w.add(kb * p.out + j);
            // The chunk `pf_cols` columns ahead in these rows, or past the last whole chunk, that
            // far into the next block's rows (beyond w at the very end: harmless hints).
            let ahead = j + pf_cols;
            let pf = if ahead < tail {
                t.w.wrapping_add(pf_cols)
            } else {
                p.w.wrapping_add((kb + kn) * p.out + ahead - tail)
            };
            for g in (0..p.m).step_by(GEMV_ROWS) {
                t.x = p.x.add(g * p.inp + kb);
                t.y = dst.add(g * ds + j);
                // Prefetched once per chunk, by the first rows of x.
                t.pf = if g == 0 { pf } else { std::ptr::null() };
                gemv_tile_rows::<S, NV, false>(GEMV_ROWS.min(p.m - g), &t);
            }
        }
        t.pf = std::ptr::null();
        for j in (tail..p.out).step_by(S::W) {
            t.n = S::W.min(p.out - j);
            t.w = p.w.add(kb * p.out + j);
            for g in (0..p.m).step_by(GEMV_ROWS) {
                t.x = p.x.add(g * p.inp + kb);
                t.y = dst.add(g * ds + j);
                gemv_tile_rows::<S, 1, true>(GEMV_ROWS.min(p.m - g), &t);
            }
        }
    }
}

/// `y[r, 0..cols] (+)= Σ_{k < kn} a[k][r] · b[k][0..NR]` for r < rows, NR = NV·W: an MR × NR
/// register tile over one packed panel of x (`a`, `[kn][MR]`) and one of w (`b`, `[kn][NR]`).
/// Safety: the CPU has S's features; a and b hold kn·MR and kn·NR floats; y[r, c] at
/// `y + r·ys + c` is valid for r < rows ≤ MR, c < cols ≤ NR.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemm_tile<S: Simd, const MR: usize, const NV: usize>(
    kn: usize,
    a: *const f32,
    b: *const f32,
    y: *mut f32,
    ys: usize,
    rows: usize,
    cols: usize,
    first: bool,
) {
    let nr = NV * S::W;
    let mut acc = [[S::zero(); NV]; MR];
    for k in 0..kn {
        let bp = b.add(k * nr);
        let bv: [S::V; NV] = std::array::from_fn(|v| S::load(bp.add(v * S::W)));
        let ap = a.add(k * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let xb = S::splat(ap.add(r));
            for (a, &bv) in acc.iter_mut().zip(&bv) {
                *a = S::fma(xb, bv, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (v, &a) in acc.iter().enumerate() {
            let n = cols.saturating_sub(v * S::W).min(S::W);
            let yp = y.add(r * ys + v * S::W);
            if n == S::W {
                S::store(yp, if first { a } else { S::add(a, S::load(yp)) });
            } else if n > 0 {
                S::store_part(
                    yp,
                    if first {
                        a
                    } else {
                        S::add(a, S::load_part(yp, n))
                    },
                    n,
                );
            }
        }
    }
}

/// GEMM path, columns c0..c1 (see the module notes): MR × (NV·W) register tiles over packed
/// panels of x and w. Safety: as [`run_part`].
#[inline(always)]
unsafe fn gemm_cols<S: Simd, const MR: usize, const NV: usize>(p: &Dense, c0: usize, c1: usize) {
    let nr = NV * S::W;
    let ng = p.m.div_ceil(MR);
    // Buffers sized to this call (a small linear must not zero KC·NC floats per call).
    let kc = KC.min(p.inp);
    // Packed x for one block of inputs, [group][k][MR] (groups KC·MR apart; rows past m stay
    // zero), and packed w for one block of inputs and columns, [panel][k][NR] (columns past the
    // block zero). Panels are one cache line more than KC·NR apart: the packing writes a row into
    // every panel, and panels a power of two apart would fall on the same L1 sets.
    let mut xbuf = AlignedBuf::zeroed(ng * kc * MR);
    let pstride = kc * nr + 16;
    let mut wbuf = AlignedBuf::zeroed(NC.min(c1 - c0).div_ceil(nr) * pstride);
    let (xp, wp) = (xbuf.as_mut_ptr(), wbuf.as_mut_ptr());
    for kb in (0..p.inp).step_by(KC) {
        let kn = KC.min(p.inp - kb);
        for g in 0..ng {
            let dst = xp.add(g * kc * MR);
            for r in 0..MR.min(p.m - g * MR) {
                let src = p.x.add((g * MR + r) * p.inp + kb);
                for k in 0..kn {
                    *dst.add(k * MR + r) = *src.add(k);
                }
            }
        }
        for nb in (c0..c1).step_by(NC) {
            let ncols = NC.min(c1 - nb);
            let np = ncols.div_ceil(nr);
            for k in 0..kn {
                // The same columns PACK_PREFETCH_ROWS rows ahead (past the block: the next
                // block's rows, or beyond w at the very end: harmless hints).
                let ahead = p.w.wrapping_add((kb + k + PACK_PREFETCH_ROWS) * p.out + nb);
                for l in (0..ncols).step_by(16) {
                    prefetch::<false>(ahead.wrapping_add(l));
                }
                let src = p.w.add((kb + k) * p.out + nb);
                for pi in 0..np {
                    let (s, d) = (src.add(pi * nr), wp.add(pi * pstride + k * nr));
                    let n = ncols - pi * nr;
                    for v in 0..NV {
                        let nv = n.saturating_sub(v * S::W).min(S::W);
                        let val = if nv == S::W {
                            S::load(s.add(v * S::W))
                        } else if nv > 0 {
                            S::load_part(s.add(v * S::W), nv)
                        } else {
                            S::zero()
                        };
                        S::store(d.add(v * S::W), val);
                    }
                }
            }
            for g in 0..ng {
                let rows = MR.min(p.m - g * MR);
                for pi in 0..np {
                    let cols = nr.min(ncols - pi * nr);
                    let y = p.y.add(g * MR * p.out + nb + pi * nr);
                    gemm_tile::<S, MR, NV>(
                        kn,
                        xp.add(g * kc * MR),
                        wp.add(pi * pstride),
                        y,
                        p.out,
                        rows,
                        cols,
                        kb == 0,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Lcg;

    /// Tolerance on |y − exact| / Σ_k |x[i, k] · w[k, o]|. Every path sums in f32 with one
    /// rounding per multiply-add, so the error is at most γ_in = in·u/(1 − in·u) of Σ|x·w|
    /// (u = 2^-24; 6e-5 at in = 1000) whatever the order; rounding errors of random signs add up
    /// like a random walk, though, and stay below about u·Σ|x·w| in practice (the tests see at
    /// most 3e-7). 1e-6 is 17u: far below the γ_in bound, so that a dropped term, a term added
    /// twice or a lower-precision accumulation (each an error of order Σ|x·w|/in ≥ 1e-3 here)
    /// fails.
    const RTOL: f64 = 1e-6;

    /// The reference y and Σ_k |x[i, k] · w[k, o]| (f64) of every output.
    fn reference(x: &[f32], m: usize, w: &[f32], inp: usize, out: usize) -> (Vec<f32>, Vec<f64>) {
        let mut e = vec![f32::NAN; m * out];
        dense_matmul_reference(x, m, w, inp, out, &mut e);
        let mut a = vec![0f64; m * out];
        for (ar, xr) in a.chunks_exact_mut(out).zip(x.chunks_exact(inp)) {
            for (&xv, wr) in xr.iter().zip(w.chunks_exact(out)) {
                for (a, &wv) in ar.iter_mut().zip(wr) {
                    *a += (xv as f64 * wv as f64).abs();
                }
            }
        }
        (e, a)
    }

    /// Max over y of |y − e| / (Σ|x·w| + tiny) against the reference e (whose rounding to f32
    /// adds at most u/2 of Σ|x·w|); a NaN counts as infinite (a NaN left from the poisoned y,
    /// i.e. an element never written).
    fn max_rel_err(y: &[f32], e: &[f32], a: &[f64]) -> f64 {
        let mut worst = 0f64;
        for ((&y, &e), &a) in y.iter().zip(e).zip(a) {
            let err = (y as f64 - e as f64).abs() / (a + 1e-30);
            worst = if err <= worst {
                worst
            } else if err.is_nan() {
                f64::INFINITY
            } else {
                err
            };
        }
        worst
    }

    /// Uniform in [-1, 1) from 24 bits of each draw. Not `next_f32() * 2 − 1`: `next_u32`
    /// yields 31 bits, so `next_f32` is in [0, 0.5) and that would make every value negative
    /// (all products positive, which hides sign and cancellation mistakes).
    fn random(rng: &mut Lcg, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u32() >> 7) & 0xff_ffff) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect()
    }

    /// (in, out): tails of every vector width, chunk and block; one block and several. Block
    /// sizes: GEMV 64 rows of w, chunks of 64 (AVX-512), 16 (AVX2) or 8 columns; GEMM 256
    /// inputs by 512 columns, panels of 64, 16 or 8 columns.
    const SHAPES: [(usize, usize); 7] = [
        (1, 1),      // one term, one partial vector
        (3, 17),     // one whole AVX-512 vector and one lane
        (17, 33),    // partial vectors on every path
        (33, 130),   // 2 GEMV chunks and a 2-column tail (AVX-512); 3 GEMM panels, the last partial
        (130, 1000), // 3 GEMV blocks, the last partial; 2 GEMM column blocks on one thread;
        // two threads from m = 5 (in split on the GEMV path, columns on the GEMM path)
        (1000, 3), // 16 GEMV blocks; 4 GEMM input blocks, the last partial; out < every vector
        (300, 64), // whole vectors and panels; 2 GEMM input blocks; two GEMV threads from m = 28
    ];
    /// Rows of x: both sides of GEMM_MIN_M = 64; tails of the 4-row GEMV tiles and of the 6-row
    /// (x86) and 4-row (portable) GEMM tiles.
    const MS: [usize; 9] = [1, 2, 5, 16, 17, 31, 63, 64, 131];

    #[test]
    fn every_path_matches_reference() {
        let mut worst = 0f64;
        for (si, &(inp, out)) in SHAPES.iter().enumerate() {
            for &m in &MS {
                let mut rng = Lcg::new(1000 * si as u64 + m as u64);
                let x = random(&mut rng, m * inp);
                let w = random(&mut rng, inp * out);
                let (e, a) = reference(&x, m, &w, inp, out);
                for isa in Isa::available() {
                    for th in [1usize, 2] {
                        let mut y = vec![f32::NAN; m * out];
                        dense_matmul_with(isa, th, &x, m, &w, inp, out, &mut y);
                        let err = max_rel_err(&y, &e, &a);
                        assert!(err <= RTOL, "{isa:?} threads {th} m {m} in {inp} out {out}: rel err {err:e} > {RTOL:e}");
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

    /// GEMM blocks in both directions at once: 3 input blocks (the last partial) by 3 column
    /// blocks (the last ending in a partial panel) on one thread, the columns split on two.
    #[test]
    fn gemm_blocks_match() {
        let (m, inp, out) = (67usize, 520usize, 1090usize);
        let mut rng = Lcg::new(42);
        let x = random(&mut rng, m * inp);
        let w = random(&mut rng, inp * out);
        let (e, a) = reference(&x, m, &w, inp, out);
        for isa in Isa::available() {
            for th in [1usize, 2] {
                let mut y = vec![f32::NAN; m * out];
                dense_matmul_with(isa, th, &x, m, &w, inp, out, &mut y);
                let err = max_rel_err(&y, &e, &a);
                assert!(
                    err <= RTOL,
                    "{isa:?} threads {th}: rel err {err:e} > {RTOL:e}"
                );
            }
        }
    }

    /// (out, in) of the NT path: no dimension a multiple of 16 (or 8) except where noted, so
    /// that every call has a partial input vector and a tail of single rows of w; (1, 1) is one
    /// term; (130, 1001) and (37, 5000) cut the inputs in blocks of 256 (the last partial) from
    /// m = 17 on; (37, 5000) has 24 rows of x per block (512 KB / 20 KB, rounded to 4), so m = 70
    /// takes 3 blocks, the last partial; (67, 64) has whole vectors only.
    const NT_SHAPES: [(usize, usize); 6] =
        [(1, 1), (5, 3), (19, 45), (130, 1001), (37, 5000), (67, 64)];
    /// Rows of x: 1, a partial 4-row tile, several tiles with a tail, several x blocks (inp 5000).
    const NT_MS: [usize; 4] = [1, 3, 17, 70];

    /// The NT reference y and Σ_k |x[i, k] · w[j, k]| (f64) of every output.
    fn reference_nt(
        x: &[f32],
        m: usize,
        w: &[f32],
        out: usize,
        inp: usize,
    ) -> (Vec<f32>, Vec<f64>) {
        let mut e = vec![f32::NAN; m * out];
        dense_matmul_nt_reference(x, m, w, out, inp, &mut e);
        let a = (0..m * out)
            .map(|o| {
                let (xr, wr) = (&x[o / out * inp..][..inp], &w[o % out * inp..][..inp]);
                xr.iter()
                    .zip(wr)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum()
            })
            .collect();
        (e, a)
    }

    /// The NT path (y = x · wᵀ, w `[out, in]`) on every ISA and 1 or 2 threads against the f64
    /// reference, with the dense path's tolerance `RTOL` (each output is an f32 sum of in/W lane
    /// sums and one horizontal sum: the same kind of error); and bit-identical over thread counts
    /// (each output is summed by one thread in one order).
    #[test]
    fn nt_matches_reference() {
        let mut worst = 0f64;
        for (si, &(out, inp)) in NT_SHAPES.iter().enumerate() {
            for &m in &NT_MS {
                let mut rng = Lcg::new(7000 + 100 * si as u64 + m as u64);
                let x = random(&mut rng, m * inp);
                let w = random(&mut rng, out * inp);
                let (e, a) = reference_nt(&x, m, &w, out, inp);
                for isa in Isa::available() {
                    let mut first: Option<Vec<f32>> = None;
                    for th in [1usize, 2] {
                        let mut y = vec![f32::NAN; m * out];
                        dense_matmul_nt_with(isa, th, &x, m, &w, out, inp, &mut y);
                        let err = max_rel_err(&y, &e, &a);
                        assert!(err <= RTOL, "NT {isa:?} threads {th} m {m} out {out} in {inp}: rel err {err:e} > {RTOL:e}");
                        worst = worst.max(err);
                        match &first {
                            None => first = Some(y),
                            Some(f) => assert!(
                                f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "NT {isa:?} m {m} out {out} in {inp}: threads change bits"
                            ),
                        }
                    }
                }
            }
        }
        eprintln!(
            "NT paths {:?}: max rel err {worst:e} (tolerance {RTOL:e})",
            Isa::available()
        );
    }

    /// NT with empty dimensions: in = 0 gives zeros; m = 0 or out = 0 touch nothing.
    #[test]
    fn nt_empty_dimensions() {
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; 6];
            dense_matmul_nt_with(isa, 2, &[], 2, &[], 3, 0, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{isa:?}: {y:?}");
            dense_matmul_nt_with(isa, 2, &[], 0, &[1.0; 3], 3, 1, &mut []);
            dense_matmul_nt_with(isa, 2, &[1.0; 2], 2, &[], 0, 1, &mut []);
        }
    }

    /// The f64 reference itself, on integers small enough that every sum is exact.
    #[test]
    fn reference_is_exact_on_integers() {
        let (m, inp, out) = (3usize, 5usize, 4usize);
        let x: Vec<f32> = (0..m * inp).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<f32> = (0..inp * out).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut y = vec![f32::NAN; m * out];
        dense_matmul_reference(&x, m, &w, inp, out, &mut y);
        for i in 0..m {
            for o in 0..out {
                let e: f32 = (0..inp).map(|k| x[i * inp + k] * w[k * out + o]).sum();
                assert_eq!(y[i * out + o], e, "y[{i}, {o}]");
            }
        }
    }

    /// Empty dimensions: in = 0 gives zeros; m = 0 or out = 0 touch nothing.
    #[test]
    fn empty_dimensions() {
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; 6];
            dense_matmul_with(isa, 2, &[], 2, &[], 0, 3, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{isa:?}: {y:?}");
            dense_matmul_with(isa, 2, &[], 0, &[1.0; 3], 1, 3, &mut []);
            dense_matmul_with(isa, 2, &[1.0; 2], 2, &[], 1, 0, &mut []);
        }
    }
}
