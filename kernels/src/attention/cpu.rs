//! Attention on the CPU over plain slices, for the ndarray backend: per (query, head) row, the
//! scores of the visible keys only, a softmax in f32, and the weighted sum of V rows. The
//! reference instead scores every key, adds a `[t, s]` mask, and runs the softmax over the whole
//! matrix: on a causal prompt half of that work, and with a window most of it, is masked away.
//!
//! Visibility is [`AttentionParams::visible`]: a row's keys are the range between the window's
//! start and its causal bound, plus, with bidirectional spans, the later keys `visible` admits.
//! Rows are split between threads when there is enough work. A row that sees no key gets zeros
//! (as the fused CubeCL kernel; the reference would give NaN).

use super::AttentionParams;
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
        (k.len(), v.len()),
        (kv_heads * s * d, kv_heads * s * d),
        "attention: k/v are not [{kv_heads}, {s}, {d}]"
    );
    assert_eq!(
        out.len(),
        t * heads * d,
        "attention: out is not [{t}, {}]",
        heads * d
    );
    if d == 0 {
        return;
    }
    let rows = t * heads;
    // Below ~1M multiply-adds a second thread costs more than it saves.
    let threads = if rows * s * d < (1 << 20) {
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
            s,
            d,
            p,
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
struct Rows<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    first: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    p: &'a AttentionParams,
    out: &'a mut [f32],
}

impl Kernel for Rows<'_> {
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
            s,
            d,
            p,
            out,
        } = self;
        let mut scores = Vec::with_capacity(s);
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            row(q, k, v, first + r, heads, kv_heads, s, d, p, &mut scores, o);
        }
    }
}

/// One (query, head) row: `row` = i · heads + h.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    row: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    d: usize,
    p: &AttentionParams,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let (i, h) = (row / heads, row % heads);
    let kvh = h / (heads / kv_heads);
    let qpos = p.q_start + i;
    let qr = &q[row * d..(row + 1) * d];
    let keys = &k[kvh * s * d..(kvh + 1) * s * d];
    let vals = &v[kvh * s * d..(kvh + 1) * s * d];
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
    for j in lo..hi.max(lo) {
        if j >= causal_hi && !p.visible(qpos, p.k_start + j) {
            scores.push(f32::NEG_INFINITY);
            continue;
        }
        let mut sc = dot(qr, &keys[j * d..(j + 1) * d]) * p.scale;
        if let Some(cap) = p.softcap {
            sc = (sc / cap).tanh() * cap;
        }
        max = max.max(sc);
        scores.push(sc);
    }
    o.fill(0.0);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0f32;
    for (jj, sc) in scores.iter().enumerate() {
        if *sc == f32::NEG_INFINITY {
            continue;
        }
        let w = (sc - max).exp();
        sum += w;
        let vr = &vals[(lo + jj) * d..(lo + jj + 1) * d];
        o.iter_mut().zip(vr).for_each(|(o, v)| *o += w * v);
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
                let err = out
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    out.iter().all(|x| x.is_finite()) && err <= 1e-5 * v_max,
                    "case {n} (t {t} s {s} d {d}) {isa:?}: max |Δ| {err:e}"
                );
            }
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
