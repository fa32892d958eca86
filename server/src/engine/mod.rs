//! The engine: owns the model on its own thread and runs requests with iteration-level
//! (continuous) scheduling. A request joins the running set at the next step; each step advances
//! every running sequence by one token; a finished, cancelled or disconnected request leaves at
//! once and its KV cache is dropped with it. It knows nothing of HTTP: requests come in through
//! `Engine::submit`, tokens go out through each request's own channel (TGI's router,
//! mistral.rs's engine).
//!
//! Each decode step runs all running sequences through the model together (`forward_batch`:
//! linears, norms and MLP over all rows at once; attention per sequence against its own cache).
//! Prefill of a newly admitted request runs on its own, in the step it joins.

mod sampling;
pub mod scripted;

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use gemma4_model::Gemma4Backend;
use gemma4_model::generation::Rng;
use gemma4_model::{KvCache, Logits, Model, SamplingParams};

/// What the engine needs of a model: a fresh cache per request, and the logits of the last
/// position after running tokens through it. Implemented by the Gemma 4 model on any backend,
/// and by `scripted::ScriptedModel` for server tests.
pub trait StepModel: 'static {
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// Runs `tokens` (the continuation of the sequence in `cache`); logits of the last one.
    fn forward_last(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>, String>;
    /// One new token per sequence, all sequences in one step; logits rows in order.
    fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut Self::Cache]) -> Result<Vec<Vec<f32>>, String> {
        tokens.iter().zip(caches.iter_mut()).map(|(t, c)| self.forward_last(&[*t], c)).collect()
    }
    /// KV entries held (tokens × layers), for the usage gauge.
    fn cache_entries(&self, cache: &Self::Cache) -> usize;
}

impl<B: Gemma4Backend> StepModel for Model<B> {
    type Cache = KvCache<B>;
    fn new_cache(&self) -> KvCache<B> {
        KvCache::new(&self.text)
    }
    fn forward_last(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>, String> {
        let logits = self.text.forward(tokens, cache, Logits::Last).map_err(|e| e.to_string())?;
        logits.into_data().to_vec::<f32>().map_err(|e| format!("reading logits: {e:?}"))
    }
    fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Result<Vec<Vec<f32>>, String> {
        let logits = self.text.forward_batch(tokens, caches).map_err(|e| e.to_string())?;
        let vocab = self.text.vocab_size;
        let flat = logits.into_data().to_vec::<f32>().map_err(|e| format!("reading logits: {e:?}"))?;
        Ok(flat.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
    fn cache_entries(&self, cache: &KvCache<B>) -> usize {
        cache.entries()
    }
}
use tokio::sync::mpsc as tokio_mpsc;

pub use sampling::{apply_penalties, top_logprobs, Penalties, TokenLogprob};

/// What a caller asks the engine to run (already tokenized and validated against the context).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    /// Stop after emitting one of these ids (the id is reported, then the request finishes).
    pub stop_ids: Vec<u32>,
    /// Never sampled.
    pub suppress_ids: Vec<u32>,
    /// Some(k): report the chosen token's logprob and the k most likely alternatives.
    pub logprobs: Option<usize>,
    /// Emitted first, in place of sampling (e.g. `<|tool_call>call:NAME{` for a named
    /// `tool_choice`): the model continues from there.
    pub forced_prefix: Vec<u32>,
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
    /// The prompt has been processed (for time-to-first-token accounting it precedes the first token).
    Token { id: u32, logprob: Option<TokenLogprob> },
    Finished { reason: FinishReason, prompt_tokens: usize, completion_tokens: usize },
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full (HTTP 503).
    QueueFull { limit: usize },
    /// The engine is not running (still loading, failed, or shut down).
    NotReady,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { limit } => write!(f, "the server is overloaded: {limit} requests are already waiting"),
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
    /// Requests that may wait for a slot before submissions get QueueFull.
    pub max_waiting: usize,
}

/// Counters shared with the HTTP layer (Prometheus /metrics and /health).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub ready: AtomicBool,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// KV entries (tokens × layers) held by running sequences.
    pub kv_entries: AtomicUsize,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub requests_finished_total: AtomicU64,
    pub requests_cancelled_total: AtomicU64,
    pub steps_total: AtomicU64,
}

/// A submitted request: its event stream. Dropping it cancels the request (the engine notices
/// at its next step and frees the slot and the cache).
pub struct RequestHandle {
    pub events: tokio_mpsc::UnboundedReceiver<EngineEvent>,
    cancelled: Arc<AtomicBool>,
}

impl RequestHandle {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct Submitted {
    req: EngineRequest,
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
}

impl Engine {
    /// Starts the engine thread; `load` runs on it (the model never crosses threads).
    /// Returns once the model is loaded, or the load error.
    pub fn start<M, F>(config: EngineConfig, load: F) -> anyhow::Result<(Engine, std::thread::JoinHandle<()>)>
    where
        M: StepModel,
        F: FnOnce() -> anyhow::Result<M> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stats = stats.clone();
        let thread_config = config.clone();
        let handle = std::thread::Builder::new().name("gemma4-engine".into()).spawn(move || {
            let model = match load() {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            thread_stats.ready.store(true, Ordering::SeqCst);
            let _ = ready_tx.send(Ok(()));
            run_loop(&model, &thread_config, &rx, &thread_stats);
            thread_stats.ready.store(false, Ordering::SeqCst);
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((Engine { tx, stats, config: Arc::new(config) }, handle)),
            Ok(Err(e)) => Err(e),
            Err(_) => anyhow::bail!("the engine thread died while loading the model"),
        }
    }

    pub fn submit(&self, req: EngineRequest) -> Result<RequestHandle, SubmitError> {
        if !self.stats.ready.load(Ordering::SeqCst) {
            return Err(SubmitError::NotReady);
        }
        if self.stats.waiting.load(Ordering::SeqCst) >= self.config.max_waiting {
            return Err(SubmitError::QueueFull { limit: self.config.max_waiting });
        }
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let cmd = Command::Submit(Box::new(Submitted { req, tx, cancelled: cancelled.clone() }));
        if self.tx.send(cmd).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady);
        }
        Ok(RequestHandle { events: rx, cancelled })
    }

    /// Asks the engine to stop after the current step; running requests get an error event.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}

/// One running sequence and its state (cache, sampler, counters).
struct Seq<C> {
    sub: Box<Submitted>,
    cache: C,
    rng: Rng,
    generated: Vec<u32>,
    /// Prompt tokens already run through the model (chunked prefill).
    prefilled: usize,
    /// Logits row for the next token; empty while the prompt is still being prefilled.
    next_logits: Vec<f32>,
}

fn run_loop<M: StepModel>(model: &M, config: &EngineConfig, rx: &mpsc::Receiver<Command>, stats: &EngineStats) {
    let mut waiting: VecDeque<Box<Submitted>> = VecDeque::new();
    let mut running: Vec<Seq<M::Cache>> = Vec::new();
    loop {
        // Take new work: block only when there is nothing to do.
        let mut shutdown = false;
        if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(Command::Submit(s)) => waiting.push_back(s),
                Ok(Command::Shutdown) | Err(_) => shutdown = true,
            }
        }
        while !shutdown {
            match rx.try_recv() {
                Ok(Command::Submit(s)) => waiting.push_back(s),
                Ok(Command::Shutdown) => shutdown = true,
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    shutdown = true;
                }
            }
        }
        if shutdown {
            for s in running.iter().map(|s| &s.sub).chain(waiting.iter()) {
                let _ = s.tx.send(EngineEvent::Error("the server is shutting down".into()));
            }
            stats.running.store(0, Ordering::SeqCst);
            stats.waiting.store(0, Ordering::SeqCst);
            stats.kv_entries.store(0, Ordering::SeqCst);
            return;
        }

        // Admit waiting requests into free slots.
        while running.len() < config.max_num_seqs {
            let Some(sub) = waiting.pop_front() else { break };
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if is_gone(&sub) {
                stats.requests_cancelled_total.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let rng = Rng::new(sub.req.sampling.seed);
            running.push(Seq { cache: model.new_cache(), sub, rng, generated: vec![], prefilled: 0, next_logits: vec![] });
        }

        // Chunked prefill: at most `prefill_chunk` prompt tokens per step over all sequences,
        // so a long prompt delays the running streams by one chunk, not by its whole length.
        let mut budget = config.prefill_chunk.max(1);
        let mut still = Vec::with_capacity(running.len());
        for mut seq in running.drain(..) {
            let total = seq.sub.req.prompt.len();
            if seq.prefilled == total || budget == 0 || is_gone(&seq.sub) {
                still.push(seq);
                continue;
            }
            let end = total.min(seq.prefilled + budget);
            budget -= end - seq.prefilled;
            let chunk = seq.sub.req.prompt[seq.prefilled..end].to_vec();
            match catch_unwind(AssertUnwindSafe(|| model.forward_last(&chunk, &mut seq.cache))) {
                Ok(Ok(row)) => {
                    stats.prompt_tokens_total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    seq.prefilled = end;
                    if end == total {
                        seq.next_logits = row;
                    }
                    still.push(seq);
                }
                Ok(Err(e)) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error(e));
                }
                Err(_) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error("internal error during prefill".into()));
                }
            }
        }
        running = still;

        // One decode step for every running sequence: sample and report each one's next token,
        // then run all continuing sequences through the model together.
        let mut keep = Vec::with_capacity(running.len());
        let mut prefilling = Vec::new();
        for mut seq in running.drain(..) {
            if is_gone(&seq.sub) {
                stats.requests_cancelled_total.fetch_add(1, Ordering::Relaxed);
                continue; // cache dropped here
            }
            if seq.prefilled < seq.sub.req.prompt.len() {
                prefilling.push(seq);
                continue;
            }
            match catch_unwind(AssertUnwindSafe(|| sample_next(&mut seq))) {
                Ok(Next::Continue(id)) => keep.push((seq, id)),
                Ok(Next::Done(reason)) => {
                    stats.requests_finished_total.fetch_add(1, Ordering::Relaxed);
                    let _ = seq.sub.tx.send(EngineEvent::Finished {
                        reason,
                        prompt_tokens: seq.sub.req.prompt.len(),
                        completion_tokens: seq.generated.len(),
                    });
                }
                Err(_) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error("internal error while sampling".into()));
                }
            }
            stats.generation_tokens_total.fetch_add(1, Ordering::Relaxed);
        }
        if !keep.is_empty() {
            let tokens: Vec<u32> = keep.iter().map(|(_, id)| *id).collect();
            let result = {
                let mut caches: Vec<&mut M::Cache> = keep.iter_mut().map(|(s, _)| &mut s.cache).collect();
                catch_unwind(AssertUnwindSafe(|| model.forward_batch(&tokens, &mut caches)))
            };
            match result {
                Ok(Ok(rows)) => {
                    for ((mut seq, _), row) in keep.into_iter().zip(rows) {
                        seq.next_logits = row;
                        running.push(seq);
                    }
                }
                Ok(Err(msg)) => {
                    for (seq, _) in keep {
                        let _ = seq.sub.tx.send(EngineEvent::Error(msg.clone()));
                    }
                }
                Err(_) => {
                    for (seq, _) in keep {
                        let _ = seq.sub.tx.send(EngineEvent::Error("internal error during decoding".into()));
                    }
                }
            }
        }
        running.extend(prefilling);
        stats.steps_total.fetch_add(1, Ordering::Relaxed);
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.kv_entries.store(running.iter().map(|s| model.cache_entries(&s.cache)).sum(), Ordering::SeqCst);
        if running.is_empty() && !waiting.is_empty() {
            // Nothing admitted (all cancelled or failed): yield briefly before retrying.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn is_gone(sub: &Submitted) -> bool {
    sub.cancelled.load(Ordering::Relaxed) || sub.tx.is_closed()
}

enum Next {
    /// Reported; run it through the model.
    Continue(u32),
    Done(FinishReason),
}

/// Samples the next token from the pending logits and reports it; says whether the request
/// goes on (and with which token) or is finished.
fn sample_next<C>(seq: &mut Seq<C>) -> Next {
    let req = &seq.sub.req;
    // Logprobs of the model's distribution (raw logits, before penalties and temperature), as vLLM.
    let raw = req.logprobs.map(|_| seq.next_logits.clone());
    apply_penalties(&mut seq.next_logits, &req.penalties, &req.prompt, &seq.generated);
    let id = match req.forced_prefix.get(seq.generated.len()) {
        Some(&forced) => forced,
        None => gemma4_model::generation::sample(&seq.next_logits, &req.sampling, &req.suppress_ids, &mut seq.rng),
    };
    let logprob = raw.map(|row| top_logprobs(&row, id, req.logprobs.unwrap_or(0)));
    seq.generated.push(id);
    if seq.sub.tx.send(EngineEvent::Token { id, logprob }).is_err() {
        return Next::Done(FinishReason::Stop); // receiver gone: stop now
    }
    if req.stop_ids.contains(&id) {
        return Next::Done(FinishReason::Stop);
    }
    if seq.generated.len() >= req.max_new_tokens {
        return Next::Done(FinishReason::Length);
    }
    Next::Continue(id)
}
