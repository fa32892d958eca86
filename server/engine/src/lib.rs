//! The engine: owns the model on its own thread and runs requests with iteration-level
//! (continuous) scheduling. A request joins the running set at the next step; each step advances
//! every running sequence by one token; a finished, cancelled or disconnected request leaves at
//! once and its KV cache is dropped with it. It knows nothing of HTTP: requests come in through
//! `Engine::submit`, tokens go out through each request's own channel (TGI's router,
//! mistral.rs's engine).
//!
//! Each step is planned by `scheduler::plan` from the queues' states alone (admission, chunked
//! prefill under the token budget, preemption under the KV block budget; cancelled requests are
//! dropped before) and executed by `run_loop`: the decoding sequences sample their next tokens, then one forward
//! (`forward_step`) runs those tokens and every planned prefill chunk together: linears, norms
//! and MLP over all rows at once, and one paged attention call per layer in which each row reads
//! its own sequence's blocks. A preempted sequence loses its cache (its blocks) and is prefilled
//! again from its prompt and generated tokens when readmitted; its sampler and penalties carry
//! on, and nothing is sent twice, so the client sees only latency.
//!
//! Logits: each item of a forward says what its sampler will need of its row ([`Need`], decided
//! by `need` from the request): on a model with a device top-k, greedy, top-k sampling and
//! logprobs take only the row's top candidates and its log-sum-exp ([`StepLogits::Top`]), and
//! `gemma4_model::sampling::sample_top` draws from them the token `sample` draws from the row;
//! top_k = 0 sampling, penalties, logit bias and a forced token's logprob take the full row.
//!
//! Prefix caching (vLLM's automatic prefix caching): each sequence carries the chained hashes of
//! its full blocks (`PrefixHasher`: token ids, and the images a block holds). Before a step is
//! planned, each waiting sequence that could be admitted looks up the longest prefix the pool can
//! reuse (`StepModel::prefix_lookup`); the scheduler starts its first chunk there and counts only
//! the blocks no running sequence holds; at admission its cache takes those blocks. The pool
//! registers each block under its hash once written, so a later request (a conversation's next
//! turn, the same system prompt, a recompute after preemption) finds it.
//!
//! Images: a request carries its preprocessed images and a prompt in which each image is a run of
//! `n` image placeholder ids (the model's `image_token_id`). The engine encodes them (vision tower)
//! on its thread at the request's first prefill chunk, then hands each prefill chunk the soft-token
//! rows of the placeholders in that chunk. A chunk never ends inside a run of placeholders: one
//! image's soft tokens attend to each other bidirectionally, so they must be run in one call.

mod sampling;
pub mod scheduler;
#[cfg(feature = "scripted")]
pub mod scripted;
pub mod structured;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use gemma4_model::config::LayerKind;
use gemma4_model::generation::Rng;
use gemma4_model::kernels::pool::for_each_mut;
use gemma4_model::vision::PreprocessedImage;
use gemma4_model::Gemma4Backend;
use gemma4_model::{
    KvPool, Logits, Model, PrefixHasher, PrefixHit, SamplingParams, SeqKv, SeqStep,
};
pub use scheduler::{BlockBudget, Blocks, Keep};
use scheduler::{Limits, SeqId, SeqState, StepPlan};

/// What the engine needs of a model: a KV pool, a place in it per running sequence, and one
/// forward per step over a ragged batch (prefill chunks and decode tokens of many sequences
/// together) that returns the logits of each one's last token. Implemented by the Gemma 4 model
/// on any backend, and by `scripted::ScriptedModel` for server tests.
pub trait StepModel: 'static {
    /// Every running sequence's KV blocks; owned by the engine thread.
    type Pool;
    /// A sequence's place in the pool; dropping it frees its blocks. Send: the decoding
    /// sequences are sampled on a thread pool.
    type Cache: Send;
    /// The soft tokens (vision tower output) of one request's images, all images concatenated
    /// in prompt order: one row per image placeholder of the prompt.
    type Soft: Clone + Send;
    /// What the layers of each kind (sliding, full) keep of a sequence: how the scheduler counts
    /// blocks.
    fn kv_keep(&self) -> [Keep; 2] {
        [Keep::Nothing, Keep::All]
    }
    /// The pool: `blocks.num_kv_blocks` per kind, or growable when None; with
    /// `blocks.prefix_caching`, it keeps and reuses the KV of prefixes.
    fn new_pool(&self, blocks: &BlockBudget) -> Self::Pool;
    fn new_cache(&self, pool: &Self::Pool) -> Self::Cache;
    /// Blocks of each kind: (in use, in all).
    fn pool_usage(&self, pool: &Self::Pool) -> [(usize, usize); 2];
    /// Blocks of each kind the prefix cache keeps that no sequence holds.
    fn pool_cached(&self, _pool: &Self::Pool) -> [usize; 2] {
        [0, 0]
    }
    /// Prefix caching: the longest cached prefix of a sequence whose full blocks hash to
    /// `hashes` that its cache could reuse, ending at a block boundary `p` with `usable(p)`
    /// (see `KvPool::lookup`). A model without a prefix cache finds nothing.
    fn prefix_lookup(
        &self,
        _pool: &Self::Pool,
        _hashes: &[u64],
        _usable: &dyn Fn(usize) -> bool,
    ) -> PrefixHit {
        PrefixHit::default()
    }
    /// A new sequence's cache holding that prefix (it registers its own blocks under
    /// `hashes` as they are written, extended by [`StepItem::hashes`]); the tokens it holds.
    fn new_cache_reusing(
        &self,
        pool: &Self::Pool,
        _hashes: Vec<u64>,
        _usable: &dyn Fn(usize) -> bool,
    ) -> (Self::Cache, usize) {
        (self.new_cache(pool), 0)
    }
    /// Whether the pool keeps a prefix cache (`prefix_lookup` can find something).
    fn prefix_caching(&self) -> bool {
        false
    }
    /// Blocks of each kind a sequence can take now (free, or cached and held by none); None:
    /// a pool that shares nothing, whose free blocks the scheduler counts itself.
    fn blocks_available(&self, _pool: &Self::Pool) -> Option<[usize; 2]> {
        None
    }
    /// Blocks of each kind that dropping `cache` returns (those it shares with no other
    /// sequence); None: all it holds.
    fn blocks_exclusive(&self, _cache: &Self::Cache) -> Option<[usize; 2]> {
        None
    }
    /// The image placeholder id (`<|image|>`), when the model takes images.
    fn image_token_id(&self) -> Option<u32> {
        None
    }
    /// Soft tokens of a request's images, concatenated in order (None when there are none).
    fn encode_images(
        &self,
        images: &[Arc<PreprocessedImage>],
    ) -> Result<Option<Self::Soft>, String> {
        if images.is_empty() {
            Ok(None)
        } else {
            Err("this model does not take images".into())
        }
    }
    /// The largest `k` of [`Need::Top`] this model serves (its device top-k); None: it returns
    /// full rows only, whatever the need.
    fn top_k_limit(&self) -> Option<usize> {
        None
    }
    /// One forward: each item runs its tokens from where its cache ends (with `soft` the
    /// request's soft tokens and the rows of them that belong to the image placeholders among
    /// its tokens; a run of placeholders is never split); the logits of each item's last token,
    /// in order, as its `need` asks (a full row always serves).
    fn forward_step(
        &self,
        pool: &mut Self::Pool,
        items: &mut [StepItem<'_, Self>],
    ) -> Result<Vec<StepLogits>, String>;
}

/// What the sampler of a sequence needs of its next logits row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The whole row (top_k = 0 sampling, penalties, logit bias, a forced token's logprob).
    Row,
    /// The row's top `k` (descending, equal logits lower id first) and its log-sum-exp.
    Top(usize),
}

/// An item's logits as its [`Need`] asked.
#[derive(Debug, Clone, PartialEq)]
pub enum StepLogits {
    Row(Vec<f32>),
    /// The row's top `(id, logit)` pairs, descending, and the row's log-sum-exp.
    Top {
        top: Vec<(u32, f32)>,
        lse: f32,
    },
}

/// One sequence's part of a step.
pub struct StepItem<'a, M: StepModel + ?Sized> {
    pub tokens: &'a [u32],
    /// Prefix hashes of the sequence's full blocks so far (empty without prefix caching).
    pub hashes: &'a [u64],
    pub need: Need,
    pub soft: Option<(&'a M::Soft, Range<usize>)>,
    pub cache: &'a mut M::Cache,
}

impl<B: Gemma4Backend> StepModel for Model<B> {
    type Pool = KvPool<B>;
    type Cache = SeqKv;
    type Soft = burn::tensor::Tensor<B, 2>;
    fn kv_keep(&self) -> [Keep; 2] {
        let has = |kind| self.text.layers.iter().any(|l| l.self_attn.kind() == kind);
        let sliding = match self.text.sliding_window() {
            Some(w) if has(LayerKind::Sliding) => Keep::Last(gemma4_model::cache::sliding_keep(w)),
            _ => Keep::Nothing,
        };
        let full = if has(LayerKind::Full) {
            Keep::All
        } else {
            Keep::Nothing
        };
        [sliding, full]
    }
    fn new_pool(&self, blocks: &BlockBudget) -> KvPool<B> {
        self.text
            .new_pool(
                blocks.block_size,
                blocks.num_kv_blocks.map(|b| b.0),
                blocks.kv_dtype,
            )
            .with_prefix_caching(blocks.prefix_caching)
    }
    fn new_cache(&self, pool: &KvPool<B>) -> SeqKv {
        pool.new_seq()
    }
    fn pool_usage(&self, pool: &KvPool<B>) -> [(usize, usize); 2] {
        pool.usage()
    }
    fn prefix_lookup(
        &self,
        pool: &KvPool<B>,
        hashes: &[u64],
        usable: &dyn Fn(usize) -> bool,
    ) -> PrefixHit {
        pool.lookup(hashes, usable)
    }
    fn new_cache_reusing(
        &self,
        pool: &KvPool<B>,
        hashes: Vec<u64>,
        usable: &dyn Fn(usize) -> bool,
    ) -> (SeqKv, usize) {
        let seq = pool.new_seq_reusing(hashes, usable);
        let reused = seq.seq_len;
        (seq, reused)
    }
    fn prefix_caching(&self) -> bool {
        true
    }
    fn pool_cached(&self, pool: &KvPool<B>) -> [usize; 2] {
        pool.cached()
    }
    fn blocks_available(&self, pool: &KvPool<B>) -> Option<[usize; 2]> {
        Some(pool.available())
    }
    fn blocks_exclusive(&self, cache: &SeqKv) -> Option<[usize; 2]> {
        Some(cache.exclusive())
    }
    fn image_token_id(&self) -> Option<u32> {
        self.config.image_token_id
    }
    fn encode_images(
        &self,
        images: &[Arc<PreprocessedImage>],
    ) -> Result<Option<Self::Soft>, String> {
        if images.is_empty() {
            return Ok(None);
        }
        let soft = images
            .iter()
            .map(|img| self.encode_image(img).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(burn::tensor::Tensor::cat(soft, 0)))
    }
    fn top_k_limit(&self) -> Option<usize> {
        Some(self.text.vocab_size.min(gemma4_model::kernels::topk::MAX_K))
    }
    /// The rows that need all of it are copied to the host; for the others one top-k over those
    /// rows (at the largest `k` asked) brings `2k + 1` words per row.
    fn forward_step(
        &self,
        pool: &mut KvPool<B>,
        items: &mut [StepItem<'_, Self>],
    ) -> Result<Vec<StepLogits>, String> {
        let needs: Vec<Need> = items.iter().map(|i| i.need).collect();
        for item in items.iter_mut() {
            let known = item.cache.hashes.len().min(item.hashes.len());
            item.cache.hashes.extend_from_slice(&item.hashes[known..]);
        }
        let mut steps: Vec<SeqStep<B>> = items
            .iter_mut()
            .map(|item| SeqStep {
                tokens: item.tokens,
                soft: item
                    .soft
                    .as_ref()
                    .filter(|(_, r)| !r.is_empty())
                    .map(|(s, r)| {
                        let width = s.dims()[1];
                        (*s).clone().slice([r.clone(), 0..width])
                    }),
                kv: &mut *item.cache,
            })
            .collect();
        let logits = self
            .text
            .forward_step(pool, &mut steps, Logits::Last)
            .map_err(|e| e.to_string())?;
        Ok(fetch_logits(logits, &needs))
    }
}
/// Brings to the host what each row's need asks of logits `[n, vocab]` (see
/// [`StepModel::forward_step`]).
pub fn fetch_logits<B: Gemma4Backend>(
    logits: burn::tensor::Tensor<B, 2>,
    needs: &[Need],
) -> Vec<StepLogits> {
    let [n, vocab] = logits.dims();
    let k = needs
        .iter()
        .filter_map(|n| match n {
            Need::Top(k) => Some(*k),
            Need::Row => None,
        })
        .max();
    let (full, top_rows): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| needs[i] == Need::Row);
    // Rows `index` of the logits (all of them without a copy when that is every row).
    let pick = |index: &[usize]| {
        if index.len() == n {
            return logits.clone();
        }
        let index = burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(
                index.iter().map(|&i| i as i32).collect::<Vec<_>>(),
                [index.len()],
            ),
            &logits.device(),
        );
        logits.clone().select(0, index)
    };
    let mut rows = if full.is_empty() {
        vec![]
    } else {
        gemma4_model::to_host_f32(pick(&full))
    }
    .into_iter();
    // One top-k over the rows that asked for it, at the largest k asked.
    let top = k.map(|k| B::top_k_rows(pick(&top_rows), k.clamp(1, vocab)));
    let mut next_top = 0;
    needs
        .iter()
        .map(|need| match (need, &top) {
            (Need::Top(k), Some(top)) => {
                let r = next_top;
                next_top += 1;
                let mut row = top.row(r);
                row.truncate(*k);
                StepLogits::Top {
                    top: row,
                    lse: top.lse[r],
                }
            }
            _ => StepLogits::Row(rows.by_ref().take(vocab).collect()),
        })
        .collect()
}

use tokio::sync::mpsc as tokio_mpsc;

pub use sampling::{apply_penalties, top_logprobs, top_logprobs_of_top, Penalties, TokenLogprob};

/// What a caller asks the engine to run (already tokenized and validated against the context).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    /// Stop after sampling one of these ids (the id is reported, then the request finishes);
    /// an id of `forced_prefix` never stops it.
    pub stop_ids: Vec<u32>,
    /// Never sampled.
    pub suppress_ids: Vec<u32>,
    /// Some(k): report the chosen token's logprob and the k most likely alternatives.
    pub logprobs: Option<usize>,
    /// Emitted first, in place of sampling (e.g. `<|tool_call>call:NAME{` for a named
    /// `tool_choice`): the model continues from there.
    pub forced_prefix: Vec<u32>,
    /// The request's images in prompt order; image k is the k-th run of image placeholder ids
    /// in `prompt`, `num_soft_tokens` long. Encoded on the engine thread at the first prefill.
    pub images: Vec<Arc<PreprocessedImage>>,
    /// The grammar the answer must follow (structured outputs), from its first token (after
    /// the forced prefix).
    pub constraint: Option<structured::Constraint>,
}

impl EngineRequest {
    /// `prompt` continued greedily for `max_new_tokens` tokens: no stop ids, penalties,
    /// logprobs or images (benches and tests).
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        EngineRequest {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            penalties: Penalties::none(),
            stop_ids: vec![],
            suppress_ids: vec![],
            logprobs: None,
            forced_prefix: vec![],
            images: vec![],
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id was produced.
    Stop,
    /// max_new_tokens or the context limit was reached.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The request was admitted; `cached_tokens` of its prompt reuse the KV of a cached prefix
    /// (prefix caching). Sent once, before its first token.
    Admitted {
        cached_tokens: usize,
    },
    /// The prompt has been processed (for time-to-first-token accounting it precedes the first token).
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is taken and the waiting queue is full (HTTP 503).
    QueueFull { limit: usize },
    /// The engine is not running (still loading, failed, or shut down).
    NotReady,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { limit } => write!(
                f,
                "the server is overloaded: {limit} requests are already running or waiting (--max-num-seqs + --max-waiting)"
            ),
            SubmitError::NotReady => write!(f, "the engine is not ready"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences advanced together per step.
    pub max_num_seqs: usize,
    /// Prompt tokens prefilled per step, over all sequences (chunked prefill).
    pub prefill_chunk: usize,
    /// Requests that may wait for a slot: a submission finding `max_num_seqs + max_waiting`
    /// requests held gets QueueFull.
    pub max_waiting: usize,
    /// The KV block budget admission and preemption count against.
    pub blocks: BlockBudget,
}

/// Counters shared with the HTTP layer (Prometheus /metrics and /health).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub ready: AtomicBool,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Requests submitted whose handle is not dropped yet: what admission counts (the running
    /// and waiting counts trail the engine thread, which a burst outruns).
    pub held: AtomicUsize,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub requests_finished_total: AtomicU64,
    pub requests_cancelled_total: AtomicU64,
    pub steps_total: AtomicU64,
    /// Sequences preempted for KV blocks (to be recomputed).
    pub preemptions_total: AtomicU64,
    /// KV blocks held by running sequences, and in the pool (all layer kinds).
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Blocks of each kind (sliding, full) the prefix cache keeps that no running sequence
    /// holds: per kind, as their bytes differ.
    pub kv_blocks_cached: [AtomicUsize; 2],
    /// Prefix caching, as vLLM counts it: prompt tokens looked up at each request's first
    /// admission, and those found cached.
    pub prefix_cache_queries_total: AtomicU64,
    pub prefix_cache_hits_total: AtomicU64,
}

/// A submitted request: its event stream. Dropping it cancels the request (the engine notices
/// at its next step and frees the slot and the cache).
pub struct RequestHandle {
    pub events: tokio_mpsc::UnboundedReceiver<EngineEvent>,
    cancelled: Arc<AtomicBool>,
    /// Counts this request in `EngineStats::held` until dropped.
    stats: Arc<EngineStats>,
}

impl RequestHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
        self.stats.held.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Submitted {
    req: EngineRequest,
    /// Each image's prefix-cache identity (empty without prefix caching).
    image_hashes: Vec<u64>,
    tx: tokio_mpsc::UnboundedSender<EngineEvent>,
    cancelled: Arc<AtomicBool>,
}

enum Command {
    Submit(Box<Submitted>),
    Shutdown,
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    pub stats: Arc<EngineStats>,
    config: Arc<EngineConfig>,
    /// Prefix hashes (keyed per engine); images are hashed by `submit`, off the engine thread.
    hasher: PrefixHasher,
}

impl Engine {
    /// Starts the engine thread; `load` runs on it (the model never crosses threads).
    /// Returns once the model is loaded, or the load error. No block budget.
    pub fn start<M, F>(
        config: EngineConfig,
        load: F,
    ) -> anyhow::Result<(Engine, std::thread::JoinHandle<()>)>
    where
        M: StepModel,
        F: FnOnce() -> anyhow::Result<M> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let hasher = PrefixHasher::new();
        let thread_hasher = hasher.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("gemma4-engine".into())
            .spawn(move || {
                let model = match load() {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                thread_stats.ready.store(true, Ordering::SeqCst);
                // The block budget counts as the model's pool allocates.
                let mut config = config;
                config.blocks.keep = model.kv_keep();
                config.blocks.prefix_caching &= model.prefix_caching();
                let _ = ready_tx.send(Ok(config.clone()));
                run_loop(&model, &config, &rx, &thread_stats, &thread_hasher);
                thread_stats.ready.store(false, Ordering::SeqCst);
            })?;
        match ready_rx.recv() {
            Ok(Ok(config)) => Ok((
                Engine {
                    tx,
                    stats,
                    config: Arc::new(config),
                    hasher,
                },
                handle,
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => anyhow::bail!("the engine thread died while loading the model"),
        }
    }

    pub fn submit(&self, req: EngineRequest) -> Result<RequestHandle, SubmitError> {
        if !self.stats.ready.load(Ordering::SeqCst) {
            return Err(SubmitError::NotReady);
        }
        let limit = self.config.max_num_seqs + self.config.max_waiting;
        if self.stats.held.fetch_add(1, Ordering::SeqCst) >= limit {
            self.stats.held.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull { limit });
        }
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let image_hashes = match self.config.blocks.prefix_caching {
            true => req.images.iter().map(|i| self.hasher.image(i)).collect(),
            false => vec![],
        };
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let cmd = Command::Submit(Box::new(Submitted {
            req,
            image_hashes,
            tx,
            cancelled: cancelled.clone(),
        }));
        if self.tx.send(cmd).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.stats.held.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady);
        }
        Ok(RequestHandle {
            events: rx,
            cancelled,
            stats: self.stats.clone(),
        })
    }

    /// Asks the engine to stop after the current step; running requests get an error event.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

/// A request's sequence, waiting or running: its cache (while running), sampler and counters.
struct Seq<C, S> {
    id: SeqId,
    sub: Box<Submitted>,
    /// None while waiting: not yet admitted, or preempted (its cache dropped).
    cache: Option<C>,
    rng: Rng,
    generated: Vec<u32>,
    /// Tokens of the prompt, then of `generated`, in the cache (chunked prefill, recompute).
    computed: usize,
    /// Prompt tokens counted in `prompt_tokens_total`: a recompute does not count them again.
    prompt_counted: usize,
    /// Logits for the next token; an empty row until the cache holds prompt and generated tokens.
    next_logits: StepLogits,
    /// Soft tokens of the request's images, from the first prefill chunk until the prompt is done.
    soft: Option<S>,
    /// Rows of `soft` used by earlier prefill chunks.
    soft_used: usize,
    /// Prefix hashes of the full blocks of the prompt and generated tokens (empty without
    /// prefix caching).
    hashes: Vec<u64>,
    /// The image placeholder runs of the prompt and each image's hash (0 without prefix
    /// caching).
    image_keys: Vec<(Range<usize>, u64)>,
    /// Admitted at least once (the prefix hit of the first admission is what is reported).
    admitted: bool,
    /// The request's grammar state (taken from the request), advanced with every token drawn.
    constraint: Option<structured::Constraint>,
}

impl<C, S> Seq<C, S> {
    fn new(id: SeqId, mut sub: Box<Submitted>) -> Self {
        Seq {
            constraint: sub.req.constraint.take(),
            id,
            rng: Rng::new(sub.req.sampling.seed),
            sub,
            cache: None,
            generated: vec![],
            computed: 0,
            prompt_counted: 0,
            next_logits: StepLogits::Row(vec![]),
            soft: None,
            soft_used: 0,
            hashes: vec![],
            image_keys: vec![],
            admitted: false,
        }
    }

    /// Tokens of the prompt and generated so far.
    fn len(&self) -> usize {
        self.sub.req.prompt.len() + self.generated.len()
    }

    /// The scheduler's view, with `computed` tokens cached (a waiting sequence: its prefix
    /// hit), `held` blocks it need not take and `frees` blocks preempting it returns.
    fn state(&self, computed: usize, held: Blocks, frees: Blocks) -> SeqState<'_> {
        SeqState {
            id: self.id,
            prompt: &self.sub.req.prompt,
            len: self.len(),
            computed,
            held,
            frees,
        }
    }

    /// Whether a cached prefix of `p` tokens may be reused: at least one token is left to
    /// compute (for logits), and `p` does not split an image (its soft tokens attend to each
    /// other, so they run in one call).
    fn usable(&self, p: usize, image_id: Option<u32>) -> bool {
        let prompt = &self.sub.req.prompt;
        let splits = |id| p > 0 && p < prompt.len() && prompt[p - 1] == id && prompt[p] == id;
        p < self.len() && !image_id.is_some_and(splits)
    }

    /// The hashes of the blocks from the one holding token `from` on (blocks of `bs`).
    fn hashes_from(&self, from: usize, bs: usize) -> &[u64] {
        &self.hashes[(from / bs).min(self.hashes.len())..]
    }

    /// Extends `hashes` to every full block of the prompt and generated tokens (only the
    /// tokens of the blocks not hashed yet are read).
    fn extend_hashes(&mut self, hasher: &PrefixHasher, block_size: usize) {
        if self.hashes.len() < self.len() / block_size {
            let tokens = self.tokens(self.hashes.len() * block_size..self.len());
            hasher.extend(&mut self.hashes, &tokens, block_size, &self.image_keys);
        }
    }

    /// Tokens `range` of the prompt followed by the generated tokens.
    fn tokens(&self, range: Range<usize>) -> Vec<u32> {
        let prompt = &self.sub.req.prompt;
        prompt
            .iter()
            .chain(&self.generated)
            .skip(range.start)
            .take(range.len())
            .copied()
            .collect()
    }

    /// Drops the cache; the sequence will be prefilled again from its prompt and generated
    /// tokens. The sampler, generated tokens and what was sent stay.
    fn preempt(&mut self) {
        self.cache = None;
        self.computed = 0;
        self.next_logits = StepLogits::Row(vec![]);
        self.soft = None;
        self.soft_used = 0;
    }
}

/// A new request's sequence, or the error that refuses it: its images must match the prompt's
/// placeholder runs (one run of `num_soft_tokens` per image, in order). With prefix caching,
/// its prompt's block hashes (with the images') are computed here.
fn new_seq<C, S>(
    id: SeqId,
    sub: Box<Submitted>,
    image_id: Option<u32>,
    hashing: Option<(&PrefixHasher, usize)>,
) -> Result<Seq<C, S>, (Box<Submitted>, String)> {
    let req = &sub.req;
    let runs = match (image_id, req.images.is_empty()) {
        (_, true) => vec![],
        (None, false) => return Err((sub, "this model does not take images".into())),
        (Some(id), false) => gemma4_model::text_model::image_runs(&req.prompt, id),
    };
    let lens: Vec<usize> = runs.iter().map(|r| r.len()).collect();
    let expected: Vec<usize> = req.images.iter().map(|img| img.num_soft_tokens).collect();
    if lens != expected {
        let msg = format!("the prompt's image placeholder runs {lens:?} do not match the images' soft-token counts {expected:?}");
        return Err((sub, msg));
    }
    let hashes = sub.image_hashes.iter().copied().chain(std::iter::repeat(0));
    let image_keys = runs.into_iter().zip(hashes).collect();
    let mut seq = Seq::new(id, sub);
    seq.image_keys = image_keys;
    if let Some((hasher, block_size)) = hashing {
        seq.extend_hashes(hasher, block_size);
    }
    Ok(seq)
}

fn run_loop<M: StepModel>(
    model: &M,
    config: &EngineConfig,
    rx: &mpsc::Receiver<Command>,
    stats: &EngineStats,
    hasher: &PrefixHasher,
) {
    let limits = Limits {
        max_num_seqs: config.max_num_seqs,
        token_budget: config.prefill_chunk,
        blocks: config.blocks,
    };
    let mut pool = model.new_pool(&config.blocks);
    let image_id = model.image_token_id();
    let top_limit = model.top_k_limit();
    let block_size = config.blocks.block_size.max(1);
    let hashing = config.blocks.prefix_caching.then_some((hasher, block_size));
    let mut next_id: SeqId = 0;
    let mut waiting: VecDeque<Seq<M::Cache, M::Soft>> = VecDeque::new();
    // In admission order: the newest last, first to be preempted.
    let mut running: Vec<Seq<M::Cache, M::Soft>> = Vec::new();
    // The last images encoded and their soft tokens: the `n` choices of one request carry the
    // same images (the same `Arc`s), which are encoded once. Replaced by the next encode, and
    // dropped when the engine goes idle.
    let mut encoded: Option<(Vec<Arc<PreprocessedImage>>, M::Soft)> = None;
    loop {
        // Take new work: block only when there is nothing to do.
        let mut shutdown = false;
        let mut submitted = Vec::new();
        if running.is_empty() && waiting.is_empty() {
            let next = match rx.try_recv() {
                Ok(c) => Ok(c),
                Err(mpsc::TryRecvError::Empty) => {
                    encoded = None; // idle: nothing submitted can share them any more
                    rx.recv().map_err(|_| ())
                }
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            };
            match next {
                Ok(Command::Submit(s)) => submitted.push(s),
                Ok(Command::Shutdown) | Err(_) => shutdown = true,
            }
        }
        while !shutdown {
            match rx.try_recv() {
                Ok(Command::Submit(s)) => submitted.push(s),
                Ok(Command::Shutdown) => shutdown = true,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    shutdown = true;
                }
            }
        }
        for sub in submitted {
            match new_seq(next_id, sub, image_id, hashing) {
                Ok(seq) => waiting.push_back(seq),
                Err((sub, msg)) => {
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = sub.tx.send(EngineEvent::Error(msg));
                }
            }
            next_id += 1;
        }
        if shutdown {
            for s in running.iter().chain(waiting.iter()) {
                let _ = s
                    .sub
                    .tx
                    .send(EngineEvent::Error("the server is shutting down".into()));
            }
            stats.running.store(0, Ordering::SeqCst);
            stats.waiting.store(0, Ordering::SeqCst);
            stats.kv_blocks_used.store(0, Ordering::SeqCst);
            return;
        }

        // Gone requests (cancelled, disconnected) leave before the step is planned: their
        // blocks serve this step, and no prefix hit counts them as held by others. One that
        // goes later in the step is noticed at the next.
        for seq in running.extract_if(.., |s| is_gone(&s.sub)) {
            drop(seq);
            stats
                .requests_cancelled_total
                .fetch_add(1, Ordering::Relaxed);
        }
        let before = waiting.len();
        waiting.retain(|s| !is_gone(&s.sub));
        let gone = before - waiting.len();
        stats.waiting.fetch_sub(gone, Ordering::SeqCst);
        stats
            .requests_cancelled_total
            .fetch_add(gone as u64, Ordering::Relaxed);

        let plan = {
            let held = |s: &Seq<_, _>| limits.blocks.held(s.computed);
            let available = model.blocks_available(&pool).map_or_else(
                || {
                    let n = limits.blocks.num_kv_blocks.unwrap_or_default();
                    n.minus(
                        running
                            .iter()
                            .fold(Blocks::default(), |a, s| a.plus(held(s))),
                    )
                },
                Blocks,
            );
            let r: Vec<SeqState> = running
                .iter()
                .map(|s| {
                    let frees = s.cache.as_ref().and_then(|c| model.blocks_exclusive(c));
                    s.state(s.computed, held(s), frees.map_or(held(s), Blocks))
                })
                .collect();
            let w = match hashing {
                Some(_) => waiting_with_hits(model, &pool, &waiting, &running, &limits, image_id),
                None => waiting
                    .iter()
                    .map(|s| s.state(0, Blocks::default(), Blocks::default()))
                    .collect(),
            };
            scheduler::plan(&w, &r, &limits, available, image_id)
        };
        apply_queue_changes(
            &plan,
            &mut waiting,
            &mut running,
            model,
            &pool,
            &limits,
            stats,
            hashing.is_some().then_some(image_id),
        );

        let chunks: HashMap<SeqId, Range<usize>> = plan.prefill.into_iter().collect();
        // The decoding sequences sample their next token from their last step's logits (one
        // whose prefill completes in this step samples at the next).
        let decode: HashSet<SeqId> = plan
            .decode
            .into_iter()
            .filter(|id| !chunks.contains_key(id))
            .collect();
        // Each sequence samples on its own row with its own generator, so they run in parallel
        // (on the CPU kernels' threads, idle between forwards): at the real vocabulary a row
        // takes ~0.2 ms, 13 ms for 64 sequences on one thread. None: the client went away
        // before its token was sampled.
        let mut todo: Vec<_> = running
            .iter_mut()
            .filter(|seq| decode.contains(&seq.id))
            .map(|seq| (seq, None))
            .collect();
        for_each_mut(&mut todo, |(seq, outcome)| {
            *outcome = Some(
                (!is_gone(&seq.sub)).then(|| catch_unwind(AssertUnwindSafe(|| sample_next(seq)))),
            );
        });
        let mut sampled: HashMap<SeqId, Option<std::thread::Result<Next>>> = todo
            .into_iter()
            .filter_map(|(seq, outcome)| Some((seq.id, outcome?)))
            .collect();
        // This step's rows of each sequence that runs: a prefill chunk or its sampled token.
        let mut work: Vec<(SeqOf<M>, Option<Rows>)> = Vec::with_capacity(running.len());
        for mut seq in running.drain(..) {
            if let Some(chunk) = chunks.get(&seq.id) {
                if chunk.start != seq.computed {
                    // Planned on a prefix hit its admission did not find: never expected.
                    let msg = "internal error: the prefix cache changed during admission";
                    let _ = seq.sub.tx.send(EngineEvent::Error(msg.into()));
                    continue;
                }
                match prefill_rows(model, &mut seq, chunk.clone(), image_id, &mut encoded) {
                    Ok(rows) => work.push((seq, Some(rows))),
                    Err(e) => {
                        let _ = seq.sub.tx.send(EngineEvent::Error(e));
                    }
                }
                continue;
            }
            let Some(outcome) = sampled.remove(&seq.id) else {
                work.push((seq, None));
                continue;
            };
            let Some(outcome) = outcome else {
                stats
                    .requests_cancelled_total
                    .fetch_add(1, Ordering::Relaxed);
                continue; // blocks freed here
            };
            stats
                .generation_tokens_total
                .fetch_add(1, Ordering::Relaxed);
            match outcome {
                Ok(Next::Continue(id)) => {
                    if let Some((hasher, block_size)) = hashing {
                        seq.extend_hashes(hasher, block_size);
                    }
                    work.push((seq, Some(Rows::decode(id))))
                }
                Ok(Next::Done(reason)) => {
                    stats
                        .requests_finished_total
                        .fetch_add(1, Ordering::Relaxed);
                    let _ = seq.sub.tx.send(EngineEvent::Finished {
                        reason,
                        prompt_tokens: seq.sub.req.prompt.len(),
                        completion_tokens: seq.generated.len(),
                    });
                }
                Ok(Next::Failed(msg)) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error(msg));
                }
                Err(_) => {
                    let _ = seq
                        .sub
                        .tx
                        .send(EngineEvent::Error("internal error while sampling".into()));
                }
            }
        }

        // One forward for every row of the step.
        let mut failed = None;
        if work.iter().any(|(_, rows)| rows.is_some()) {
            let result = {
                // The masks the next samplers need, computed while the forward runs.
                let mut masks: Vec<&mut structured::Constraint> = vec![];
                let mut items: Vec<StepItem<M>> = work
                    .iter_mut()
                    .filter_map(|(seq, rows)| {
                        let rows = rows.as_ref()?;
                        let Seq {
                            cache,
                            soft,
                            sub,
                            generated,
                            hashes,
                            constraint,
                            ..
                        } = seq;
                        // A prefill chunk that leaves prompt tokens for later: its logits are
                        // dropped, so the least is fetched.
                        let dropped = rows.chunk.as_ref().is_some_and(|(chunk, _)| {
                            chunk.end < sub.req.prompt.len() + generated.len()
                        });
                        // A mask needs the whole row to apply to.
                        let masked = constraint.as_mut().filter(|c| !c.free_now());
                        let masked = match masked {
                            Some(c) if !dropped => {
                                masks.push(c);
                                true
                            }
                            _ => false,
                        };
                        Some(StepItem {
                            tokens: &rows.tokens,
                            hashes,
                            need: match top_limit {
                                Some(_) if dropped => Need::Top(1),
                                _ if masked => Need::Row,
                                _ => need(&sub.req, generated.len(), top_limit),
                            },
                            soft: soft.as_ref().map(|s| (s, rows.soft.clone())),
                            cache: cache.as_mut().expect("a running sequence has a cache"),
                        })
                    })
                    .collect();
                std::thread::scope(|s| {
                    if !masks.is_empty() {
                        s.spawn(|| {
                            let prepare = || masks.iter_mut().for_each(|c| c.prepare());
                            let _ = catch_unwind(AssertUnwindSafe(prepare));
                        });
                    }
                    catch_unwind(AssertUnwindSafe(|| {
                        model.forward_step(&mut pool, &mut items)
                    }))
                })
            };
            match result {
                Ok(Ok(logits)) => {
                    let ran = work.iter_mut().filter_map(|(s, r)| Some((s, r.take()?)));
                    for ((seq, rows), row) in ran.zip(logits) {
                        seq.ran(rows, row, stats);
                    }
                }
                Ok(Err(msg)) => failed = Some(msg),
                Err(_) => failed = Some("internal error in the model's forward".to_string()),
            }
        }
        running = work
            .into_iter()
            .filter_map(|(seq, rows)| match (&failed, rows) {
                (Some(msg), Some(_)) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error(msg.clone()));
                    None
                }
                _ => Some(seq),
            })
            .collect();

        stats.steps_total.fetch_add(1, Ordering::Relaxed);
        stats.running.store(running.len(), Ordering::SeqCst);
        let usage = model.pool_usage(&pool);
        stats
            .kv_blocks_used
            .store(usage[0].0 + usage[1].0, Ordering::SeqCst);
        stats
            .kv_blocks_total
            .store(usage[0].1 + usage[1].1, Ordering::SeqCst);
        for (gauge, n) in stats.kv_blocks_cached.iter().zip(model.pool_cached(&pool)) {
            gauge.store(n, Ordering::SeqCst);
        }
        if running.is_empty() && !waiting.is_empty() {
            // Nothing admitted (all cancelled or failed): yield briefly before retrying.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The scheduler's view of the waiting sequences, with the prefix hits of those that could be
/// admitted now. A sequence whose next block is one that a sequence ahead of it has yet to
/// compute (the `n` choices of a request, requests sharing a system prompt that arrive together)
/// waits until that block is computed rather than computing it a second time: it and those
/// behind it (FIFO) are left out of this step.
fn waiting_with_hits<'a, M: StepModel>(
    model: &M,
    pool: &M::Pool,
    waiting: &'a VecDeque<SeqOf<M>>,
    running: &[SeqOf<M>],
    limits: &Limits,
    image_id: Option<u32>,
) -> Vec<SeqState<'a>> {
    let bs = limits.blocks.block_size.max(1);
    let mut pending: HashSet<u64> = running
        .iter()
        .flat_map(|s| s.hashes_from(s.computed, bs))
        .copied()
        .collect();
    let slots = limits.max_num_seqs.saturating_sub(running.len());
    let mut states = Vec::with_capacity(slots);
    for s in waiting.iter().take(slots) {
        let hit = model.prefix_lookup(pool, &s.hashes, &|p| s.usable(p, image_id));
        if s.hashes
            .get(hit.tokens / bs)
            .is_some_and(|h| pending.contains(h))
        {
            break;
        }
        pending.extend(s.hashes_from(hit.tokens, bs));
        states.push(s.state(hit.tokens, Blocks(hit.in_use), Blocks::default()));
    }
    states
}

/// The plan's changes to the queues: aborted sequences leave, preempted ones go
/// back to the front of the waiting queue (oldest first), admitted ones get a fresh cache.
///
/// `caching`: Some(the image placeholder id) with prefix caching, under which an admitted
/// sequence takes the blocks of its cached prefix and starts after it.
#[allow(clippy::too_many_arguments)]
fn apply_queue_changes<M: StepModel>(
    plan: &StepPlan,
    waiting: &mut VecDeque<Seq<M::Cache, M::Soft>>,
    running: &mut Vec<Seq<M::Cache, M::Soft>>,
    model: &M,
    pool: &M::Pool,
    limits: &Limits,
    stats: &EngineStats,
    caching: Option<Option<u32>>,
) {
    let mut remove = |id: SeqId| {
        if let Some(i) = running.iter().position(|s| s.id == id) {
            return Some(running.remove(i));
        }
        let i = waiting.iter().position(|s| s.id == id)?;
        stats.waiting.fetch_sub(1, Ordering::SeqCst);
        waiting.remove(i)
    };
    for &id in &plan.aborted {
        if let Some(seq) = remove(id) {
            let msg = format!(
                "the request needs more KV cache than the engine holds ({:?} blocks of {} tokens per layer kind)",
                limits.blocks.num_kv_blocks.unwrap_or_default().0,
                limits.blocks.block_size
            );
            let _ = seq.sub.tx.send(EngineEvent::Error(msg));
        }
    }
    for &id in &plan.preempted {
        let Some(i) = running.iter().position(|s| s.id == id) else {
            continue;
        };
        let mut seq = running.remove(i);
        seq.preempt();
        waiting.push_front(seq);
        stats.waiting.fetch_add(1, Ordering::SeqCst);
        stats.preemptions_total.fetch_add(1, Ordering::Relaxed);
    }
    for &id in &plan.admitted {
        let Some(mut seq) = waiting.pop_front() else {
            break;
        };
        debug_assert_eq!(seq.id, id, "admitted from the front");
        stats.waiting.fetch_sub(1, Ordering::SeqCst);
        let (cache, reused) = match caching {
            Some(image_id) => {
                model.new_cache_reusing(pool, seq.hashes.clone(), &|p| seq.usable(p, image_id))
            }
            None => (model.new_cache(pool), 0),
        };
        seq.cache = Some(cache);
        seq.computed = reused;
        if !seq.admitted && caching.is_some() {
            let prompt = seq.sub.req.prompt.len() as u64;
            stats
                .prefix_cache_queries_total
                .fetch_add(prompt, Ordering::Relaxed);
            stats
                .prefix_cache_hits_total
                .fetch_add(reused as u64, Ordering::Relaxed);
        }
        if !seq.admitted {
            seq.admitted = true;
            let _ = seq.sub.tx.send(EngineEvent::Admitted {
                cached_tokens: reused,
            });
        }
        running.push(seq);
    }
}

/// A running sequence of model `M`.
type SeqOf<M> = Seq<<M as StepModel>::Cache, <M as StepModel>::Soft>;

/// A sequence's rows in a step: its tokens, the soft-token rows of the image placeholders among
/// them, and what running them means.
struct Rows {
    tokens: Vec<u32>,
    soft: Range<usize>,
    /// Some: a prefill chunk (positions in prompt + generated) and the prompt part of it.
    chunk: Option<(Range<usize>, Range<usize>)>,
}

impl Rows {
    fn decode(id: u32) -> Rows {
        Rows {
            tokens: vec![id],
            soft: 0..0,
            chunk: None,
        }
    }
}

/// The rows of one prefill chunk (`chunk` of the prompt and generated tokens); encodes the
/// request's images at its first chunk that holds placeholders: those wholly before the chunk
/// are in the KV of a reused prefix and are not encoded again.
fn prefill_rows<M: StepModel>(
    model: &M,
    seq: &mut Seq<M::Cache, M::Soft>,
    chunk: Range<usize>,
    image_id: Option<u32>,
    encoded: &mut Option<(Vec<Arc<PreprocessedImage>>, M::Soft)>,
) -> Result<Rows, String> {
    let tokens = seq.tokens(chunk.clone());
    let prompt_len = seq.sub.req.prompt.len();
    // Only the prompt holds image placeholders (a generated one is a plain token).
    let in_prompt = chunk.start.min(prompt_len)..chunk.end.min(prompt_len);
    let placeholders = image_id.map_or(0, |id| {
        seq.sub.req.prompt[in_prompt.clone()]
            .iter()
            .filter(|&&t| t == id)
            .count()
    });
    let done = seq
        .image_keys
        .iter()
        .filter(|(run, _)| run.end <= chunk.start);
    let skip = done.count();
    if seq.soft.is_none() && skip < seq.sub.req.images.len() {
        let images = &seq.sub.req.images[skip..];
        let soft = catch_unwind(AssertUnwindSafe(|| {
            encode_request_images(model, images, encoded)
        }));
        seq.soft = soft.map_err(|_| "internal error while encoding images".to_string())??;
        seq.soft_used = 0;
    }
    Ok(Rows {
        tokens,
        soft: seq.soft_used..seq.soft_used + placeholders,
        chunk: Some((chunk, in_prompt)),
    })
}

impl<C, S> Seq<C, S> {
    /// After the forward that ran `rows`: the cache holds them; `logits` (of their last token)
    /// become the pending row once the prompt and generated tokens are all in.
    fn ran(&mut self, rows: Rows, logits: StepLogits, stats: &EngineStats) {
        let Some((chunk, in_prompt)) = rows.chunk else {
            self.computed += 1;
            self.next_logits = logits;
            return;
        };
        let new_prompt = in_prompt.end.saturating_sub(self.prompt_counted);
        stats
            .prompt_tokens_total
            .fetch_add(new_prompt as u64, Ordering::Relaxed);
        self.prompt_counted = self.prompt_counted.max(in_prompt.end);
        self.computed = chunk.end;
        self.soft_used = rows.soft.end;
        if chunk.end == self.sub.req.prompt.len() + self.generated.len() {
            self.next_logits = logits;
            self.soft = None; // the soft tokens live on in the KV cache only
        }
    }
}

/// Encodes `images` (the request's images from the first one not yet in the KV cache), or takes
/// the soft tokens of `encoded` when those are of the same images (another choice of the same
/// request).
fn encode_request_images<M: StepModel>(
    model: &M,
    images: &[Arc<PreprocessedImage>],
    encoded: &mut Option<(Vec<Arc<PreprocessedImage>>, M::Soft)>,
) -> Result<Option<M::Soft>, String> {
    if let Some((done, soft)) = encoded {
        if same_images(done, images) {
            return Ok(Some(soft.clone()));
        }
    }
    let soft = model.encode_images(images)?;
    if let Some(s) = &soft {
        *encoded = Some((images.to_vec(), s.clone()));
    }
    Ok(soft)
}

/// The same image objects in the same order (not merely equal pixels).
fn same_images(a: &[Arc<PreprocessedImage>], b: &[Arc<PreprocessedImage>]) -> bool {
    !a.is_empty() && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

fn is_gone(sub: &Submitted) -> bool {
    sub.cancelled.load(Ordering::Relaxed) || sub.tx.is_closed()
}

enum Next {
    /// Reported; run it through the model.
    Continue(u32),
    Done(FinishReason),
    /// The request cannot go on (its grammar failed, or allows no token).
    Failed(String),
}

/// What sampling a request's next token needs of its logits (`generated` tokens so far), for a
/// model that serves top-k up to `limit` (None: rows only): the fewest top candidates that decide
/// the same token and logprobs as the full row, or the row itself.
fn need(req: &EngineRequest, generated: usize, limit: Option<usize>) -> Need {
    let Some(limit) = limit else {
        return Need::Row;
    };
    // Penalties and biases change logits the top-k never saw.
    if !req.penalties.is_noop() {
        return Need::Row;
    }
    let sampling = match req.forced_prefix.get(generated) {
        // A forced token's logprob needs its logit, wherever it ranks.
        Some(_) if req.logprobs.is_some() => return Need::Row,
        Some(_) => Some(1),
        None => gemma4_model::sampling::top_needed(&req.sampling, &req.suppress_ids),
    };
    match sampling.map(|k| k.max(req.logprobs.unwrap_or(0))) {
        Some(k) if k <= limit => Need::Top(k),
        _ => Need::Row,
    }
}

/// Samples the next token from the pending logits and reports it; says whether the request
/// goes on (and with which token) or is finished.
fn sample_next<C, S>(seq: &mut Seq<C, S>) -> Next {
    let req = &seq.sub.req;
    let forced = req.forced_prefix.get(seq.generated.len()).copied();
    // The grammar's mask (a constrained sequence always has its full row: `need`).
    let mask = match (&mut seq.constraint, forced) {
        (Some(c), None) => match c.allowed() {
            Ok(mask) => mask,
            Err(e) => return Next::Failed(format!("structured output: {e}")),
        },
        _ => None,
    };
    let (id, logprob) = match &mut seq.next_logits {
        StepLogits::Row(row) => {
            // Logprobs of the model's distribution (raw logits, before penalties and
            // temperature), as vLLM.
            let raw = req.logprobs.map(|_| row.clone());
            apply_penalties(row, &req.penalties, &req.prompt, &seq.generated);
            if let Some(mask) = &mask {
                structured::apply_mask(row, mask);
                let open = |(i, x): (usize, &f32)| {
                    x.is_finite() && !req.suppress_ids.contains(&(i as u32))
                };
                if !row.iter().enumerate().any(open) {
                    return Next::Failed("structured output: the grammar allows no token".into());
                }
            }
            let id = forced.unwrap_or_else(|| {
                gemma4_model::generation::sample(
                    row,
                    &req.sampling,
                    &req.suppress_ids,
                    &mut seq.rng,
                )
            });
            let logprob = raw.map(|row| top_logprobs(&row, id, req.logprobs.unwrap_or(0)));
            (id, logprob)
        }
        // `need` asked for these: no penalties, no grammar, and enough candidates for the draw.
        StepLogits::Top { .. } if mask.is_some() => {
            return Next::Failed("internal error: a constrained sequence got no full row".into())
        }
        StepLogits::Top { top, lse } => {
            let id = forced.unwrap_or_else(|| {
                gemma4_model::sampling::sample_top(
                    top,
                    &req.sampling,
                    &req.suppress_ids,
                    &mut seq.rng,
                )
            });
            let logprob = req.logprobs.map(|k| top_logprobs_of_top(top, *lse, id, k));
            (id, logprob)
        }
    };
    seq.generated.push(id);
    let mut grammar_done = false;
    if let (Some(c), None) = (&mut seq.constraint, forced) {
        if let Err(e) = c.consume(id) {
            return Next::Failed(format!("structured output: {e}"));
        }
        grammar_done = c.is_done();
    }
    if seq.sub.tx.send(EngineEvent::Token { id, logprob }).is_err() {
        return Next::Done(FinishReason::Stop); // receiver gone: stop now
    }
    if grammar_done {
        return Next::Done(FinishReason::Stop);
    }
    // A forced token is the caller's, not the model's: it never ends the request (a prompt
    // replayed for its logprobs may hold an end-of-turn id).
    if forced.is_none() && req.stop_ids.contains(&id) {
        return Next::Done(FinishReason::Stop);
    }
    if seq.generated.len() >= req.max_new_tokens {
        return Next::Done(FinishReason::Length);
    }
    Next::Continue(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_logits_brings_each_row_what_it_needs() {
        // Rows that need all of it come back whole; the others their top k (of the row they
        // are, not of their index among the top rows) and the row's log-sum-exp.
        type B = gemma4_model::CpuBackend;
        let (n, vocab) = (5, 300);
        let mut rng = Rng::new(7);
        let flat: Vec<f32> = (0..n * vocab)
            .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
            .collect();
        let logits = burn::tensor::Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(flat.clone(), [n, vocab]),
            &Default::default(),
        );
        let needs = [
            Need::Row,
            Need::Top(3),
            Need::Row,
            Need::Top(7),
            Need::Top(1),
        ];
        let got = fetch_logits(logits, &needs);
        for (i, (need, got)) in needs.iter().zip(&got).enumerate() {
            let row = &flat[i * vocab..(i + 1) * vocab];
            match (need, got) {
                (Need::Row, StepLogits::Row(r)) => assert_eq!(r.as_slice(), row, "row {i}"),
                (Need::Top(k), StepLogits::Top { top, lse }) => {
                    assert_eq!(top, &gemma4_model::sampling::top_k(row, *k, &[]), "row {i}");
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
                    let expected = max + sum.ln() as f32;
                    assert!(
                        (lse - expected).abs() < 1e-4,
                        "row {i}: lse {lse} vs {expected}"
                    );
                }
                _ => panic!("row {i}: {need:?} answered by {got:?}"),
            }
        }
    }
    use std::sync::Mutex;

    /// Each prefill chunk and the soft rows it was given.
    type Chunks = Vec<(Vec<u32>, Range<usize>)>;

    /// Records every prefill chunk and the soft rows it was given.
    struct Recording {
        log: Arc<Mutex<Chunks>>,
        encodes: Arc<AtomicUsize>,
        /// Held by the test while it submits, so that encoding waits for every submission.
        gate: Arc<Mutex<()>>,
    }

    impl StepModel for Recording {
        type Pool = ();
        type Cache = ();
        type Soft = Vec<u32>; // one "row" per soft token: its index
        fn new_pool(&self, _: &BlockBudget) {}
        fn new_cache(&self, _: &()) {}
        fn pool_usage(&self, _: &()) -> [(usize, usize); 2] {
            [(0, 0); 2]
        }
        fn image_token_id(&self) -> Option<u32> {
            Some(5)
        }
        fn encode_images(
            &self,
            images: &[Arc<PreprocessedImage>],
        ) -> Result<Option<Vec<u32>>, String> {
            let _submitted = self.gate.lock().unwrap();
            self.encodes.fetch_add(1, Ordering::SeqCst);
            let n: usize = images.iter().map(|i| i.num_soft_tokens).sum();
            Ok(Some((0..n as u32).collect()))
        }
        fn forward_step(
            &self,
            _: &mut (),
            items: &mut [StepItem<'_, Self>],
        ) -> Result<Vec<StepLogits>, String> {
            let mut rows_out = vec![];
            for item in items.iter() {
                let rows = item.soft.as_ref().map_or(0..0, |(s, r)| {
                    assert!(r.end <= s.len());
                    r.clone()
                });
                // Decode rows are not prefill chunks: only chunks are recorded.
                if item.tokens.len() > 1 || !rows.is_empty() || item.soft.is_some() {
                    self.log.lock().unwrap().push((item.tokens.to_vec(), rows));
                }
                let mut logits = vec![0.0; 16];
                logits[15] = 10.0;
                rows_out.push(StepLogits::Row(logits));
            }
            Ok(rows_out)
        }
    }

    fn image(n: usize) -> Arc<PreprocessedImage> {
        Arc::new(PreprocessedImage {
            pixel_values: vec![],
            positions: vec![],
            patches_h: 0,
            patches_w: 0,
            num_soft_tokens: n,
        })
    }

    fn request(prompt: Vec<u32>, images: Vec<Arc<PreprocessedImage>>) -> EngineRequest {
        EngineRequest {
            images,
            ..EngineRequest::greedy(prompt, 1)
        }
    }

    fn run(prompt: Vec<u32>, images: Vec<Arc<PreprocessedImage>>) -> (Chunks, Vec<EngineEvent>) {
        let (log, mut events, _) = run_all(vec![request(prompt, images)]);
        (log, events.remove(0))
    }

    /// Runs the requests to completion together; the events of each, and the encode calls.
    fn run_all(requests: Vec<EngineRequest>) -> (Chunks, Vec<Vec<EngineEvent>>, usize) {
        let log = Arc::new(Mutex::new(vec![]));
        let encodes = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(()));
        let (l, e, g) = (log.clone(), encodes.clone(), gate.clone());
        let config = EngineConfig {
            max_num_seqs: 2,
            prefill_chunk: 3,
            max_waiting: 4,
            blocks: BlockBudget::default(),
        };
        let (engine, thread) = Engine::start(config, move || {
            Ok(Recording {
                log: l,
                encodes: e,
                gate: g,
            })
        })
        .unwrap();
        let submitting = gate.lock().unwrap();
        let handles: Vec<_> = requests
            .into_iter()
            .map(|r| engine.submit(r).unwrap())
            .collect();
        drop(submitting);
        let mut all = vec![];
        for mut h in handles {
            let mut events = vec![];
            while let Some(e) = h.events.blocking_recv() {
                let done = matches!(e, EngineEvent::Finished { .. } | EngineEvent::Error(_));
                events.push(e);
                if done {
                    break;
                }
            }
            all.push(events);
        }
        engine.shutdown();
        thread.join().unwrap();
        let log = log.lock().unwrap().clone();
        (log, all, encodes.load(Ordering::SeqCst))
    }

    #[test]
    fn a_burst_is_admitted_up_to_slots_plus_queue() {
        // Admission counts the requests held by clients, not the engine's trailing counts: a
        // burst faster than the engine thread still gets exactly max_num_seqs + max_waiting.
        let config = EngineConfig {
            max_num_seqs: 2,
            prefill_chunk: 3,
            max_waiting: 3,
            blocks: BlockBudget::default(),
        };
        let (engine, thread) = Engine::start(config, || {
            Ok(Recording {
                log: Default::default(),
                encodes: Default::default(),
                gate: Default::default(),
            })
        })
        .unwrap();
        let mut held: Vec<_> = (0..5)
            .map(|_| engine.submit(request(vec![1, 2, 3], vec![])).unwrap())
            .collect();
        let refused = engine.submit(request(vec![1, 2, 3], vec![]));
        assert_eq!(refused.err(), Some(SubmitError::QueueFull { limit: 5 }));
        // A client that lets go (finished, or gone) makes room at once.
        held.pop();
        held.push(engine.submit(request(vec![1, 2, 3], vec![])).unwrap());
        assert!(engine.submit(request(vec![1, 2, 3], vec![])).is_err());
        drop(held);
        assert_eq!(engine.stats.held.load(Ordering::SeqCst), 0);
        engine.shutdown();
        thread.join().unwrap();
    }

    #[test]
    fn choices_of_one_request_encode_their_images_once() {
        // `n` choices carry the same image objects: one encode, each choice gets the soft rows.
        let prompt = vec![1, 9, 5, 5, 5, 5, 8];
        let images = vec![image(4)];
        let (log, events, encodes) = run_all(vec![
            request(prompt.clone(), images.clone()),
            request(prompt.clone(), images),
        ]);
        assert_eq!(encodes, 1);
        assert_eq!(
            log.iter().filter(|(_, rows)| *rows == (0..4)).count(),
            2,
            "{log:?}"
        );
        assert!(
            events
                .iter()
                .all(|e| matches!(e.last(), Some(EngineEvent::Finished { .. }))),
            "{events:?}"
        );
        // Equal images in distinct objects (two requests) are encoded each.
        let (_, _, encodes) = run_all(vec![
            request(prompt.clone(), vec![image(4)]),
            request(prompt, vec![image(4)]),
        ]);
        assert_eq!(encodes, 2);
    }

    #[test]
    fn prefill_hands_each_chunk_its_soft_rows() {
        let prompt = vec![1, 9, 5, 5, 5, 5, 8, 2, 9, 5, 5, 8, 3];
        let (log, events) = run(prompt.clone(), vec![image(4), image(2)]);
        let chunks: Vec<Vec<u32>> = log.iter().map(|(c, _)| c.clone()).collect();
        assert_eq!(chunks.concat(), prompt);
        assert_eq!(
            log,
            vec![
                (vec![1, 9, 5, 5, 5, 5], 0..4),
                (vec![8, 2, 9], 4..4),
                (vec![5, 5, 8], 4..6),
                (vec![3], 6..6)
            ]
        );
        assert!(
            matches!(
                events.last(),
                Some(EngineEvent::Finished {
                    prompt_tokens: 13,
                    ..
                })
            ),
            "{events:?}"
        );
    }

    /// A deterministic fake whose logits depend on every token of the sequence so far, so a
    /// recompute that misses or reorders a token changes what comes next.
    struct Hashing {
        /// Held by the test while it submits, so that all requests are running together.
        gate: Arc<Mutex<()>>,
        /// Serves [`Need::Top`] (by the host selection the CPU backend uses), else rows only.
        top: bool,
    }

    const VOCAB: usize = 64;

    impl StepModel for Hashing {
        type Pool = ();
        type Cache = Vec<u32>;
        type Soft = ();
        fn new_pool(&self, _: &BlockBudget) {}
        fn new_cache(&self, _: &()) -> Vec<u32> {
            vec![]
        }
        fn pool_usage(&self, _: &()) -> [(usize, usize); 2] {
            [(0, 0); 2]
        }
        fn top_k_limit(&self) -> Option<usize> {
            self.top.then_some(VOCAB)
        }
        fn forward_step(
            &self,
            _: &mut (),
            items: &mut [StepItem<'_, Self>],
        ) -> Result<Vec<StepLogits>, String> {
            drop(self.gate.lock().unwrap());
            let mut out = vec![];
            for item in items.iter_mut() {
                item.cache.extend_from_slice(item.tokens);
                let h = item.cache.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
                    (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3)
                });
                let row: Vec<f32> = (0..VOCAB as u64)
                    .map(|j| {
                        let x = (h ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                            .wrapping_mul(0xff51_afd7_ed55_8ccd);
                        // On a 1/16 grid: ties, which the top-k must order as the sampler does.
                        ((x >> 40) as f32 / (1u64 << 24) as f32 * 64.0).round() / 16.0 - 2.0
                    })
                    .collect();
                out.push(match item.need {
                    Need::Top(k) if self.top => {
                        let t = gemma4_model::kernels::topk::select_host(&row, VOCAB, k);
                        StepLogits::Top {
                            top: t.row(0),
                            lse: t.lse[0],
                        }
                    }
                    _ => StepLogits::Row(row),
                });
            }
            Ok(out)
        }
    }

    /// Runs the requests together; each one's tokens (or its error) and the engine's counters.
    fn generate(
        requests: &[EngineRequest],
        config: EngineConfig,
        blocks: BlockBudget,
        top: bool,
    ) -> (Vec<Result<Vec<u32>, String>>, Arc<EngineStats>) {
        let gate = Arc::new(Mutex::new(()));
        let g = gate.clone();
        let (engine, thread) = Engine::start(EngineConfig { blocks, ..config }, move || {
            Ok(Hashing { gate: g, top })
        })
        .unwrap();
        let submitting = gate.lock().unwrap();
        let handles: Vec<_> = requests
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        drop(submitting);
        let mut outputs = vec![];
        for mut h in handles {
            let mut tokens = vec![];
            let out = loop {
                match h.events.blocking_recv() {
                    Some(EngineEvent::Token { id, .. }) => tokens.push(id),
                    Some(EngineEvent::Finished {
                        completion_tokens, ..
                    }) => {
                        assert_eq!(completion_tokens, tokens.len());
                        break Ok(tokens);
                    }
                    Some(EngineEvent::Error(e)) => break Err(e),
                    Some(EngineEvent::Admitted { .. }) => {}
                    None => break Err("closed".into()),
                }
            };
            outputs.push(out);
        }
        engine.shutdown();
        thread.join().unwrap();
        (outputs, engine.stats.clone())
    }

    #[test]
    fn preempted_requests_generate_what_they_generate_alone() {
        // 24 requests, greedy and seeded, in a pool of 5 blocks of 16 tokens (the longest
        // request needs 4): preemption is forced, and every output must equal the run alone.
        let requests: Vec<EngineRequest> = (0..24u32)
            .map(|i| {
                let prompt = (0..3 + i * 7 % 38).map(|t| (t * 13 + i) % 60).collect();
                let mut r = request(prompt, vec![]);
                r.max_new_tokens = 5 + i as usize % 16;
                if i % 2 == 1 {
                    r.sampling.temperature = 1.0;
                    r.sampling.seed = u64::from(i);
                    r.penalties.frequency = 0.5;
                }
                if i % 6 == 2 {
                    r.forced_prefix = vec![7, 8];
                }
                r
            })
            .collect();
        let config = EngineConfig {
            max_num_seqs: 12,
            prefill_chunk: 16,
            max_waiting: 64,
            blocks: BlockBudget::default(),
        };
        let alone: Vec<_> = requests
            .iter()
            .map(|r| {
                let (mut out, _) = generate(
                    std::slice::from_ref(r),
                    config.clone(),
                    BlockBudget::default(),
                    true,
                );
                out.remove(0).unwrap()
            })
            .collect();
        let blocks = BlockBudget {
            num_kv_blocks: Some(Blocks([5, 5])),
            block_size: 16,
            ..BlockBudget::default()
        };
        let (together, stats) = generate(&requests, config, blocks, true);
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(Ok(a), t.as_ref(), "request {i}");
        }
        assert!(stats.preemptions_total.load(Ordering::SeqCst) > 0);
        assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn top_k_logits_generate_what_full_rows_generate() {
        // The same requests on a model that returns full rows and on one that serves the top-k
        // the engine asks for: greedy, the 31B's sampling (t 1, top_k 64, top_p 0.95) and
        // smaller top-k with suppressed ids, min-p, logprobs, a forced prefix; top_k = 0 and
        // penalties take rows on both. Every token must be the same.
        let requests: Vec<EngineRequest> = (0..16u32)
            .map(|i| {
                let prompt = (0..3 + i % 5).map(|t| (t * 7 + i) % 60).collect();
                let mut r = request(prompt, vec![]);
                r.max_new_tokens = 24;
                r.sampling.seed = u64::from(i);
                if i % 4 != 0 {
                    r.sampling.temperature = [1.0, 0.7, 1.3][i as usize % 3];
                    r.sampling.top_k = [64, 5, 1, 0][i as usize / 4];
                    r.sampling.top_p = [0.95, 1.0][i as usize % 2];
                }
                if i % 5 == 1 {
                    r.suppress_ids = vec![3, 17, 40];
                    r.sampling.top_k = r.sampling.top_k.min(8);
                }
                if i % 7 == 2 {
                    r.sampling.min_p = 0.1;
                }
                if i % 3 == 1 {
                    r.logprobs = Some(4);
                }
                if i % 6 == 3 {
                    r.forced_prefix = vec![7, 8];
                }
                if i == 14 {
                    r.penalties.frequency = 0.5;
                }
                r
            })
            .collect();
        assert!(requests
            .iter()
            .any(|r| need(r, 0, Some(VOCAB)) == Need::Top(64)));
        let config = EngineConfig {
            max_num_seqs: 16,
            prefill_chunk: 16,
            max_waiting: 64,
            blocks: BlockBudget::default(),
        };
        let (rows, _) = generate(&requests, config.clone(), BlockBudget::default(), false);
        let (top, _) = generate(&requests, config, BlockBudget::default(), true);
        for (i, (a, b)) in rows.iter().zip(&top).enumerate() {
            assert_eq!(a, b, "request {i}: {:?}", requests[i].sampling);
        }
    }

    #[test]
    fn a_forced_stop_id_does_not_end_the_request() {
        // The forced prefix holds a stop id: it is emitted, and the request goes on.
        let mut r = request(vec![1, 2, 3], vec![]);
        r.forced_prefix = vec![7, 8, 9];
        r.stop_ids = vec![8];
        r.max_new_tokens = 3;
        let config = EngineConfig {
            max_num_seqs: 4,
            prefill_chunk: 16,
            max_waiting: 4,
            blocks: BlockBudget::default(),
        };
        let (out, _) = generate(&[r], config, BlockBudget::default(), true);
        assert_eq!(out[0], Ok(vec![7, 8, 9]));
    }

    #[test]
    fn need_asks_for_the_least_that_decides() {
        let mut r = request(vec![1, 2], vec![]);
        assert_eq!(need(&r, 0, None), Need::Row, "a model without top-k");
        assert_eq!(need(&r, 0, Some(256)), Need::Top(1), "greedy");
        r.suppress_ids = vec![4, 4, 9];
        assert_eq!(need(&r, 0, Some(256)), Need::Top(3));
        r.logprobs = Some(5);
        assert_eq!(need(&r, 0, Some(256)), Need::Top(5));
        r.sampling.temperature = 1.0;
        r.sampling.top_k = 64;
        assert_eq!(need(&r, 0, Some(256)), Need::Top(66));
        assert_eq!(need(&r, 0, Some(64)), Need::Row, "past the limit");
        r.forced_prefix = vec![7];
        assert_eq!(
            need(&r, 0, Some(256)),
            Need::Row,
            "a forced token's logprob"
        );
        assert_eq!(need(&r, 1, Some(256)), Need::Top(66));
        r.sampling.top_k = 0;
        assert_eq!(need(&r, 1, Some(256)), Need::Row, "top_k 0 needs the mass");
        r.sampling.top_k = 64;
        r.penalties.repetition = 1.1;
        assert_eq!(need(&r, 1, Some(256)), Need::Row, "penalties");
    }

    /// Runs `requests` on the tiny fixture model (CPU) with the pool `blocks`; each one's
    /// tokens and the engine's counters once every block is back.
    fn tiny_model_run(
        requests: &[EngineRequest],
        config: &EngineConfig,
        blocks: BlockBudget,
    ) -> (Vec<Vec<u32>>, Arc<EngineStats>) {
        let dir = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/tiny-31b-recipe"
        ));
        let load = move || {
            Ok(Model::<gemma4_model::CpuBackend>::load(
                dir,
                &Default::default(),
            )?)
        };
        let config = EngineConfig {
            blocks,
            ..config.clone()
        };
        let (engine, thread) = Engine::start(config, load).unwrap();
        let handles: Vec<_> = requests
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        let outputs: Vec<Vec<u32>> = handles
            .into_iter()
            .map(|mut h| {
                let mut tokens = vec![];
                while let Some(e) = h.events.blocking_recv() {
                    match e {
                        EngineEvent::Token { id, .. } => tokens.push(id),
                        EngineEvent::Finished { .. } => break,
                        EngineEvent::Error(e) => panic!("{e}"),
                        EngineEvent::Admitted { .. } => {}
                    }
                }
                tokens
            })
            .collect();
        // The gauge is updated at the end of the step that finished the last request.
        let stats = engine.stats.clone();
        let used = || stats.kv_blocks_used.load(Ordering::SeqCst);
        let start = std::time::Instant::now();
        while used() > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(used(), 0, "blocks still held after every request finished");
        engine.shutdown();
        thread.join().unwrap();
        (outputs, stats)
    }

    /// Each request run alone, without prefix caching.
    fn tiny_model_alone(requests: &[EngineRequest], config: &EngineConfig) -> Vec<Vec<u32>> {
        let plain = BlockBudget {
            prefix_caching: false,
            ..BlockBudget::default()
        };
        requests
            .iter()
            .map(|r| {
                tiny_model_run(std::slice::from_ref(r), config, plain)
                    .0
                    .remove(0)
            })
            .collect()
    }

    #[test]
    fn the_tiny_model_generates_the_same_under_preemption() {
        // The real fixture model on the CPU: 32 concurrent greedy requests in a paged pool of 4
        // blocks of 16 tokens per layer kind (the longest request needs 3 full blocks). A
        // preempted request is recomputed by prefill where it was decoded before (reusing its
        // own cached blocks where they survived); greedy output must not change, and every
        // block returns to the pool.
        let requests: Vec<EngineRequest> = (0..32u32)
            .map(|i| {
                let prompt = (0..4 + i * 5 % 36)
                    .map(|t| 20 + (t * 37 + i * 11) % 560)
                    .collect();
                let mut r = request(prompt, vec![]);
                r.max_new_tokens = 8;
                r
            })
            .collect();
        let config = EngineConfig {
            max_num_seqs: 32,
            prefill_chunk: 32,
            max_waiting: 64,
            blocks: BlockBudget::default(),
        };
        let blocks = BlockBudget {
            num_kv_blocks: Some(Blocks([4, 4])),
            block_size: 16,
            ..BlockBudget::default()
        };
        let (together, stats) = tiny_model_run(&requests, &config, blocks);
        assert!(stats.preemptions_total.load(Ordering::SeqCst) > 0);
        assert_eq!(together, tiny_model_alone(&requests, &config));
    }

    #[test]
    fn choices_of_one_prompt_compute_it_once() {
        // `n` = 4: four requests with one 50-token prompt arrive together. The first computes
        // it; the others wait for its 3 full blocks and compute only the last 2 tokens.
        let prompt: Vec<u32> = (0..50).map(|t| 20 + (t * 41) % 560).collect();
        let mut one = request(prompt, vec![]);
        one.max_new_tokens = 5;
        let requests = vec![one; 4];
        let config = EngineConfig {
            max_num_seqs: 8,
            prefill_chunk: 256,
            max_waiting: 64,
            blocks: BlockBudget::default(),
        };
        let blocks = BlockBudget {
            block_size: 16,
            ..BlockBudget::default()
        };
        let (together, stats) = tiny_model_run(&requests, &config, blocks);
        assert_eq!(stats.prefix_cache_hits_total.load(Ordering::SeqCst), 3 * 48);
        assert_eq!(
            stats.prefix_cache_queries_total.load(Ordering::SeqCst),
            4 * 50
        );
        let alone = tiny_model_alone(&requests[..1], &config).remove(0);
        assert!(together.iter().all(|t| *t == alone));
    }

    #[test]
    fn the_tiny_model_shares_a_common_prefix_exactly() {
        // 12 requests with a common 50-token prefix (a system prompt) and their own endings,
        // 4 running at a time in a small pool: later ones reuse the blocks of the prefix
        // (held by running requests or cached), and generate what each generates alone
        // without prefix caching.
        let system: Vec<u32> = (0..50).map(|t| 20 + (t * 53) % 560).collect();
        let requests: Vec<EngineRequest> = (0..12u32)
            .map(|i| {
                let own = (0..3 + i % 7).map(|t| 30 + (t * 29 + i * 13) % 500);
                let mut r = request(system.iter().copied().chain(own).collect(), vec![]);
                r.max_new_tokens = 6;
                r
            })
            .collect();
        let config = EngineConfig {
            max_num_seqs: 4,
            prefill_chunk: 64,
            max_waiting: 64,
            blocks: BlockBudget::default(),
        };
        let blocks = BlockBudget {
            num_kv_blocks: Some(Blocks([16, 16])),
            block_size: 16,
            ..BlockBudget::default()
        };
        let (together, stats) = tiny_model_run(&requests, &config, blocks);
        let hits = stats.prefix_cache_hits_total.load(Ordering::SeqCst);
        // The first 4 are admitted together (nothing cached); each of the 8 others finds the
        // prefix's 3 full blocks.
        assert!(hits >= 8 * 48, "{hits}");
        assert_eq!(together, tiny_model_alone(&requests, &config));
    }

    #[test]
    fn mismatched_images_are_an_error_event() {
        let (log, events) = run(vec![1, 9, 5, 5, 8], vec![image(3)]);
        assert!(log.is_empty());
        assert!(
            matches!(events.last(), Some(EngineEvent::Error(m)) if m.contains("soft-token counts")),
            "{events:?}"
        );
    }
}
