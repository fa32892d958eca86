//! The top `k` logits of each row, with their ids, and the row's log-sum-exp: what sampling and
//! logprobs need of a `[n, vocab]` logits tensor, so that `n · (2k + 1)` words cross to the host
//! instead of `n · vocab` (262,144 on Gemma 4).
//!
//! Order: descending by value, equal values by lower id first (as `model::sampling::top_k` and a
//! stable sort of the row). Values compare by their IEEE bits made orderable (as `f32::total_cmp`:
//! −0 < +0); NaN ranks below −∞, so a NaN is returned only when a row has fewer than `k` other
//! values (the host drops them). The log-sum-exp skips NaN; it is `max + ln Σ exp(x − max)`.
//!
//! Three implementations of one definition:
//! - [`reference`]: the row copied to the host and fully sorted; the lse in f64.
//! - [`select_host`]: the CPU backend's path, a selection (`select_nth_unstable`) then a sort of
//!   the `k` chosen; the lse in f64.
//! - [`top_k_rows`]: the CubeCL kernel, one launch and one read of the packed result.
//!
//! # The kernel
//! One cube of 256 threads per row. Each logit gets a 64-bit key, unique in its row: the value's
//! orderable bits above, the id's complement below (a lower id ranks higher on equal values).
//! Radix select finds the k-th largest key one byte at a time, most significant first: per pass,
//! a 256-bin histogram (shared-memory atomics) of that byte among the keys that match the prefix
//! found so far, then one thread walks the bins from the top to the bin holding the k-th key.
//! After 8 passes the threshold key is exact and exactly `k` keys are ≥ it (keys are unique, so
//! ties need no second rule); they are appended to shared memory, sorted by a bitonic sort of 256
//! slots, and written out with the lse (one more pass over the row and a tree sum).
//! Every pass reads the whole row: 10 reads of it in all, against one copy of it to the host.
//!
//! Output: one u32 tensor `[n, 2k + 1]`: the `k` values' f32 bits, the `k` ids, the lse's bits.
//!
//! # lavapipe
//! Mesa's lavapipe caps an invocation at 65 535 loop iterations: a thread runs about
//! 10 · vocab / 256 (the passes over the row) + 8 · 256 (thread 0's walks over the bins) + 44
//! (sort and tree), 43 000 at [`MAX_VOCAB`], which bounds the vocabulary.

use burn::tensor::{backend::Backend, DType, Int, Shape, Tensor as BurnTensor};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_dtype, tensor::CubeTensor, BoolElement,
    CubeBackend, CubeRuntime, FloatElement,
};
use cubecl::prelude::*;

/// Threads per cube (one cube per row).
const NT: usize = 256;
/// Largest `k` (the bitonic sort's width).
pub const MAX_K: usize = NT;
/// Largest vocabulary (lavapipe's loop-iteration cap; see the module docs).
pub const MAX_VOCAB: usize = 1 << 20;
/// Largest row count (one cube per row along one grid axis, the WebGPU / Vulkan minimum).
pub const MAX_ROWS: usize = 65_535;

/// The top `k` of each of `n` rows, descending, and each row's log-sum-exp, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct TopRows {
    pub k: usize,
    /// `[n · k]`, row-major.
    pub values: Vec<f32>,
    /// `[n · k]`, row-major.
    pub ids: Vec<u32>,
    /// `[n]`.
    pub lse: Vec<f32>,
}

impl TopRows {
    /// Ids, and the bits of values and lse: comparable with `==` when NaN is among them.
    pub fn bits(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect();
        (self.ids.clone(), bits(&self.values), bits(&self.lse))
    }

    pub fn rows(&self) -> usize {
        self.lse.len()
    }

    /// Row `r`'s `(id, value)` pairs, descending.
    pub fn row(&self, r: usize) -> Vec<(u32, f32)> {
        let span = r * self.k..(r + 1) * self.k;
        self.ids[span.clone()]
            .iter()
            .copied()
            .zip(self.values[span].iter().copied())
            .collect()
    }
}

/// Why [`top_k_rows`] did not run (see [`crate::fallback`] for what the backend does then).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopKError {
    #[error("k = {k} must be in 1..={limit} and at most the vocabulary {vocab}")]
    K {
        k: usize,
        vocab: usize,
        limit: usize,
    },
    #[error("{what} = {value} exceeds the kernel's limit {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },
    #[error("logits have dtype {got:?}, expected the backend's float element {expected:?}")]
    Dtype { got: DType, expected: DType },
}

/// The order key of a value: its bits made orderable as unsigned (as `f32::total_cmp`), NaN 0.
fn order_key_host(v: f32) -> u32 {
    let bits = v.to_bits();
    if v.is_nan() {
        0
    } else if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The full key of logit `id`: unique in a row, larger ranks first.
fn key_host(v: f32, id: u32) -> u64 {
    (u64::from(order_key_host(v)) << 32) | u64::from(!id)
}

/// `max + ln Σ exp(x − max)` over the non-NaN values, in f64; −∞ when there are none finite.
fn lse_host(row: &[f32], max: f32) -> f32 {
    if max == f32::NEG_INFINITY || max.is_nan() {
        return max;
    }
    let m = max as f64;
    let s: f64 = row
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| (x as f64 - m).exp())
        .sum();
    (m + s.ln()) as f32
}

fn check_k(k: usize, vocab: usize) -> Result<(), TopKError> {
    if k == 0 || k > MAX_K || k > vocab {
        return Err(TopKError::K {
            k,
            vocab,
            limit: MAX_K,
        });
    }
    Ok(())
}

/// The definition: each row of `rows` (`[n, vocab]` row-major) fully sorted by key.
fn sorted_host(rows: &[f32], vocab: usize, k: usize) -> TopRows {
    let mut out = TopRows {
        k,
        values: vec![],
        ids: vec![],
        lse: vec![],
    };
    for row in rows.chunks_exact(vocab) {
        let mut all: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        all.sort_by_key(|&(i, v)| std::cmp::Reverse(key_host(v, i)));
        push_row(&mut out, row, &all[..k]);
    }
    out
}

fn push_row(out: &mut TopRows, row: &[f32], top: &[(u32, f32)]) {
    out.ids.extend(top.iter().map(|t| t.0));
    out.values.extend(top.iter().map(|t| t.1));
    out.lse.push(lse_host(row, top[0].1));
}

/// The plain reference: the logits copied to the host, each row fully sorted. Panics on a `k`
/// outside `1..=vocab` (the callers check it).
pub fn reference<B: Backend>(logits: BurnTensor<B, 2>, k: usize) -> TopRows {
    let [_, vocab] = logits.dims();
    assert!(k >= 1 && k <= vocab, "top-k: k = {k} outside 1..={vocab}");
    let data = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32 just above");
    sorted_host(&data, vocab, k)
}

/// The host selection (the CPU backend's path): per row, the `k` best keys by
/// `select_nth_unstable` (linear time; keys are unique, so the result is the reference's), then
/// a sort of those `k`. Panics on a `k` outside `1..=vocab` (the callers check it).
pub fn select_host(rows: &[f32], vocab: usize, k: usize) -> TopRows {
    assert!(k >= 1 && k <= vocab, "top-k: k = {k} outside 1..={vocab}");
    let mut out = TopRows {
        k,
        values: Vec::with_capacity(rows.len() / vocab * k),
        ids: Vec::with_capacity(rows.len() / vocab * k),
        lse: Vec::with_capacity(rows.len() / vocab),
    };
    let mut keys: Vec<u64> = Vec::with_capacity(vocab);
    for row in rows.chunks_exact(vocab) {
        keys.clear();
        keys.extend(row.iter().enumerate().map(|(i, &v)| !key_host(v, i as u32)));
        // Ascending complements = descending keys.
        if k < vocab {
            keys.select_nth_unstable(k - 1);
        }
        let top = &mut keys[..k];
        top.sort_unstable();
        let top: Vec<(u32, f32)> = top
            .iter()
            .map(|&c| {
                let id = !(!c as u32);
                (id, row[id as usize])
            })
            .collect();
        push_row(&mut out, row, &top);
    }
    out
}

/// The orderable bits of `v` (see [`order_key_host`]); NaN is told by its bits, not `v != v`,
/// which a shader compiler may fold away.
#[cube]
fn order_key(v: f32) -> u32 {
    let bits = u32::reinterpret(v);
    let mut key = 0u32;
    if (bits & 0x7fff_ffffu32) <= 0x7f80_0000u32 {
        if bits >= 0x8000_0000u32 {
            key = !bits;
        } else {
            key = bits | 0x8000_0000u32;
        }
    }
    key
}

/// One cube per row: radix select of the k-th largest key, gather, bitonic sort, lse.
#[cube(launch)]
fn top_k_kernel<F: Float>(logits: &Tensor<F>, out: &mut Tensor<u32>, vocab: u32, k: u32) {
    let row = CUBE_POS_X as usize;
    let tid = UNIT_POS_X as usize;
    let vocab = vocab as usize;
    let k = k as usize;
    let base = row * vocab;

    let hist = SharedMemory::<Atomic<u32>>::new(comptime!(NT));
    let count = SharedMemory::<Atomic<u32>>::new(1usize);
    // The threshold key found so far (high word, low word) and how many keys of the current
    // prefix still rank above the k-th.
    let mut state = SharedMemory::<u32>::new(3usize);
    let mut s_hi = SharedMemory::<u32>::new(comptime!(NT));
    let mut s_lo = SharedMemory::<u32>::new(comptime!(NT));
    let mut acc = SharedMemory::<f32>::new(comptime!(NT));

    if tid == 0 {
        state[0] = 0u32;
        state[1] = 0u32;
        state[2] = k as u32;
        count[0].store(0u32);
    }
    // Padding slots sort last: every real key has a nonzero low word (an id's complement).
    s_hi[tid] = 0u32;
    s_lo[tid] = 0u32;

    for pass in 0..8u32 {
        hist[tid].store(0u32);
        sync_cube();
        let pre_hi = state[0];
        let pre_lo = state[1];
        // The byte of this pass within its word, and the bits above it (already fixed).
        let q = pass % 4;
        let shift = 24 - 8 * q;
        let above = !(0xffff_ffffu32 >> (8 * q));
        let mut i = tid;
        while i < vocab {
            let hi = order_key(f32::cast_from(logits[base + i]));
            let lo = !(i as u32);
            if pass < 4 {
                if (hi & above) == pre_hi {
                    hist[((hi >> shift) & 0xffu32) as usize].fetch_add(1u32);
                }
            } else if hi == pre_hi && (lo & above) == pre_lo {
                hist[((lo >> shift) & 0xffu32) as usize].fetch_add(1u32);
            }
            i += comptime!(NT);
        }
        sync_cube();
        if tid == 0 {
            // From the top bin down to the one that holds the k-th key.
            let mut remaining = state[2];
            let mut chosen = 0u32;
            let mut found = false;
            let mut b = 256u32;
            while b > 0 {
                b -= 1;
                let c = hist[b as usize].load();
                if !found {
                    if c >= remaining {
                        chosen = b;
                        found = true;
                    } else {
                        remaining -= c;
                    }
                }
            }
            if pass < 4 {
                state[0] = pre_hi | (chosen << shift);
            } else {
                state[1] = pre_lo | (chosen << shift);
            }
            state[2] = remaining;
        }
        sync_cube();
    }

    // Exactly k keys are ≥ the threshold.
    let t_hi = state[0];
    let t_lo = state[1];
    let mut i = tid;
    while i < vocab {
        let hi = order_key(f32::cast_from(logits[base + i]));
        let lo = !(i as u32);
        if hi > t_hi || (hi == t_hi && lo >= t_lo) {
            let slot = count[0].fetch_add(1u32) as usize;
            s_hi[slot] = hi;
            s_lo[slot] = lo;
        }
        i += comptime!(NT);
    }
    sync_cube();

    // Bitonic sort of the 256 slots, descending.
    let mut size = 2usize;
    while size <= comptime!(NT) {
        let mut stride = size / 2;
        while stride > 0 {
            let j = tid ^ stride;
            if j > tid {
                let (a_hi, a_lo, b_hi, b_lo) = (s_hi[tid], s_lo[tid], s_hi[j], s_lo[j]);
                let a_less = a_hi < b_hi || (a_hi == b_hi && a_lo < b_lo);
                if a_less == ((tid & size) == 0) {
                    s_hi[tid] = b_hi;
                    s_lo[tid] = b_lo;
                    s_hi[j] = a_hi;
                    s_lo[j] = a_lo;
                }
            }
            sync_cube();
            stride /= 2;
        }
        size *= 2;
    }

    let width = 2 * k + 1;
    if tid < k {
        let key = s_hi[tid];
        let mut bits = !key;
        if key >= 0x8000_0000u32 {
            bits = key & 0x7fff_ffffu32;
        }
        out[row * width + tid] = bits;
        out[row * width + k + tid] = !s_lo[tid];
    }

    // lse around the row's maximum (the first key); −∞ terms add nothing and are skipped, so an
    // all −∞ row sums to 0 and gets −∞.
    let top = s_hi[0];
    let mut max_bits = !top;
    if top >= 0x8000_0000u32 {
        max_bits = top & 0x7fff_ffffu32;
    }
    let max = f32::reinterpret(max_bits);
    let mut partial = 0.0f32;
    let mut i = tid;
    while i < vocab {
        let x = f32::cast_from(logits[base + i]);
        let bits = u32::reinterpret(x);
        if (bits & 0x7fff_ffffu32) <= 0x7f80_0000u32 && bits != 0xff80_0000u32 {
            partial += f32::exp(x - max);
        }
        i += comptime!(NT);
    }
    acc[tid] = partial;
    sync_cube();
    // A runtime value (a comptime one cannot be mutated): CUBE_DIM_X is NT.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            acc[tid] += acc[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    if tid == 0 {
        out[row * width + 2 * k] = u32::reinterpret(max + f32::ln(acc[0]));
    }
}

/// The top `k` of each row of `logits` `[n, vocab]` and each row's lse, by the kernel: one
/// launch, then one read of `n · (2k + 1)` words. Refuses (launching nothing) a `k` outside
/// `1..=min(vocab, MAX_K)`, more than [`MAX_ROWS`] rows, a vocabulary over [`MAX_VOCAB`], or
/// logits of another dtype than the backend's float element.
pub fn top_k_rows<R: CubeRuntime, F: FloatElement, BT: BoolElement>(
    logits: BurnTensor<CubeBackend<R, F, i32, BT>, 2>,
    k: usize,
) -> Result<TopRows, TopKError> {
    let [n, vocab] = logits.dims();
    check_k(k, vocab)?;
    for (what, value, limit) in [("rows", n, MAX_ROWS), ("vocab", vocab, MAX_VOCAB)] {
        if value > limit {
            return Err(TopKError::TooLarge { what, value, limit });
        }
    }
    let x: CubeTensor<R> = logits.into_primitive().tensor();
    let expected = <F as burn::tensor::Element>::dtype();
    if x.dtype != expected {
        return Err(TopKError::Dtype {
            got: x.dtype,
            expected,
        });
    }
    if n == 0 {
        return Ok(TopRows {
            k,
            values: vec![],
            ids: vec![],
            lse: vec![],
        });
    }
    let x = into_contiguous(x);
    let client = x.client.clone();
    let width = 2 * k + 1;
    let out = empty_device_dtype::<R>(
        client.clone(),
        x.device.clone(),
        Shape::from(vec![n, width]),
        DType::I32,
    );
    top_k_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(n as u32, 1, 1),
        CubeDim::new_1d(NT as u32),
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        vocab as u32,
        k as u32,
    );
    let words = BurnTensor::<CubeBackend<R, F, i32, BT>, 2, Int>::from_primitive(out)
        .into_data()
        .to_vec::<i32>()
        .expect("the kernel's output is i32");
    Ok(unpack(&words, n, k))
}

/// The kernel's packed rows `[n, 2k + 1]` (u32 words in an i32 tensor) → [`TopRows`].
fn unpack(words: &[i32], n: usize, k: usize) -> TopRows {
    let mut out = TopRows {
        k,
        values: Vec::with_capacity(n * k),
        ids: Vec::with_capacity(n * k),
        lse: Vec::with_capacity(n),
    };
    for row in words.chunks_exact(2 * k + 1) {
        out.values
            .extend(row[..k].iter().map(|&w| f32::from_bits(w as u32)));
        out.ids.extend(row[k..2 * k].iter().map(|&w| w as u32));
        out.lse.push(f32::from_bits(row[2 * k] as u32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_equals_the_full_sort() {
        let mut rng = crate::testing::Lcg::new(5);
        for (vocab, k) in [(1, 1), (7, 3), (300, 64), (5000, 256), (5000, 1)] {
            let rows: Vec<f32> = (0..3 * vocab)
                .map(|i| match i % 97 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => -0.0,
                    3 => 0.0,
                    // Quantized: many ties.
                    _ => (rng.next_f32() * 16.0).round() / 4.0,
                })
                .collect();
            let (a, b) = (select_host(&rows, vocab, k), sorted_host(&rows, vocab, k));
            assert_eq!(a.bits(), b.bits(), "vocab {vocab} k {k}");
        }
    }

    #[test]
    fn keys_rank_like_total_cmp_with_nan_last() {
        let vals = [
            f32::NAN,
            f32::NEG_INFINITY,
            -1.0,
            -0.0,
            0.0,
            1.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(order_key_host(w[0]) < order_key_host(w[1]), "{w:?}");
        }
        assert!(key_host(1.0, 3) > key_host(1.0, 4), "lower id first");
    }
}
