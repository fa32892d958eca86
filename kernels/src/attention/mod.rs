//! Attention of the Gemma 4 towers: the parameters every path shares, the plain Burn reference,
//! and beside it the fused CubeCL kernels (`flash`) and the CPU loops of the ndarray backend (`cpu`).
//!
//! Layout (the KV cache's): q `[t, heads, d]`, k and v `[kv_heads, s, d]`; query head h reads KV
//! head h / (heads / kv_heads) (transformers' `repeat_kv` order); the output is `[t, heads · d]`.
//! Query i sits at absolute position `q_start + i`, key j at `k_start + j`.

pub mod cpu;
pub mod flash;
pub mod reference;

use std::ops::Range;

/// Which keys a query sees, and how scores are scaled.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionParams {
    /// Absolute position of query 0.
    pub q_start: usize,
    /// Absolute position of key 0.
    pub k_start: usize,
    /// Causal: key position ≤ query position. False for the vision encoder (bidirectional).
    pub causal: bool,
    /// Sliding window in keys including the query itself: a key is visible only if q - k < window.
    pub window: Option<usize>,
    /// Multiplies q·k before the softmax (Gemma 4: 1.0, the norms do the scaling).
    pub scale: f32,
    /// tanh softcap of the scores (Gemma 4 has none; kept for the kernel family).
    pub softcap: Option<f32>,
    /// Absolute position ranges whose tokens also see each other in both directions (an image's
    /// soft tokens on sliding layers); empty for text.
    pub bidirectional: Vec<Range<usize>>,
}

impl AttentionParams {
    /// Causal text attention with an optional window, scaling 1.0.
    pub fn causal(q_start: usize, k_start: usize, window: Option<usize>) -> Self {
        AttentionParams {
            q_start,
            k_start,
            causal: true,
            window,
            scale: 1.0,
            softcap: None,
            bidirectional: Vec::new(),
        }
    }

    /// Every query sees every key (the vision encoder), scaling 1.0.
    pub fn bidirectional() -> Self {
        AttentionParams {
            q_start: 0,
            k_start: 0,
            causal: false,
            window: None,
            scale: 1.0,
            softcap: None,
            bidirectional: Vec::new(),
        }
    }

    /// Whether the query at absolute position `q` sees the key at absolute position `k`:
    /// transformers' AND(sliding_window, OR(causal, blockwise)) (`create_masks_for_vision_model`),
    /// where the window bounds the past only (`kv_idx > q_idx - sliding_window`).
    pub fn visible(&self, q: usize, k: usize) -> bool {
        let in_window = self.window.is_none_or(|w| k + w > q);
        let same_block = || {
            self.bidirectional
                .iter()
                .any(|r| r.contains(&q) && r.contains(&k))
        };
        in_window && (!self.causal || k <= q || same_block())
    }
}
