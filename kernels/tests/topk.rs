//! The top-k kernel on wgpu (lavapipe here), in f32 and f16, against the plain reference (the
//! same device tensor read back and fully sorted on the host), over a named grid of shapes: the
//! real vocabulary (262,144) and small ones, k = 1, 64 and 256, rows with many ties (values on a
//! 1/8 grid, a constant row), NaN and −∞ sprinkled in, and rows with fewer finite values than k.
//!
//! Ids and value bits must be equal exactly (a selection has no rounding; f16 values widen to f32
//! exactly). The lse is compared with a bound: the kernel sums exp(x − max) in f32, ⌈vocab/256⌉
//! terms per thread in order and then an 8-level tree, so its relative error is at most about
//! (vocab/256 + 8)·2^-24 (about 6e-5 at 262,144; random rows land far lower), which ln turns into
//! an absolute error of the same size; exp adds a few ulp per term and the final `max + ln`
//! rounds once (2^-24·|lse|). The reference sums in f64.

use burn::backend::wgpu::WgpuDevice;
use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::FloatElement;
use gemma4_kernels::fallback;
use gemma4_kernels::testing::{dtype, Gpu, Lcg};
use gemma4_kernels::topk::{self, top_k_rows, TopKError, TopRows};
use gemma4_kernels::Gemma4Backend;

/// Row `r` of a case: logits like a language model's on a 1/8 grid (many ties), row 1 constant,
/// NaN and −∞ sprinkled in, row 2 mostly −∞ when `sparse` (fewer finite values than k).
fn rows(rng: &mut Lcg, n: usize, vocab: usize, sparse: bool) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * vocab);
    for r in 0..n {
        for _ in 0..vocab {
            let u = rng.next_f32();
            let x = match rng.next_u32() % 997 {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                _ if r == 1 => 0.5,
                _ if r == 2 && sparse && !rng.next_u32().is_multiple_of(64) => f32::NEG_INFINITY,
                // A long tail and a few large ones.
                _ => ((-2.0 * (1.0 - u as f64).ln()).sqrt() as f32 * 4.0 - 6.0) * 8.0,
            };
            v.push(if x.is_finite() { x.round() / 8.0 } else { x });
        }
    }
    v
}

fn lse_tol(vocab: usize, lse: f32) -> f64 {
    ((vocab / 256 + 16) as f64) * 2f64.powi(-24) + 2f64.powi(-23) * (lse.abs() as f64)
}

/// Checks the kernel against the reference; returns the largest lse difference seen.
fn check<F: FloatElement>(dev: &WgpuDevice, seed: u64, n: usize, vocab: usize, k: usize) -> f64 {
    let mut rng = Lcg::new(seed);
    let host = rows(&mut rng, n, vocab, k >= 64);
    let t = Tensor::<Gpu<F>, 2>::from_data(TensorData::new(host, [n, vocab]), (dev, dtype::<F>()));
    let want: TopRows = topk::reference(t.clone(), k);
    let got = top_k_rows(t, k).unwrap_or_else(|e| panic!("n {n} vocab {vocab} k {k}: {e}"));
    let (wi, wv, _) = want.bits();
    let (gi, gv, _) = got.bits();
    for r in 0..n {
        let span = r * k..(r + 1) * k;
        assert_eq!(
            gi[span.clone()],
            wi[span.clone()],
            "ids: row {r} of n {n} vocab {vocab} k {k}"
        );
        assert_eq!(
            gv[span.clone()],
            wv[span],
            "values: row {r} of n {n} vocab {vocab} k {k}"
        );
    }
    let mut worst = 0.0f64;
    for (r, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        if w.is_finite() {
            let d = (g as f64 - w as f64).abs();
            assert!(
                d <= lse_tol(vocab, w),
                "lse row {r}: {g} vs {w} (n {n} vocab {vocab} k {k})"
            );
            worst = worst.max(d);
        } else {
            assert_eq!(g.to_bits(), w.to_bits(), "lse row {r}: {g} vs {w}");
        }
    }
    worst
}

fn grid<F: FloatElement>() {
    let dev = WgpuDevice::default();
    let mut worst = 0.0f64;
    // (seed, rows, vocab, k): the real vocabulary at k = 1 and 64; small vocabularies, k = vocab,
    // k = 256 (the sort's width); 3+ rows, so row 1 (constant) and row 2 (sparse) are in.
    for (seed, n, vocab, k) in [
        (1, 1, 262_144, 1),
        (2, 3, 262_144, 64),
        (3, 4, 1000, 64),
        (4, 3, 7, 1),
        (5, 3, 7, 7),
        (6, 3, 5000, 256),
        (7, 64, 2048, 64),
        (8, 3, 257, 256),
    ] {
        worst = worst.max(check::<F>(&dev, seed, n, vocab, k));
    }
    eprintln!("{:?}: largest lse difference {worst:e}", dtype::<F>());
}

#[test]
fn top_k_matches_reference_f32() {
    grid::<f32>();
}

#[test]
fn top_k_matches_reference_f16() {
    assert_eq!(dtype::<burn::tensor::f16>(), DType::F16);
    grid::<burn::tensor::f16>();
}

#[test]
fn the_backend_runs_the_kernel_and_refuses_bad_k() {
    let dev = WgpuDevice::default();
    let t = Tensor::<Gpu, 2>::from_data(
        TensorData::new(vec![1.0f32, 3.0, 3.0, -2.0, 0.0, 7.0], [2, 3]),
        &dev,
    );
    let before = fallback::launches("top_k");
    let got = <Gpu as Gemma4Backend>::top_k_rows(t.clone(), 2);
    assert!(fallback::launches("top_k") > before);
    assert_eq!(got.row(0), vec![(1, 3.0), (2, 3.0)]);
    assert_eq!(got.row(1), vec![(2, 7.0), (1, 0.0)]);
    for k in [0, 4] {
        assert!(
            matches!(top_k_rows(t.clone(), k), Err(TopKError::K { .. })),
            "k {k}"
        );
    }
    let wide = Tensor::<Gpu, 2>::zeros([1, 1000], &dev);
    assert!(matches!(top_k_rows(wide, 257), Err(TopKError::K { .. })));
}
