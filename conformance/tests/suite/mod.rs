//! The golden checks, generic over the backend: `golden.rs` runs them on the CPU reference
//! backend, `golden_wgpu.rs` on wgpu, where the model goes through the CubeCL kernels.

#![allow(dead_code)] // each test binary uses part of the suite

pub mod vision;

use gemma4_conformance::{fixtures, name};
use gemma4_model::golden::*;
use gemma4_model::{Gemma4Backend, KvCache, Logits, Model};

/// Every kernel of `kernels` (the backend's: `fallback::CUBE_KERNELS` or `CPU_KERNELS`) launched and
/// none fell back (the policy is Strict, so a refusal would already have panicked; the counts say
/// so explicitly).
pub fn assert_every_kernel_ran(kernels: &[&str]) {
    let counts: Vec<_> = gemma4_model::kernels::fallback::counts()
        .into_iter()
        .filter(|(k, _, _)| kernels.contains(k))
        .collect();
    eprintln!("kernel launches / fallbacks: {counts:?}");
    for (kernel, launches, fallbacks) in counts {
        assert!(launches > 0, "{kernel} never launched");
        assert_eq!(
            fallbacks, 0,
            "{kernel} fell back to the reference {fallbacks} times"
        );
    }
}

pub fn load<B: Gemma4Backend>(dir: &std::path::Path, device: &B::Device) -> Model<B> {
    Model::<B>::load(dir, device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn to_vec<B: Gemma4Backend>(t: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Logits within `tol.logits` of transformers at every position of every case.
pub fn logits_match_reference<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in fixtures() {
        let model = load::<B>(&dir, device);
        let reference = load_reference(&dir).unwrap();
        for case in &reference.cases {
            let seq = case.sequence();
            let (expected, shape) = reference_logits(&dir, &case.name).unwrap();
            assert_eq!(
                shape,
                [seq.len(), model.text.vocab_size],
                "{}/{} reference shape",
                name(&dir),
                case.name
            );
            let got = case_logits(&model.text, case).unwrap();
            let (d, at) = max_abs_diff(&got, &expected);
            println!(
                "{}/{}: {} positions, max|Δlogit| = {d:.2e} (tolerance {:.1e}) at position {}",
                name(&dir),
                case.name,
                seq.len(),
                tol.logits,
                at / shape[1]
            );
            assert!(
                d <= tol.logits,
                "{}/{}: max|Δ| {d} at flat index {at}",
                name(&dir),
                case.name
            );
        }
    }
}

/// Prints a case's greedy continuation and asserts it is the reference's.
pub fn assert_greedy(
    dir: &std::path::Path,
    case: &str,
    min_margin: f64,
    tokens: &[u32],
    expected: &[u32],
) {
    println!(
        "{}/{case}: greedy {tokens:?} (reference min margin {min_margin:.3})",
        name(dir)
    );
    assert_eq!(tokens, expected, "{}/{case} greedy continuation", name(dir));
}

/// Greedy continuations identical to the reference's; returns (fixture-case, tokens) for snapshots.
pub fn greedy_matches_reference<B: Gemma4Backend>(device: &B::Device) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for dir in fixtures() {
        let model = load::<B>(&dir, device);
        let reference = load_reference(&dir).unwrap();
        for case in &reference.cases {
            let tokens = case_greedy(&model.text, case).unwrap();
            assert_greedy(
                &dir,
                &case.name,
                case.min_greedy_margin,
                &tokens,
                &case.greedy_ids,
            );
            out.push((format!("{}-{}", name(&dir), case.name), tokens));
        }
    }
    out
}

/// Prefill in chunks then one token at a time equals one prefill; sliding caches keep their window.
pub fn decode_through_cache_equals_prefill<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in fixtures() {
        let model = load::<B>(&dir, device);
        let reference = load_reference(&dir).unwrap();
        for case in &reference.cases {
            let seq = case.sequence();
            let vocab = model.text.vocab_size;
            let full = case_logits(&model.text, case).unwrap();

            // Prefill the prompt in two uneven chunks, then one token at a time.
            let p = case.prompt_ids.len();
            let split = (p / 3).max(1);
            let mut cache = model.text.new_cache();
            let mut stepped = to_vec(
                model
                    .text
                    .forward(&seq[..split], &mut cache, Logits::All)
                    .unwrap(),
            );
            if split < p {
                stepped.extend(to_vec(
                    model
                        .text
                        .forward(&seq[split..p], &mut cache, Logits::All)
                        .unwrap(),
                ));
            }
            for &tok in &seq[p..] {
                stepped.extend(to_vec(
                    model.text.forward(&[tok], &mut cache, Logits::All).unwrap(),
                ));
            }
            assert_eq!(cache.seq_len, seq.len());
            let (d, at) = max_abs_diff(&stepped, &full);
            println!(
                "{}/{}: cache vs prefill max|Δ| = {d:.2e} (tolerance {:.1e})",
                name(&dir),
                case.name,
                tol.cache
            );
            assert!(
                d <= tol.cache,
                "{}/{}: position {}",
                name(&dir),
                case.name,
                at / vocab
            );

            // Sliding layers keep only their window.
            for (l, layer) in cache.layers.iter().zip(&model.text.layers) {
                if let Some(w) = layer.self_attn.sliding_window {
                    assert!(
                        l.len() < w,
                        "sliding cache holds {} > window-1 {}",
                        l.len(),
                        w - 1
                    );
                } else {
                    assert_eq!(l.len(), seq.len());
                }
            }
        }
    }
}

/// Continuous batching: one forward over sequences at different positions matches the reference.
pub fn batched_decode_matches_reference<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    // Continuous batching: sequences at different positions (some past the sliding window)
    // decoded together give the logits each gives alone, and match the reference.
    for dir in fixtures() {
        let model = load::<B>(&dir, device);
        let reference = load_reference(&dir).unwrap();
        let cases = &reference.cases;
        let mut caches: Vec<KvCache<B>> = cases.iter().map(|_| model.text.new_cache()).collect();
        for (c, cache) in cases.iter().zip(caches.iter_mut()) {
            model
                .text
                .forward(&c.prompt_ids, cache, Logits::Last)
                .unwrap();
        }
        let steps = cases.iter().map(|c| c.greedy_ids.len()).min().unwrap();
        let mut worst = 0f32;
        for step in 0..steps {
            let tokens: Vec<u32> = cases.iter().map(|c| c.greedy_ids[step]).collect();
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            let batched = to_vec(model.text.forward_batch(&tokens, &mut refs).unwrap());
            let vocab = model.text.vocab_size;
            for (b, c) in cases.iter().enumerate() {
                let (expected, _) = reference_logits(&dir, &c.name).unwrap();
                let pos = c.prompt_ids.len() + step;
                let (d, _) = max_abs_diff(
                    &batched[b * vocab..(b + 1) * vocab],
                    &expected[pos * vocab..(pos + 1) * vocab],
                );
                worst = worst.max(d);
            }
        }
        println!("{}: batched decode of {} sequences, {steps} steps: max|Δ| vs reference {worst:.2e} (tolerance {:.1e})", name(&dir), cases.len(), tol.logits);
        assert!(worst <= tol.logits);
    }
}
