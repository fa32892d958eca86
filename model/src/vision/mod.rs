//! The vision tower (`Gemma4VisionModel` + `Gemma4MultimodalEmbedder` in modeling_gemma4.py):
//! pixels of one image in, one soft token per pooled 3×3 cell out, in the text tower's width.
//!
//! patch_embedder -> encoder layers (bidirectional, 2-D RoPE) -> pooler (3×3 average, ·√hidden)
//! -> standardize -> embed_vision (weightless RMSNorm, projection to the text hidden size).
//! The weights stay bf16 in the checkpoint (ModelOpt excludes them from NVFP4).

pub mod embedder;
pub mod encoder;
pub mod patch_embedder;
pub mod pooler;
pub mod preprocess;

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::VisionConfig;
use crate::error::LoadError;
use crate::weights::Checkpoint;
use crate::Gemma4Backend;

pub use embedder::MultimodalEmbedder;
pub use encoder::{AxialRope, VisionEncoderLayer};
pub use patch_embedder::PatchEmbedder;
pub use pooler::Pooler;
pub use preprocess::PreprocessedImage;

#[derive(Module, Debug)]
pub struct VisionTower<B: Gemma4Backend> {
    pub patch_embedder: PatchEmbedder<B>,
    pub layers: Vec<VisionEncoderLayer<B>>,
    pub pooler: Pooler<B>,
    pub embed_vision: MultimodalEmbedder<B>,
    #[module(skip)]
    pub rope: AxialRope,
}

impl<B: Gemma4Backend> VisionTower<B> {
    /// Soft tokens `[num_soft_tokens, text_hidden]` of one preprocessed image.
    pub fn encode(&self, image: &PreprocessedImage, device: &B::Device) -> Tensor<B, 2> {
        let n = image.positions.len();
        let patch_dim = image.pixel_values.len() / n.max(1);
        let pixels = Tensor::<B, 2>::from_data(
            TensorData::new(image.pixel_values.clone(), [n, patch_dim]),
            device,
        );
        let xs: Vec<usize> = image.positions.iter().map(|p| p[0] as usize).collect();
        let ys: Vec<usize> = image.positions.iter().map(|p| p[1] as usize).collect();
        let mut h = self.patch_embedder.forward(pixels, &xs, &ys);
        let (cos, sin) = self.rope.tables::<B>(&xs, &ys, device);
        for layer in &self.layers {
            h = layer.forward(h, &cos, &sin);
        }
        let pooled = self.pooler.forward(h, image.patches_h, image.patches_w);
        self.embed_vision.forward(pooled)
    }

    pub fn load(
        ckpt: &mut Checkpoint,
        cfg: &VisionConfig,
        text_hidden: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let p = "model.vision_tower";
        let patch_embedder =
            PatchEmbedder::load(ckpt, &format!("{p}.patch_embedder"), cfg, device)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                VisionEncoderLayer::load(ckpt, &format!("{p}.encoder.layers.{i}"), cfg, device)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pooler = Pooler::load(ckpt, p, cfg, device)?;
        let embed_vision =
            MultimodalEmbedder::load(ckpt, "model.embed_vision", cfg, text_hidden, device)?;
        Ok(VisionTower {
            patch_embedder,
            layers,
            pooler,
            embed_vision,
            rope: AxialRope::new(cfg.head_dim, cfg.rope_theta),
        })
    }
}
