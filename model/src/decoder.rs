//! One decoder layer (`Gemma4TextDecoderLayer`): four sandwich norms and a learned scalar.
//! h = r + post_attention_layernorm(attn(input_layernorm(h)));
//! h = r + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)));
//! h = h · layer_scalar  (new in Gemma 4; tensor `layers.{i}.layer_scalar`, shape [1]).

use crate::Gemma4Backend;
use burn::prelude::*;
use gemma4_kernels::attention::PagedBatch;

use crate::attention::Attention;
use crate::cache::LayerKv;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::RopeTables;

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Gemma4Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: RmsNorm<B>,
    pub post_feedforward_layernorm: RmsNorm<B>,
    pub layer_scalar: f32,
}

impl<B: Gemma4Backend> DecoderLayer<B> {
    /// h [rows, hidden] -> [rows, hidden]: one step of a ragged batch (see `Attention::forward`).
    pub fn forward(
        &self,
        h: Tensor<B, 2>,
        rope: &RopeTables<B>,
        kv: &mut LayerKv<B>,
        slots: &[u32],
        batch: &PagedBatch,
    ) -> Tensor<B, 2> {
        let attn = self.self_attn.forward(
            self.input_layernorm.forward(h.clone()),
            rope,
            kv,
            slots,
            batch,
        );
        self.feed_forward(self.post_attention_layernorm.forward_add(h, attn, 1.0))
    }

    /// The feed-forward half, with the layer's scalar folded into the residual add.
    fn feed_forward(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let ff = self
            .mlp
            .forward(self.pre_feedforward_layernorm.forward(h.clone()));
        self.post_feedforward_layernorm
            .forward_add(h, ff, self.layer_scalar)
    }
}
