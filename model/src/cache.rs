//! KV cache: state outside the modules, owned by the caller (the engine) and created per request.
//! Sliding layers keep only the keys the next query can still see (the window minus itself);
//! full layers keep the whole context.

use burn::prelude::*;
use crate::Gemma4Backend;

use crate::text_model::TextModel;

#[derive(Debug, Clone)]
pub struct LayerCache<B: Gemma4Backend> {
    /// [kv_heads, cached, head_dim] after k_norm and RoPE.
    pub k: Option<Tensor<B, 3>>,
    /// [kv_heads, cached, head_dim] after v_norm.
    pub v: Option<Tensor<B, 3>>,
    /// Absolute position of the first cached entry.
    pub start: usize,
    /// Entries kept after a step; None keeps everything.
    pub keep: Option<usize>,
}

impl<B: Gemma4Backend> LayerCache<B> {
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends new entries [kv_heads, n, d]; returns all keys and values visible to this step
    /// and the absolute position of the first of them. Trims to the window afterwards.
    pub fn append(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>, usize) {
        let start = self.start;
        let (k_all, v_all) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
            _ => (k, v),
        };
        let total = k_all.dims()[1];
        let drop = self.keep.map_or(0, |keep| total.saturating_sub(keep));
        let [h, _, d] = k_all.dims();
        if drop == total {
            self.k = None;
            self.v = None;
        } else {
            self.k = Some(k_all.clone().slice([0..h, drop..total, 0..d]));
            self.v = Some(v_all.clone().slice([0..h, drop..total, 0..d]));
        }
        self.start = start + drop;
        (k_all, v_all, start)
    }
}

#[derive(Debug, Clone)]
pub struct KvCache<B: Gemma4Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// Tokens processed so far (the position of the next token).
    pub seq_len: usize,
}

impl<B: Gemma4Backend> KvCache<B> {
    /// A fresh cache shaped for this model's layers.
    pub fn new(model: &TextModel<B>) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|l| LayerCache { k: None, v: None, start: 0, keep: l.self_attn.sliding_window.map(|w| w - 1) })
            .collect();
        KvCache { layers, seq_len: 0 }
    }

    /// Cached entries over all layers (for memory accounting and leak tests).
    pub fn entries(&self) -> usize {
        self.layers.iter().map(LayerCache::len).sum()
    }
}
