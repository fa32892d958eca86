//! Plain Burn attention: scores, additive mask, softmax, weighted sum. The reference of the
//! fused kernels, and the path of every backend without them.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{BasicOps, TensorData};

use super::{fp8, AttentionParams, PagedBatch};

/// Added to masked scores. Every causal row keeps at least its own position, so the softmax max
/// is finite and exp(-inf - max) = 0 exactly (a large finite value sends libm's exp down its slow
/// underflow path instead).
const MASKED: f32 = f32::NEG_INFINITY;

/// q `[t, heads, d]`, k and v `[kv_heads, s, d]` -> `[t, heads · d]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    p: &AttentionParams,
) -> Tensor<B, 2> {
    let [t, nh, d] = q.dims();
    let [nkv, s, _] = k.dims();
    let dv = v.dims()[2];
    let device = k.device();
    // GQA by reshaping: query head h = kv * groups + j uses KV head kv.
    let groups = nh / nkv;
    let q = q.swap_dims(0, 1).reshape([nkv, groups * t, d]);
    let mut scores = q.matmul(k.swap_dims(1, 2)).reshape([nkv, groups, t, s]);
    if p.scale != 1.0 {
        scores = scores * p.scale;
    }
    if let Some(cap) = p.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    let scores = scores + mask::<B>(p, t, s, &device).unsqueeze::<4>();
    let probs = softmax(scores, 3).reshape([nkv, groups * t, s]);
    probs
        .matmul(v)
        .reshape([nh, t, dv])
        .swap_dims(0, 1)
        .reshape([t, nh * dv])
}

/// Paged attention over a ragged batch (see [`PagedBatch`]): q `[rows, heads, d]`, the pools
/// `[kv_heads, slots, d]` -> `[rows, heads · d]`. The reference gathers each sequence's keys
/// into a contiguous copy and runs [`attention`] on it; the fast kernels read the blocks in place.
/// A sequence without rows contributes nothing; one without keys gets zero rows (as the kernels).
pub fn paged_attention<B: Backend>(
    q: Tensor<B, 3>,
    k_pool: Tensor<B, 3>,
    v_pool: Tensor<B, 3>,
    batch: &PagedBatch,
) -> Tensor<B, 2> {
    let dv = v_pool.dims()[2];
    paged_with(q, dv, batch, |index| {
        (
            k_pool.clone().select(1, index.clone()),
            v_pool.clone().select(1, index),
        )
    })
}

/// [`paged_attention`] over fp8 pools `[kv_heads, slots, d / 4]` of packed E4M3 words (see
/// [`super::fp8`]): each sequence's keys and values are gathered, dequantized (code · scale),
/// then attended as floats.
pub fn paged_attention_fp8<B: Backend>(
    q: Tensor<B, 3>,
    k_pool: Tensor<B, 3, Int>,
    v_pool: Tensor<B, 3, Int>,
    scales: fp8::KvScales,
    batch: &PagedBatch,
) -> Tensor<B, 2> {
    let dv = v_pool.dims()[2] * fp8::PER_WORD;
    paged_with(q, dv, batch, |index| {
        (
            fp8::dequantize(k_pool.clone().select(1, index.clone()), scales.k),
            fp8::dequantize(v_pool.clone().select(1, index), scales.v),
        )
    })
}

/// The reference's loop: `gather(slots)` gives a sequence's K and V `[kv_heads, keys, d]`.
fn paged_with<B: Backend>(
    q: Tensor<B, 3>,
    dv: usize,
    batch: &PagedBatch,
    gather: impl Fn(Tensor<B, 1, Int>) -> (Tensor<B, 3>, Tensor<B, 3>),
) -> Tensor<B, 2> {
    let [rows, heads, d] = q.dims();
    let device = q.device();
    let mut outs = Vec::with_capacity(batch.seqs.len());
    for seq in batch.seqs.iter().filter(|s| !s.rows.is_empty()) {
        let t = seq.rows.len();
        if seq.keys == 0 {
            outs.push(Tensor::zeros([t, heads * dv], &device));
            continue;
        }
        let slots: Vec<i32> = (0..seq.keys).map(|j| batch.slot(seq, j) as i32).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [seq.keys]), &device);
        let (k, v) = gather(index);
        let q = q.clone().slice([seq.rows.clone(), 0..heads, 0..d]);
        debug_assert_eq!(k.dims()[1], seq.keys);
        outs.push(attention(q, k, v, &seq.params));
    }
    if outs.is_empty() {
        return Tensor::zeros([rows, heads * dv], &device);
    }
    Tensor::cat(outs, 0)
}

/// Writes `new` `[n, kv_heads, d]` (this step's keys or values, row i for slot `slots[i]`) into
/// `pool` `[kv_heads, slots, d]` and returns the pool: one `slice_assign` per run of
/// consecutive slots (in place when the pool's buffer is not shared).
pub fn kv_write<B: Backend>(pool: Tensor<B, 3>, new: Tensor<B, 3>, slots: &[u32]) -> Tensor<B, 3> {
    write_rows(pool, new, slots)
}

/// Writes rows `new` `[n, kv_heads, w]` into `pool` `[kv_heads, slots, w]` at `slots`: one
/// `slice_assign` per run of consecutive slots. Any element kind (float values, fp8 words).
pub fn write_rows<B: Backend, K: BasicOps<B>>(
    pool: Tensor<B, 3, K>,
    new: Tensor<B, 3, K>,
    slots: &[u32],
) -> Tensor<B, 3, K> {
    let [n, kv_heads, d] = new.dims();
    assert_eq!(
        n,
        slots.len(),
        "kv_write: {n} rows for {} slots",
        slots.len()
    );
    let new = new.swap_dims(0, 1);
    let mut pool = pool;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && slots[j] == slots[j - 1] + 1 {
            j += 1;
        }
        let at = slots[i] as usize..slots[i] as usize + (j - i);
        pool = pool.slice_assign(
            [0..kv_heads, at, 0..d],
            new.clone().slice([0..kv_heads, i..j, 0..d]),
        );
        i = j;
    }
    pool
}

/// `[t, s]` additive mask: 0 where query i sees key j, MASKED elsewhere.
pub fn mask<B: Backend>(
    p: &AttentionParams,
    t: usize,
    s: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for j in 0..s {
            if !p.visible(p.q_start + i, p.k_start + j) {
                m[i * s + j] = MASKED;
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [t, s]), device)
}
