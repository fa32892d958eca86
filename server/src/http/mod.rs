//! The OpenAI-compatible HTTP layer: thin handlers over the engine, the chat template and the
//! output parser. Auth (bearer, constant-time) on `/v1/*`, `/tokenize`, `/detokenize`; a body limit;
//! OpenAI error objects everywhere.

pub mod body;
pub mod chat;
pub mod completions;
pub mod listener;
pub mod metrics;
pub mod response_store;
pub mod responses;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::chat_template::ChatTemplate;
use crate::cpu::CpuPool;
use crate::images;
use crate::openai::error::{self, ApiError};
use crate::openai::protocol::*;
use crate::output::SpecialTokens;
use crate::prompt;
use body::ApiJson;
use gemma4_engine::Engine;
use gemma4_model::SamplingParams;

pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub special: Arc<SpecialTokens>,
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub max_model_len: usize,
    pub stop_ids: Vec<u32>,
    pub suppress_ids: Vec<u32>,
    pub default_sampling: SamplingParams,
    pub metrics: metrics::Metrics,
    /// KV entries (tokens × layers) the running slots could hold, for the usage gauge.
    pub created: u64,
    /// Image inputs: the vision side of the checkpoint and the operator's limits.
    pub images: images::ImageSettings,
    /// Structured outputs: the grammar compiler over the vocabulary, or why there is none.
    pub grammars: Result<gemma4_engine::structured::Grammars, String>,
    /// Finished Responses kept for `GET /v1/responses/{id}` and `previous_response_id`.
    pub responses: response_store::ResponseStore,
    /// Where request bodies are parsed and prompts rendered and tokenized.
    pub cpu: CpuPool,
    pub limits: RequestLimits,
    /// The most bytes of text one token stands for ([`prompt::max_token_bytes`]): bounds a
    /// prompt's token count from below before tokenizing.
    pub max_token_bytes: usize,
}

/// Time limits of a request once its head has arrived.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// The whole body must arrive within this (`--body-read-timeout`).
    pub body_read: std::time::Duration,
}

impl AppState {
    /// `model` may be the served name or left out.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m.is_empty() || m == self.served_model_name => Ok(()),
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "The model `{m}` does not exist; this server serves `{}`",
                    self.served_model_name
                ),
            )
            .param("model")),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gemma4",
        description = "OpenAI-compatible API of the gemma4 inference server"
    ),
    paths(
        chat::chat_completions,
        completions::completions,
        responses::responses,
        responses::get_response,
        responses::delete_response,
        models,
        tokenize,
        detokenize,
        health,
        version,
        metrics_handler
    ),
    components(schemas(
        ChatCompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
        crate::openai::completions::CompletionRequest,
        crate::openai::completions::Completion,
        ResponsesRequest,
        ResponseObject,
        DeletedResponse,
        ModelList,
        TokenizeRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        VersionResponse,
        error::ErrorBody
    ))
)]
pub struct ApiDoc;

/// Request bodies above this are refused with 413.
pub const BODY_LIMIT: usize = 32 * 1024 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route(
            "/v1/responses/{response_id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/health", get(health))
        .route("/metrics", get(metrics_handler))
        .route("/version", get(version))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Constant-time comparison: the time taken does not depend on where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            // The scheme is case-insensitive (RFC 9110), as vLLM takes it.
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        if !same(given.as_bytes(), key.as_bytes()) {
            state.metrics.error();
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid or missing API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: state.served_model_name.clone(),
            object: "model".into(),
            created: state.created,
            owned_by: "gemma4".into(),
            max_model_len: state.max_model_len,
        }],
    })
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse), (status = 400, body = error::ErrorBody)))]
async fn tokenize(
    State(state): State<Arc<AppState>>,
    payload: Result<ApiJson<TokenizeRequest>, ApiError>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let ApiJson(mut req) = payload?;
    state.check_model(req.model.as_deref())?;
    let tokens = match (req.prompt.take(), &req.messages) {
        (Some(p), None) => {
            let tokenizer = state.tokenizer.clone();
            let special = req.add_special_tokens.unwrap_or(true);
            state
                .cpu
                .run(move || tokenizer.encode(p.as_str(), special))
                .await?
                .map_err(|e| ApiError::bad_request(format!("tokenizing: {e}")))?
                .get_ids()
                .to_vec()
        }
        (None, Some(_)) => {
            let conversation = req.conversation()?;
            prompt::build(&state, &conversation).await?.ids
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_model_len,
        tokens,
    }))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse), (status = 400, body = error::ErrorBody)))]
async fn detokenize(
    State(state): State<Arc<AppState>>,
    payload: Result<ApiJson<DetokenizeRequest>, ApiError>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let ApiJson(req) = payload?;
    state.check_model(req.model.as_deref())?;
    let vocab = state.tokenizer.get_vocab_size(true) as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is outside the vocabulary (size {vocab})"
        ))
        .param("tokens"));
    }
    let prompt = state
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::bad_request(format!("detokenizing: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "The engine takes work"), (status = 503, body = error::ErrorBody)))]
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state
        .engine
        .stats
        .ready
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        StatusCode::OK.into_response()
    } else {
        ApiError::unavailable("the engine is not running").into_response()
    }
}

#[utoipa::path(get, path = "/version", responses((status = 200, body = VersionResponse)))]
async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(
        &state.engine.stats,
        &state.served_model_name,
        state.engine.config().blocks.num_kv_blocks.is_some(),
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(body),
    )
        .into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// A handler's answer; an error is counted in `/metrics` and sent as an OpenAI error object.
fn respond(state: &AppState, answer: Result<Response, ApiError>) -> Response {
    answer.unwrap_or_else(|e| {
        state.metrics.error();
        e.into_response()
    })
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
