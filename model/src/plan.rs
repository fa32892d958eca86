//! The memory plan of a deployment, computed from the model's shapes without loading weights:
//! what the weights take on the device, an estimate of a worst-case step's activations, and what
//! is left for the KV cache in blocks of `block_size` tokens per layer kind, with the maximum
//! number of sequences at `max_model_len` that fit (the figures vLLM logs at start).
//!
//! KV per token and layer: K and V, `num_key_value_heads × head_dim` each (full layers with
//! `attention_k_eq_v` still store both: V = v_norm(k_proj x) while K is RoPE'd). A sliding
//! layer keeps only the blocks that cover its window (`ceil(window / block_size) + 1`: the window
//! straddles at most one more block); a full layer keeps one block per `block_size` tokens.

use crate::config::{LayerKind, TextConfig};

/// What the plan is computed for.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Device memory in bytes, and the fraction of it the server may use.
    pub memory_bytes: u64,
    pub gpu_memory_utilization: f64,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    /// Prompt tokens per step (chunked prefill): the largest step's activations.
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// Bytes of the compute dtype (2 for bf16/f16, 4 for f32).
    pub dtype_bytes: u64,
    /// Bytes of one cached K or V element (the compute dtype's, or 1 for fp8).
    pub kv_bytes: u64,
    /// NVFP4 weight bytes (packed values, E4M3 block scales, per-tensor scales): device bytes.
    pub nvfp4_weight_bytes: u64,
    /// Float weight bytes as stored in bf16 in the checkpoint (they become `dtype_bytes` each).
    pub bf16_weight_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub weight_bytes: u64,
    /// Estimated: hidden states, attention projections and the MLP of one
    /// `max_num_batched_tokens` step, plus f32 logits for `max_num_seqs` rows.
    pub activation_bytes: u64,
    pub kv_cache_bytes: u64,
    /// KV bytes per token of one layer of each kind.
    pub kv_token_bytes_sliding: u64,
    pub kv_token_bytes_full: u64,
    pub sliding_layers: usize,
    pub full_layers: usize,
    /// Bytes of one block (all layers of the kind, `block_size` tokens).
    pub block_bytes_sliding: u64,
    pub block_bytes_full: u64,
    /// Blocks one sequence of `max_model_len` tokens holds, per kind.
    pub blocks_per_seq_sliding: u64,
    pub blocks_per_seq_full: u64,
    pub seq_bytes: u64,
    /// Sequences of `max_model_len` tokens the KV cache holds at once.
    pub max_concurrency: u64,
    /// The pool split in that proportion: blocks of each kind.
    pub num_blocks_sliding: u64,
    pub num_blocks_full: u64,
}

/// How a KV cache of some bytes splits into blocks of each layer kind: in the proportion one
/// sequence of `max_model_len` tokens needs them, so `max_concurrency` such sequences fit.
#[derive(Debug, Clone, PartialEq)]
pub struct KvSplit {
    /// KV bytes per token of one layer of each kind (sliding, full).
    pub token_bytes: [u64; 2],
    /// Layers of each kind.
    pub layers: [usize; 2],
    /// Bytes of one block (all layers of the kind, `block_size` tokens).
    pub block_bytes: [u64; 2],
    /// Blocks one sequence of `max_model_len` tokens holds, per kind.
    pub blocks_per_seq: [u64; 2],
    pub seq_bytes: u64,
    pub max_concurrency: u64,
    /// Blocks of each kind in the pool.
    pub num_blocks: [u64; 2],
}

/// Splits `kv_cache_bytes` into blocks (see [`KvSplit`]); `kv_bytes` is the bytes of one cached
/// element.
pub fn split_kv(
    text: &TextConfig,
    kv_cache_bytes: u64,
    max_model_len: usize,
    block_size: usize,
    kv_bytes: u64,
) -> KvSplit {
    let bs = block_size.max(1) as u64;
    let per_token = |kind: LayerKind| -> (usize, u64) {
        let layers: Vec<_> = text.layers.iter().filter(|l| l.kind == kind).collect();
        let bytes = layers.first().map_or(0, |l| {
            2 * (l.num_key_value_heads * l.head_dim) as u64 * kv_bytes
        });
        (layers.len(), bytes)
    };
    let (sliding_layers, sliding_bytes) = per_token(LayerKind::Sliding);
    let (full_layers, full_bytes) = per_token(LayerKind::Full);
    let block_bytes = [
        bs * sliding_bytes * sliding_layers as u64,
        bs * full_bytes * full_layers as u64,
    ];
    let len = max_model_len as u64;
    let full_blocks = len.div_ceil(bs);
    let window_blocks = (text.sliding_window as u64).div_ceil(bs) + 1;
    let blocks_per_seq = [full_blocks.min(window_blocks), full_blocks];
    let seq_bytes = blocks_per_seq[0] * block_bytes[0] + blocks_per_seq[1] * block_bytes[1];
    let max_concurrency = kv_cache_bytes / seq_bytes.max(1);
    // What the proportion leaves over goes to the full kind, which grows with context.
    let sliding = max_concurrency * blocks_per_seq[0];
    let full = kv_cache_bytes.saturating_sub(sliding * block_bytes[0]) / block_bytes[1].max(1);
    KvSplit {
        token_bytes: [sliding_bytes, full_bytes],
        layers: [sliding_layers, full_layers],
        block_bytes,
        blocks_per_seq,
        seq_bytes,
        max_concurrency,
        num_blocks: [sliding, if full_layers > 0 { full } else { 0 }],
    }
}

/// The plan, or why nothing fits (the weights and activations alone exceed the budget, or not
/// one sequence of `max_model_len` tokens fits).
pub fn plan(text: &TextConfig, p: &PlanInput) -> Result<Plan, String> {
    let weight_bytes = p.nvfp4_weight_bytes + p.bf16_weight_bytes / 2 * p.dtype_bytes;
    let widest_q = text
        .layers
        .iter()
        .map(|l| text.num_attention_heads * l.head_dim)
        .max()
        .unwrap_or(0);
    let per_step_token = 4 * text.hidden_size + 3 * text.intermediate_size + 3 * widest_q;
    let activation_bytes = (p.max_num_batched_tokens * per_step_token) as u64 * p.dtype_bytes
        + (p.max_num_seqs * text.vocab_size) as u64 * 4;
    let usable = (p.memory_bytes as f64 * p.gpu_memory_utilization) as u64;
    let kv_cache_bytes = usable
        .checked_sub(weight_bytes + activation_bytes)
        .ok_or_else(|| {
            format!(
                "the weights ({:.1} GiB) and a step's activations ({:.1} GiB) exceed {:.1} GiB × {}",
                gib(weight_bytes),
                gib(activation_bytes),
                gib(p.memory_bytes),
                p.gpu_memory_utilization
            )
        })?;
    let split = split_kv(
        text,
        kv_cache_bytes,
        p.max_model_len,
        p.block_size,
        p.kv_bytes,
    );
    let (max_concurrency, seq_bytes) = (split.max_concurrency, split.seq_bytes);
    if max_concurrency == 0 {
        return Err(format!(
            "one sequence of {} tokens needs {:.2} GiB of KV cache; {:.2} GiB are left",
            p.max_model_len,
            gib(seq_bytes),
            gib(kv_cache_bytes)
        ));
    }
    Ok(Plan {
        weight_bytes,
        activation_bytes,
        kv_cache_bytes,
        kv_token_bytes_sliding: split.token_bytes[0],
        kv_token_bytes_full: split.token_bytes[1],
        sliding_layers: split.layers[0],
        full_layers: split.layers[1],
        block_bytes_sliding: split.block_bytes[0],
        block_bytes_full: split.block_bytes[1],
        blocks_per_seq_sliding: split.blocks_per_seq[0],
        blocks_per_seq_full: split.blocks_per_seq[1],
        seq_bytes,
        max_concurrency,
        num_blocks_sliding: split.num_blocks[0],
        num_blocks_full: split.num_blocks[1],
    })
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use std::path::PathBuf;

    fn config_31b() -> TextConfig {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/31b-config");
        ModelConfig::from_dir(&dir).expect("31B config").text
    }

    fn input(max_model_len: usize, kv_bytes: u64) -> PlanInput {
        PlanInput {
            memory_bytes: 80 << 30,
            gpu_memory_utilization: 0.9,
            max_model_len,
            max_num_seqs: 16,
            max_num_batched_tokens: 2048,
            block_size: 16,
            dtype_bytes: 2,
            kv_bytes,
            nvfp4_weight_bytes: 10 << 30,
            bf16_weight_bytes: 8 << 30,
        }
    }

    /// The 31B's KV shapes, by hand from its config: sliding layers 2 × 16 heads × 256, full
    /// layers 2 × 4 heads × 512; 50 sliding and 10 full layers; a 1024-token window.
    #[test]
    fn kv_of_the_31b() {
        let t = config_31b();
        let p = plan(&t, &input(8192, 2)).unwrap();
        assert_eq!((p.sliding_layers, p.full_layers), (50, 10));
        assert_eq!(p.kv_token_bytes_sliding, 2 * 16 * 256 * 2);
        assert_eq!(p.kv_token_bytes_full, 2 * 4 * 512 * 2);
        assert_eq!(p.block_bytes_sliding, 16 * 16384 * 50);
        assert_eq!(p.block_bytes_full, 16 * 8192 * 10);
        assert_eq!(p.blocks_per_seq_sliding, 1024 / 16 + 1);
        assert_eq!(p.blocks_per_seq_full, 8192 / 16);
        assert_eq!(p.seq_bytes, 65 * 13_107_200 + 512 * 1_310_720);
        assert_eq!(p.weight_bytes, (10 << 30) + (8 << 30));
        assert_eq!(p.max_concurrency, p.kv_cache_bytes / p.seq_bytes);
        // fp8 halves every KV figure; a short context keeps fewer sliding blocks than the window.
        let fp8 = plan(&t, &input(8192, 1)).unwrap();
        assert_eq!(fp8.seq_bytes * 2, p.seq_bytes);
        let short = plan(&t, &input(100, 2)).unwrap();
        assert_eq!(
            (short.blocks_per_seq_sliding, short.blocks_per_seq_full),
            (7, 7)
        );
    }

    #[test]
    fn what_does_not_fit_is_an_error() {
        let t = config_31b();
        let mut small = input(8192, 2);
        small.memory_bytes = 16 << 30;
        assert!(plan(&t, &small).unwrap_err().contains("exceed"));
        let mut long = input(262_144, 2);
        long.memory_bytes = 24 << 30;
        assert!(plan(&t, &long).unwrap_err().contains("one sequence"));
    }
}
