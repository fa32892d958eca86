//! Every fixture on the CPU reference backend: logits within `Tolerances::F32` of transformers at
//! every position, greedy continuations identical, decode through the KV cache equal to a full
//! prefill, and insta snapshots of the greedy outputs.

mod suite;

use gemma4_conformance::{fixtures, name};
use gemma4_model::golden::{load_reference, Tolerances};
use gemma4_model::kernels::fallback;
use gemma4_model::{CpuBackend, Logits};

type B = CpuBackend;

fn to_vec(t: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn fixtures_are_present() {
    let names: Vec<String> = fixtures().iter().map(|d| name(d)).collect();
    assert!(
        names.len() >= 2,
        "expected at least two fixtures, found {names:?}"
    );
}

#[test]
fn logits_match_reference() {
    suite::logits_match_reference::<B>(&Default::default(), Tolerances::F32);
    // The text tower attends through the paged kernel; the vision tower through the contiguous one.
    suite::vision::soft_tokens_match_reference::<B>(&Default::default(), Tolerances::F32);
    // Every kernel of this backend ran, and none fell back to the reference.
    suite::assert_every_kernel_ran(fallback::CPU_KERNELS);
}

/// Named so the snapshot files' recorded expression (`out.tokens`) stays as it was.
struct Greedy {
    tokens: Vec<u32>,
}

#[test]
fn greedy_matches_reference_and_snapshots() {
    for (case, tokens) in suite::greedy_matches_reference::<B>(&Default::default()) {
        let out = Greedy { tokens };
        insta::assert_json_snapshot!(case, out.tokens);
    }
}

#[test]
fn decode_through_cache_equals_prefill() {
    suite::decode_through_cache_equals_prefill::<B>(&Default::default(), Tolerances::F32);
}

#[test]
fn prefix_reuse_equals_recompute() {
    for dir in fixtures() {
        suite::prefix::text_cases::<B>(&dir, &Default::default(), Tolerances::F32);
    }
    suite::vision::prefix_cases::<B>(&Default::default(), Tolerances::F32);
}

#[test]
fn batched_decode_equals_per_sequence_decode() {
    suite::batched_decode_matches_reference::<B>(&Default::default(), Tolerances::F32);
}

#[test]
fn fresh_cache_per_request_leaks_nothing() {
    let dir = &fixtures()[0];
    let model = suite::load::<B>(dir, &Default::default());
    let reference = load_reference(dir).unwrap();
    let case = &reference.cases[0];
    let run = || {
        let mut cache = model.text.new_cache();
        to_vec(
            model
                .text
                .forward(&case.prompt_ids, &mut cache, Logits::Last)
                .unwrap(),
        )
    };
    let first = run();
    // Another request in between, with another sequence.
    let mut other = model.text.new_cache();
    model
        .text
        .forward(
            &reference.cases.last().unwrap().prompt_ids,
            &mut other,
            Logits::Last,
        )
        .unwrap();
    assert_eq!(run(), first);
}

#[test]
fn media_placeholders_embed_as_pad() {
    // Gemma4Model.forward replaces image/video/audio placeholder ids by pad_token_id before the
    // embedding lookup (text-only input keeps the pad embedding there).
    let dir = &fixtures()[0];
    let model = suite::load::<B>(dir, &Default::default());
    let placeholders = model.config.placeholder_ids();
    assert!(
        !placeholders.is_empty(),
        "fixture config names its placeholder ids"
    );
    let pad = model.config.pad_token_id.unwrap();
    let logits = |ids: &[u32]| {
        let mut cache = model.text.new_cache();
        to_vec(model.text.forward(ids, &mut cache, Logits::All).unwrap())
    };
    let with_pad = logits(&[2, 200, pad, 300]);
    for &p in &placeholders {
        assert_eq!(logits(&[2, 200, p, 300]), with_pad, "placeholder {p}");
    }
    assert_ne!(logits(&[2, 200, 201, 300]), with_pad);
}
