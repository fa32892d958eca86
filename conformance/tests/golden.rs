//! Every fixture on the CPU reference backend: logits within LOGITS_TOLERANCE of transformers at
//! every position, greedy continuations identical, decode through the KV cache equal to a full
//! prefill, and insta snapshots of the greedy outputs.

use gemma4_conformance::*;
use gemma4_model::{CpuBackend, KvCache, Logits, Model};

type B = CpuBackend;

fn load(dir: &std::path::Path) -> Model<B> {
    Model::<B>::load(dir, &Default::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn to_vec(t: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn fixtures_are_present() {
    let names: Vec<String> = fixtures().iter().map(|d| name(d)).collect();
    assert!(names.len() >= 2, "expected at least two fixtures, found {names:?}");
}

#[test]
fn logits_match_reference() {
    for dir in fixtures() {
        let model = load(&dir);
        let reference = load_reference(&dir);
        for case in &reference.cases {
            let seq = case.sequence();
            let (expected, shape) = reference_logits(&dir, &case.name);
            assert_eq!(shape, [seq.len(), model.text.vocab_size], "{}/{} reference shape", name(&dir), case.name);
            let got = case_logits(&model.text, case).unwrap();
            let (d, at) = max_abs_diff(&got, &expected);
            println!(
                "{}/{}: {} positions, max|Δlogit| = {d:.2e} (tolerance {LOGITS_TOLERANCE:.0e}) at position {}",
                name(&dir),
                case.name,
                seq.len(),
                at / shape[1]
            );
            assert!(d <= LOGITS_TOLERANCE, "{}/{}: max|Δ| {d} at flat index {at}", name(&dir), case.name);
        }
    }
}

/// Named so the snapshot files' recorded expression (`out.tokens`) stays as it was.
struct Greedy {
    tokens: Vec<u32>,
}

#[test]
fn greedy_matches_reference_and_snapshots() {
    for dir in fixtures() {
        let model = load(&dir);
        let reference = load_reference(&dir);
        for case in &reference.cases {
            let out = Greedy { tokens: case_greedy(&model.text, case).unwrap() };
            println!("{}/{}: greedy {:?} (reference min margin {:.3})", name(&dir), case.name, out.tokens, case.min_greedy_margin);
            assert_eq!(out.tokens, case.greedy_ids, "{}/{} greedy continuation", name(&dir), case.name);
            insta::assert_json_snapshot!(format!("{}-{}", name(&dir), case.name), out.tokens);
        }
    }
}

#[test]
fn decode_through_cache_equals_prefill() {
    for dir in fixtures() {
        let model = load(&dir);
        let reference = load_reference(&dir);
        for case in &reference.cases {
            let seq = case.sequence();
            let vocab = model.text.vocab_size;
            let full = case_logits(&model.text, case).unwrap();

            // Prefill the prompt in two uneven chunks, then one token at a time.
            let p = case.prompt_ids.len();
            let split = (p / 3).max(1);
            let mut cache = KvCache::new(&model.text);
            let mut stepped = to_vec(model.text.forward(&seq[..split], &mut cache, Logits::All).unwrap());
            if split < p {
                stepped.extend(to_vec(model.text.forward(&seq[split..p], &mut cache, Logits::All).unwrap()));
            }
            for &tok in &seq[p..] {
                stepped.extend(to_vec(model.text.forward(&[tok], &mut cache, Logits::All).unwrap()));
            }
            assert_eq!(cache.seq_len, seq.len());
            let (d, at) = max_abs_diff(&stepped, &full);
            println!("{}/{}: cache vs prefill max|Δ| = {d:.2e} (tolerance {CACHE_TOLERANCE:.0e})", name(&dir), case.name);
            assert!(d <= CACHE_TOLERANCE, "{}/{}: position {}", name(&dir), case.name, at / vocab);

            // Sliding layers keep only their window.
            for (l, layer) in cache.layers.iter().zip(&model.text.layers) {
                if let Some(w) = layer.self_attn.sliding_window {
                    assert!(l.len() <= w - 1, "sliding cache holds {} > window-1 {}", l.len(), w - 1);
                } else {
                    assert_eq!(l.len(), seq.len());
                }
            }
        }
    }
}

#[test]
fn fresh_cache_per_request_leaks_nothing() {
    let dir = &fixtures()[0];
    let model = load(dir);
    let reference = load_reference(dir);
    let case = &reference.cases[0];
    let run = || {
        let mut cache = KvCache::new(&model.text);
        to_vec(model.text.forward(&case.prompt_ids, &mut cache, Logits::Last).unwrap())
    };
    let first = run();
    // Another request in between, with another sequence.
    let mut other = KvCache::new(&model.text);
    model.text.forward(&reference.cases.last().unwrap().prompt_ids, &mut other, Logits::Last).unwrap();
    assert_eq!(run(), first);
}

#[test]
fn media_placeholders_embed_as_pad() {
    // Gemma4Model.forward replaces image/video/audio placeholder ids by pad_token_id before the
    // embedding lookup (text-only input keeps the pad embedding there).
    let dir = &fixtures()[0];
    let model = load(dir);
    let placeholders = model.config.placeholder_ids();
    assert!(!placeholders.is_empty(), "fixture config names its placeholder ids");
    let pad = model.config.pad_token_id.unwrap();
    let logits = |ids: &[u32]| {
        let mut cache = KvCache::new(&model.text);
        to_vec(model.text.forward(ids, &mut cache, Logits::All).unwrap())
    };
    let with_pad = logits(&[2, 200, pad, 300]);
    for &p in &placeholders {
        assert_eq!(logits(&[2, 200, p, 300]), with_pad, "placeholder {p}");
    }
    assert_ne!(logits(&[2, 200, 201, 300]), with_pad);
}

#[test]
fn batched_decode_equals_per_sequence_decode() {
    // Continuous batching: sequences at different positions (some past the sliding window)
    // decoded together give the logits each gives alone, and match the reference.
    for dir in fixtures() {
        let model = load(&dir);
        let reference = load_reference(&dir);
        let cases = &reference.cases;
        let mut caches: Vec<KvCache<B>> = cases.iter().map(|_| KvCache::new(&model.text)).collect();
        for (c, cache) in cases.iter().zip(caches.iter_mut()) {
            model.text.forward(&c.prompt_ids, cache, Logits::Last).unwrap();
        }
        let steps = cases.iter().map(|c| c.greedy_ids.len()).min().unwrap();
        let mut worst = 0f32;
        for step in 0..steps {
            let tokens: Vec<u32> = cases.iter().map(|c| c.greedy_ids[step]).collect();
            let mut refs: Vec<&mut KvCache<B>> = caches.iter_mut().collect();
            let batched = to_vec(model.text.forward_batch(&tokens, &mut refs).unwrap());
            let vocab = model.text.vocab_size;
            for (b, c) in cases.iter().enumerate() {
                let (expected, _) = reference_logits(&dir, &c.name);
                let pos = c.prompt_ids.len() + step;
                let (d, _) = max_abs_diff(&batched[b * vocab..(b + 1) * vocab], &expected[pos * vocab..(pos + 1) * vocab]);
                worst = worst.max(d);
            }
        }
        println!("{}: batched decode of {} sequences, {steps} steps: max|Δ| vs reference {worst:.2e} (tolerance {LOGITS_TOLERANCE:.0e})", name(&dir), cases.len());
        assert!(worst <= LOGITS_TOLERANCE);
    }
}
