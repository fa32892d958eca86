//! Gated MLP: down(gelu_tanh(gate(x)) · up(x)) (`Gemma4TextMLP`). In the 31B checkpoint these three
//! are the NVFP4 linears.

use crate::Gemma4Backend;
use burn::prelude::*;

use crate::linear::Linear;

#[derive(Module, Debug)]
pub struct Mlp<B: Gemma4Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Gemma4Backend> Mlp<B> {
    /// x [n, hidden] -> [n, hidden].
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gated = B::gelu_tanh_mul(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(gated)
    }
}
