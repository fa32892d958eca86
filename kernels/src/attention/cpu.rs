//! Attention on the CPU over plain slices, for the ndarray backend: per (query, head) row, the
//! scores of the visible keys only, a softmax in f32, and the weighted sum of V rows. The
//! reference instead scores every key, adds a `[t, s]` mask, and runs the softmax over the whole
//! matrix: on a causal prompt half of that work, and with a window most of it, is masked away.
//!
//! Visibility is [`AttentionParams::visible`]: a row's keys are the range between the window's
//! start and its causal bound, plus, with bidirectional spans, the later keys `visible` admits.
//! Rows are split between threads when there is enough work. A row that sees no key gets zeros
//! (as the fused CubeCL kernel; the reference would give NaN).

use std::ops::Range;

use super::fp8::{self, KvScales};
use super::{AttentionParams, PagedBatch};
use crate::simd::{Isa, Kernel, Simd};

/// q `[t, heads, d]`, k and v `[kv_heads, s, d]` (row-major) -> out `[t, heads · d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    p: &AttentionParams,
    out: &mut [f32],
) {
    attention_with(Isa::detect(), q, k, v, t, heads, kv_heads, s, d, p, out)
}

/// [`attention`] on a given instruction set (tests run every one the CPU has).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    p: &AttentionParams,
    out: &mut [f32],
) {
    // A contiguous cache is one sequence in one block of s keys.
    let one = [Segment {
        rows: 0..t,
        params: p,
        keys: s,
        blocks: &[0],
        block_size: s.max(1),
    }];
    let (k, v) = (Plain::new(k, kv_heads, s, d), Plain::new(v, kv_heads, s, d));
    run(isa, q, &k, &v, heads, kv_heads, d, &one, out)
}

/// Paged attention over a ragged batch (see [`PagedBatch`]): q `[rows, heads, d]`, the pools
/// `[kv_heads, slots, d]` -> out `[rows, heads · d]`. Each row reads its keys through its
/// sequence's block table, in place.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    heads: usize,
    kv_heads: usize,
    slots: usize,
    d: usize,
    batch: &PagedBatch,
    out: &mut [f32],
) {
    paged_attention_with(
        Isa::detect(),
        q,
        k_pool,
        v_pool,
        heads,
        kv_heads,
        slots,
        d,
        batch,
        out,
    )
}

/// [`paged_attention`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with(
    isa: Isa,
    q: &[f32],
    k_pool: &[f32],
    v_pool: &[f32],
    heads: usize,
    kv_heads: usize,
    slots: usize,
    d: usize,
    batch: &PagedBatch,
    out: &mut [f32],
) {
    let (k, v) = (
        Plain::new(k_pool, kv_heads, slots, d),
        Plain::new(v_pool, kv_heads, slots, d),
    );
    paged_run(isa, q, &k, &v, heads, kv_heads, slots, d, batch, out)
}

/// [`paged_attention`] over fp8 pools `[kv_heads, slots, d / 4]` of packed E4M3 words (see
/// [`super::fp8`]): each key and value row is decoded (code · scale) as the loop reaches it.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_fp8(
    q: &[f32],
    k_pool: &[i32],
    v_pool: &[i32],
    scales: KvScales,
    heads: usize,
    kv_heads: usize,
    slots: usize,
    d: usize,
    batch: &PagedBatch,
    out: &mut [f32],
) {
    if let Some(why) = fp8::check_head_dim(d) {
        panic!("paged attention: {why}");
    }
    let (k, v) = (
        Fp8::new(k_pool, scales.k, kv_heads, slots, d),
        Fp8::new(v_pool, scales.v, kv_heads, slots, d),
    );
    paged_run(
        Isa::detect(),
        q,
        &k,
        &v,
        heads,
        kv_heads,
        slots,
        d,
        batch,
        out,
    )
}

/// Where the rows of K or V come from: an f32 pool, or fp8 words decoded per row.
trait KvRows: Sync {
    /// KV head `kvh`'s row at `slot`, `d` values (decoded into `buf` when stored otherwise).
    fn row<'a>(&'a self, kvh: usize, slot: usize, buf: &'a mut [f32]) -> &'a [f32];
}

/// An f32 pool `[kv_heads, slots, d]`.
struct Plain<'a> {
    data: &'a [f32],
    slots: usize,
    d: usize,
}

impl<'a> Plain<'a> {
    fn new(data: &'a [f32], kv_heads: usize, slots: usize, d: usize) -> Self {
        assert_eq!(
            data.len(),
            kv_heads * slots * d,
            "attention: k/v are not [{kv_heads}, {slots}, {d}]"
        );
        Plain { data, slots, d }
    }
}

impl KvRows for Plain<'_> {
    #[inline(always)]
    fn row<'a>(&'a self, kvh: usize, slot: usize, _: &'a mut [f32]) -> &'a [f32] {
        &self.data[(kvh * self.slots + slot) * self.d..][..self.d]
    }
}

/// An fp8 pool `[kv_heads, slots, d / 4]` and its scale (folded into the decode table).
struct Fp8<'a> {
    words: &'a [i32],
    slots: usize,
    w: usize,
    table: [f32; 256],
}

impl<'a> Fp8<'a> {
    fn new(words: &'a [i32], scale: f32, kv_heads: usize, slots: usize, d: usize) -> Self {
        let w = d / fp8::PER_WORD;
        assert_eq!(
            words.len(),
            kv_heads * slots * w,
            "attention: fp8 k/v are not [{kv_heads}, {slots}, {w}] words"
        );
        let table = fp8::scaled_table(scale);
        Fp8 {
            words,
            slots,
            w,
            table,
        }
    }
}

impl KvRows for Fp8<'_> {
    #[inline(always)]
    fn row<'a>(&'a self, kvh: usize, slot: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let words = &self.words[(kvh * self.slots + slot) * self.w..][..self.w];
        fp8::dequantize_row(words, &self.table, buf);
        buf
    }
}

#[allow(clippy::too_many_arguments)]
fn paged_run(
    isa: Isa,
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    heads: usize,
    kv_heads: usize,
    slots: usize,
    d: usize,
    batch: &PagedBatch,
    out: &mut [f32],
) {
    if let Some(why) = batch.check(slots) {
        panic!("paged attention: {why}");
    }
    let segments: Vec<Segment> = batch
        .seqs
        .iter()
        .map(|s| Segment {
            rows: s.rows.clone(),
            params: &s.params,
            keys: s.keys,
            blocks: &s.blocks,
            block_size: batch.block_size,
        })
        .collect();
    run(isa, q, k, v, heads, kv_heads, d, &segments, out)
}

/// The queries `rows` of one sequence, its keys `0..keys` and the blocks that hold them: key j
/// is slot `blocks[j / block_size] · block_size + j % block_size` of each KV head.
#[derive(Debug, Clone)]
struct Segment<'a> {
    rows: Range<usize>,
    params: &'a AttentionParams,
    keys: usize,
    blocks: &'a [u32],
    block_size: usize,
}

impl Segment<'_> {
    /// Keys `lo..hi` as runs of consecutive slots, `(first key, its slot, length)`: one division
    /// per block, not per key.
    #[inline(always)]
    fn runs(&self, lo: usize, hi: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let bs = self.block_size;
        let mut j = lo;
        std::iter::from_fn(move || {
            if j >= hi {
                return None;
            }
            let off = j % bs;
            let len = (bs - off).min(hi - j);
            let run = (j, self.blocks[j / bs] as usize * bs + off, len);
            j += len;
            Some(run)
        })
    }
}

/// Every (query, head) row of `segments` (whose rows follow each other from 0), k and v
/// `[kv_heads, slots, d]` as `KvRows`.
#[allow(clippy::too_many_arguments)]
fn run<K: KvRows, V: KvRows>(
    isa: Isa,
    q: &[f32],
    k: &K,
    v: &V,
    heads: usize,
    kv_heads: usize,
    d: usize,
    segments: &[Segment],
    out: &mut [f32],
) {
    let t = segments.last().map_or(0, |s| s.rows.end);
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "attention: {heads} heads over {kv_heads} KV heads"
    );
    assert_eq!(
        q.len(),
        t * heads * d,
        "attention: q is not [{t}, {heads}, {d}]"
    );
    assert_eq!(
        out.len(),
        t * heads * d,
        "attention: out is not [{t}, {}]",
        heads * d
    );
    if d == 0 || t == 0 {
        return;
    }
    let rows = t * heads;
    let work: usize = segments
        .iter()
        .map(|s| s.rows.len() * s.keys)
        .sum::<usize>()
        * heads
        * d;
    // Below ~1M multiply-adds a second thread costs more than it saves.
    let threads = if work < (1 << 20) {
        1
    } else {
        crate::pool::threads().min(rows)
    };
    let per = rows.div_ceil(threads.max(1));
    let run = &|c: usize, chunk: &mut [f32]| {
        isa.dispatch(Rows {
            q,
            k,
            v,
            first: c * per,
            heads,
            kv_heads,
            d,
            segments,
            out: chunk,
        })
    };
    if threads == 1 {
        return run(0, out);
    }
    // Contiguous ranges of rows on the kernels' pool, the first on the calling thread.
    crate::pool::scope(|scope| {
        let mut chunks = out.chunks_mut(per * d).enumerate();
        let (_, first) = chunks.next().expect("rows > 0 when threads > 1");
        for (c, chunk) in chunks {
            scope.spawn(move |_| run(c, chunk));
        }
        run(0, first);
    });
}

/// Consecutive (query, head) rows from `first`, one per `d` floats of `out`: [`row`] compiled for
/// the path that runs it (the same code, autovectorized with AVX2 or AVX-512; the build's
/// baseline is SSE2).
struct Rows<'a, K, V> {
    q: &'a [f32],
    k: &'a K,
    v: &'a V,
    first: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    segments: &'a [Segment<'a>],
    out: &'a mut [f32],
}

impl<K: KvRows, V: KvRows> Kernel for Rows<'_, K, V> {
    type Output = ();
    #[inline(always)]
    unsafe fn run<S: Simd>(self) {
        let Rows {
            q,
            k,
            v,
            first,
            heads,
            kv_heads,
            d,
            segments,
            out,
        } = self;
        let mut scores = Vec::new();
        let mut buf = vec![0f32; d];
        let mut seg = 0;
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            let row_index = first + r;
            let i = row_index / heads;
            while segments[seg].rows.end <= i {
                seg += 1;
            }
            let s = &segments[seg];
            row(
                q,
                k,
                v,
                row_index,
                i - s.rows.start,
                heads,
                kv_heads,
                d,
                s,
                &mut scores,
                &mut buf,
                o,
            );
        }
    }
}

/// One (query, head) row: `row` = i · heads + h over the whole batch, `i_local` the query's
/// index within its sequence `seg`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row(
    q: &[f32],
    k: &impl KvRows,
    v: &impl KvRows,
    row: usize,
    i_local: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    seg: &Segment,
    scores: &mut Vec<f32>,
    buf: &mut [f32],
    o: &mut [f32],
) {
    let (p, s) = (seg.params, seg.keys);
    let h = row % heads;
    let kvh = h / (heads / kv_heads);
    let qpos = p.q_start + i_local;
    let qr = &q[row * d..(row + 1) * d];
    // Keys from the window's start to the causal bound are all visible; later ones only through
    // a bidirectional span (checked one by one).
    let lo = p
        .window
        .map_or(0, |w| {
            (qpos + 1).saturating_sub(w).saturating_sub(p.k_start)
        })
        .min(s);
    let causal_hi = if p.causal {
        (qpos + 1).saturating_sub(p.k_start).min(s)
    } else {
        s
    };
    let hi = if p.causal && !p.bidirectional.is_empty() {
        s
    } else {
        causal_hi
    };
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for (j0, slot0, n) in seg.runs(lo, hi.max(lo)) {
        for m in 0..n {
            let j = j0 + m;
            if j >= causal_hi && !p.visible(qpos, p.k_start + j) {
                scores.push(f32::NEG_INFINITY);
                continue;
            }
            let kr = k.row(kvh, slot0 + m, buf);
            let mut sc = dot(qr, kr) * p.scale;
            if let Some(cap) = p.softcap {
                sc = (sc / cap).tanh() * cap;
            }
            max = max.max(sc);
            scores.push(sc);
        }
    }
    o.fill(0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0f32;
    for (j0, slot0, n) in seg.runs(lo, hi.max(lo)) {
        for (m, sc) in scores[j0 - lo..j0 - lo + n].iter().enumerate() {
            if *sc == f32::NEG_INFINITY {
                continue;
            }
            let vr = v.row(kvh, slot0 + m, buf);
            let w = (sc - max).exp();
            sum += w;
            o.iter_mut().zip(vr).for_each(|(o, v)| *o += w * v);
        }
    }
    let inv = 1.0 / sum;
    o.iter_mut().for_each(|x| *x *= inv);
}

/// a · b in f32 with 8 partial sums (vectorizable, and closer to the exact sum than one chain);
/// also the sum of squares of the CPU RMSNorm (`dot(v, v)`).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference;
    use crate::testing::{Cpu, Lcg};
    use burn::prelude::*;
    use burn::tensor::TensorData;

    fn random(rng: &mut Lcg, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    /// Against the reference on every mask kind: causal text with a cache, windows, GQA, softcap,
    /// scale, non-causal (vision) with and without a window, bidirectional spans; rows big enough
    /// to take the threaded path too. Tolerance 1e-5 · max|v| (the output is a convex combination
    /// of v rows; both sides are f32 with different summation orders).
    #[test]
    fn matches_reference() {
        let dev = Default::default();
        let causal = |t: usize, s: usize, w| AttentionParams::causal(s - t, 0, w);
        let cases: Vec<(usize, usize, usize, usize, usize, AttentionParams)> = vec![
            (1, 1, 2, 1, 8, causal(1, 1, None)),
            (1, 300, 8, 2, 64, causal(1, 300, Some(64))),
            (
                5,
                69,
                4,
                2,
                256,
                AttentionParams {
                    k_start: 7,
                    q_start: 71,
                    ..AttentionParams::causal(0, 0, Some(16))
                },
            ),
            (
                33,
                33,
                2,
                2,
                32,
                AttentionParams {
                    softcap: Some(3.0),
                    scale: 0.5,
                    ..causal(33, 33, None)
                },
            ),
            (130, 130, 8, 1, 72, causal(130, 130, None)),
            (40, 40, 4, 4, 48, AttentionParams::bidirectional()),
            (
                33,
                50,
                4,
                2,
                32,
                AttentionParams {
                    q_start: 10,
                    causal: false,
                    window: Some(16),
                    ..AttentionParams::bidirectional()
                },
            ),
            (
                130,
                130,
                4,
                2,
                64,
                AttentionParams {
                    bidirectional: vec![20..84, 100..101],
                    ..causal(130, 130, Some(16))
                },
            ),
            (
                33,
                100,
                8,
                1,
                512,
                AttentionParams {
                    bidirectional: vec![70..80, 90..130],
                    ..AttentionParams::causal(37 + 67, 37, None)
                },
            ),
        ];
        for (n, (t, s, heads, kv, d, p)) in cases.into_iter().enumerate() {
            let mut rng = Lcg::new(500 + n as u64);
            let (q, k, v) = (
                random(&mut rng, t * heads * d),
                random(&mut rng, kv * s * d),
                random(&mut rng, kv * s * d),
            );
            let expected: Vec<f32> = reference::attention(
                Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), [t, heads, d]), &dev),
                Tensor::<Cpu, 3>::from_data(TensorData::new(k.clone(), [kv, s, d]), &dev),
                Tensor::<Cpu, 3>::from_data(TensorData::new(v.clone(), [kv, s, d]), &dev),
                &p,
            )
            .into_data()
            .to_vec()
            .unwrap();
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; t * heads * d];
                attention_with(isa, &q, &k, &v, t, heads, kv, s, d, &p, &mut out);
                let v_max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = max_diff(&out, &expected);
                assert!(
                    out.iter().all(|x| x.is_finite()) && err <= 1e-5 * v_max,
                    "case {n} (t {t} s {s} d {d}) {isa:?}: max |Δ| {err:e}"
                );
            }
        }
    }

    /// Random ragged batches over pools with shuffled blocks: prefill chunks with a cache before
    /// them, decode rows, windows that start mid-table, bidirectional spans, GQA; every
    /// instruction set against the reference (which gathers each sequence's keys first).
    #[test]
    fn paged_matches_reference() {
        let dev = Default::default();
        for case in 0..6u64 {
            let mut rng = Lcg::new(900 + case);
            let (heads, kv, d) = [(4, 2, 32), (8, 1, 64), (2, 2, 16)][case as usize % 3];
            let block_size = [16, 4, 7][case as usize % 3];
            let num_blocks = 64;
            let (batch, rows) = random_paged_batch(&mut rng, block_size, num_blocks);
            let slots = num_blocks * block_size;
            let q = random(&mut rng, rows * heads * d);
            let k = random(&mut rng, kv * slots * d);
            let v = random(&mut rng, kv * slots * d);
            let expected: Vec<f32> = reference::paged_attention(
                Tensor::<Cpu, 3>::from_data(TensorData::new(q.clone(), [rows, heads, d]), &dev),
                Tensor::<Cpu, 3>::from_data(TensorData::new(k.clone(), [kv, slots, d]), &dev),
                Tensor::<Cpu, 3>::from_data(TensorData::new(v.clone(), [kv, slots, d]), &dev),
                &batch,
            )
            .into_data()
            .to_vec()
            .unwrap();
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; rows * heads * d];
                paged_attention_with(isa, &q, &k, &v, heads, kv, slots, d, &batch, &mut out);
                let err = max_diff(&out, &expected);
                assert!(
                    out.iter().all(|x| x.is_finite()) && err <= 1e-5,
                    "case {case} {isa:?}: max |Δ| {err:e} over {:?}",
                    batch
                        .seqs
                        .iter()
                        .map(|s| (s.rows.clone(), s.keys))
                        .collect::<Vec<_>>()
                );
            }
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// A random ragged batch over `num_blocks` blocks handed out from a shuffled free list (each
    /// sequence's blocks scattered over the pool): decode rows and prefill chunks after a cache,
    /// windows whose table starts later, image spans. Returns the batch and its rows.
    fn random_paged_batch(
        rng: &mut Lcg,
        block_size: usize,
        num_blocks: usize,
    ) -> (crate::attention::PagedBatch, usize) {
        use crate::attention::{PagedBatch, PagedSeq};
        let mut pick = |n: usize| (rng.next_f32() * n as f32) as usize % n.max(1);
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, pick(i + 1));
        }
        let mut seqs = Vec::new();
        let mut rows = 0;
        for _ in 0..1 + pick(4) {
            let t = if pick(2) == 0 { 1 } else { 1 + pick(40) };
            let before = pick(60);
            // Keys start at a block boundary; with a window the table may begin later.
            let window = [None, Some(8), Some(24)][pick(3)];
            let k_start = match window {
                Some(w) => (before.saturating_sub(w) / block_size) * block_size,
                None => 0,
            };
            let keys = before + t - k_start;
            let n_blocks = keys.div_ceil(block_size);
            if free.len() < n_blocks {
                break;
            }
            let blocks = free.split_off(free.len() - n_blocks);
            // One image span inside the chunk.
            let bidirectional: Vec<_> = if t > 6 && pick(2) == 0 {
                std::iter::once(before + 2..before + 6).collect()
            } else {
                Vec::new()
            };
            seqs.push(PagedSeq {
                rows: rows..rows + t,
                params: AttentionParams {
                    bidirectional,
                    ..AttentionParams::causal(before, k_start, window)
                },
                keys,
                blocks,
            });
            rows += t;
        }
        (PagedBatch { block_size, seqs }, rows)
    }

    /// The fp8 pools: the CPU loop (decode per row) against the reference (gather, dequantize
    /// with tensor ops, attend) on the same words: the same values, so 1e-5 as for floats; and
    /// against float attention on the unquantized K/V, within the bound E4M3 rounding allows.
    ///
    /// That bound: each stored value is off by at most half an E4M3 step, 2^-4 · |x| for normals
    /// (3 mantissa bits) and 2^-10 · scale below them. V's error moves the output by at most
    /// ev = 2^-4 · max|v| + 2^-10 · s_v; K's moves each score by at most
    /// δ = max_row |q|₁ · (2^-4 · max|k| + 2^-10 · s_k), which scales each softmax weight by
    /// e^±δ, so the output moves by at most (e^{2δ} - 1) · (max|v| + ev) more.
    #[test]
    fn paged_fp8_matches_reference() {
        use crate::attention::fp8;
        let dev = Default::default();
        for case in 0..6u64 {
            let mut rng = Lcg::new(700 + case);
            let (heads, kv, d) = [(4, 2, 32), (8, 1, 64), (2, 2, 16)][case as usize % 3];
            let block_size = [16, 4, 7][case as usize % 3];
            let num_blocks = 64;
            let (batch, rows) = random_paged_batch(&mut rng, block_size, num_blocks);
            let slots = num_blocks * block_size;
            // Values spread over E4M3's range after scaling (|x| / s up to 200, down into the
            // subnormals), queries small enough that the bound above says something.
            let scales = KvScales {
                k: 0.005,
                v: 0.00125,
            };
            let q: Vec<f32> = random(&mut rng, rows * heads * d)
                .iter()
                .map(|x| x * 0.1)
                .collect();
            let wide = |rng: &mut Lcg, n| -> Vec<f32> {
                random(rng, n).iter().map(|x| x * x * x).collect()
            };
            let k = wide(&mut rng, kv * slots * d);
            let v: Vec<f32> = wide(&mut rng, kv * slots * d)
                .iter()
                .map(|x| x * 0.25)
                .collect();
            let t3 = |x: &[f32], dims: [usize; 3]| {
                Tensor::<Cpu, 3>::from_data(TensorData::new(x.to_vec(), dims), &dev)
            };
            let kw = fp8::quantize(t3(&k, [kv, slots, d]), scales.k);
            let vw = fp8::quantize(t3(&v, [kv, slots, d]), scales.v);
            let qt = t3(&q, [rows, heads, d]);
            let expected: Vec<f32> =
                reference::paged_attention_fp8(qt.clone(), kw.clone(), vw.clone(), scales, &batch)
                    .into_data()
                    .to_vec()
                    .unwrap();
            let float: Vec<f32> = reference::paged_attention(
                qt,
                t3(&k, [kv, slots, d]),
                t3(&v, [kv, slots, d]),
                &batch,
            )
            .into_data()
            .to_vec()
            .unwrap();
            let (kh, vh) = (
                kw.into_data().to_vec::<i32>().unwrap(),
                vw.into_data().to_vec::<i32>().unwrap(),
            );
            let mut out = vec![f32::NAN; rows * heads * d];
            paged_attention_fp8(&q, &kh, &vh, scales, heads, kv, slots, d, &batch, &mut out);
            let err = max_diff(&out, &expected);
            assert!(
                out.iter().all(|x| x.is_finite()) && err <= 1e-5,
                "case {case}: fp8 CPU vs fp8 reference max |Δ| {err:e}"
            );

            let amax = |x: &[f32]| x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (kmax, vmax) = (amax(&k), amax(&v));
            let q1 = q
                .chunks_exact(d)
                .map(|r| r.iter().map(|x| x.abs()).sum::<f32>())
                .fold(0f32, f32::max);
            let ulp = 2f32.powi(-4);
            let ev = ulp * vmax + 2f32.powi(-10) * scales.v;
            let delta = q1 * (ulp * kmax + 2f32.powi(-10) * scales.k);
            let bound = ev + ((2.0 * delta).exp() - 1.0) * (vmax + ev);
            let err_float = max_diff(&out, &float);
            assert!(
                err_float <= bound,
                "case {case}: fp8 vs float max |Δ| {err_float:e} > bound {bound:e}"
            );
            eprintln!(
                "case {case}: fp8 CPU vs fp8 reference {err:.1e}; vs float {err_float:.3e} \
                 (bound {bound:.3e}, max|v| {vmax:.3})"
            );
        }
    }

    #[test]
    fn rows_without_keys_are_zero() {
        // Keys at 10..50, queries at 0..3: nothing is causally visible.
        let p = AttentionParams::causal(0, 10, None);
        let mut out = vec![f32::NAN; 3 * 2 * 8];
        attention(
            &[1.0; 48],
            &[1.0; 2 * 40 * 8],
            &[1.0; 2 * 40 * 8],
            3,
            2,
            2,
            40,
            8,
            &p,
            &mut out,
        );
        assert!(out.iter().all(|&x| x == 0.0));
    }
}
