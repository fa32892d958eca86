//! KV cache: state outside the modules, owned by the caller (the engine) and created per request.
//! Sliding layers keep only the keys the next query can still see (the window minus itself);
//! full layers keep the whole context.

use crate::Gemma4Backend;
use burn::prelude::*;

/// One layer's keys and values in preallocated buffers `[kv_heads, capacity, head_dim]`, written
/// in place: a step appends its entries with `slice_assign` and attention reads a view of the live
/// entries (no copy of the cache per step; the fused attention kernel reads the view's strides).
/// Capacity grows 1.5× when it runs out (full layers); a sliding layer's entries that fell out of
/// the window are dropped by moving the live ones to the front when the buffer fills, so each
/// entry is copied about once.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Gemma4Backend> {
    /// [kv_heads, capacity, head_dim] after k_norm and RoPE.
    k: Option<Tensor<B, 3>>,
    /// [kv_heads, capacity, head_dim] after v_norm.
    v: Option<Tensor<B, 3>>,
    /// Buffer index of the first live entry, and the number of live entries.
    first: usize,
    len: usize,
    /// Absolute position of the first live entry.
    pub start: usize,
    /// Entries kept after a step; None keeps everything.
    pub keep: Option<usize>,
}

/// Smallest buffer a layer allocates (entries).
const MIN_CAPACITY: usize = 64;

impl<B: Gemma4Backend> LayerCache<B> {
    /// An empty cache that keeps `keep` entries after each step (None: all).
    pub fn new(keep: Option<usize>) -> Self {
        LayerCache {
            k: None,
            v: None,
            first: 0,
            len: 0,
            start: 0,
            keep,
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the buffers can hold.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    /// Appends new entries [kv_heads, n, d]; returns all keys and values visible to this step
    /// (views of the buffers) and the absolute position of the first of them. Trims to the
    /// window afterwards.
    pub fn append(
        &mut self,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, usize) {
        let [h, n, d] = k.dims();
        if self.first + self.len + n > self.capacity() {
            self.regrow(h, n, d, &k.device());
        }
        let (kb, vb) = (
            self.k.take().expect("buffers after regrow"),
            self.v.take().expect("buffers after regrow"),
        );
        let at = self.first + self.len..self.first + self.len + n;
        let kb = kb.slice_assign([0..h, at.clone(), 0..d], k);
        let vb = vb.slice_assign([0..h, at, 0..d], v);
        let live = self.first..self.first + self.len + n;
        let (k_all, v_all) = (
            kb.clone().slice([0..h, live.clone(), 0..d]),
            vb.clone().slice([0..h, live, 0..d]),
        );
        self.k = Some(kb);
        self.v = Some(vb);
        let start = self.start;
        let total = self.len + n;
        let drop = self.keep.map_or(0, |keep| total.saturating_sub(keep));
        self.first += drop;
        self.len = total - drop;
        self.start += drop;
        (k_all, v_all, start)
    }

    /// Makes room for `n` more entries: live entries move to the front of a buffer of 1.5 times
    /// what they and the new ones need (a sliding layer's stays about 1.5 windows).
    fn regrow(&mut self, h: usize, n: usize, d: usize, device: &B::Device) {
        let need = self.len + n;
        let capacity = (need + need / 2).max(MIN_CAPACITY);
        let (mut kb, mut vb) = (
            Tensor::<B, 3>::zeros([h, capacity, d], device),
            Tensor::<B, 3>::zeros([h, capacity, d], device),
        );
        if let (Some(k), Some(v)) = (self.k.take(), self.v.take()) {
            if self.len > 0 {
                let live = self.first..self.first + self.len;
                kb = kb.slice_assign(
                    [0..h, 0..self.len, 0..d],
                    k.slice([0..h, live.clone(), 0..d]),
                );
                vb = vb.slice_assign([0..h, 0..self.len, 0..d], v.slice([0..h, live, 0..d]));
            }
        }
        self.k = Some(kb);
        self.v = Some(vb);
        self.first = 0;
    }
}

#[derive(Debug, Clone)]
pub struct KvCache<B: Gemma4Backend> {
    pub layers: Vec<LayerCache<B>>,
    /// Tokens processed so far (the position of the next token).
    pub seq_len: usize,
}

impl<B: Gemma4Backend> KvCache<B> {
    /// A fresh cache with one layer per item of `keep`: the entries that layer keeps after a
    /// step (None: all). `TextModel::new_cache` gives the model's.
    pub fn new(keep: impl IntoIterator<Item = Option<usize>>) -> Self {
        KvCache {
            layers: keep.into_iter().map(LayerCache::new).collect(),
            seq_len: 0,
        }
    }

    /// Cached entries over all layers (for memory accounting and leak tests).
    pub fn entries(&self) -> usize {
        self.layers.iter().map(LayerCache::len).sum()
    }
}
