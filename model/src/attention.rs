//! Self-attention of the text tower (`Gemma4TextAttention`). Differences from Gemma 2/3 that
//! matter here: q/k norms with weights and a weightless v_norm; scaling 1.0 (no 1/sqrt(d));
//! no attention softcap; full layers have their own head_dim and KV heads, and with
//! `attention_k_eq_v` no v_proj: V = v_norm(k_proj x), while K = RoPE(k_norm(k_proj x)), so K ≠ V.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::TensorData;

use crate::cache::LayerCache;
use crate::config::LayerKind;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::{apply_rope, Rope};

/// Added to masked scores. Every row keeps at least its own position, so the softmax max is
/// finite and exp(-inf - max) = 0 exactly (a large finite value sends libm's exp down its slow
/// underflow path instead).
const MASKED: f32 = f32::NEG_INFINITY;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
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

impl<B: Backend> Attention<B> {
    pub fn kind(&self) -> LayerKind {
        if self.sliding_window.is_some() { LayerKind::Sliding } else { LayerKind::Full }
    }

    /// x [t, hidden] at positions pos0..pos0+t -> [t, hidden]; appends this step's K/V to `cache`.
    pub fn forward(&self, x: Tensor<B, 2>, pos0: usize, cache: &mut LayerCache<B>) -> Tensor<B, 2> {
        let device = x.device();
        let t = x.dims()[0];
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (cos, sin) = self.rope.tables::<B>(pos0, t, &device);

        let q = self.q_proj.forward(x.clone()).reshape([t, nh, d]);
        let q = apply_rope(self.q_norm.forward(q), &cos, &sin);

        let k_raw = self.k_proj.forward(x.clone()).reshape([t, nkv, d]);
        let v_raw = match &self.v_proj {
            Some(v_proj) => v_proj.forward(x).reshape([t, nkv, d]),
            None => k_raw.clone(),
        };
        let k = apply_rope(self.k_norm.forward(k_raw), &cos, &sin);
        let v = self.v_norm.forward(v_raw);

        let (k_all, v_all, k_start) = cache.append(k.swap_dims(0, 1), v.swap_dims(0, 1));
        let s = k_all.dims()[1];

        // GQA by reshaping: query head h = kv * groups + j uses KV head kv (repeat_kv order).
        let groups = nh / nkv;
        let q = q.swap_dims(0, 1).reshape([nkv, groups * t, d]);
        let scores = q.matmul(k_all.swap_dims(1, 2)).reshape([nkv, groups, t, s]); // scaling 1.0
        let scores = scores + self.mask(pos0, t, k_start, s, &device).unsqueeze::<4>();
        let probs = softmax(scores, 3).reshape([nkv, groups * t, s]);
        let out = probs.matmul(v_all).reshape([nh, t, d]).swap_dims(0, 1).reshape([t, nh * d]);
        self.o_proj.forward(out)
    }

    /// [t, s] additive mask: 0 where query pos0+i may see key k_start+j, MASKED elsewhere.
    fn mask(&self, pos0: usize, t: usize, k_start: usize, s: usize, device: &B::Device) -> Tensor<B, 2> {
        let mut m = vec![0f32; t * s];
        for i in 0..t {
            let qp = pos0 + i;
            for j in 0..s {
                let kp = k_start + j;
                let visible = kp <= qp && self.sliding_window.is_none_or(|w| qp - kp < w);
                if !visible {
                    m[i * s + j] = MASKED;
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [t, s]), device)
    }
}
