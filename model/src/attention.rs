//! Self-attention of the text tower (`Gemma4TextAttention`). Differences from Gemma 2/3 that
//! matter here: q/k norms with weights and a weightless v_norm; scaling 1.0 (no 1/sqrt(d));
//! no attention softcap; full layers have their own head_dim and KV heads, and with
//! `attention_k_eq_v` no v_proj: V = v_norm(k_proj x), while K = RoPE(k_norm(k_proj x)), so K ≠ V.

use std::ops::Range;

use burn::prelude::*;
use gemma4_kernels::attention::AttentionParams;

use crate::Gemma4Backend;

use crate::cache::LayerCache;
use crate::config::LayerKind;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::{Rope, RopeTables};

#[derive(Module, Debug)]
pub struct Attention<B: Gemma4Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    /// None on full layers with `attention_k_eq_v`.
    pub v_proj: Option<Linear<B>>,
    pub o_proj: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub v_norm: RmsNorm<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Some(window) on sliding layers.
    pub sliding_window: Option<usize>,
    #[module(skip)]
    pub rope: Rope,
}

impl<B: Gemma4Backend> Attention<B> {
    pub fn kind(&self) -> LayerKind {
        if self.sliding_window.is_some() {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        }
    }

    /// x [t, hidden] at positions pos0..pos0+t -> [t, hidden]; appends this step's K/V to `cache`.
    /// `rope`: this layer kind's tables for those positions (`self.rope`'s, made once per step).
    /// `images`: absolute position ranges of image soft tokens, which see each other in both
    /// directions on sliding layers only (full layers stay causal).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        pos0: usize,
        rope: &RopeTables<B>,
        cache: &mut LayerCache<B>,
        images: &[Range<usize>],
    ) -> Tensor<B, 2> {
        let (q, k, v) = self.project(x, rope);
        let images = if self.sliding_window.is_some() {
            images
        } else {
            &[]
        };
        self.o_proj
            .forward(self.attend(q, k, v, pos0, cache, images))
    }

    /// Batched decode: row b of x [n, hidden] is the next token of sequence b, at position
    /// `positions[b]` with cache `caches[b]`. The projections run once over all rows; attention
    /// runs per sequence against its own cache.
    pub fn forward_batch(
        &self,
        x: Tensor<B, 2>,
        positions: &[usize],
        rope: &RopeTables<B>,
        caches: &mut [&mut LayerCache<B>],
    ) -> Tensor<B, 2> {
        let (q, k, v) = self.project(x, rope);
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let outs: Vec<Tensor<B, 2>> = caches
            .iter_mut()
            .enumerate()
            .map(|(b, cache)| {
                let row =
                    |t: &Tensor<B, 3>, heads: usize| t.clone().slice([b..b + 1, 0..heads, 0..d]);
                self.attend(
                    row(&q, nh),
                    row(&k, nkv),
                    row(&v, nkv),
                    positions[b],
                    cache,
                    &[],
                )
            })
            .collect();
        self.o_proj.forward(Tensor::cat(outs, 0))
    }

    /// q [t, heads, d] and k, v [t, kv_heads, d]: normed, and q/k rotated.
    fn project(
        &self,
        x: Tensor<B, 2>,
        rope: &RopeTables<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let t = x.dims()[0];
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([t, nh, d]);
        let q = self
            .q_norm
            .forward_rope(q, rope.cos.clone(), rope.sin.clone());
        let k_raw = self.k_proj.forward(x.clone()).reshape([t, nkv, d]);
        let v_raw = match &self.v_proj {
            Some(v_proj) => v_proj.forward(x).reshape([t, nkv, d]),
            None => k_raw.clone(),
        };
        let k = self
            .k_norm
            .forward_rope(k_raw, rope.cos.clone(), rope.sin.clone());
        let v = self.v_norm.forward(v_raw);
        (q, k, v)
    }

    /// Attention of t queries at pos0.. over the cache plus these t keys; [t, heads · d].
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        pos0: usize,
        cache: &mut LayerCache<B>,
        images: &[Range<usize>],
    ) -> Tensor<B, 2> {
        let (k_all, v_all, k_start) = cache.append(k.swap_dims(0, 1), v.swap_dims(0, 1));
        let params = AttentionParams {
            bidirectional: images.to_vec(),
            ..AttentionParams::causal(pos0, k_start, self.sliding_window)
        };
        <B as Gemma4Backend>::attention(q, k_all, v_all, &params)
    }
}
