//! The golden checks on wgpu (Mesa's lavapipe in CI): the same fixtures and tolerances as on the
//! CPU, with the model going through the CubeCL kernels of `gemma4-kernels`.

mod suite;

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use gemma4_model::golden::Tolerances;
use gemma4_model::kernels::fallback;

type B = Wgpu<f32, i32>;

// One test, so the device starts once and the cases run in order in one process.
#[test]
fn golden_fixtures_on_wgpu() {
    let device = WgpuDevice::default();
    suite::logits_match_reference::<B>(&device, Tolerances::F32);
    suite::greedy_matches_reference::<B>(&device);
    suite::decode_through_cache_equals_prefill::<B>(&device, Tolerances::F32);
    suite::batched_decode_matches_reference::<B>(&device, Tolerances::F32);
    suite::vision::soft_tokens_match_reference::<B>(&device, Tolerances::F32);
    suite::vision::multimodal_cases_match_reference::<B>(&device, Tolerances::F32);
    for dir in gemma4_conformance::fixtures() {
        suite::prefix::text_cases::<B>(&dir, &device, Tolerances::F32);
    }
    suite::vision::prefix_cases::<B>(&device, Tolerances::F32);

    // Every kernel of this backend ran, and none fell back to the reference.
    suite::assert_every_kernel_ran(fallback::CUBE_KERNELS);
}
