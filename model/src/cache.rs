//! The paged KV cache. A [`KvPool`] holds every layer's keys and values in blocks of
//! `block_size` tokens (`[kv_heads, num_blocks · block_size, d]` per layer, after k_norm/RoPE and
//! v_norm), one pool of block ids per layer kind: a block id names the same slots in every layer
//! of its kind. A sequence owns a [`SeqKv`]: one block table per kind. Full layers grow block by
//! block; sliding layers free the blocks that fell out of the window after each step, so a
//! sliding table holds at most `ceil((window - 1) / block_size) + 1` blocks between steps.
//! Blocks return to the pool when the table is dropped (finish, cancel, preemption, error), so
//! no path can leak them.
//!
//! The pool's element type is the model's float type, or with [`KvDtype::Fp8`] E4M3 codes packed
//! four to an i32 word with one scale per layer for K and one for V (vLLM's
//! `--kv-cache-dtype fp8`; see `gemma4_kernels::attention::fp8`).
//!
//! A pool is bounded (the engine's, sized from memory or `--num-kv-blocks`: a step that needs
//! more blocks than are free fails, and the scheduler sees to it that it never does) or growable
//! (one sequence's own cache, [`KvCache`], for tests and benches: it grows by half when full).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::LayerKind;
use crate::Gemma4Backend;
use burn::prelude::*;
use gemma4_kernels::attention::fp8::{self, KvScales};
use gemma4_kernels::attention::PagedBatch;

/// Tokens per block unless configured (vLLM's default on CUDA).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Blocks of a kind: index 0 sliding, 1 full.
pub type PerKind<T> = [T; 2];

/// The index of a layer kind in [`PerKind`] arrays.
pub fn kind_index(kind: LayerKind) -> usize {
    match kind {
        LayerKind::Sliding => 0,
        LayerKind::Full => 1,
    }
}

/// Tokens a sliding layer keeps after a step: the keys its next query can still see.
pub fn sliding_keep(window: usize) -> usize {
    window.saturating_sub(1)
}

/// The blocks a sequence of `tokens` cached tokens holds for a layer kind that keeps `keep`
/// tokens (None: all). The scheduler counts with this; [`SeqKv`] holds exactly this many.
pub fn blocks_held(tokens: usize, keep: Option<usize>, block_size: usize) -> usize {
    blocks_needed(tokens, tokens, keep, block_size)
}

/// The blocks a sequence with `computed` cached tokens holds during a step that runs tokens
/// `computed..end` (this step's keys and the window before its first query).
pub fn blocks_needed(computed: usize, end: usize, keep: Option<usize>, block_size: usize) -> usize {
    let first = keep.map_or(0, |k| computed.saturating_sub(k) / block_size);
    end.div_ceil(block_size).saturating_sub(first)
}

/// Why a step could not get its blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache is out of {kind} blocks ({total} of {block_size} tokens, none free)")]
pub struct OutOfBlocks {
    pub kind: &'static str,
    pub total: usize,
    pub block_size: usize,
}

/// What prefix caching found for a sequence: the tokens whose KV it reuses, and how many of
/// the blocks holding them are held by running sequences (shared, so taking them costs nothing;
/// the others come out of the cache, which counts as taking a block).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixHit {
    pub tokens: usize,
    pub in_use: PerKind<usize>,
}

/// Prefix hashes of a sequence's full blocks, chained: block j's hash covers its token ids, the
/// hashes of the images whose placeholders it holds, and block j-1's hash, so equal hashes
/// mean equal prefixes (two images behind the same placeholder ids hash apart). SipHash keyed at
/// random per hasher, so that clients cannot craft collisions.
#[derive(Debug, Clone, Default)]
pub struct PrefixHasher {
    state: std::hash::RandomState,
}

impl PrefixHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `hashes` (those of a sequence's first blocks) to every full block of `tokens`,
    /// the sequence's tokens from block `hashes.len()` on (the ones already hashed are not
    /// passed again); `images` are the placeholder runs (positions in the sequence) of its
    /// images and each image's [`PrefixHasher::image`].
    pub fn extend(
        &self,
        hashes: &mut Vec<u64>,
        tokens: &[u32],
        block_size: usize,
        images: &[(Range<usize>, u64)],
    ) {
        let first = hashes.len();
        for (k, chunk) in tokens.chunks_exact(block_size).enumerate() {
            let j = first + k;
            let block = j * block_size..(j + 1) * block_size;
            let mut h = self.state.build_hasher();
            h.write_u64(j.checked_sub(1).map_or(0, |p| hashes[p]));
            chunk.iter().for_each(|&t| h.write_u32(t));
            for (run, image) in images {
                if run.start < block.end && block.start < run.end {
                    h.write_u64(*image);
                }
            }
            hashes.push(h.finish());
        }
    }

    /// An image's identity for prefix caching: its preprocessed pixels, patch grid and
    /// soft-token count (which decide its soft tokens).
    pub fn image(&self, image: &crate::vision::PreprocessedImage) -> u64 {
        let mut h = self.state.build_hasher();
        h.write_usize(image.patches_h);
        h.write_usize(image.patches_w);
        h.write_usize(image.num_soft_tokens);
        let mut bytes = Vec::with_capacity(4096);
        for chunk in image.pixel_values.chunks(1024) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|v| v.to_bits().to_le_bytes()));
            h.write(&bytes);
        }
        for p in &image.positions {
            h.write_i64(p[0]);
            h.write_i64(p[1]);
        }
        h.finish()
    }
}

/// The block ids of one kind: how many there are, who holds them, which are free, which are
/// cached (prefix caching: a block whose contents are registered under a prefix hash stays
/// cached after its last holder lets go, until it is evicted, least recently released first).
#[derive(Debug)]
struct Blocks {
    total: usize,
    growable: bool,
    /// Whether full blocks are registered under their prefix hash (prefix caching on).
    caching: bool,
    /// Free and holding nothing reusable.
    free: Vec<u32>,
    /// Per block: the sequences holding it (shared prefix blocks have more than one).
    refs: Vec<u32>,
    /// Per block: the prefix hash its contents are registered under.
    hash: Vec<Option<u64>>,
    /// Registered blocks by hash, held or cached.
    by_hash: HashMap<u64, u32>,
    /// Cached blocks no sequence holds, by release time: evicted oldest first.
    lru: BTreeMap<u64, u32>,
    /// Per block: its key in `lru`.
    released_at: Vec<u64>,
    clock: u64,
}

impl Blocks {
    fn new(total: usize, growable: bool) -> Self {
        Blocks {
            total,
            growable,
            caching: false,
            // Popped from the end: low ids first.
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            hash: vec![None; total],
            by_hash: HashMap::new(),
            lru: BTreeMap::new(),
            released_at: vec![0; total],
            clock: 0,
        }
    }

    /// A block for one holder: a free one, else the least recently released cached one (its
    /// hash forgotten), else a new one if the pool grows. Held blocks are never taken.
    fn take(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => match self.lru.pop_first() {
                Some((_, id)) => {
                    let h = self.hash[id as usize]
                        .take()
                        .expect("a cached block has a hash");
                    self.by_hash.remove(&h);
                    id
                }
                None if self.growable => {
                    let grown = (self.total + self.total / 2).max(self.total + 4);
                    self.free.extend((self.total as u32..grown as u32).rev());
                    self.refs.resize(grown, 0);
                    self.hash.resize(grown, None);
                    self.released_at.resize(grown, 0);
                    self.total = grown;
                    self.free.pop()?
                }
                None => return None,
            },
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// One more holder of a registered block (a prefix hit): out of the cache if it was there.
    fn acquire(&mut self, id: u32) {
        let i = id as usize;
        if self.refs[i] == 0 {
            self.lru.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    /// One holder fewer: at the last, a registered block is cached, any other is free.
    fn release(&mut self, id: u32) {
        let i = id as usize;
        self.refs[i] -= 1;
        if self.refs[i] > 0 {
            return;
        }
        if self.hash[i].is_some() {
            self.clock += 1;
            self.released_at[i] = self.clock;
            self.lru.insert(self.clock, id);
        } else {
            self.free.push(id);
        }
    }

    /// Registers a full block under its prefix hash, unless another block already holds that
    /// prefix (two sequences computed it at once: this one stays private).
    fn register(&mut self, id: u32, hash: u64) {
        if !self.caching || self.hash[id as usize].is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.by_hash.entry(hash) {
            e.insert(id);
            self.hash[id as usize] = Some(hash);
        }
    }

    /// Blocks a sequence can take: free or cached.
    fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }
}

type Allocator = Arc<Mutex<PerKind<Blocks>>>;

fn lock(a: &Allocator) -> MutexGuard<'_, PerKind<Blocks>> {
    // A panic while the lock is held leaves the lists consistent (each change is one push/pop).
    a.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the KV cache stores: the model's float type, or E4M3 codes (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The model's float type (`auto`): the accurate default.
    #[default]
    Model,
    /// E4M3 with the checkpoint's per-layer `k_scale` / `v_scale` (1.0 where it has none).
    Fp8,
}

impl KvDtype {
    /// Bytes per cached element, given the model's float element size.
    pub fn elem_bytes(self, model_elem_bytes: usize) -> usize {
        match self {
            KvDtype::Model => model_elem_bytes,
            KvDtype::Fp8 => 1,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    /// vLLM's names: `auto` (the model's dtype) and `fp8` (E4M3; `fp8_e4m3` also accepted).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KvDtype::Model),
            "fp8" | "fp8_e4m3" => Ok(KvDtype::Fp8),
            other => Err(format!("unknown KV cache dtype {other:?} (auto or fp8)")),
        }
    }
}

/// One layer's keys and values: floats `[kv_heads, slots, d]`, or fp8 words
/// `[kv_heads, slots, d / 4]` with their scales.
#[derive(Debug)]
pub enum KvBuffers<B: Gemma4Backend> {
    Float {
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    },
    Fp8 {
        k: Tensor<B, 3, Int>,
        v: Tensor<B, 3, Int>,
        scales: KvScales,
    },
}

impl<B: Gemma4Backend> KvBuffers<B> {
    /// `slots` zero slots of `h` heads by `d` (fp8: code 0 is 0.0).
    fn zeros(
        dtype: KvDtype,
        scales: KvScales,
        h: usize,
        slots: usize,
        d: usize,
        device: &B::Device,
    ) -> Self {
        match dtype {
            KvDtype::Model => KvBuffers::Float {
                k: Tensor::zeros([h, slots, d], device),
                v: Tensor::zeros([h, slots, d], device),
            },
            KvDtype::Fp8 => KvBuffers::Fp8 {
                k: Tensor::zeros([h, slots, d / fp8::PER_WORD], device),
                v: Tensor::zeros([h, slots, d / fp8::PER_WORD], device),
                scales,
            },
        }
    }

    /// Slots held.
    fn slots(&self) -> usize {
        match self {
            KvBuffers::Float { k, .. } => k.dims()[1],
            KvBuffers::Fp8 { k, .. } => k.dims()[1],
        }
    }

    /// Appends `more` zero slots (live slots keep their values).
    fn grow(&mut self, more: usize, device: &B::Device) {
        fn cat<B: Backend, K: burn::tensor::BasicOps<B>>(
            t: &mut Tensor<B, 3, K>,
            more: usize,
            device: &B::Device,
        ) {
            let [h, _, w] = t.dims();
            *t = Tensor::cat(vec![t.clone(), Tensor::zeros([h, more, w], device)], 1);
        }
        match self {
            KvBuffers::Float { k, v } => {
                cat(k, more, device);
                cat(v, more, device);
            }
            KvBuffers::Fp8 { k, v, .. } => {
                cat(k, more, device);
                cat(v, more, device);
            }
        }
    }
}

/// One layer's pool.
#[derive(Debug)]
pub struct LayerKv<B: Gemma4Backend> {
    pub buffers: KvBuffers<B>,
    pub kind: LayerKind,
}

impl<B: Gemma4Backend> LayerKv<B> {
    /// Writes a step's keys and values `[n, kv_heads, d]` at `slots`, in place (fp8: quantized
    /// with the layer's scales).
    pub fn write(&mut self, k: Tensor<B, 3>, v: Tensor<B, 3>, slots: &[u32]) {
        // The buffers are moved out (an empty tensor in their place), so the write owns them
        // and goes in place.
        let device = k.device();
        match &mut self.buffers {
            KvBuffers::Float { k: kb, v: vb } => {
                let empty = || Tensor::empty([0, 0, 0], &device);
                *kb = B::kv_write(std::mem::replace(kb, empty()), k, slots);
                *vb = B::kv_write(std::mem::replace(vb, empty()), v, slots);
            }
            KvBuffers::Fp8 {
                k: kb,
                v: vb,
                scales,
            } => {
                let empty = || Tensor::empty([0, 0, 0], &device);
                *kb = B::kv_write_fp8(std::mem::replace(kb, empty()), k, slots, scales.k);
                *vb = B::kv_write_fp8(std::mem::replace(vb, empty()), v, slots, scales.v);
            }
        }
    }

    /// This step's attention: q `[rows, heads, d]` over the pool as `batch` lays it out ->
    /// `[rows, heads · d]`.
    pub fn attend(&self, q: Tensor<B, 3>, batch: &PagedBatch) -> Tensor<B, 2> {
        match &self.buffers {
            KvBuffers::Float { k, v } => B::paged_attention(q, k.clone(), v.clone(), batch),
            KvBuffers::Fp8 { k, v, scales } => {
                B::paged_attention_fp8(q, k.clone(), v.clone(), *scales, batch)
            }
        }
    }
}

/// Every layer's KV blocks, and the block ids of each kind.
#[derive(Debug)]
pub struct KvPool<B: Gemma4Backend> {
    pub block_size: usize,
    pub layers: Vec<LayerKv<B>>,
    /// What the layers store.
    pub dtype: KvDtype,
    /// Tokens each kind keeps after a step (None: all).
    keep: PerKind<Option<usize>>,
    blocks: Allocator,
    device: B::Device,
}

impl<B: Gemma4Backend> KvPool<B> {
    /// A pool for layers of `(kind, kv_heads, head_dim, fp8 scales)`, `num_blocks` blocks per
    /// kind (None: growable, starting empty), storing `dtype` (the scales are used by fp8 only).
    /// `sliding_window` sets what sliding layers keep.
    pub fn new(
        layers: &[(LayerKind, usize, usize, KvScales)],
        sliding_window: Option<usize>,
        block_size: usize,
        num_blocks: Option<PerKind<usize>>,
        dtype: KvDtype,
        device: &B::Device,
    ) -> Self {
        let block_size = block_size.max(1);
        let totals = num_blocks.unwrap_or([0, 0]);
        let blocks = [0, 1].map(|i| Blocks::new(totals[i], num_blocks.is_none()));
        let kv = layers
            .iter()
            .map(|&(kind, h, d, scales)| {
                let slots = totals[kind_index(kind)] * block_size;
                LayerKv {
                    buffers: KvBuffers::zeros(dtype, scales, h, slots, d, device),
                    kind,
                }
            })
            .collect();
        KvPool {
            block_size,
            layers: kv,
            dtype,
            keep: [sliding_window.map(sliding_keep), None],
            blocks: Arc::new(Mutex::new(blocks)),
            device: device.clone(),
        }
    }

    /// Turns prefix caching on or off (off by default): with it, each full block of a
    /// sequence is registered under its prefix hash ([`SeqKv::hashes`]) once written, and
    /// stays cached after the sequence lets go, for [`KvPool::new_seq_reusing`] to find.
    pub fn with_prefix_caching(self, on: bool) -> Self {
        lock(&self.blocks).iter_mut().for_each(|b| b.caching = on);
        self
    }

    /// A new sequence's (empty) block tables.
    pub fn new_seq(&self) -> SeqKv {
        SeqKv {
            seq_len: 0,
            tables: Default::default(),
            hashes: Vec::new(),
            registered: 0,
            keep: self.keep,
            block_size: self.block_size,
            blocks: self.blocks.clone(),
        }
    }

    /// The longest cached prefix of a sequence whose full blocks hash to `hashes` that every
    /// layer can reuse, ending at a multiple of the block size `p` for which `usable(p)`
    /// holds: full layers need all its blocks, sliding layers those of the window before `p`
    /// (where they were evicted, the hit is cut back to where they reach). Changes nothing.
    pub fn lookup(&self, hashes: &[u64], usable: impl Fn(usize) -> bool) -> PrefixHit {
        let lists = lock(&self.blocks);
        self.find(&lists, hashes, usable)
            .map_or_else(PrefixHit::default, |(k, tables)| PrefixHit {
                tokens: k * self.block_size,
                in_use: [0, 1].map(|i| {
                    let refs = &lists[i].refs;
                    tables[i]
                        .blocks
                        .iter()
                        .filter(|&&b| refs[b as usize] > 0)
                        .count()
                }),
            })
    }

    /// A new sequence holding the blocks of its longest reusable cached prefix (see
    /// [`KvPool::lookup`]): it starts at `seq_len` = the tokens reused, and registers its own
    /// blocks under `hashes` as they are written.
    pub fn new_seq_reusing(&self, hashes: Vec<u64>, usable: impl Fn(usize) -> bool) -> SeqKv {
        let mut seq = self.new_seq();
        let mut lists = lock(&self.blocks);
        if let Some((k, tables)) = self.find(&lists, &hashes, usable) {
            for (i, table) in tables.iter().enumerate() {
                table.blocks.iter().for_each(|&b| lists[i].acquire(b));
            }
            seq.tables = tables;
            seq.seq_len = k * self.block_size;
            seq.registered = k;
        }
        seq.hashes = hashes;
        seq
    }

    /// The reusable prefix: its block count and the tables that hold it.
    fn find(
        &self,
        lists: &PerKind<Blocks>,
        hashes: &[u64],
        usable: impl Fn(usize) -> bool,
    ) -> Option<(usize, PerKind<BlockTable>)> {
        if !lists[0].caching {
            return None;
        }
        let bs = self.block_size;
        let present = |i: usize, j: usize| lists[i].by_hash.get(&hashes[j]).copied();
        let kinds: Vec<usize> = (0..2).filter(|&i| self.has_kind(i)).collect();
        // Full layers: the leading blocks present.
        let longest = if kinds.contains(&1) {
            (0..hashes.len())
                .take_while(|&j| present(1, j).is_some())
                .count()
        } else {
            hashes.len()
        };
        (1..=longest).rev().find_map(|k| {
            if !usable(k * bs) {
                return None;
            }
            let mut tables: PerKind<BlockTable> = Default::default();
            for &i in &kinds {
                let first = self.keep[i].map_or(0, |keep| (k * bs).saturating_sub(keep) / bs);
                tables[i] = BlockTable {
                    first,
                    blocks: (first..k).map(|j| present(i, j)).collect::<Option<_>>()?,
                };
            }
            Some((k, tables))
        })
    }

    /// Blocks of each kind: (in use, in all). Cached blocks no sequence holds are not in use.
    pub fn usage(&self) -> PerKind<(usize, usize)> {
        let b = lock(&self.blocks);
        [0, 1].map(|i| (b[i].total - b[i].available(), b[i].total))
    }

    /// Blocks of each kind a sequence can take now: free, or cached and held by none.
    pub fn available(&self) -> PerKind<usize> {
        let b = lock(&self.blocks);
        [0, 1].map(|i| b[i].available())
    }

    /// Cached blocks of each kind that no sequence holds (what the prefix cache keeps beyond
    /// the running sequences).
    pub fn cached(&self) -> PerKind<usize> {
        let b = lock(&self.blocks);
        [0, 1].map(|i| b[i].lru.len())
    }

    /// Tokens each kind keeps after a step (None: all).
    pub fn keep(&self) -> PerKind<Option<usize>> {
        self.keep
    }

    /// Whether any layer is of kind `i`.
    fn has_kind(&self, i: usize) -> bool {
        self.layers.iter().any(|l| kind_index(l.kind) == i)
    }

    /// Grows the layers' buffers of a growable pool to the blocks handed out (new blocks are
    /// zero; live ones keep their slots).
    fn fit_buffers(&mut self) {
        let totals = {
            let b = lock(&self.blocks);
            [b[0].total, b[1].total]
        };
        for layer in self.layers.iter_mut() {
            let slots = totals[kind_index(layer.kind)] * self.block_size;
            let have = layer.buffers.slots();
            if slots > have {
                layer.buffers.grow(slots - have, &self.device);
            }
        }
    }
}

/// One sequence's block table for one layer kind: `blocks[i]` holds the sequence's tokens
/// `(first + i) · block_size ..` (the blocks before `first` were freed: out of the window).
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    pub first: usize,
    pub blocks: Vec<u32>,
}

/// A sequence's place in a [`KvPool`]: its length and block tables. Dropping it frees its
/// blocks (cached ones stay in the prefix cache).
#[derive(Debug)]
pub struct SeqKv {
    /// Tokens processed so far (the position of the next token).
    pub seq_len: usize,
    pub tables: PerKind<BlockTable>,
    /// Prefix hashes of the sequence's full blocks ([`PrefixHasher`]), as far as its tokens
    /// are known (they may run ahead of `seq_len`; the caller extends them as tokens come):
    /// with prefix caching on, each block is registered under its hash once written.
    pub hashes: Vec<u64>,
    /// Leading blocks already registered (or reused).
    registered: usize,
    keep: PerKind<Option<usize>>,
    block_size: usize,
    blocks: Allocator,
}

impl SeqKv {
    /// Takes the blocks that tokens up to `end` need for the kinds in `pool` (kept on failure:
    /// they return to the pool with the sequence).
    fn reserve<B: Gemma4Backend>(
        &mut self,
        pool: &KvPool<B>,
        end: usize,
    ) -> Result<(), OutOfBlocks> {
        let mut lists = lock(&self.blocks);
        for i in (0..2).filter(|&i| pool.has_kind(i)) {
            let table = &mut self.tables[i];
            let need = end.div_ceil(self.block_size);
            while table.first + table.blocks.len() < need {
                let id = lists[i].take().ok_or(OutOfBlocks {
                    kind: ["sliding", "full"][i],
                    total: lists[i].total,
                    block_size: self.block_size,
                })?;
                table.blocks.push(id);
            }
        }
        Ok(())
    }

    /// The pool slots of positions `range` in kind `i`'s table (reserved).
    fn slots(&self, i: usize, range: std::ops::Range<usize>) -> Vec<u32> {
        let (bs, table) = (self.block_size, &self.tables[i]);
        range
            .map(|p| table.blocks[p / bs - table.first] * bs as u32 + (p % bs) as u32)
            .collect()
    }

    /// After a step to `end`: registers the blocks it filled under their hashes, then lets go
    /// of the blocks a kind no longer keeps.
    fn advance(&mut self, end: usize) {
        self.seq_len = end;
        let mut lists = lock(&self.blocks);
        let full = (end / self.block_size).min(self.hashes.len());
        for j in self.registered..full {
            for (list, table) in lists.iter_mut().zip(&self.tables) {
                if let Some(&id) = j.checked_sub(table.first).and_then(|k| table.blocks.get(k)) {
                    list.register(id, self.hashes[j]);
                }
            }
        }
        self.registered = self.registered.max(full);
        for i in 0..2 {
            let Some(keep) = self.keep[i] else { continue };
            let table = &mut self.tables[i];
            let first = end.saturating_sub(keep) / self.block_size;
            let drop = first.saturating_sub(table.first).min(table.blocks.len());
            table
                .blocks
                .drain(..drop)
                .for_each(|id| lists[i].release(id));
            table.first += drop;
        }
    }

    /// Blocks of each kind that dropping this sequence would return to the pool (those no
    /// other sequence shares).
    pub fn exclusive(&self) -> PerKind<usize> {
        let lists = lock(&self.blocks);
        [0, 1].map(|i| {
            let refs = &lists[i].refs;
            self.tables[i]
                .blocks
                .iter()
                .filter(|&&b| refs[b as usize] == 1)
                .count()
        })
    }

    /// Blocks held of each kind.
    pub fn blocks_held(&self) -> PerKind<usize> {
        [0, 1].map(|i| self.tables[i].blocks.len())
    }

    /// Tokens cached in kind `i`'s layers (sliding: at most the window minus one).
    pub fn tokens_held(&self, i: usize) -> usize {
        let first = self.tables[i].first * self.block_size;
        let start = self.keep[i].map_or(0, |k| self.seq_len.saturating_sub(k));
        if self.tables[i].blocks.is_empty() {
            0
        } else {
            self.seq_len - start.max(first)
        }
    }
}

impl Drop for SeqKv {
    /// The last blocks first: they are the first the cache evicts, the prefix the last.
    fn drop(&mut self) {
        let mut lists = lock(&self.blocks);
        for (list, table) in lists.iter_mut().zip(&mut self.tables) {
            table.blocks.drain(..).rev().for_each(|id| list.release(id));
        }
    }
}

/// The positions, slots and tables of one step's sequences, for the model's layers.
#[derive(Debug)]
pub(crate) struct StepLayout {
    /// Per kind: the write slots of every row, and the attention batch.
    pub slots: PerKind<Vec<u32>>,
    pub batches: PerKind<gemma4_kernels::attention::PagedBatch>,
}

impl<B: Gemma4Backend> KvPool<B> {
    /// Reserves the blocks of a step (sequence b runs `lens[b]` tokens from its `seq_len`) and
    /// lays it out; `params(i, b)` gives kind i's attention parameters of sequence b (positions
    /// are filled in here).
    pub(crate) fn layout(
        &mut self,
        seqs: &mut [&mut SeqKv],
        lens: &[usize],
        params: impl Fn(usize, usize) -> gemma4_kernels::attention::AttentionParams,
    ) -> Result<StepLayout, OutOfBlocks> {
        use gemma4_kernels::attention::{PagedBatch, PagedSeq};
        for (seq, &t) in seqs.iter_mut().zip(lens) {
            seq.reserve(self, seq.seq_len + t)?;
        }
        self.fit_buffers();
        let mut slots: PerKind<Vec<u32>> = Default::default();
        let mut batches: PerKind<PagedBatch> = [0, 1].map(|_| PagedBatch {
            block_size: self.block_size,
            seqs: Vec::with_capacity(seqs.len()),
        });
        for i in (0..2).filter(|&i| self.has_kind(i)) {
            let mut row = 0;
            for (b, (seq, &t)) in seqs.iter().zip(lens).enumerate() {
                let (pos0, end) = (seq.seq_len, seq.seq_len + t);
                slots[i].extend(seq.slots(i, pos0..end));
                let table = &seq.tables[i];
                let k_start = table.first * self.block_size;
                let mut p = params(i, b);
                p.q_start = pos0;
                p.k_start = k_start;
                batches[i].seqs.push(PagedSeq {
                    rows: row..row + t,
                    params: p,
                    keys: end - k_start,
                    blocks: table.blocks.clone(),
                });
                row += t;
            }
        }
        Ok(StepLayout { slots, batches })
    }

    /// After the step: each sequence is `lens[b]` tokens longer and frees what it no longer keeps.
    pub(crate) fn advance(&self, seqs: &mut [&mut SeqKv], lens: &[usize]) {
        for (seq, &t) in seqs.iter_mut().zip(lens) {
            let end = seq.seq_len + t;
            seq.advance(end);
        }
    }
}

/// One sequence with a growable pool of its own: the cache of single-sequence runs (golden
/// tests, `check`, benches). `TextModel::new_cache` makes one.
#[derive(Debug)]
pub struct KvCache<B: Gemma4Backend> {
    pub pool: KvPool<B>,
    pub seq: SeqKv,
}

impl<B: Gemma4Backend> KvCache<B> {
    /// Tokens processed so far.
    pub fn seq_len(&self) -> usize {
        self.seq.seq_len
    }

    /// Tokens cached in each layer, in layer order (sliding layers: their window minus one).
    pub fn layer_tokens(&self) -> Vec<usize> {
        self.pool
            .layers
            .iter()
            .map(|l| self.seq.tokens_held(kind_index(l.kind)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gemma4_kernels::attention::AttentionParams;

    type B = burn::backend::NdArray<f32, i32>;

    /// A pool of one sliding layer (window 9: it keeps 8 tokens) and one full layer, one head
    /// of 4, `n` blocks of 4 tokens of each kind.
    fn two_layer_pool(n: usize) -> KvPool<B> {
        let one = KvScales::default();
        let layers = [
            (LayerKind::Sliding, 1, 4, one),
            (LayerKind::Full, 1, 4, one),
        ];
        KvPool::<B>::new(
            &layers,
            Some(9),
            4,
            Some([n, n]),
            KvDtype::Model,
            &Default::default(),
        )
    }

    fn params(_: usize, _: usize) -> AttentionParams {
        AttentionParams::causal(0, 0, None)
    }

    /// The block hashes of `tokens` (blocks of 4, no images).
    fn hashes(hasher: &PrefixHasher, tokens: &[u32]) -> Vec<u64> {
        let mut h = vec![];
        hasher.extend(&mut h, tokens, 4, &[]);
        h
    }

    #[test]
    fn held_blocks_follow_the_window() {
        // Window 16 (keep 15), blocks of 4: after 20 tokens, positions 5..20 are kept: blocks
        // 1..5 (4 blocks); a step running 20..30 needs blocks 1..8.
        assert_eq!(blocks_held(20, Some(15), 4), 4);
        assert_eq!(blocks_needed(20, 30, Some(15), 4), 7);
        assert_eq!(blocks_held(20, None, 4), 5);
        assert_eq!(blocks_held(0, Some(15), 4), 0);
        assert_eq!(blocks_held(3, Some(15), 4), 1);
    }

    #[test]
    fn tables_free_what_the_window_drops_and_everything_on_drop() {
        let mut pool = two_layer_pool(8);
        let mut a = pool.new_seq();
        pool.layout(&mut [&mut a], &[10], params).unwrap();
        assert_eq!(a.blocks_held(), [3, 3]);
        pool.advance(&mut [&mut a], &[10]);
        // Keep 8: positions 2..10, blocks 0..3 still (block 0 holds 2, 3).
        assert_eq!(a.blocks_held(), [3, 3]);
        assert_eq!(a.blocks_held()[0], blocks_held(10, Some(8), 4));
        pool.layout(&mut [&mut a], &[7], params).unwrap();
        pool.advance(&mut [&mut a], &[7]);
        // 17 tokens, keep 9..17: blocks 2..5.
        assert_eq!(a.blocks_held(), [blocks_held(17, Some(8), 4), 5]);
        assert_eq!(a.tables[0].first, 2);
        assert_eq!(a.tokens_held(0), 8);
        assert_eq!(a.tokens_held(1), 17);
        // The full kind has 3 of 8 left: a second sequence of 16 tokens does not fit (its 4
        // sliding blocks do).
        let mut b = pool.new_seq();
        let err = pool.layout(&mut [&mut b], &[16], params).unwrap_err();
        assert_eq!(err.kind, "full");
        drop(b);
        assert_eq!(pool.usage(), [(3, 8), (5, 8)]);
        drop(a);
        assert_eq!(pool.usage(), [(0, 8), (0, 8)]);
    }

    #[test]
    fn prefix_blocks_are_shared_cached_and_evicted_oldest_first() {
        let mut pool = two_layer_pool(8).with_prefix_caching(true);
        let hasher = PrefixHasher::new();
        let hashes = |tokens: &[u32]| hashes(&hasher, tokens);
        let t: Vec<u32> = (0..14).collect();
        let mut a = pool.new_seq_reusing(hashes(&t), |p| p < t.len());
        assert_eq!(a.seq_len, 0, "nothing cached yet");
        pool.layout(&mut [&mut a], &[14], params).unwrap();
        pool.advance(&mut [&mut a], &[14]);
        // a holds full blocks 0..4 and sliding blocks 1..4; sliding block 0 left the window
        // registered, so it is cached, not free.
        assert_eq!(a.blocks_held(), [3, 4]);
        assert_eq!(pool.cached(), [1, 0]);
        assert_eq!(pool.available(), [5, 4]);

        // b shares a's first 12 tokens: 3 full blocks, and sliding blocks 1..3 (the window
        // before position 12), all held by a.
        let u: Vec<u32> = t[..12].iter().copied().chain([99; 6]).collect();
        let hit = pool.lookup(&hashes(&u), |p| p < u.len());
        assert_eq!(
            hit,
            PrefixHit {
                tokens: 12,
                in_use: [2, 3]
            }
        );
        // Not usable there: the next block boundary down.
        assert_eq!(pool.lookup(&hashes(&u), |p| p <= 8).tokens, 8);
        let b = pool.new_seq_reusing(hashes(&u), |p| p < u.len());
        assert_eq!((b.seq_len, b.tables[0].first), (12, 1));
        assert_eq!(
            a.exclusive(),
            [1, 1],
            "only a's last block of each kind is its own"
        );
        assert_eq!(pool.usage(), [(3, 8), (4, 8)], "shared blocks count once");
        drop(a);
        assert_eq!(pool.usage(), [(2, 8), (3, 8)]);
        assert_eq!(b.exclusive(), [2, 3]);
        drop(b);
        assert_eq!(pool.usage(), [(0, 8), (0, 8)]);
        assert_eq!(pool.cached(), [3, 3]);
        assert_eq!(pool.lookup(&hashes(&u), |p| p < u.len()).in_use, [0, 0]);

        // c needs 6 blocks of each kind: 5 are free, so one cached block goes, the least
        // recently released: sliding block 0 (out of the window first) and full block 2 (b
        // released its blocks last first). The prefix is then usable up to 8 tokens in full
        // layers, but the sliding layers lost block 0, so nothing is reused.
        let v: Vec<u32> = (100..124).collect();
        let mut c = pool.new_seq_reusing(hashes(&v), |p| p < v.len());
        pool.layout(&mut [&mut c], &[24], params).unwrap();
        assert_eq!(pool.lookup(&hashes(&u), |p| p < u.len()).tokens, 0);
        assert_eq!(pool.cached(), [2, 2]);
        // Held blocks are never evicted: with c's 6 and the 2 cached of each kind, a sequence
        // needing 3 more blocks fails instead.
        let mut d = pool.new_seq();
        let err = pool.layout(&mut [&mut d], &[12], params).unwrap_err();
        assert_eq!(err.kind, "sliding");
        drop(d);
        assert_eq!(c.blocks_held(), [6, 6]);
        drop(c);
        assert_eq!(pool.usage(), [(0, 8), (0, 8)]);
    }

    #[test]
    fn a_hit_is_cut_back_to_where_the_sliding_blocks_reach() {
        let mut pool = two_layer_pool(16).with_prefix_caching(true);
        let hasher = PrefixHasher::new();
        let hashes = |tokens: &[u32]| hashes(&hasher, tokens);
        // a runs 24 tokens: every block registered; sliding blocks 0..4 cached as they left
        // the window.
        let t: Vec<u32> = (0..24).collect();
        let mut a = pool.new_seq_reusing(hashes(&t), |p| p < t.len());
        pool.layout(&mut [&mut a], &[24], params).unwrap();
        pool.advance(&mut [&mut a], &[24]);
        assert_eq!(a.tables[0].first, 4);
        // Sharing a's first 20 tokens: reusable up to 20 while a holds the window's blocks.
        let u: Vec<u32> = t[..20].iter().copied().chain([99; 8]).collect();
        assert_eq!(pool.lookup(&hashes(&u), |p| p < u.len()).tokens, 20);
        // Evict a's sliding blocks 3 and 4 (by hand: pressure would take the oldest first).
        drop(a);
        {
            let mut lists = lock(&pool.blocks);
            let h = hashes(&t);
            for j in [3, 4] {
                let id = lists[0].by_hash[&h[j]];
                let key = lists[0].released_at[id as usize];
                lists[0].lru.remove(&key);
                lists[0].by_hash.remove(&h[j]);
                lists[0].hash[id as usize] = None;
                lists[0].free.push(id);
            }
        }
        // Reusing 20 tokens needs sliding blocks 3 and 4, 16 needs 2 and 3, 12 needs 1 and 2.
        assert_eq!(pool.lookup(&hashes(&u), |p| p < u.len()).tokens, 12);
    }
}
