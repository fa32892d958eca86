//! Golden outputs: the reference format of the conformance fixtures (`reference.json` with the
//! cases, `reference.safetensors` with transformers' f32 logits and soft tokens; written by
//! `conformance/fixtures_gen/` with transformers 5.23.0 and nvidia-modelopt 0.47.0), the engine's
//! outputs for a case, and the tolerances each float type is held to against them. Shared by the
//! conformance tests and `gemma4 check`, which runs the same comparison from the product binary.

use std::path::Path;

use serde::Deserialize;

use crate::{
    generate, Gemma4Backend, GenerateRequest, LoadError, Logits, RunError, SamplingParams,
    TextModel,
};

/// What a backend's float type is held to against the f32 reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    /// Max |Δ logit| against transformers.
    pub logits: f32,
    /// Max |Δ logit| between decode through the cache and one prefill.
    pub cache: f32,
    /// Max |Δ| of the vision tower's soft tokens.
    pub soft_tokens: f32,
}

impl Tolerances {
    /// f32 activations. Each tolerance is twice the worst max |Δ| measured over every case of
    /// every fixture, on the CPU backend (`conformance/tests/golden.rs`, `vision.rs`; its AVX-512
    /// kernels) and on wgpu (`golden_wgpu.rs`, lavapipe), rounded up to two significant digits.
    /// Measured with `cargo test -p gemma4-conformance -- --nocapture`, which prints every value.
    /// CUDA in f32 (`gemma4 check --device cuda --dtype float32`) is held to the same, unmeasured.
    pub const F32: Tolerances = Tolerances {
        // Worst 6.15e-5 (text cases on wgpu; CPU 5.91e-5; batched decode 5.72e-5 wgpu, 5.01e-5
        // CPU; multimodal cases 5.39e-5 wgpu, 4.72e-5 CPU).
        logits: 1.3e-4,
        // The engine against itself, a different association of the same f32 sums. Worst
        // 4.91e-5 (CPU; wgpu 4.56e-5).
        cache: 9.9e-5,
        // Compared in absolute terms (their magnitude is a few units). Worst 3.52e-6 (wgpu;
        // CPU 2.32e-6).
        soft_tokens: 7.1e-6,
    };

    /// f16 activations and weights (f32 accumulation in every kernel). f16 keeps 11 significant
    /// bits: each stored value is rounded by at most u/2 = 2^-12 ≈ 2.4e-4 of itself. The
    /// fixtures' logits reach |30| (the final softcap), so storing a logit alone costs up to
    /// 30·u/2 ≈ 7e-3. The hidden state is rounded again after every projection, norm and residual
    /// add: about N = 10 roundings per layer, N ≈ 82 for the 8-layer fixture. Independent
    /// roundings add up like a random walk, √N·(u/2)·30 ≈ 0.066; they could add linearly only in
    /// the worst case, N·(u/2)·30 ≈ 0.6. Three random-walk widths, 0.2, bound logits and the
    /// cache check a priori; soft tokens (a few units, two encoder layers, the pooler's √hidden
    /// scale) 4·u·8 ≈ 2e-2. Each tolerance is the f32 rule (twice the worst measured, on wgpu
    /// over lavapipe, `golden_wgpu_f16.rs`, rounded up to two significant digits) where that is
    /// below the a-priori bound, else the bound. Greedy continuations must still be identical
    /// (the fixtures' smallest reference margin is 0.10).
    pub const F16: Tolerances = Tolerances {
        // Worst 0.108 (text cases 0.049..0.108; batched decode 0.094; multimodal 0.074): twice
        // that, 0.22, is above the bound, so the bound stays (1.85 times the worst).
        logits: 0.2,
        // Worst 0.0625 (0.031..0.0625).
        cache: 0.13,
        // Worst 4.37e-3 (2.46e-3..4.37e-3).
        soft_tokens: 8.8e-3,
    };

    /// bf16 (CUDA): 8 significant bits, u/2 = 2^-9 ≈ 2e-3, eight times f16's; the same
    /// a-priori arithmetic gives 1.6 for logits and the cache check and 0.16 for soft tokens.
    /// Not measured (no bf16 without CUDA; `scripts/device-check.sh` checks it on a GPU), so not
    /// tightened.
    pub const BF16: Tolerances = Tolerances {
        logits: 1.6,
        cache: 1.6,
        soft_tokens: 0.16,
    };

    /// The tolerances for a backend whose float elements are `dtype`.
    pub fn for_dtype(dtype: burn::tensor::DType) -> Tolerances {
        match dtype {
            burn::tensor::DType::F16 => Tolerances::F16,
            burn::tensor::DType::BF16 => Tolerances::BF16,
            _ => Tolerances::F32,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub generator: serde_json::Value,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub min_greedy_margin: f64,
}

impl Case {
    /// prompt_ids + greedy_ids: the sequence whose logits the reference holds.
    pub fn sequence(&self) -> Vec<u32> {
        self.prompt_ids
            .iter()
            .chain(&self.greedy_ids)
            .copied()
            .collect()
    }
}

/// A multimodal case of a vision fixture's reference.json: images placed among text.
#[derive(Debug, Clone, Deserialize)]
pub struct MultimodalCase {
    pub name: String,
    /// Image files, relative to the fixture directory, in prompt order.
    pub images: Vec<String>,
    /// With each image's placeholders already expanded (boi + n x image + eoi).
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub min_greedy_margin: f32,
    pub soft_tokens_tensors: Vec<String>,
}

/// One image of a vision fixture and the budget it was processed at.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageCase {
    pub file: String,
    pub max_soft_tokens: usize,
    pub num_soft_tokens: usize,
    pub soft_tokens_tensor: String,
    /// Whether our decoder reproduces PIL's pixels for this file (JPEG decoders differ).
    pub decode_exact: bool,
    /// PIL's decoded RGB pixels [h, w, 3], stored where decoders may differ.
    pub decoded_tensor: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionReference {
    pub multimodal_cases: Vec<MultimodalCase>,
    pub images: Vec<ImageCase>,
}

/// The text cases of a fixture's reference.json.
pub fn load_reference(dir: &Path) -> Result<Reference, LoadError> {
    read_json(dir)
}

/// The multimodal cases and images of a vision fixture's reference.json.
pub fn load_vision_reference(dir: &Path) -> Result<VisionReference, LoadError> {
    read_json(dir)
}

fn read_json<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, LoadError> {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Json {
        path,
        msg: e.to_string(),
    })
}

/// `<case>.logits` from reference.safetensors: (values, [positions, vocab]).
pub fn reference_logits(dir: &Path, case: &str) -> Result<(Vec<f32>, [usize; 2]), LoadError> {
    let name = format!("{case}.logits");
    let (values, shape) = reference_f32(dir, &name)?;
    match shape[..] {
        [positions, vocab] => Ok((values, [positions, vocab])),
        _ => Err(LoadError::BadValue {
            name,
            msg: format!("shape {shape:?} is not [positions, vocab]"),
        }),
    }
}

/// Any F32 tensor of reference.safetensors: (values, shape).
pub fn reference_f32(dir: &Path, tensor: &str) -> Result<(Vec<f32>, Vec<usize>), LoadError> {
    let (bytes, shape) = reference_tensor(dir, tensor, safetensors::Dtype::F32)?;
    let values = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((values, shape))
}

/// A U8 tensor of reference.safetensors: (bytes, shape).
pub fn reference_u8(dir: &Path, tensor: &str) -> Result<(Vec<u8>, Vec<usize>), LoadError> {
    reference_tensor(dir, tensor, safetensors::Dtype::U8)
}

/// A tensor of reference.safetensors of the given dtype: (raw little-endian bytes, shape).
fn reference_tensor(
    dir: &Path,
    tensor: &str,
    dtype: safetensors::Dtype,
) -> Result<(Vec<u8>, Vec<usize>), LoadError> {
    let path = dir.join("reference.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LoadError::Safetensors {
        path,
        msg: e.to_string(),
    })?;
    let t = st.tensor(tensor).map_err(|_| LoadError::MissingTensor {
        name: tensor.to_string(),
    })?;
    if t.dtype() != dtype {
        return Err(LoadError::Dtype {
            name: tensor.to_string(),
            expected: format!("{dtype:?}"),
            found: format!("{:?}", t.dtype()),
        });
    }
    Ok((t.data().to_vec(), t.shape().to_vec()))
}

/// The engine's logits at every position of the case's sequence, one prefill: [positions · vocab].
pub fn case_logits<B: Gemma4Backend>(
    model: &TextModel<B>,
    case: &Case,
) -> Result<Vec<f32>, RunError> {
    let mut cache = model.new_cache();
    let logits = model.forward(&case.sequence(), &mut cache, Logits::All)?;
    Ok(crate::to_host_f32(logits))
}

/// The engine's greedy continuation of the case's prompt, as long as the reference's (no eos
/// stop, as the reference was made).
pub fn case_greedy<B: Gemma4Backend>(
    model: &TextModel<B>,
    case: &Case,
) -> Result<Vec<u32>, RunError> {
    let req = GenerateRequest {
        prompt: case.prompt_ids.clone(),
        max_new_tokens: case.greedy_ids.len(),
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
        suppress_ids: vec![],
        max_len: usize::MAX,
    };
    Ok(generate(model, &req, |_| {})?.tokens)
}

/// Max |a - b| and where it is.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x - y).abs();
        if d > worst.0 || d.is_nan() {
            worst = (if d.is_nan() { f32::INFINITY } else { d }, i);
        }
    }
    worst
}
