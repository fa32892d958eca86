//! The vision encoder layers (`Gemma4VisionEncoderLayer`, `Gemma4VisionAttention`): the text
//! layer's sandwich norms without `layer_scalar`, q/k norms with weights and a weightless v_norm,
//! scaling 1.0, every patch sees every patch, and axial 2-D RoPE: the first half of each head is
//! rotated by the patch's x, the second half by its y (`apply_multidimensional_rope`), each half
//! in rotate-half form with inv_freq over that half (`compute_axial_rope_parameters`).

use burn::prelude::*;
use gemma4_kernels::attention::AttentionParams;

use crate::config::VisionConfig;
use crate::error::LoadError;
use crate::kernels::fused::reference::apply_rope;
use crate::linear::Linear;
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::text_model::{load_linear, load_norm};
use crate::weights::Checkpoint;
use crate::Gemma4Backend;

/// cos/sin of both axes: one rotate-half RoPE of width head_dim/2 per axis.
#[derive(Debug, Clone)]
pub struct AxialRope {
    pub axis: Rope,
}

impl AxialRope {
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let spatial = head_dim / 2;
        // inv_freq = 1 / theta^(arange(0, spatial, 2) / spatial), in f32 as torch computes it.
        let base = theta as f32;
        let inv_freq = (0..spatial / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / spatial as f32))
            .collect();
        AxialRope {
            axis: Rope {
                inv_freq,
                head_dim: spatial,
            },
        }
    }

    /// ([x tables], [y tables]), each cos and sin `[n, head_dim/2]`.
    pub fn tables<B: Backend>(
        &self,
        xs: &[usize],
        ys: &[usize],
        device: &B::Device,
    ) -> ([Tensor<B, 2>; 2], [Tensor<B, 2>; 2]) {
        let (cx, sx) = self.axis.tables_at::<B>(xs, device);
        let (cy, sy) = self.axis.tables_at::<B>(ys, device);
        ([cx, cy], [sx, sy])
    }

    /// x [n, heads, d]: the first d/2 channels rotated by x, the rest by y, with the tables of
    /// [`AxialRope::tables`].
    pub fn apply<B: Backend>(
        x: Tensor<B, 3>,
        cos: &[Tensor<B, 2>; 2],
        sin: &[Tensor<B, 2>; 2],
    ) -> Tensor<B, 3> {
        let [n, heads, d] = x.dims();
        let half = d / 2;
        let first = apply_rope(
            x.clone().slice([0..n, 0..heads, 0..half]),
            cos[0].clone(),
            sin[0].clone(),
        );
        let second = apply_rope(
            x.slice([0..n, 0..heads, half..d]),
            cos[1].clone(),
            sin[1].clone(),
        );
        Tensor::cat(vec![first, second], 2)
    }
}

#[derive(Module, Debug)]
pub struct VisionAttention<B: Gemma4Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub v_norm: RmsNorm<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Gemma4Backend> VisionAttention<B> {
    /// x [n, hidden] -> [n, hidden], bidirectional over the image's patches.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &[Tensor<B, 2>; 2],
        sin: &[Tensor<B, 2>; 2],
    ) -> Tensor<B, 2> {
        let n = x.dims()[0];
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = AxialRope::apply(
            self.q_norm
                .forward(self.q_proj.forward(x.clone()).reshape([n, nh, d])),
            cos,
            sin,
        );
        let k = AxialRope::apply(
            self.k_norm
                .forward(self.k_proj.forward(x.clone()).reshape([n, nkv, d])),
            cos,
            sin,
        );
        let v = self
            .v_norm
            .forward(self.v_proj.forward(x).reshape([n, nkv, d]));
        let out = <B as Gemma4Backend>::attention(
            q,
            k.swap_dims(0, 1),
            v.swap_dims(0, 1),
            &AttentionParams::bidirectional(),
        );
        self.o_proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct VisionEncoderLayer<B: Gemma4Backend> {
    pub self_attn: VisionAttention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: RmsNorm<B>,
    pub post_feedforward_layernorm: RmsNorm<B>,
}

impl<B: Gemma4Backend> VisionEncoderLayer<B> {
    pub fn forward(
        &self,
        h: Tensor<B, 2>,
        cos: &[Tensor<B, 2>; 2],
        sin: &[Tensor<B, 2>; 2],
    ) -> Tensor<B, 2> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(h.clone()), cos, sin);
        let h = self.post_attention_layernorm.forward_add(h, attn, 1.0);
        let ff = self
            .mlp
            .forward(self.pre_feedforward_layernorm.forward(h.clone()));
        self.post_feedforward_layernorm.forward_add(h, ff, 1.0)
    }

    pub fn load(
        ckpt: &mut Checkpoint,
        p: &str,
        cfg: &VisionConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (h, nh, nkv, d, eps) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.rms_norm_eps,
        );
        // Gemma4ClippableLinear wraps the nn.Linear as `.linear`.
        let linear = |ckpt: &mut Checkpoint, name: &str, out: usize, inp: usize| {
            load_linear(ckpt, &format!("{p}.{name}.linear"), out, inp, device)
        };
        let a = "self_attn";
        let self_attn = VisionAttention {
            q_proj: linear(ckpt, &format!("{a}.q_proj"), nh * d, h)?,
            k_proj: linear(ckpt, &format!("{a}.k_proj"), nkv * d, h)?,
            v_proj: linear(ckpt, &format!("{a}.v_proj"), nkv * d, h)?,
            o_proj: linear(ckpt, &format!("{a}.o_proj"), h, nh * d)?,
            q_norm: load_norm(ckpt, &format!("{p}.{a}.q_norm"), d, eps, device)?,
            k_norm: load_norm(ckpt, &format!("{p}.{a}.k_norm"), d, eps, device)?,
            v_norm: RmsNorm::new(None, eps),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        };
        let i = cfg.intermediate_size;
        let mlp = Mlp {
            gate_proj: linear(ckpt, "mlp.gate_proj", i, h)?,
            up_proj: linear(ckpt, "mlp.up_proj", i, h)?,
            down_proj: linear(ckpt, "mlp.down_proj", h, i)?,
        };
        let norm = |ckpt: &mut Checkpoint, name: &str| {
            load_norm(ckpt, &format!("{p}.{name}"), h, eps, device)
        };
        Ok(VisionEncoderLayer {
            self_attn,
            mlp,
            input_layernorm: norm(ckpt, "input_layernorm")?,
            post_attention_layernorm: norm(ckpt, "post_attention_layernorm")?,
            pre_feedforward_layernorm: norm(ckpt, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm(ckpt, "post_feedforward_layernorm")?,
        })
    }
}
