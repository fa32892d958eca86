//! Rotary position embedding, rotate-half form (`apply_rotary_pos_emb` in modeling_gemma4.py:
//! the first half of each head pairs with the second half, not interleaved pairs as in burn-nn's
//! `RotaryEncoding`).
//!
//! Sliding layers use default RoPE over the whole head (theta 1e4 in the 31B); full layers use
//! proportional RoPE (theta 1e6, partial 0.25): only the first int(partial·d/2) frequencies are
//! non-zero, with the exponent divided by the full d (`_compute_proportional_rope_parameters`).

use burn::prelude::*;
use burn::tensor::TensorData;

use crate::config::{RopeConfig, RopeKind};

/// cos and sin `[positions, head_dim]` for one step's positions, on the device: computed once per
/// step for each layer kind and shared by all layers of that kind (the 31B has 50 sliding and 10
/// full layers, two tables each instead of one upload per layer).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

#[derive(Debug, Clone)]
pub struct Rope {
    /// [head_dim / 2], f32 as transformers computes it.
    pub inv_freq: Vec<f32>,
    pub head_dim: usize,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let rotated = match cfg.kind {
            RopeKind::Default => half,
            // Python: int(rope_proportion * head_dim // 2)
            RopeKind::Proportional {
                partial_rotary_factor,
            } => ((partial_rotary_factor * head_dim as f64) / 2.0).floor() as usize,
        };
        let base = cfg.theta as f32;
        let inv_freq = (0..half)
            .map(|i| {
                if i < rotated {
                    1.0f32 / base.powf((2 * i) as f32 / head_dim as f32)
                } else {
                    0.0
                }
            })
            .collect();
        Rope { inv_freq, head_dim }
    }

    /// cos and sin tables [len, head_dim] for positions start..start+len (emb = cat(freqs, freqs)).
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let positions: Vec<usize> = (start..start + len).collect();
        self.tables_at(&positions, device)
    }

    /// [`Self::tables_at`] as a [`RopeTables`].
    pub fn step_tables<B: Backend>(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> RopeTables<B> {
        let (cos, sin) = self.tables_at(positions, device);
        RopeTables { cos, sin }
    }

    /// cos and sin tables [positions.len(), head_dim] for arbitrary positions (batched decode).
    /// The angles are p · inv_freq in f32 on the host, as transformers computes them (a half
    /// precision backend could not even represent positions above 2048 exactly), then cast to
    /// the backend's float type on upload.
    pub fn tables_at<B: Backend>(
        &self,
        positions: &[usize],
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let d = self.head_dim;
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * d);
        let mut sin = Vec::with_capacity(len * d);
        for &p in positions {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, d]), device),
            Tensor::from_data(TensorData::new(sin, [len, d]), device),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::reference::apply_rope;
    use crate::testing::{Cpu, Lcg};

    #[test]
    fn proportional_frequencies() {
        let r = Rope::new(
            &RopeConfig {
                kind: RopeKind::Proportional {
                    partial_rotary_factor: 0.25,
                },
                theta: 1e6,
            },
            512,
        );
        assert_eq!(r.inv_freq.len(), 256);
        assert_eq!(r.inv_freq.iter().filter(|f| **f != 0.0).count(), 64);
        // Exponent over the full head dim: inv_freq[1] = 1e6^(-2/512).
        assert!((r.inv_freq[1] - 1e6f32.powf(-2.0 / 512.0)).abs() < 1e-7);
        let d = Rope::new(
            &RopeConfig {
                kind: RopeKind::Default,
                theta: 1e4,
            },
            256,
        );
        assert!(d.inv_freq.iter().all(|f| *f > 0.0));
    }

    #[test]
    fn rotate_half_against_scalar_formula() {
        let device = Default::default();
        let rope = Rope::new(
            &RopeConfig {
                kind: RopeKind::Default,
                theta: 100.0,
            },
            8,
        );
        let (len, heads, d) = (5usize, 3usize, 8usize);
        let mut rng = Lcg::new(5);
        let x: Vec<f32> = (0..len * heads * d).map(|_| rng.next_f32() - 0.5).collect();
        let (cos, sin) = rope.tables::<Cpu>(7, len, &device);
        let y = apply_rope(
            Tensor::<Cpu, 3>::from_data(TensorData::new(x.clone(), [len, heads, d]), &device),
            cos,
            sin,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        for p in 0..len {
            for h in 0..heads {
                let base = (p * heads + h) * d;
                for i in 0..d / 2 {
                    let a = (7 + p) as f32 * rope.inv_freq[i];
                    let (x1, x2) = (x[base + i], x[base + i + d / 2]);
                    let e1 = x1 * a.cos() - x2 * a.sin();
                    let e2 = x2 * a.cos() + x1 * a.sin();
                    assert!(
                        (y[base + i] - e1).abs() < 1e-6 && (y[base + i + d / 2] - e2).abs() < 1e-6
                    );
                }
            }
        }
    }
}
