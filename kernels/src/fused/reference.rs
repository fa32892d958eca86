//! The plain Burn versions of the fused steps: the semantics the kernels are tested against.
//! RMSNorm is Gemma 4's (`Gemma4RMSNorm`): x · (mean(x²) + eps)^-½ · w, in f32, multiplying by
//! `w` (Gemma 2/3 used `1 + w`). RoPE is the rotate-half form of `apply_rotary_pos_emb`: the first
//! half of each head pairs with the second half.

use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

/// x `[rows, dim]` normalized over dim, times `weight` `[dim]` when given.
pub fn rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: Option<Tensor<B, 1>>,
    eps: f64,
) -> Tensor<B, 2> {
    let mean_sq = x.clone().square().mean_dim(1);
    let normed = x * mean_sq.add_scalar(eps).powf_scalar(-0.5);
    match weight {
        Some(w) => normed * w.unsqueeze::<2>(),
        None => normed,
    }
}

/// `(residual + rms_norm(x) · weight) · scale`, all `[rows, dim]`.
pub fn rms_norm_add<B: Backend>(
    residual: Tensor<B, 2>,
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
    scale: f32,
) -> Tensor<B, 2> {
    let h = residual + rms_norm(x, Some(weight), eps);
    if scale == 1.0 {
        h
    } else {
        h * scale
    }
}

/// x `[t, heads, d]` normalized per head (weight `[d]` when given), then rotated with cos/sin
/// `[t, d]` (`emb = cat(freqs, freqs)`): x·cos + rotate_half(x)·sin.
pub fn rms_norm_rope<B: Backend>(
    x: Tensor<B, 3>,
    weight: Option<Tensor<B, 1>>,
    eps: f64,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [t, heads, d] = x.dims();
    let x = rms_norm(x.reshape([t * heads, d]), weight, eps).reshape([t, heads, d]);
    apply_rope(x, cos, sin)
}

/// Rotate-half RoPE alone: x `[t, heads, d]`, cos/sin `[t, d]`.
pub fn apply_rope<B: Backend>(
    x: Tensor<B, 3>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [t, heads, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..t, 0..heads, 0..half]);
    let x2 = x.clone().slice([0..t, 0..heads, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.unsqueeze_dim::<3>(1) + rotated * sin.unsqueeze_dim::<3>(1)
}

/// `gelu_tanh(gate) · up`, both `[rows, width]` (gelu with the tanh approximation, as
/// `hidden_activation: gelu_pytorch_tanh`).
pub fn gelu_tanh_mul<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    gelu_approximate(gate) * up
}
