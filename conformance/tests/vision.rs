//! The vision fixtures on the CPU reference backend: soft tokens, multimodal logits and greedy
//! continuations against transformers.

mod suite;

use gemma4_model::golden::Tolerances;
use gemma4_model::CpuBackend;

#[test]
fn vision_fixture_is_present() {
    assert!(
        !gemma4_conformance::vision_fixtures().is_empty(),
        "expected a fixture with multimodal_cases (fixtures/tiny-vision)"
    );
}

#[test]
fn soft_tokens_match_reference() {
    suite::vision::soft_tokens_match_reference::<CpuBackend>(&Default::default(), Tolerances::F32);
}

#[test]
fn multimodal_cases_match_reference() {
    suite::vision::multimodal_cases_match_reference::<CpuBackend>(
        &Default::default(),
        Tolerances::F32,
    );
}
