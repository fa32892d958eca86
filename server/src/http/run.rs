//! The part shared by chat completions and responses: building the prompt (chat template,
//! tokenizer, context check), mapping request fields to engine parameters, and running one choice
//! through the engine and the output parser into API deltas.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::images;
use super::types::{FunctionCall, LogprobContent, ToolCallChunk, TopLogprob};
use super::AppState;
use crate::engine::{EngineEvent, EngineRequest, FinishReason, Penalties, SubmitError};
use crate::output::{OutputParser, ParsedDelta};
use gemma4_model::vision::PreprocessedImage;
use gemma4_model::SamplingParams;

/// A rendered, tokenized prompt, with its images: each image is a run of `num_soft_tokens`
/// image placeholder ids in `ids` (between `<|image>` and `<image|>`), in order.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<Arc<PreprocessedImage>>,
}

/// Renders chat messages with the checkpoint's template, tokenizes them, and loads the images
/// (fetch, decode, preprocess) and expands their placeholders. `labels[i]` names message i in
/// error messages (default `messages[i]`); `mm` is the request's `mm_processor_kwargs`.
pub async fn chat_prompt(
    state: &AppState,
    messages: &[Value],
    labels: Option<&[String]>,
    tools: Option<&[Value]>,
    thinking: Option<bool>,
    extra_kwargs: Option<&Map<String, Value>>,
    mm: Option<&Value>,
) -> Result<Prompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("`messages` must not be empty").param("messages"));
    }
    let label = |i: usize| {
        labels
            .and_then(|l| l.get(i).cloned())
            .unwrap_or_else(|| format!("messages[{i}]"))
    };
    let budget = images::soft_token_budget(&state.images, mm)?;
    let mut refs = Vec::new();
    // The template gets `{"type": "image"}` in place of each image part (no URL data in it).
    let mut rendered: Vec<Value> = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad_request(format!("{}: `role` is missing or not a string", label(i)))
                .param("messages")
        })?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(
                ApiError::bad_request(format!("{}: unknown role `{role}`", label(i)))
                    .param("messages"),
            );
        }
        let mut m = m.clone();
        if let Some(Value::Array(parts)) = m.get_mut("content") {
            for (j, p) in parts.iter_mut().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") | Some("input_text") | Some("output_text") => {}
                    Some("image_url") | Some("input_image") | Some("image") => {
                        let location = format!("{}.content[{j}]", label(i));
                        if role == "tool" {
                            return Err(ApiError::bad_request(format!(
                                "{location}: images in tool messages are not supported"
                            ))
                            .param("messages"));
                        }
                        let url = images::part_url(p).map_err(|e| {
                            ApiError::bad_request(format!("{location}: {e}")).param("messages")
                        })?;
                        refs.push(images::ImageRef { location, url });
                        *p = serde_json::json!({"type": "image"});
                    }
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "{}: unsupported content part type {other:?}",
                            label(i)
                        ))
                        .param("messages"))
                    }
                }
            }
        }
        rendered.push(m);
    }
    images::check_refs(&state.images, &refs).map_err(|e| e.param("messages"))?;
    let Some(template) = &state.template else {
        return Err(ApiError::bad_request(
            "this model has no chat template; use /tokenize and a completion client",
        ));
    };
    let converted = template
        .convert_openai_messages(&rendered)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    let mut kwargs = extra_kwargs.cloned().unwrap_or_default();
    if let Some(t) = thinking {
        kwargs.insert("enable_thinking".into(), Value::Bool(t));
    }
    let text = template
        .render(&converted, tools, true, &kwargs)
        .map_err(|e| ApiError::bad_request(format!("rendering the chat template: {e}")))?;
    let enc = state
        .tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
    let ids = enc.get_ids().to_vec();
    // Every image placeholder of the prompt must be one of the request's images.
    let placeholders = state
        .images
        .image_token_id
        .map_or(0, |id| ids.iter().filter(|&&t| t == id).count());
    if placeholders != refs.len() {
        return Err(ApiError::bad_request(if refs.is_empty() {
            "the prompt contains the image placeholder token `<|image|>` but the request has no image".to_string()
        } else {
            format!(
                "the chat template rendered {placeholders} image placeholders for the request's {} images (images are taken in user, system and assistant messages; the text must not contain `<|image|>`)",
                refs.len()
            )
        })
        .param("messages"));
    }
    if refs.is_empty() {
        return Ok(Prompt {
            ids,
            images: vec![],
        });
    }
    let (Some(vision), Some(budget)) = (state.images.vision.clone(), budget) else {
        return Err(ApiError::bad_request(
            "this model has no vision tower: image inputs are not supported",
        ));
    };
    let loaded = images::load(&state.images, refs, budget)
        .await
        .map_err(|e| {
            if e.param.is_none() && e.status == axum::http::StatusCode::BAD_REQUEST {
                e.param("messages")
            } else {
                e
            }
        })?;
    let counts: Vec<usize> = loaded.iter().map(|p| p.num_soft_tokens).collect();
    Ok(Prompt {
        ids: images::expand_placeholders(&ids, &vision, &counts),
        images: loaded,
    })
}

/// Sampling, penalties and limits taken from a request.
pub struct GenParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    /// Tokens the answer must start with (tool_choice "required" or a named tool).
    pub forced_prefix: Vec<u32>,
}

pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
}

pub fn sampling(state: &AppState, f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let d = &state.default_sampling;
    let temperature = f.temperature.unwrap_or(d.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!(
            "temperature {temperature} must be between 0 and 2"
        ))
        .param("temperature"));
    }
    let top_p = f.top_p.unwrap_or(d.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(
            ApiError::bad_request(format!("top_p {top_p} must be in (0, 1]")).param("top_p"),
        );
    }
    let top_k = match f.top_k {
        None => d.top_k,
        Some(k) if k <= 0 => 0, // -1 / 0 disable, as vLLM
        Some(k) => k as usize,
    };
    let min_p = f.min_p.unwrap_or(d.min_p);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(
            ApiError::bad_request(format!("min_p {min_p} must be in [0, 1]")).param("min_p"),
        );
    }
    let seed = match f.seed {
        Some(s) => s as u64,
        // Unseeded requests still differ from each other.
        None => crate::ids::random_u64(),
    };
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
    })
}

/// max_tokens bounded by what is left of the context after the prompt; a prompt that does not
/// leave room for one token is a 400 naming the limit.
pub fn max_tokens(
    state: &AppState,
    prompt_len: usize,
    requested: Option<u32>,
) -> Result<usize, ApiError> {
    let limit = state.max_model_len;
    if prompt_len >= limit {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {limit} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input messages."
        ))
        .param("messages"));
    }
    let left = limit - prompt_len;
    Ok(match requested {
        Some(0) => {
            return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens"))
        }
        Some(n) => (n as usize).min(left),
        None => left,
    })
}

/// One update of one choice.
#[derive(Debug)]
pub enum ChoiceEvent {
    Delta {
        reasoning: String,
        content: String,
        tool_calls: Vec<ToolCallChunk>,
        logprobs: Vec<LogprobContent>,
    },
    Done {
        finish_reason: String,
        completion_tokens: usize,
        reasoning_tokens: usize,
        prompt_tokens: usize,
    },
    Error(ApiError),
}

/// Holds back text that may be the start of a stop string; reports a hit.
struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Returns (text safe to emit, stop hit).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

pub fn engine_request(
    state: &AppState,
    prompt: &Prompt,
    p: &GenParams,
    seed_offset: u64,
) -> EngineRequest {
    let mut sampling = p.sampling.clone();
    sampling.seed = sampling.seed.wrapping_add(seed_offset);
    EngineRequest {
        prompt: prompt.ids.clone(),
        max_new_tokens: p.max_tokens,
        sampling,
        penalties: p.penalties.clone(),
        stop_ids: if p.ignore_eos {
            vec![]
        } else {
            state.stop_ids.clone()
        },
        suppress_ids: state.suppress_ids.clone(),
        logprobs: p.logprobs,
        forced_prefix: p.forced_prefix.clone(),
        images: prompt.images.clone(),
    }
}

/// `tool_choice` "required" or a named function: the answer is made to start with the Gemma 4
/// tool-call syntax (`<|tool_call>call:` and, when named, `NAME{`), so the model must call a tool
/// (and the named one) instead of being checked afterwards.
pub fn forced_tool_prefix(
    state: &AppState,
    tool_choice: Option<&Value>,
    tools: Option<&[Value]>,
) -> Result<Vec<u32>, ApiError> {
    let Some(choice) = tool_choice else {
        return Ok(vec![]);
    };
    let text = match choice.as_str() {
        Some("required") => {
            if tools.is_none_or(|t| t.is_empty()) {
                return Err(
                    ApiError::bad_request("tool_choice \"required\" needs `tools`")
                        .param("tool_choice"),
                );
            }
            "<|tool_call>call:".to_string()
        }
        Some(_) => return Ok(vec![]),
        None => {
            // Chat: {"type": "function", "function": {"name"}}; Responses: {"type": "function", "name"}.
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .or(choice.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let declared = tools.unwrap_or_default().iter().any(|t| {
                t.get("function")
                    .and_then(|f| f.get("name"))
                    .or(t.get("name"))
                    .and_then(Value::as_str)
                    == Some(name)
            });
            if !declared {
                return Err(ApiError::bad_request(format!(
                    "tool_choice names `{name}`, which is not among `tools`"
                ))
                .param("tool_choice"));
            }
            format!("<|tool_call>call:{name}{{")
        }
    };
    let enc = state
        .tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

pub fn submit(
    state: &AppState,
    req: EngineRequest,
) -> Result<crate::engine::RequestHandle, ApiError> {
    state.engine.submit(req).map_err(|e| match e {
        SubmitError::QueueFull { .. } | SubmitError::NotReady => {
            ApiError::unavailable(e.to_string())
        }
    })
}

/// Runs one submitted choice to its end, sending `(index, event)`s. Returns early (dropping the
/// handle, which cancels the request in the engine) when the receiver is gone.
pub async fn run_choice(
    state: Arc<AppState>,
    mut handle: crate::engine::RequestHandle,
    index: usize,
    prompt_len: usize,
    stop: Vec<String>,
    tx: mpsc::Sender<(usize, ChoiceEvent)>,
) {
    let mut parser = OutputParser::new(state.special.clone(), state.tokenizer.clone());
    let mut stopper = StopMatcher {
        stops: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        pending: String::new(),
    };
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    let mut tokens = 0usize;
    let mut tool_calls = 0usize;
    while let Some(ev) = handle.events.recv().await {
        match ev {
            EngineEvent::Token { id, logprob } => {
                let now = Instant::now();
                match last {
                    None => state
                        .metrics
                        .time_to_first_token(now.duration_since(start).as_secs_f64()),
                    Some(t) => state
                        .metrics
                        .inter_token(now.duration_since(t).as_secs_f64()),
                }
                last = Some(now);
                tokens += 1;
                let mut delta = deltas(parser.push(&[id]), &mut stopper, &mut tool_calls);
                if let Some(lp) = logprob {
                    delta.logprobs.push(logprob_content(&state, lp));
                }
                let hit = delta.hit;
                if !delta.is_empty() && tx.send((index, delta.into_event())).await.is_err() {
                    return;
                }
                if hit {
                    state.metrics.end_to_end(start.elapsed().as_secs_f64());
                    let done = ChoiceEvent::Done {
                        finish_reason: "stop".into(),
                        completion_tokens: tokens,
                        reasoning_tokens: parser.reasoning_tokens(),
                        prompt_tokens: prompt_len,
                    };
                    let _ = tx.send((index, done)).await;
                    return; // dropping the handle cancels the rest
                }
            }
            EngineEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut delta = deltas(parser.finish(), &mut stopper, &mut tool_calls);
                let rest = stopper.flush();
                delta.content.push_str(&rest);
                if !delta.is_empty() && tx.send((index, delta.into_event())).await.is_err() {
                    return;
                }
                state.metrics.end_to_end(start.elapsed().as_secs_f64());
                let finish_reason = if tool_calls > 0 {
                    "tool_calls"
                } else if reason == FinishReason::Length {
                    "length"
                } else {
                    "stop"
                };
                let done = ChoiceEvent::Done {
                    finish_reason: finish_reason.into(),
                    completion_tokens,
                    reasoning_tokens: parser.reasoning_tokens(),
                    prompt_tokens,
                };
                let _ = tx.send((index, done)).await;
                return;
            }
            EngineEvent::Error(msg) => {
                state.metrics.error();
                let _ = tx
                    .send((index, ChoiceEvent::Error(ApiError::internal(msg))))
                    .await;
                return;
            }
        }
    }
    let _ = tx
        .send((
            index,
            ChoiceEvent::Error(ApiError::internal("the engine dropped the request")),
        ))
        .await;
}

struct Pending {
    reasoning: String,
    content: String,
    tool_calls: Vec<ToolCallChunk>,
    logprobs: Vec<LogprobContent>,
    hit: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty()
            && self.content.is_empty()
            && self.tool_calls.is_empty()
            && self.logprobs.is_empty()
    }
    fn into_event(self) -> ChoiceEvent {
        ChoiceEvent::Delta {
            reasoning: self.reasoning,
            content: self.content,
            tool_calls: self.tool_calls,
            logprobs: self.logprobs,
        }
    }
}

fn deltas(parsed: Vec<ParsedDelta>, stopper: &mut StopMatcher, tool_calls: &mut usize) -> Pending {
    let mut p = Pending {
        reasoning: String::new(),
        content: String::new(),
        tool_calls: vec![],
        logprobs: vec![],
        hit: false,
    };
    for d in parsed {
        if p.hit {
            break;
        }
        match d {
            ParsedDelta::Reasoning(t) => p.reasoning.push_str(&t),
            ParsedDelta::Content(t) => {
                let (out, hit) = stopper.push(&t);
                p.content.push_str(&out);
                p.hit = hit;
            }
            ParsedDelta::ToolCall {
                index,
                id,
                name,
                arguments,
            } => {
                *tool_calls += 1;
                p.tool_calls.push(ToolCallChunk {
                    index,
                    id,
                    kind: "function".into(),
                    function: FunctionCall { name, arguments },
                });
            }
        }
    }
    p
}

fn logprob_content(state: &AppState, lp: crate::engine::TokenLogprob) -> LogprobContent {
    let text = |id: u32| state.tokenizer.decode(&[id], false).unwrap_or_default();
    let token = text(lp.id);
    LogprobContent {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob: lp.logprob,
        top_logprobs: lp
            .top
            .into_iter()
            .map(|(id, logprob)| {
                let t = text(id);
                TopLogprob {
                    bytes: t.as_bytes().to_vec(),
                    token: t,
                    logprob,
                }
            })
            .collect(),
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
