//! `Gemma4VisionPatchEmbedder`: pixels in [0, 1] are mapped to [-1, 1] in the model (the
//! processor does no mean/std), projected 768 -> hidden, plus a learned embedding per axis:
//! `position_embedding_table[0][x] + position_embedding_table[1][y]`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::VisionConfig;
use crate::error::LoadError;
use crate::linear::Linear;
use crate::text_model::load_linear;
use crate::weights::Checkpoint;
use crate::Gemma4Backend;

#[derive(Module, Debug)]
pub struct PatchEmbedder<B: Gemma4Backend> {
    pub input_proj: Linear<B>,
    /// [position_embedding_size, hidden] for x, and for y.
    pub x_table: Param<Tensor<B, 2>>,
    pub y_table: Param<Tensor<B, 2>>,
}

impl<B: Gemma4Backend> PatchEmbedder<B> {
    /// pixels [n, 3·patch²], patch positions (x, y) -> [n, hidden].
    pub fn forward(&self, pixels: Tensor<B, 2>, xs: &[usize], ys: &[usize]) -> Tensor<B, 2> {
        let device = pixels.device();
        let h = self.input_proj.forward((pixels - 0.5) * 2.0);
        let index = |v: &[usize]| {
            Tensor::<B, 1, Int>::from_data(
                TensorData::new(v.iter().map(|&i| i as i32).collect::<Vec<_>>(), [v.len()]),
                &device,
            )
        };
        h + self.x_table.val().select(0, index(xs)) + self.y_table.val().select(0, index(ys))
    }

    pub fn load(
        ckpt: &mut Checkpoint,
        p: &str,
        cfg: &VisionConfig,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let (hidden, size) = (cfg.hidden_size, cfg.position_embedding_size);
        let patch_dim = 3 * cfg.patch_size * cfg.patch_size;
        let input_proj = load_linear(ckpt, &format!("{p}.input_proj"), hidden, patch_dim, device)?;
        let table = ckpt.float(&format!("{p}.position_embedding_table"), &[2, size, hidden])?;
        let (x, y) = table.split_at(size * hidden);
        let t = |v: &[f32]| {
            Param::from_tensor(Tensor::from_data(
                TensorData::new(v.to_vec(), [size, hidden]),
                device,
            ))
        };
        Ok(PatchEmbedder {
            input_proj,
            x_table: t(x),
            y_table: t(y),
        })
    }
}
