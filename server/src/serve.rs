//! `gemma4 serve`: loads the model on the engine thread, then serves the OpenAI-compatible API
//! (`run_with` serves over an engine started with any other `StepModel`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gemma4_engine::structured::Grammars;
use gemma4_engine::{Engine, EngineConfig};
use gemma4_model::{Gemma4Backend, Model};

use crate::chat_template::ChatTemplate;
use crate::http::{self, AppState};
use crate::output::SpecialTokens;

/// The flags of `gemma4 serve`, and of the scripted test server
/// (`server/examples/scripted_serve.rs`).
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Checkpoint directory; the bundled tiny fixture when omitted.
    #[arg(long, default_value_os_t = bundled_model(), hide_default_value = true)]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name clients use in `model` (default: the checkpoint directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize.
    #[arg(long, env = "GEMMA4_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Context limit (prompt + output); default and maximum: the model's max_position_embeddings.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Requests advanced together per engine step.
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// Prompt tokens prefilled per engine step (chunked prefill, as vLLM's option of that name):
    /// bounds how long a new long prompt stalls the running streams.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for a slot; beyond that the server answers 503.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// KV cache blocks of each layer kind (sliding, full) in the paged pool, overriding
    /// --kv-cache-memory (for tests: a small pool forces preemption). A request is admitted when
    /// its first chunk's blocks are free; when a step needs more than are free, the newest
    /// sequence is preempted and recomputed later. Neither flag: the pool grows as needed
    /// (no admission by memory, no preemption).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Bytes of KV cache to allocate at start (vLLM's --kv-cache-memory): split into blocks of
    /// each layer kind in the proportion a --max-model-len sequence needs them.
    #[arg(long)]
    pub kv_cache_memory: Option<u64>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = gemma4_engine::scheduler::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// What the KV cache stores (vLLM's flag): `auto`, the model's float type; `fp8`, E4M3 with
    /// the checkpoint's per-layer k_scale/v_scale (1.0 where it has none): one byte per element,
    /// at some accuracy cost.
    #[arg(long, default_value = "auto", value_parser = parse_kv_dtype)]
    pub kv_cache_dtype: gemma4_model::KvDtype,
    /// Turn automatic prefix caching off (vLLM's flag). On by default: a request reuses the
    /// KV blocks of the longest prefix an earlier request computed (a conversation's earlier
    /// turns, a shared system prompt, the other `n` choices), as long as they are cached.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Seconds in-flight requests get to finish after Ctrl-C; then the rest are ended (a
    /// stream with an error frame and `[DONE]`).
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace: u64,
    /// Seconds a client has to send a request's headers, counted from the connection's opening
    /// (or the end of its previous response); past it the connection is closed.
    #[arg(long, default_value_t = 20)]
    pub header_read_timeout: u64,
    /// Seconds a client has to send a request's whole body once its headers arrived; past it
    /// the answer is a 408.
    #[arg(long, default_value_t = 60)]
    pub body_read_timeout: u64,
    /// Seconds an idle keep-alive connection (no request in flight, nothing received) stays
    /// open.
    #[arg(long, default_value_t = 15)]
    pub keep_alive_timeout: u64,
    /// Refuse http:// and https:// image URLs (a 400); data: URLs are still taken. Without
    /// it, image URLs are fetched: hosts that resolve to loopback, private or link-local
    /// addresses are refused, redirects are not followed, and https is verified against
    /// Mozilla's roots (compiled in).
    #[arg(long)]
    pub no_image_urls: bool,
    /// Fetch image URLs only from these domains (comma-separated; a domain also allows its
    /// subdomains), as vLLM's flag of that name. Default: any public host.
    #[arg(long, value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// PEM file of CA certificates also trusted for https:// image URLs.
    #[arg(long)]
    pub image_ca_file: Option<PathBuf>,
    /// Images per request; a request with more gets a 400.
    #[arg(long, default_value_t = crate::images::DEFAULT_LIMIT_PER_PROMPT)]
    pub limit_images_per_prompt: usize,
    /// Seconds the fetch of one image URL may take.
    #[arg(long, default_value_t = crate::images::DEFAULT_FETCH_TIMEOUT_SECS)]
    pub image_fetch_timeout: u64,
    /// Bytes of finished Responses kept in memory (lost at restart) for `GET /v1/responses/{id}`
    /// and `previous_response_id`, counted approximately as their conversation and output. When
    /// a new one does not fit, the oldest are evicted first; one larger than the whole budget is
    /// not kept (its id then answers 404). 0 keeps none.
    #[arg(long, default_value_t = 256 << 20)]
    pub responses_store_max_bytes: usize,
    /// Seconds a stored response is kept after it finished.
    #[arg(long, default_value_t = 3600)]
    pub responses_store_ttl: u64,
}

impl ServeArgs {
    /// The connection time limits.
    pub fn conn_limits(&self) -> http::listener::ConnLimits {
        http::listener::ConnLimits {
            header_read: Duration::from_secs(self.header_read_timeout.max(1)),
            keep_alive: Duration::from_secs(self.keep_alive_timeout.max(1)),
        }
    }

    /// The engine's scheduling limits.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_num_seqs: self.max_num_seqs.max(1),
            prefill_chunk: self.max_num_batched_tokens.max(1),
            max_waiting: self.max_waiting,
            blocks: gemma4_engine::BlockBudget {
                num_kv_blocks: self.num_kv_blocks.map(|n| gemma4_engine::Blocks([n, n])),
                block_size: self.block_size.max(1),
                kv_dtype: self.kv_cache_dtype,
                prefix_caching: !self.no_enable_prefix_caching,
                ..Default::default()
            },
        }
    }
}

fn parse_kv_dtype(s: &str) -> Result<gemma4_model::KvDtype, String> {
    s.parse()
}

/// The bundled tiny checkpoint, served when no --model is given.
pub fn bundled_model() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/tiny-31b-recipe"
    ))
}

/// Everything but the engine: tokenizer, template, limits.
pub fn build_state(args: &ServeArgs, engine: Engine, meta: ModelMeta) -> Result<AppState> {
    let dir = &args.model;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let special = SpecialTokens::from_tokenizer(&tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    // The answer ends with the end of the turn once its grammar is complete.
    let end = special.turn_end.or(special.eos);
    let grammars = match (std::fs::read_to_string(&tok_path), end) {
        (Ok(json), Some(end)) => Grammars::new(&json, meta.vocab_size, end),
        (Err(e), _) => Err(e.to_string()),
        (_, None) => Err("the tokenizer has no end-of-turn token".into()),
    };
    if let Err(e) = &grammars {
        tracing::warn!("structured outputs are off (requests that ask for them get a 400): {e}");
    }
    let template =
        ChatTemplate::from_dir(dir).map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
    if template.is_none() {
        tracing::warn!(
            "{} has no chat template: chat endpoints will answer 400",
            dir.display()
        );
    }
    let max_model_len = args
        .max_model_len
        .unwrap_or(meta.max_position_embeddings)
        .min(meta.max_position_embeddings);
    let mut images = crate::images::ImageSettings::new(
        meta.vision,
        meta.image_token_id,
        crate::images::UrlPolicy::new(!args.no_image_urls, &args.allowed_media_domains)
            .map_err(|e| anyhow::anyhow!("--allowed-media-domains: {e}"))?,
        args.limit_images_per_prompt,
        Duration::from_secs(args.image_fetch_timeout.max(1)),
    );
    if let Some(path) = &args.image_ca_file {
        images
            .add_ca_file(path)
            .map_err(|e| anyhow::anyhow!("--image-ca-file {e}"))?;
    }
    let served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "gemma4".into())
    });
    let max_token_bytes = crate::prompt::max_token_bytes(&tokenizer);
    Ok(AppState {
        engine,
        max_token_bytes,
        cpu: crate::cpu::CpuPool::per_core(),
        limits: http::RequestLimits {
            body_read: Duration::from_secs(args.body_read_timeout.max(1)),
        },
        tokenizer: Arc::new(tokenizer),
        template: template.map(Arc::new),
        special: Arc::new(special),
        served_model_name,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_model_len,
        stop_ids: meta.stop_ids,
        suppress_ids: meta.suppress_ids,
        default_sampling: meta.default_sampling,
        metrics: Default::default(),
        created: http::now_secs(),
        images,
        grammars,
        responses: http::response_store::ResponseStore::new(
            args.responses_store_max_bytes,
            Duration::from_secs(args.responses_store_ttl),
        ),
    })
}

/// What the HTTP side needs to know of the model (the model itself stays on the engine thread).
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub max_position_embeddings: usize,
    /// Rows of the embedding (the logits' width).
    pub vocab_size: usize,
    pub num_layers: usize,
    pub stop_ids: Vec<u32>,
    pub suppress_ids: Vec<u32>,
    pub default_sampling: gemma4_model::SamplingParams,
    /// The config's image placeholder id (also for text-only checkpoints).
    pub image_token_id: Option<u32>,
    /// Present when the checkpoint takes images.
    pub vision: Option<crate::images::VisionMeta>,
}

impl ModelMeta {
    /// From the checkpoint's configs; `has_tower`: the loaded model has a vision tower.
    pub fn from_configs(
        dir: &std::path::Path,
        config: &gemma4_model::ModelConfig,
        generation: &gemma4_model::GenerationConfig,
        has_tower: bool,
    ) -> Result<ModelMeta> {
        Ok(ModelMeta {
            max_position_embeddings: config.text.max_position_embeddings,
            vocab_size: config.text.vocab_size,
            num_layers: config.text.num_hidden_layers,
            stop_ids: gemma4_model::stop_ids(config, generation),
            suppress_ids: generation.suppress_tokens.clone(),
            default_sampling: generation.sampling(0),
            image_token_id: config.image_token_id,
            vision: vision_meta(dir, config, has_tower)?,
        })
    }
}

/// The vision side of a checkpoint: its placeholder ids and the image processor config, when the
/// model has a vision tower (`has_tower`) and the config names all three ids.
fn vision_meta(
    dir: &std::path::Path,
    config: &gemma4_model::ModelConfig,
    has_tower: bool,
) -> Result<Option<crate::images::VisionMeta>> {
    if !has_tower {
        return Ok(None);
    }
    let (Some(image), Some(boi), Some(eoi)) = (
        config.image_token_id,
        config.boi_token_id,
        config.eoi_token_id,
    ) else {
        tracing::warn!("the checkpoint has a vision tower but its config lacks image_token_id, boi_token_id or eoi_token_id: images are disabled");
        return Ok(None);
    };
    let processor = gemma4_model::vision::preprocess::ImageProcessorConfig::from_dir(dir)
        .map_err(|e| anyhow::anyhow!("image processor config: {e}"))?;
    Ok(Some(crate::images::VisionMeta {
        image_token_id: image,
        boi_token_id: boi,
        eoi_token_id: eoi,
        processor,
        max_patches_per_side: config
            .vision
            .as_ref()
            .map_or(0, |v| v.position_embedding_size),
    }))
}

/// Starts the engine with a model loaded on its thread (with a progress bar on stderr).
/// The pool's blocks from --kv-cache-memory (unless --num-kv-blocks gives them), logged as vLLM
/// does: blocks, tokens, and the maximum concurrency at the context limit.
fn kv_pool_blocks(args: &ServeArgs, elem_bytes: u64) -> Result<Option<gemma4_engine::Blocks>> {
    let (Some(bytes), None) = (args.kv_cache_memory, args.num_kv_blocks) else {
        if let Some(n) = args.num_kv_blocks {
            tracing::info!(
                "KV cache: {n} sliding + {n} full blocks of {} tokens (--num-kv-blocks)",
                args.block_size
            );
        }
        return Ok(None);
    };
    let config = gemma4_model::ModelConfig::from_dir(&args.model)?;
    let text = &config.text;
    let max_model_len = args
        .max_model_len
        .unwrap_or(text.max_position_embeddings)
        .min(text.max_position_embeddings);
    let split =
        gemma4_model::plan::split_kv(text, bytes, max_model_len, args.block_size, elem_bytes);
    if split.max_concurrency == 0 {
        anyhow::bail!(
            "--kv-cache-memory {bytes}: one sequence of {max_model_len} tokens needs {} bytes of KV cache",
            split.seq_bytes
        );
    }
    let [sliding, full] = split.num_blocks;
    tracing::info!(
        "KV cache: {:.2} GiB = {sliding} sliding + {full} full blocks of {} tokens ({} tokens in full layers); maximum concurrency for {max_model_len} tokens per request: {}",
        gemma4_model::plan::gib(bytes),
        args.block_size,
        full * args.block_size as u64,
        split.max_concurrency
    );
    Ok(Some(gemma4_engine::Blocks([
        sliding as usize,
        full as usize,
    ])))
}

pub fn start_engine<B: Gemma4Backend>(
    args: &ServeArgs,
    device: B::Device,
    progress: bool,
) -> Result<(Engine, ModelMeta)> {
    let dir = args.model.clone();
    let mut config = args.engine_config();
    let elem_bytes = args
        .kv_cache_dtype
        .elem_bytes(std::mem::size_of::<B::FloatElem>()) as u64;
    config.blocks.num_kv_blocks = kv_pool_blocks(args, elem_bytes)?.or(config.blocks.num_kv_blocks);
    let (meta_tx, meta_rx) = std::sync::mpsc::channel();
    let (engine, _thread) = Engine::start::<Model<B>, _>(config, move || {
        let bar = if progress {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading weights {bar:40} {pos}/{len} tensors {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let b = bar.clone();
        let model = Model::<B>::load_with_progress(&dir, &device, move |done, total| {
            b.set_length(total as u64);
            b.set_position(done as u64);
        })
        .with_context(|| format!("loading {}", dir.display()))?;
        bar.finish_and_clear();
        let meta = ModelMeta::from_configs(
            &dir,
            &model.config,
            &model.generation,
            model.vision.is_some(),
        )?;
        let r = &model.report;
        tracing::info!(
            tensors = r.tensors_used,
            nvfp4_linears = r.nvfp4_linears,
            dense_linears = r.dense_linears,
            "loaded {}",
            dir.display()
        );
        let _ = meta_tx.send(meta);
        Ok(model)
    })?;
    let meta = meta_rx
        .recv()
        .context("the engine did not report the model")?;
    Ok((engine, meta))
}

/// Serves until Ctrl-C, then shuts down ([`serve_until`]).
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    limits: http::listener::ConnLimits,
    grace: Duration,
) -> Result<()> {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_until(state, listener, limits, grace, ctrl_c).await;
    Ok(())
}

/// Serves the API until `stop` completes; then accepts no more connections, gives in-flight
/// requests `grace` to finish, ends the rest through the engine (each stream gets an error
/// frame and `[DONE]`, each waiting answer an error) and waits briefly for those last frames to
/// be sent.
pub async fn serve_until(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    limits: http::listener::ConnLimits,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let engine = state.engine.clone();
    let stats = engine.stats.clone();
    let server = http::listener::Listener::start(listener, http::router(state), limits);
    stop.await;
    tracing::info!(
        running = stats.running.load(Ordering::SeqCst),
        waiting = stats.waiting.load(Ordering::SeqCst),
        "shutting down: no new requests; in-flight requests get {}s to finish",
        grace.as_secs()
    );
    server.stop();
    if server.drain(grace).await {
        tracing::info!("all in-flight requests finished");
    } else {
        tracing::warn!(
            running = stats.running.load(Ordering::SeqCst),
            waiting = stats.waiting.load(Ordering::SeqCst),
            "grace period over: ending the remaining requests"
        );
    }
    engine.shutdown();
    if !server.drain(SHUTDOWN_FLUSH).await {
        tracing::warn!(
            "{} connections still open {}s after the engine stopped: closing them",
            server.open(),
            SHUTDOWN_FLUSH.as_secs()
        );
    }
}

/// How long the last frames of ended requests get to reach their clients.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

pub fn run<B: Gemma4Backend>(args: ServeArgs, device: B::Device) -> Result<()> {
    // A kernel refusing a shape must not take the server down: the plain reference answers
    // instead, with a warning naming the kernel and shape and a count in /metrics (tests keep
    // the default, Strict, where a refusal is an error).
    gemma4_model::kernels::fallback::set_policy(gemma4_model::kernels::fallback::Policy::Warn);
    let (engine, meta) = start_engine::<B>(&args, device, true)?;
    run_with(args, engine, meta)
}

/// Serves the API over an engine already started, whatever `StepModel` it runs (the checkpoint's
/// weights in `run`; the scripted test model in `server/examples/scripted_serve.rs`), with the
/// tokenizer and chat template of `args.model`. Returns after Ctrl-C and the grace period.
pub fn run_with(args: ServeArgs, engine: Engine, meta: ModelMeta) -> Result<()> {
    let state = Arc::new(build_state(&args, engine, meta)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("bad address {}:{}", args.host, args.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            "serving `{}` on http://{} (max_model_len {}, max_num_seqs {}, prefix caching {}, auth {})",
            state.served_model_name,
            listener.local_addr()?,
            state.max_model_len,
            args.max_num_seqs,
            if state.engine.config().blocks.prefix_caching { "on" } else { "off" },
            if state.api_key.is_some() { "on" } else { "off" }
        );
        serve(
            state,
            listener,
            args.conn_limits(),
            Duration::from_secs(args.shutdown_grace),
        )
        .await
    })
}
