//! Self-attention of the text tower (`Gemma4TextAttention`). Differences from Gemma 2/3 that
//! matter here: q/k norms with weights and a weightless v_norm; scaling 1.0 (no 1/sqrt(d));
//! no attention softcap; full layers have their own head_dim and KV heads, and with
//! `attention_k_eq_v` no v_proj: V = v_norm(k_proj x), while K = RoPE(k_norm(k_proj x)), so K ≠ V.

use burn::prelude::*;
use gemma4_kernels::attention::fp8::KvScales;
use gemma4_kernels::attention::PagedBatch;

use crate::Gemma4Backend;

use crate::cache::LayerKv;
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
    /// The checkpoint's FP8 KV-cache scales (`k_proj.k_scale`, `v_proj.v_scale`), 1.0 where it
    /// has none; used only by an fp8 pool.
    #[module(skip)]
    pub kv_scales: KvScales,
}

impl<B: Gemma4Backend> Attention<B> {
    pub fn kind(&self) -> LayerKind {
        if self.sliding_window.is_some() {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        }
    }

    /// One step of a ragged batch: x [rows, hidden], the rows of every sequence of the step in
    /// order, at the positions `rope` was made for -> [rows, hidden]. This step's keys and values
    /// are written into this layer's pool at `slots` (one per row), then every row attends to
    /// its sequence's blocks as `batch` lays them out (one call for the whole batch).
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        rope: &RopeTables<B>,
        kv: &mut LayerKv<B>,
        slots: &[u32],
        batch: &PagedBatch,
    ) -> Tensor<B, 2> {
        let (q, k, v) = self.project(x, rope);
        kv.write(k, v, slots);
        let out = kv.attend(q, batch);
        self.o_proj.forward(out)
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
}
