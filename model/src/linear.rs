//! A bias-free linear layer that is either dense (bf16/f32 in the checkpoint) or NVFP4, decided
//! per linear from the tensors present (`weight` U8 plus `weight_scale` means NVFP4), never from a
//! hard-coded list.

use crate::Gemma4Backend;
use burn::module::Param;
use burn::prelude::*;

use crate::nvfp4::Nvfp4Weight;

#[derive(Module, Debug)]
pub enum Linear<B: Gemma4Backend> {
    /// Weight stored transposed, [in, out], so the forward is a plain x · w.
    Dense(Param<Tensor<B, 2>>),
    Nvfp4(Nvfp4Weight<B>),
}

impl<B: Gemma4Backend> Linear<B> {
    /// x [n, in] -> [n, out].
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Linear::Dense(w) => B::dense_linear(x, w.val()),
            Linear::Nvfp4(w) => w.forward(x),
        }
    }

    pub fn is_nvfp4(&self) -> bool {
        matches!(self, Linear::Nvfp4(_))
    }
}
