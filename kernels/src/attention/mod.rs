//! Attention of the Gemma 4 towers: the parameters every path shares, the plain Burn reference,
//! and beside it the fused CubeCL kernels (`flash`, and `kv_write` for the paged pool) and the CPU
//! loops of the ndarray backend (`cpu`).
//!
//! Layout (the KV cache's): q `[t, heads, d]`, k and v `[kv_heads, s, d]`; query head h reads KV
//! head h / (heads / kv_heads) (transformers' `repeat_kv` order); the output is `[t, heads · d]`.
//! Query i sits at absolute position `q_start + i`, key j at `k_start + j`.
//!
//! The text tower's KV cache is paged ([`PagedBatch`]): each layer's K and V live in a pool
//! `[kv_heads, num_blocks · block_size, d]`, and key j of a sequence is in slot
//! `blocks[j / block_size] · block_size + j % block_size` of its block table. One call attends
//! the query rows of every sequence of a step (a ragged batch: prefill chunks and decode rows
//! together), each against its own blocks; nothing is gathered into a contiguous copy.

pub mod cpu;
pub mod flash;
pub mod fp8;
pub mod kv_write;
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

/// One sequence of a [`PagedBatch`]: its query rows, the keys it sees and where they live.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedSeq {
    /// Its rows of q (and of the output), consecutive; the rows of the batch's sequences follow
    /// each other in order from 0.
    pub rows: Range<usize>,
    /// Positions, window and spans as for a contiguous call: query i of the sequence is at
    /// `params.q_start + i`, key j at `params.k_start + j`.
    pub params: AttentionParams,
    /// Keys in the cache for this call (this step's own already written): keys `0..keys`.
    pub keys: usize,
    /// The pool blocks holding keys `0..keys`, in order (`keys.div_ceil(block_size)` at least).
    pub blocks: Vec<u32>,
}

/// A ragged batch of sequences over one layer's paged K/V pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PagedBatch {
    /// Tokens per block.
    pub block_size: usize,
    pub seqs: Vec<PagedSeq>,
}

impl PagedBatch {
    /// Query rows in all.
    pub fn rows(&self) -> usize {
        self.seqs.last().map_or(0, |s| s.rows.end)
    }

    /// The pool slot of key `j` of `seq`.
    pub fn slot(&self, seq: &PagedSeq, j: usize) -> usize {
        seq.blocks[j / self.block_size] as usize * self.block_size + j % self.block_size
    }

    /// Why the batch is not well formed for a pool of `slots` slots (rows not consecutive from
    /// 0, a block table too short for its keys, a block past the pool), or None.
    pub fn check(&self, slots: usize) -> Option<String> {
        if self.block_size == 0 {
            return Some("block_size 0".into());
        }
        let mut next = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.rows.start != next || s.rows.end < s.rows.start {
                return Some(format!(
                    "sequence {i}: rows {:?} do not follow row {next}",
                    s.rows
                ));
            }
            next = s.rows.end;
            if s.blocks.len() < s.keys.div_ceil(self.block_size) {
                return Some(format!(
                    "sequence {i}: {} blocks for {} keys of {} per block",
                    s.blocks.len(),
                    s.keys,
                    self.block_size
                ));
            }
            let past = |&&b: &&u32| (b as usize + 1) * self.block_size > slots;
            if let Some(b) = s.blocks.iter().find(past) {
                return Some(format!(
                    "sequence {i}: block {b} is past the pool's {slots} slots"
                ));
            }
        }
        None
    }
}
