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

use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use gemma4_model::generation::Rng;
use gemma4_model::vision::PreprocessedImage;
use gemma4_model::Gemma4Backend;
use gemma4_model::{KvCache, Logits, Model, SamplingParams};

/// What the engine needs of a model: a fresh cache per request, and the logits of the last
/// position after running tokens through it. Implemented by the Gemma 4 model on any backend,
/// and by `scripted::ScriptedModel` for server tests.
pub trait StepModel: 'static {
    type Cache;
    /// The soft tokens (vision tower output) of one request's images, all images concatenated
    /// in prompt order: one row per image placeholder of the prompt.
    type Soft: Clone;
    fn new_cache(&self) -> Self::Cache;
    /// Runs `tokens` (the continuation of the sequence in `cache`); logits of the last one.
    fn forward_last(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>, String>;
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
    /// A prefill chunk: as `forward_last`, with `soft` the request's soft tokens and the rows of
    /// them that belong to the image placeholders among `tokens` (in order). `tokens` never
    /// splits one image's run of placeholders.
    fn forward_prefill(
        &self,
        tokens: &[u32],
        soft: Option<(&Self::Soft, Range<usize>)>,
        cache: &mut Self::Cache,
    ) -> Result<Vec<f32>, String> {
        match soft {
            Some((_, rows)) if !rows.is_empty() => Err("this model does not take images".into()),
            _ => self.forward_last(tokens, cache),
        }
    }
    /// One new token per sequence, all sequences in one step; logits rows in order.
    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
    ) -> Result<Vec<Vec<f32>>, String> {
        tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| self.forward_last(&[*t], c))
            .collect()
    }
    /// KV entries held (tokens × layers), for the usage gauge.
    fn cache_entries(&self, cache: &Self::Cache) -> usize;
}

impl<B: Gemma4Backend> StepModel for Model<B> {
    type Cache = KvCache<B>;
    type Soft = burn::tensor::Tensor<B, 2>;
    fn new_cache(&self) -> KvCache<B> {
        self.text.new_cache()
    }
    fn forward_last(&self, tokens: &[u32], cache: &mut KvCache<B>) -> Result<Vec<f32>, String> {
        self.forward_prefill(tokens, None, cache)
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
    fn forward_prefill(
        &self,
        tokens: &[u32],
        soft: Option<(&Self::Soft, Range<usize>)>,
        cache: &mut KvCache<B>,
    ) -> Result<Vec<f32>, String> {
        let rows = soft.filter(|(_, r)| !r.is_empty()).map(|(s, r)| {
            let width = s.dims()[1];
            s.clone().slice([r, 0..width])
        });
        let logits = self
            .text
            .forward_multimodal(tokens, rows, cache, Logits::Last)
            .map_err(|e| e.to_string())?;
        Ok(gemma4_model::to_host_f32(logits))
    }
    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache<B>],
    ) -> Result<Vec<Vec<f32>>, String> {
        let logits = self
            .text
            .forward_batch(tokens, caches)
            .map_err(|e| e.to_string())?;
        let vocab = self.text.vocab_size;
        let flat = gemma4_model::to_host_f32(logits);
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
    /// The request's images in prompt order; image k is the k-th run of image placeholder ids
    /// in `prompt`, `num_soft_tokens` long. Encoded on the engine thread at the first prefill.
    pub images: Vec<Arc<PreprocessedImage>>,
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
    /// The waiting queue is full (HTTP 503).
    QueueFull { limit: usize },
    /// The engine is not running (still loading, failed, or shut down).
    NotReady,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { limit } => write!(
                f,
                "the server is overloaded: {limit} requests are already waiting"
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
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stats = stats.clone();
        let thread_config = config.clone();
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
                let _ = ready_tx.send(Ok(()));
                run_loop(&model, &thread_config, &rx, &thread_stats);
                thread_stats.ready.store(false, Ordering::SeqCst);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((
                Engine {
                    tx,
                    stats,
                    config: Arc::new(config),
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
        if self.stats.waiting.load(Ordering::SeqCst) >= self.config.max_waiting {
            return Err(SubmitError::QueueFull {
                limit: self.config.max_waiting,
            });
        }
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let cmd = Command::Submit(Box::new(Submitted {
            req,
            tx,
            cancelled: cancelled.clone(),
        }));
        if self.tx.send(cmd).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady);
        }
        Ok(RequestHandle {
            events: rx,
            cancelled,
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

/// One running sequence and its state (cache, sampler, counters).
struct Seq<C, S> {
    sub: Box<Submitted>,
    cache: C,
    rng: Rng,
    generated: Vec<u32>,
    /// Prompt tokens already run through the model (chunked prefill).
    prefilled: usize,
    /// Logits row for the next token; empty while the prompt is still being prefilled.
    next_logits: Vec<f32>,
    /// Soft tokens of the request's images, from the first prefill chunk until the prompt is done.
    soft: Option<S>,
    /// Soft-token rows already used by earlier prefill chunks (placeholders in `prompt[..prefilled]`).
    soft_used: usize,
}

fn run_loop<M: StepModel>(
    model: &M,
    config: &EngineConfig,
    rx: &mpsc::Receiver<Command>,
    stats: &EngineStats,
) {
    let mut waiting: VecDeque<Box<Submitted>> = VecDeque::new();
    let mut running: Vec<Seq<M::Cache, M::Soft>> = Vec::new();
    // The last images encoded and their soft tokens: the `n` choices of one request carry the
    // same images (the same `Arc`s), which are encoded once. Replaced by the next encode, and
    // dropped when the engine goes idle.
    let mut encoded: Option<(Vec<Arc<PreprocessedImage>>, M::Soft)> = None;
    loop {
        // Take new work: block only when there is nothing to do.
        let mut shutdown = false;
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
                let _ =
                    s.tx.send(EngineEvent::Error("the server is shutting down".into()));
            }
            stats.running.store(0, Ordering::SeqCst);
            stats.waiting.store(0, Ordering::SeqCst);
            stats.kv_entries.store(0, Ordering::SeqCst);
            return;
        }

        // Admit waiting requests into free slots.
        while running.len() < config.max_num_seqs {
            let Some(sub) = waiting.pop_front() else {
                break;
            };
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if is_gone(&sub) {
                stats
                    .requests_cancelled_total
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let rng = Rng::new(sub.req.sampling.seed);
            running.push(Seq {
                cache: model.new_cache(),
                sub,
                rng,
                generated: vec![],
                prefilled: 0,
                next_logits: vec![],
                soft: None,
                soft_used: 0,
            });
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
            let image_id = model.image_token_id();
            let end = chunk_end(&seq.sub.req.prompt, seq.prefilled, budget, image_id);
            budget = budget.saturating_sub(end - seq.prefilled);
            let chunk = &seq.sub.req.prompt[seq.prefilled..end];
            let placeholders = image_id.map_or(0, |id| chunk.iter().filter(|&&t| t == id).count());
            let result = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<f32>, String> {
                if seq.prefilled == 0 && !seq.sub.req.images.is_empty() {
                    seq.soft = encode_request_images(model, &seq.sub.req, image_id, &mut encoded)?;
                }
                let rows = seq.soft_used..seq.soft_used + placeholders;
                model.forward_prefill(chunk, seq.soft.as_ref().map(|s| (s, rows)), &mut seq.cache)
            }));
            match result {
                Ok(Ok(row)) => {
                    stats
                        .prompt_tokens_total
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    seq.prefilled = end;
                    seq.soft_used += placeholders;
                    if end == total {
                        seq.next_logits = row;
                        seq.soft = None; // the soft tokens live on in the KV cache only
                    }
                    still.push(seq);
                }
                Ok(Err(e)) => {
                    let _ = seq.sub.tx.send(EngineEvent::Error(e));
                }
                Err(_) => {
                    let _ = seq
                        .sub
                        .tx
                        .send(EngineEvent::Error("internal error during prefill".into()));
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
                stats
                    .requests_cancelled_total
                    .fetch_add(1, Ordering::Relaxed);
                continue; // cache dropped here
            }
            if seq.prefilled < seq.sub.req.prompt.len() {
                prefilling.push(seq);
                continue;
            }
            match catch_unwind(AssertUnwindSafe(|| sample_next(&mut seq))) {
                Ok(Next::Continue(id)) => keep.push((seq, id)),
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
                Err(_) => {
                    let _ = seq
                        .sub
                        .tx
                        .send(EngineEvent::Error("internal error while sampling".into()));
                }
            }
            stats
                .generation_tokens_total
                .fetch_add(1, Ordering::Relaxed);
        }
        if !keep.is_empty() {
            let tokens: Vec<u32> = keep.iter().map(|(_, id)| *id).collect();
            let result = {
                let mut caches: Vec<&mut M::Cache> =
                    keep.iter_mut().map(|(s, _)| &mut s.cache).collect();
                catch_unwind(AssertUnwindSafe(|| {
                    model.forward_batch(&tokens, &mut caches)
                }))
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
                        let _ = seq
                            .sub
                            .tx
                            .send(EngineEvent::Error("internal error during decoding".into()));
                    }
                }
            }
        }
        running.extend(prefilling);
        stats.steps_total.fetch_add(1, Ordering::Relaxed);
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.kv_entries.store(
            running.iter().map(|s| model.cache_entries(&s.cache)).sum(),
            Ordering::SeqCst,
        );
        if running.is_empty() && !waiting.is_empty() {
            // Nothing admitted (all cancelled or failed): yield briefly before retrying.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// End of the next prefill chunk from `start` with `budget` tokens: at most `budget` tokens, but
/// extended to the end of a run of image placeholders rather than ending inside one.
fn chunk_end(prompt: &[u32], start: usize, budget: usize, image_id: Option<u32>) -> usize {
    let total = prompt.len();
    let mut end = total.min(start + budget.max(1));
    if let Some(id) = image_id {
        while end < total && end > start && prompt[end - 1] == id && prompt[end] == id {
            end += 1;
        }
    }
    end
}

/// Checks that the request's images match its placeholders (one run of `num_soft_tokens` per
/// image, in order) and encodes them, or takes the soft tokens of `encoded` when those are of the
/// same images (another choice of the same request).
fn encode_request_images<M: StepModel>(
    model: &M,
    req: &EngineRequest,
    image_id: Option<u32>,
    encoded: &mut Option<(Vec<Arc<PreprocessedImage>>, M::Soft)>,
) -> Result<Option<M::Soft>, String> {
    let Some(id) = image_id else {
        return Err("this model does not take images".into());
    };
    let runs: Vec<usize> = gemma4_model::text_model::image_runs(&req.prompt, id)
        .iter()
        .map(|r| r.len())
        .collect();
    let expected: Vec<usize> = req.images.iter().map(|img| img.num_soft_tokens).collect();
    if runs != expected {
        return Err(format!("the prompt's image placeholder runs {runs:?} do not match the images' soft-token counts {expected:?}"));
    }
    if let Some((images, soft)) = encoded {
        if same_images(images, &req.images) {
            return Ok(Some(soft.clone()));
        }
    }
    let soft = model.encode_images(&req.images)?;
    if let Some(s) = &soft {
        *encoded = Some((req.images.clone(), s.clone()));
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
}

/// Samples the next token from the pending logits and reports it; says whether the request
/// goes on (and with which token) or is finished.
fn sample_next<C, S>(seq: &mut Seq<C, S>) -> Next {
    let req = &seq.sub.req;
    // Logprobs of the model's distribution (raw logits, before penalties and temperature), as vLLM.
    let raw = req.logprobs.map(|_| seq.next_logits.clone());
    apply_penalties(
        &mut seq.next_logits,
        &req.penalties,
        &req.prompt,
        &seq.generated,
    );
    let id = match req.forced_prefix.get(seq.generated.len()) {
        Some(&forced) => forced,
        None => gemma4_model::generation::sample(
            &seq.next_logits,
            &req.sampling,
            &req.suppress_ids,
            &mut seq.rng,
        ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn chunks_never_end_inside_an_image_run() {
        let p = [1, 9, 5, 5, 5, 5, 8, 2, 3];
        assert_eq!(chunk_end(&p, 0, 3, Some(5)), 6); // [1 9 5 | 5 5 5] -> extended to the run's end
        assert_eq!(chunk_end(&p, 0, 2, Some(5)), 2); // ends before the run
        assert_eq!(chunk_end(&p, 0, 6, Some(5)), 6); // ends exactly at the run's end
        assert_eq!(chunk_end(&p, 6, 100, Some(5)), 9);
        assert_eq!(chunk_end(&p, 0, 3, None), 3);
        assert_eq!(chunk_end(&p, 2, 0, Some(5)), 6); // a zero budget still makes progress
    }

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
        type Cache = ();
        type Soft = Vec<u32>; // one "row" per soft token: its index
        fn new_cache(&self) {}
        fn forward_last(&self, tokens: &[u32], c: &mut ()) -> Result<Vec<f32>, String> {
            self.forward_prefill(tokens, None, c)
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
        fn forward_prefill(
            &self,
            tokens: &[u32],
            soft: Option<(&Vec<u32>, Range<usize>)>,
            _: &mut (),
        ) -> Result<Vec<f32>, String> {
            let rows = soft.map_or(0..0, |(s, r)| {
                assert!(r.end <= s.len());
                r
            });
            self.log.lock().unwrap().push((tokens.to_vec(), rows));
            let mut logits = vec![0.0; 16];
            logits[15] = 10.0;
            Ok(logits)
        }
        fn cache_entries(&self, _: &()) -> usize {
            0
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
            prompt,
            max_new_tokens: 1,
            sampling: SamplingParams::greedy(),
            penalties: Penalties::none(),
            stop_ids: vec![],
            suppress_ids: vec![],
            logprobs: None,
            forced_prefix: vec![],
            images,
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
                let done = !matches!(e, EngineEvent::Token { .. });
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
