//! Gemma 4 (text tower) as Burn modules, the NVFP4 checkpoint loader (and `synth`, its mirror:
//! a writer of checkpoints in the same format with random values), and generation.
//!
//! Reference: transformers 5.23.0 `models/gemma4/modeling_gemma4.py`; checkpoint format:
//! nvidia-modelopt 0.47 `export_hf_checkpoint` (hf_quant_config.json, `weight`/`weight_scale`/
//! `weight_scale_2`/`input_scale` per linear).

pub mod attention;
pub mod cache;
pub mod config;
pub mod decoder;
pub mod error;
pub mod generation;
pub mod golden;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod plan;
/// The NVFP4 weight format and its reference decode live with the kernels that read them.
pub use gemma4_kernels::nvfp4;
pub mod rope;
pub mod sampling;
pub mod synth;
pub mod text_model;
pub mod vision;
pub mod weights;

#[doc(hidden)]
pub mod testing;
/// The kernels crate (attention parameters and references, NVFP4 format), for benches and tools.
pub use gemma4_kernels as kernels;
pub use gemma4_kernels::Gemma4Backend;

use std::path::Path;

use burn::prelude::Backend;

pub use cache::{KvCache, KvDtype, KvPool, PrefixHasher, PrefixHit, SeqKv, DEFAULT_BLOCK_SIZE};
pub use config::{GenerationConfig, ModelConfig};
pub use error::{LoadError, RunError, SynthError};
pub use generation::{generate, FinishReason, GenerateOutput, GenerateRequest, SamplingParams};
pub use text_model::{Logits, SeqStep, TextModel};

/// The CPU reference backend (pure Rust, f32; NVFP4 words in i32).
pub type CpuBackend = burn::backend::NdArray<f32, i32>;

/// A float tensor's elements as f32 on the host, whatever the backend's float type (logits of a
/// half-precision backend are widened here, after the device has done its work).
pub fn to_host_f32<B: Backend, const D: usize>(t: burn::tensor::Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32 just above")
}

/// What the loader did, for logs.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub tensors_used: usize,
    pub nvfp4_linears: usize,
    pub dense_linears: usize,
    /// Vision tensors present in a checkpoint whose config has no vision tower.
    pub skipped: Vec<String>,
    /// Weight bytes on the device by kind.
    pub bytes: WeightBytes,
    /// Of those, the text tower's: what every decode step reads.
    pub text_bytes: usize,
}

/// Weight bytes on the device: NVFP4 linears packed (4-bit codes and E4M3 block scales, as in the
/// checkpoint), and every other weight in the backend's float type (bf16/f16 weights are not
/// widened on a half-precision backend; the f32 CPU backend widens them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightBytes {
    pub nvfp4: usize,
    pub float: usize,
    /// The float weights' dtype on the device, e.g. `F16`.
    pub float_dtype: String,
}

impl WeightBytes {
    pub fn total(&self) -> usize {
        self.nvfp4 + self.float
    }
}

impl std::fmt::Display for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: usize| b as f64 / 1e9;
        write!(
            f,
            "weights {:.3} GB: NVFP4 packed {:.3} GB, {} {:.3} GB",
            gb(self.total()),
            gb(self.nvfp4),
            self.float_dtype,
            gb(self.float)
        )
    }
}

/// Sums the float parameters' bytes in their device dtype.
struct FloatBytes {
    bytes: usize,
    dtype: Option<burn::tensor::DType>,
}

impl<B: Backend> burn::module::ModuleVisitor<B> for FloatBytes {
    fn visit_float<const D: usize>(
        &mut self,
        param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
    ) {
        let t = param.val();
        let dtype = t.dtype();
        self.bytes += t.shape().num_elements() * dtype.size();
        self.dtype.get_or_insert(dtype);
    }
}

/// A loaded checkpoint: configs and the text tower.
#[derive(Debug)]
pub struct Model<B: Gemma4Backend> {
    pub config: ModelConfig,
    pub generation: GenerationConfig,
    pub text: TextModel<B>,
    /// Present when the checkpoint has a vision tower.
    pub vision: Option<vision::VisionTower<B>>,
    pub report: LoadReport,
}

impl<B: Gemma4Backend> Model<B> {
    /// Loads `config.json`, `hf_quant_config.json`, `generation_config.json` and the weights of
    /// `dir`. Any missing, misshapen, mistyped or unused tensor is an error naming it.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, LoadError> {
        Self::load_with_progress(dir, device, |_, _| {})
    }

    /// As `load`, calling `progress(tensors loaded, total)` along the way.
    pub fn load_with_progress(
        dir: &Path,
        device: &B::Device,
        progress: impl FnMut(usize, usize) + Send + 'static,
    ) -> Result<Self, LoadError> {
        let config = ModelConfig::from_dir(dir)?;
        let generation = GenerationConfig::from_dir(dir)?;
        let mut ckpt = weights::Checkpoint::open(dir)?;
        ckpt.set_progress(progress);
        let mut text = TextModel::load(&mut ckpt, &config.text, device)?;
        let text_nvfp4 = ckpt.nvfp4_bytes;
        text.placeholder_ids = config.placeholder_ids();
        text.pad_token_id = config.pad_token_id.unwrap_or(0);
        text.image_token_id = config.image_token_id;
        let vision = match &config.vision {
            Some(vc) if ckpt.contains("model.vision_tower.patch_embedder.input_proj.weight") => {
                Some(vision::VisionTower::load(
                    &mut ckpt,
                    vc,
                    config.text.hidden_size,
                    device,
                )?)
            }
            _ => None,
        };
        // A checkpoint without the tower (text-only export) loads as text; stray vision tensors
        // are acknowledged in the report rather than silently dropped.
        let skipped: Vec<String> = ckpt
            .names()
            .filter(|n| {
                n.starts_with("model.vision_tower.") || n.starts_with("model.embed_vision.")
            })
            .filter(|_| vision.is_none())
            .map(str::to_string)
            .collect();
        for n in &skipped {
            ckpt.skip(n);
        }
        ckpt.finish()?;
        let (nvfp4_linears, dense_linears) = text.linear_counts();
        let mut floats = FloatBytes {
            bytes: 0,
            dtype: None,
        };
        burn::module::Module::visit(&text, &mut floats);
        let text_bytes = text_nvfp4 + floats.bytes;
        if let Some(v) = &vision {
            burn::module::Module::visit(v, &mut floats);
        }
        let bytes = WeightBytes {
            nvfp4: ckpt.nvfp4_bytes,
            float: floats.bytes,
            float_dtype: floats
                .dtype
                .map_or_else(|| "float".into(), |d| format!("{d:?}")),
        };
        let report = LoadReport {
            tensors_used: ckpt.used_count() - skipped.len(),
            nvfp4_linears,
            dense_linears,
            skipped,
            bytes,
            text_bytes,
        };
        Ok(Model {
            config,
            generation,
            text,
            vision,
            report,
        })
    }

    /// Soft tokens `[n, text_hidden]` of one preprocessed image.
    pub fn encode_image(
        &self,
        image: &vision::PreprocessedImage,
    ) -> Result<burn::tensor::Tensor<B, 2>, RunError> {
        let tower = self.vision.as_ref().ok_or(RunError::NoVision)?;
        // Each patch's (x, y) indexes the tower's position table: a grid wider or taller than
        // it has no embedding (a small vision config at a large soft-token budget).
        let table = self
            .config
            .vision
            .as_ref()
            .map_or(0, |v| v.position_embedding_size);
        if image.patches_w.max(image.patches_h) > table {
            return Err(RunError::Image(format!(
                "the patch grid {}x{} exceeds the vision tower's position table ({table} per side)",
                image.patches_h, image.patches_w
            )));
        }
        Ok(tower.encode(image, &self.text.embed_tokens.device()))
    }

    /// Stop ids: union of config.json and generation_config.json eos ids.
    pub fn stop_ids(&self) -> Vec<u32> {
        stop_ids(&self.config, &self.generation)
    }

    /// Default sampling from generation_config.json (greedy when `do_sample` is false).
    pub fn default_sampling(&self, seed: u64) -> SamplingParams {
        self.generation.sampling(seed)
    }
}

/// Union of config.json and generation_config.json eos ids.
pub fn stop_ids(config: &ModelConfig, generation: &GenerationConfig) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    for id in &generation.eos_token_ids {
        if !ids.contains(id) {
            ids.push(*id);
        }
    }
    ids
}

impl GenerationConfig {
    /// Default sampling from generation_config.json (greedy when `do_sample` is false).
    pub fn sampling(&self, seed: u64) -> SamplingParams {
        let g = self;
        if g.do_sample == Some(false) {
            return SamplingParams {
                seed,
                ..SamplingParams::greedy()
            };
        }
        SamplingParams {
            temperature: g.temperature.unwrap_or(1.0) as f32,
            top_k: g.top_k.unwrap_or(0),
            top_p: g.top_p.unwrap_or(1.0) as f32,
            min_p: g.min_p.unwrap_or(0.0) as f32,
            seed,
        }
    }
}
