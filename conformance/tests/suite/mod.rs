//! The golden checks, generic over the backend: `golden.rs` runs them on the CPU reference
//! backend, `golden_wgpu.rs` on wgpu, where the model goes through the CubeCL kernels.

#![allow(dead_code)] // each test binary uses part of the suite

pub mod prefix;
pub mod vision;

use gemma4_conformance::{fixtures, name};
use gemma4_model::golden::*;
use gemma4_model::{Gemma4Backend, Logits, Model, SeqStep};

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
            // The backend's top-k of these rows (the device kernel on wgpu) is the host
            // selection's: what the engine samples from instead of the full rows.
            let t = burn::tensor::Tensor::<B, 2>::from_data(
                burn::tensor::TensorData::new(got, shape),
                device,
            );
            let k = 64.min(shape[1]);
            let rows = to_vec(t.clone());
            let want = gemma4_model::kernels::topk::select_host(&rows, shape[1], k);
            assert_eq!(
                B::top_k_rows(t, k).ids,
                want.ids,
                "{}/{} top-k",
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
            assert_eq!(cache.seq_len(), seq.len());
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

            // Sliding layers keep only their window, in as few blocks as cover it.
            for (held, layer) in cache.layer_tokens().iter().zip(&model.text.layers) {
                if let Some(w) = layer.self_attn.sliding_window {
                    assert!(*held < w, "sliding cache holds {held} > window-1 {}", w - 1);
                } else {
                    assert_eq!(*held, seq.len());
                }
            }
            let [sliding, full] = cache.seq.blocks_held();
            let bs = cache.pool.block_size;
            if let Some(w) = model.text.sliding_window() {
                assert!(
                    sliding <= (w - 1).div_ceil(bs) + 1,
                    "{sliding} sliding blocks"
                );
            }
            assert_eq!(full, seq.len().div_ceil(bs));
        }
    }
}

/// Continuous batching: one forward over sequences at different positions matches the reference.
/// The sequences share one pool of few blocks, scattered (blocks freed by a sliding window are
/// reused by the others), and each step mixes decode rows with a prefill chunk of a sequence
/// that joins late.
pub fn batched_decode_matches_reference<B: Gemma4Backend>(device: &B::Device, tol: Tolerances) {
    for dir in fixtures() {
        let model = load::<B>(&dir, device);
        let reference = load_reference(&dir).unwrap();
        let cases = &reference.cases;
        let vocab = model.text.vocab_size;
        // Blocks of 4 tokens, enough for every case at once and no more.
        let bs = 4;
        let longest = cases.iter().map(|c| c.sequence().len()).max().unwrap();
        let full = cases.len() * longest.div_ceil(bs);
        let mut pool = model
            .text
            .new_pool(bs, Some([full, full]), gemma4_model::KvDtype::Model);
        let mut seqs: Vec<_> = cases.iter().map(|_| pool.new_seq()).collect();
        // All but the last case prefill their prompts in one step; the last joins later.
        let (late, early) = cases.split_last().unwrap();
        let mut steps: Vec<SeqStep<B>> = early
            .iter()
            .zip(seqs.iter_mut())
            .map(|(c, kv)| SeqStep {
                tokens: &c.prompt_ids,
                soft: None,
                kv,
            })
            .collect();
        model
            .text
            .forward_step(&mut pool, &mut steps, Logits::Last)
            .unwrap();
        let steps_n = cases.iter().map(|c| c.greedy_ids.len()).min().unwrap();
        let mut worst = 0f32;
        for step in 0..steps_n {
            // Early cases decode their next greedy token; at step 1 the late case prefills its
            // whole prompt in the same forward, then decodes with the others.
            let mut rows: Vec<(usize, Vec<u32>)> = (0..early.len())
                .map(|b| (b, vec![cases[b].greedy_ids[step]]))
                .collect();
            let last = cases.len() - 1;
            let late_pos = seqs[last].seq_len;
            if step == 1 {
                rows.push((last, late.prompt_ids.clone()));
            } else if step > 1 {
                rows.push((last, vec![late.sequence()[late_pos]]));
            }
            let mut steps: Vec<SeqStep<B>> = Vec::new();
            let mut kvs: Vec<Option<&mut gemma4_model::SeqKv>> =
                seqs.iter_mut().map(Some).collect();
            for (b, tokens) in &rows {
                steps.push(SeqStep {
                    tokens,
                    soft: None,
                    kv: kvs[*b].take().unwrap(),
                });
            }
            let positions: Vec<usize> = steps
                .iter()
                .map(|s| s.kv.seq_len + s.tokens.len() - 1)
                .collect();
            let batched = to_vec(
                model
                    .text
                    .forward_step(&mut pool, &mut steps, Logits::Last)
                    .unwrap(),
            );
            for (r, ((b, _), pos)) in rows.iter().zip(&positions).enumerate() {
                let (expected, _) = reference_logits(&dir, &cases[*b].name).unwrap();
                let (d, _) = max_abs_diff(
                    &batched[r * vocab..(r + 1) * vocab],
                    &expected[pos * vocab..(pos + 1) * vocab],
                );
                worst = worst.max(d);
            }
        }
        drop(seqs);
        assert_eq!(pool.usage().map(|(used, _)| used), [0, 0], "blocks leaked");
        println!("{}: batched decode of {} sequences, {steps_n} steps: max|Δ| vs reference {worst:.2e} (tolerance {:.1e})", name(&dir), cases.len(), tol.logits);
        assert!(worst <= tol.logits);
    }
}
