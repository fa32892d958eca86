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
        let t = x.dims()[0];
        let (cos, sin) = self.rope.tables::<B>(pos0, t, &x.device());
        let (q, k, v) = self.project(x, &cos, &sin);
        self.o_proj.forward(self.attend(q, k, v, pos0, cache))
    }

    /// Batched decode: row b of x [n, hidden] is the next token of sequence b, at position
    /// `positions[b]` with cache `caches[b]`. The projections run once over all rows; attention
    /// runs per sequence against its own cache.
    pub fn forward_batch(&self, x: Tensor<B, 2>, positions: &[usize], caches: &mut [&mut LayerCache<B>]) -> Tensor<B, 2> {
        let (cos, sin) = self.rope.tables_at::<B>(positions, &x.device());
        let (q, k, v) = self.project(x, &cos, &sin);
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let outs: Vec<Tensor<B, 2>> = caches
            .iter_mut()
            .enumerate()
            .map(|(b, cache)| {
                let row = |t: &Tensor<B, 3>, heads: usize| t.clone().slice([b..b + 1, 0..heads, 0..d]);
                self.attend(row(&q, nh), row(&k, nkv), row(&v, nkv), positions[b], cache)
            })
            .collect();
        self.o_proj.forward(Tensor::cat(outs, 0))
    }

    /// q [t, heads, d] and k, v [t, kv_heads, d]: normed, and q/k rotated.
    fn project(&self, x: Tensor<B, 2>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let t = x.dims()[0];
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x.clone()).reshape([t, nh, d]);
        let q = apply_rope(self.q_norm.forward(q), cos, sin);
        let k_raw = self.k_proj.forward(x.clone()).reshape([t, nkv, d]);
        let v_raw = match &self.v_proj {
            Some(v_proj) => v_proj.forward(x).reshape([t, nkv, d]),
            None => k_raw.clone(),
        };
        let k = apply_rope(self.k_norm.forward(k_raw), cos, sin);
        let v = self.v_norm.forward(v_raw);
        (q, k, v)
    }

    /// Attention of t queries at pos0.. over the cache plus these t keys; [t, heads · d].
    fn attend(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, pos0: usize, cache: &mut LayerCache<B>) -> Tensor<B, 2> {
        let device = q.device();
        let t = q.dims()[0];
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (k_all, v_all, k_start) = cache.append(k.swap_dims(0, 1), v.swap_dims(0, 1));
        let s = k_all.dims()[1];

        // GQA by reshaping: query head h = kv * groups + j uses KV head kv (repeat_kv order).
        let groups = nh / nkv;
        let q = q.swap_dims(0, 1).reshape([nkv, groups * t, d]);
        let scores = q.matmul(k_all.swap_dims(1, 2)).reshape([nkv, groups, t, s]); // scaling 1.0
        let scores = scores + self.mask(pos0, t, k_start, s, &device).unsqueeze::<4>();
        let probs = softmax(scores, 3).reshape([nkv, groups * t, s]);
        probs.matmul(v_all).reshape([nh, t, d]).swap_dims(0, 1).reshape([t, nh * d])
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
