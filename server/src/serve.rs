//! `gemma4 serve`: loads the model on the engine thread, then serves the OpenAI-compatible API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gemma4_engine::{Engine, EngineConfig};
use gemma4_model::Gemma4Backend;

use crate::chat_template::ChatTemplate;
use crate::http::{self, AppState};
use crate::parser::SpecialTokens;
use gemma4_model::Model;

#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    /// Prompt tokens prefilled per engine step (chunked prefill), as vLLM's option of that name.
    pub max_num_batched_tokens: usize,
    pub max_waiting: usize,
    /// Seconds in-flight requests get to finish after Ctrl-C before they are aborted.
    pub shutdown_grace: u64,
    /// Test mode: answer every request with this text (tokenized, special tokens included)
    /// through `ScriptedModel` instead of running the weights.
    pub scripted_output: Option<String>,
    /// Fetch http(s):// image URLs (otherwise only data: URLs are taken).
    pub allow_image_urls: bool,
    /// PEM CA certificates trusted for https:// image URLs besides Mozilla's roots.
    pub image_ca_file: Option<PathBuf>,
    /// Images per request; more is a 400.
    pub limit_images_per_prompt: usize,
    /// Seconds a fetch of one image URL may take.
    pub image_fetch_timeout: u64,
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
    let mut images = http::images::ImageSettings::new(
        meta.vision,
        meta.image_token_id,
        args.allow_image_urls,
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
    Ok(AppState {
        engine,
        tokenizer: Arc::new(tokenizer),
        template,
        special: Arc::new(special),
        served_model_name,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_model_len,
        stop_ids: meta.stop_ids,
        suppress_ids: meta.suppress_ids,
        default_sampling: meta.default_sampling,
        metrics: Default::default(),
        kv_capacity: args.max_num_seqs * max_model_len * meta.num_layers,
        created: http::run::now_secs(),
        images,
    })
}

/// What the HTTP side needs to know of the model (the model itself stays on the engine thread).
#[derive(Debug, Clone)]
pub struct ModelMeta {
    pub max_position_embeddings: usize,
    pub num_layers: usize,
    pub stop_ids: Vec<u32>,
    pub suppress_ids: Vec<u32>,
    pub default_sampling: gemma4_model::SamplingParams,
    /// The config's image placeholder id (also for text-only checkpoints).
    pub image_token_id: Option<u32>,
    /// Present when the checkpoint takes images.
    pub vision: Option<http::images::VisionMeta>,
}

/// The vision side of a checkpoint: its placeholder ids and the image processor config, when the
/// model has a vision tower (`has_tower`) and the config names all three ids.
fn vision_meta(
    dir: &std::path::Path,
    config: &gemma4_model::ModelConfig,
    has_tower: bool,
) -> Result<Option<http::images::VisionMeta>> {
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
    Ok(Some(http::images::VisionMeta {
        image_token_id: image,
        boi_token_id: boi,
        eoi_token_id: eoi,
        processor,
    }))
}

/// Starts the engine with a model loaded on its thread (with a progress bar on stderr).
pub fn start_engine<B: Gemma4Backend>(
    args: &ServeArgs,
    device: B::Device,
    progress: bool,
) -> Result<(Engine, ModelMeta)> {
    if let Some(text) = &args.scripted_output {
        return start_scripted(args, text);
    }
    let dir = args.model.clone();
    let (meta_tx, meta_rx) = std::sync::mpsc::channel();
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs.max(1),
        prefill_chunk: args.max_num_batched_tokens.max(1),
        max_waiting: args.max_waiting,
    };
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
        let meta = ModelMeta {
            max_position_embeddings: model.config.text.max_position_embeddings,
            num_layers: model.config.text.num_hidden_layers,
            stop_ids: model.stop_ids(),
            suppress_ids: model.generation.suppress_tokens.clone(),
            default_sampling: model.default_sampling(0),
            image_token_id: model.config.image_token_id,
            vision: vision_meta(&dir, &model.config, model.vision.is_some())?,
        };
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

/// The scripted test model with the checkpoint's configs and tokenizer (no weights loaded).
fn start_scripted(args: &ServeArgs, text: &str) -> Result<(Engine, ModelMeta)> {
    let config = gemma4_model::ModelConfig::from_dir(&args.model)?;
    let generation = gemma4_model::GenerationConfig::from_dir(&args.model)?;
    let tok_path = args.model.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let script = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the script: {e}"))?
        .get_ids()
        .to_vec();
    tracing::warn!(
        tokens = script.len(),
        "test mode: every request is answered with the scripted output, not the model"
    );
    let meta = ModelMeta {
        max_position_embeddings: config.text.max_position_embeddings,
        num_layers: config.text.num_hidden_layers,
        stop_ids: gemma4_model::stop_ids(&config, &generation),
        suppress_ids: generation.suppress_tokens.clone(),
        default_sampling: generation.sampling(0),
        image_token_id: config.image_token_id,
        vision: vision_meta(&args.model, &config, config.vision.is_some())?,
    };
    let vocab_size = config.text.vocab_size;
    let image_token_id = config.image_token_id;
    let engine_config = EngineConfig {
        max_num_seqs: args.max_num_seqs.max(1),
        prefill_chunk: args.max_num_batched_tokens.max(1),
        max_waiting: args.max_waiting,
    };
    let (engine, _thread) = Engine::start(engine_config, move || {
        Ok(gemma4_engine::scripted::ScriptedModel {
            vocab_size,
            script,
            image_token_id,
        })
    })?;
    Ok((engine, meta))
}

pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    grace: Duration,
) -> Result<()> {
    let engine = state.engine.clone();
    let stats = engine.stats.clone();
    let app = http::router(state.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown_signal = async move {
        let _ = tokio::signal::ctrl_c().await;
        let running = stats.running.load(Ordering::SeqCst);
        let waiting = stats.waiting.load(Ordering::SeqCst);
        tracing::info!(
            running,
            waiting,
            "shutting down: no new requests; in-flight requests get {}s to finish",
            grace.as_secs()
        );
        let _ = stop_tx.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown_signal);
    let server = tokio::spawn(async move { server.await });
    // After the signal, give in-flight requests the grace period, then abort what is left.
    let _ = stop_rx.await;
    match tokio::time::timeout(grace, server).await {
        Ok(_) => tracing::info!("all in-flight requests finished"),
        Err(_) => {
            let running = state.engine.stats.running.load(Ordering::SeqCst);
            let waiting = state.engine.stats.waiting.load(Ordering::SeqCst);
            tracing::warn!(
                running,
                waiting,
                "grace period over: aborting the remaining requests"
            );
        }
    }
    engine.shutdown();
    Ok(())
}

pub fn run<B: Gemma4Backend>(args: ServeArgs, device: B::Device) -> Result<()> {
    // A kernel refusing a shape must not take the server down: the plain reference answers
    // instead, with a warning naming the kernel and shape and a count in /metrics (tests keep
    // the default, Strict, where a refusal is an error).
    gemma4_model::kernels::fallback::set_policy(gemma4_model::kernels::fallback::Policy::Warn);
    let (engine, meta) = start_engine::<B>(&args, device, true)?;
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
            "serving `{}` on http://{} (max_model_len {}, max_num_seqs {}, auth {})",
            state.served_model_name,
            listener.local_addr()?,
            state.max_model_len,
            args.max_num_seqs,
            if state.api_key.is_some() { "on" } else { "off" }
        );
        serve(state, listener, Duration::from_secs(args.shutdown_grace)).await
    })
}
