//! Plain Burn attention: scores, additive mask, softmax, weighted sum. The reference of the
//! fused kernels, and the path of every backend without them.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::TensorData;

use super::AttentionParams;

/// Added to masked scores. Every causal row keeps at least its own position, so the softmax max
/// is finite and exp(-inf - max) = 0 exactly (a large finite value sends libm's exp down its slow
/// underflow path instead).
const MASKED: f32 = f32::NEG_INFINITY;

/// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    p: &AttentionParams,
) -> Tensor<B, 2> {
    let [t, nh, d] = q.dims();
    let [nkv, s, _] = k.dims();
    let dv = v.dims()[2];
    let device = k.device();
    // GQA by reshaping: query head h = kv * groups + j uses KV head kv.
    let groups = nh / nkv;
    let q = q.swap_dims(0, 1).reshape([nkv, groups * t, d]);
    let mut scores = q.matmul(k.swap_dims(1, 2)).reshape([nkv, groups, t, s]);
    if p.scale != 1.0 {
        scores = scores * p.scale;
    }
    if let Some(cap) = p.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    let scores = scores + mask::<B>(p, t, s, &device).unsqueeze::<4>();
    let probs = softmax(scores, 3).reshape([nkv, groups * t, s]);
    probs
        .matmul(v)
        .reshape([nh, t, dv])
        .swap_dims(0, 1)
        .reshape([t, nh * dv])
}

/// `[t, s]` additive mask: 0 where query i sees key j, MASKED elsewhere.
pub fn mask<B: Backend>(
    p: &AttentionParams,
    t: usize,
    s: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for j in 0..s {
            if !p.visible(p.q_start + i, p.k_start + j) {
                m[i * s + j] = MASKED;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [t, s]), device)
}
