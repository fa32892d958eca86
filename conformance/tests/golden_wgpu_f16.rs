//! The golden checks on wgpu in half precision (`Wgpu<f16, i32>`; Mesa's lavapipe has
//! SHADER_F16): the model, its weights and activations in f16, every CubeCL kernel accumulating in
//! f32, against the same f32 transformers references. Greedy continuations must be identical;
//! logits within `Tolerances::F16` (derived in `gemma4_model::golden`). This is how CI runs the
//! half-precision kernels without a GPU; bf16 (CUDA) is `scripts/device-check.sh`'s.

mod suite;

use burn::backend::wgpu::{Wgpu, WgpuDevice, WgpuRuntime};
use gemma4_model::golden::Tolerances;
use gemma4_model::kernels::fallback;

type B = Wgpu<half::f16, i32>;

// One test, so the device starts once and the cases run in order in one process (and a kernel
// error, which leaves a wgpu device broken, cannot spill into the f32 golden binary).
#[test]
fn golden_fixtures_on_wgpu_f16() {
    let device = WgpuDevice::default();
    assert!(
        gemma4_model::kernels::device::supports_f16::<WgpuRuntime>(&device),
        "the wgpu adapter has no SHADER_F16"
    );
    let tol = Tolerances::F16;
    suite::logits_match_reference::<B>(&device, tol);
    suite::greedy_matches_reference::<B>(&device);
    suite::decode_through_cache_equals_prefill::<B>(&device, tol);
    suite::batched_decode_matches_reference::<B>(&device, tol);
    suite::vision::soft_tokens_match_reference::<B>(&device, tol);
    suite::vision::multimodal_cases_match_reference::<B>(&device, tol);

    // Every kernel of this backend ran, and none fell back to the reference.
    suite::assert_every_kernel_ran(fallback::CUBE_KERNELS);
}
