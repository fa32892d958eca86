//! RMSNorm as Gemma 4 has it (`Gemma4RMSNorm` in modeling_gemma4.py): x · (mean(x²) + eps)^-½ · w,
//! computed in f32. Gemma 2/3 multiplied by `1 + w`; Gemma 4 multiplies by `w`. `v_norm` (and the
//! vision pre-projection norm) have no weight at all. The arithmetic is the backend's
//! (`Gemma4Backend::rms_norm` and its fused neighbours; the reference in `kernels::fused`).

use burn::module::Param;
use burn::prelude::*;

use crate::Gemma4Backend;

#[derive(Module, Debug)]
pub struct RmsNorm<B: Gemma4Backend> {
    /// [dim], or None for the weightless form.
    pub weight: Option<Param<Tensor<B, 1>>>,
    pub eps: f64,
}

impl<B: Gemma4Backend> RmsNorm<B> {
    pub fn new(weight: Option<Tensor<B, 1>>, eps: f64) -> Self {
        Self {
            weight: weight.map(Param::from_tensor),
            eps,
        }
    }

    /// Normalizes over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let dim = dims[D - 1];
        let rows = dims.iter().product::<usize>() / dim.max(1);
        B::rms_norm(x.reshape([rows, dim]), self.weight(), self.eps).reshape(dims)
    }

    /// `(residual + self.forward(x)) · scale` in one pass: the sandwich norm after a block, its
    /// residual add, and (after the feed-forward block) the layer's `layer_scalar`.
    pub fn forward_add(&self, residual: Tensor<B, 2>, x: Tensor<B, 2>, scale: f32) -> Tensor<B, 2> {
        match self.weight() {
            Some(w) => B::rms_norm_add(residual, x, w, self.eps, scale),
            None => (residual + self.forward(x)) * scale,
        }
    }

    /// The q/k norm per head, then rotate-half RoPE: x `[t, heads, d]`, cos/sin `[t, d]`.
    pub fn forward_rope(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        B::rms_norm_rope(x, self.weight(), self.eps, cos, sin)
    }

    fn weight(&self) -> Option<Tensor<B, 1>> {
        self.weight.as_ref().map(|w| w.val())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Cpu, Lcg};
    use burn::tensor::TensorData;

    #[test]
    fn matches_formula_with_weight_not_one_plus_weight() {
        let device = Default::default();
        let mut rng = Lcg::new(3);
        let (rows, dim) = (3usize, 24usize);
        let x: Vec<f32> = (0..rows * dim)
            .map(|_| rng.next_f32() * 4.0 - 2.0)
            .collect();
        let w: Vec<f32> = (0..dim).map(|_| rng.next_f32() + 0.5).collect();
        let norm = RmsNorm::<Cpu>::new(
            Some(Tensor::from_data(
                TensorData::new(w.clone(), [dim]),
                &device,
            )),
            1e-6,
        );
        let y = norm.forward(Tensor::<Cpu, 2>::from_data(
            TensorData::new(x.clone(), [rows, dim]),
            &device,
        ));
        let y = y.into_data().to_vec::<f32>().unwrap();
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            for c in 0..dim {
                let e = row[c] as f64 / (ms + 1e-6).sqrt() * w[c] as f64;
                assert!(
                    (y[r * dim + c] as f64 - e).abs() < 1e-5,
                    "{} vs {e}",
                    y[r * dim + c]
                );
            }
        }
    }
}
