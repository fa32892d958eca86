//! `Gemma4MultimodalEmbedder`: weightless RMSNorm, then a projection to the text hidden size.
//! The result replaces the `<|image|>` placeholders' embeddings as is (no embedding scale).

use burn::prelude::*;

use crate::config::VisionConfig;
use crate::error::LoadError;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::text_model::load_linear;
use crate::weights::Checkpoint;
use crate::Gemma4Backend;

#[derive(Module, Debug)]
pub struct MultimodalEmbedder<B: Gemma4Backend> {
    pub embedding_pre_projection_norm: RmsNorm<B>,
    pub embedding_projection: Linear<B>,
}

impl<B: Gemma4Backend> MultimodalEmbedder<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.embedding_projection
            .forward(self.embedding_pre_projection_norm.forward(x))
    }

    pub fn load(
        ckpt: &mut Checkpoint,
        p: &str,
        cfg: &VisionConfig,
        text_hidden: usize,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        Ok(MultimodalEmbedder {
            embedding_pre_projection_norm: RmsNorm::new(None, cfg.rms_norm_eps),
            embedding_projection: load_linear(
                ckpt,
                &format!("{p}.embedding_projection"),
                text_hidden,
                cfg.hidden_size,
                device,
            )?,
        })
    }
}
