//! `Gemma4VisionPooler` and the standardization after it: average each k×k cell of patches
//! (k = pooling_kernel_size; cells numbered row-major, `x/k + (width/k)·(y/k)`), multiply by
//! √hidden in f32, then `(h - std_bias) · std_scale` when the config standardizes.

use burn::module::Param;
use burn::prelude::*;

use crate::config::VisionConfig;
use crate::error::LoadError;
use crate::weights::Checkpoint;
use crate::Gemma4Backend;

#[derive(Module, Debug)]
pub struct Pooler<B: Gemma4Backend> {
    pub std_bias: Option<Param<Tensor<B, 1>>>,
    pub std_scale: Option<Param<Tensor<B, 1>>>,
    pub kernel: usize,
    pub root_hidden: f32,
}

impl<B: Gemma4Backend> Pooler<B> {
    /// h [ph·pw, hidden] (patch index y·pw + x) -> [(ph/k)·(pw/k), hidden].
    pub fn forward(&self, h: Tensor<B, 2>, patches_h: usize, patches_w: usize) -> Tensor<B, 2> {
        let k = self.kernel;
        let hidden = h.dims()[1];
        let (ch, cw) = (patches_h / k, patches_w / k);
        // The reference averages with a one-hot matmul of weights 1/k² (`_avg_pool_by_positions`).
        let cells = (h * (1.0 / (k * k) as f32))
            .reshape([ch, k, cw, k, hidden])
            .sum_dim(3)
            .sum_dim(1)
            .reshape([ch * cw, hidden]);
        let pooled = cells * self.root_hidden;
        match (&self.std_bias, &self.std_scale) {
            (Some(bias), Some(scale)) => {
                (pooled - bias.val().unsqueeze::<2>()) * scale.val().unsqueeze::<2>()
            }
            _ => pooled,
        }
    }

    pub fn load(
        ckpt: &mut Checkpoint,
        p: &str,
        cfg: &VisionConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let h = cfg.hidden_size;
        let mut vector = |name: &str| -> Result<Option<Param<Tensor<B, 1>>>, LoadError> {
            if !cfg.standardize {
                return Ok(None);
            }
            let v = ckpt.float_data(&format!("{p}.{name}"), &[h])?;
            Ok(Some(Param::from_tensor(Tensor::from_data(v, device))))
        };
        let std_bias = vector("std_bias")?;
        let std_scale = vector("std_scale")?;
        // Python: self.hidden_size ** 0.5, a double, multiplied into an f32 tensor.
        Ok(Pooler {
            std_bias,
            std_scale,
            kernel: cfg.pooling_kernel_size,
            root_hidden: (h as f64).sqrt() as f32,
        })
    }
}
