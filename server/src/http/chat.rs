//! `POST /v1/chat/completions`, streaming (server-sent events) and not, with `n` choices.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, ErrorBody};
use super::run::{self, ChoiceEvent, GenParams, SamplingFields};
use super::types::*;
use super::AppState;
use crate::engine::Penalties;

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "A completion, or a stream of chat.completion.chunk events", body = ChatCompletion),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    payload: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Response {
    match handle(state.clone(), payload).await {
        Ok(r) => r,
        Err(e) => {
            state.metrics.error();
            e.into_response()
        }
    }
}

fn thinking(req: &ChatCompletionRequest) -> Option<bool> {
    if let Some(v) = req
        .chat_template_kwargs
        .as_ref()
        .and_then(|k| k.get("enable_thinking"))
        .and_then(|v| v.as_bool())
    {
        return Some(v);
    }
    req.reasoning_effort.as_ref().map(|e| e != "none")
}

async fn handle(
    state: Arc<AppState>,
    payload: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = payload?;
    state.check_model(req.model.as_deref())?;
    if let Some(tc) = &req.tool_choice {
        let ok = matches!(tc.as_str(), Some("none" | "auto" | "required"))
            || tc.get("function").and_then(|f| f.get("name")).is_some();
        if !ok {
            return Err(ApiError::bad_request(
                "tool_choice must be \"none\", \"auto\", \"required\" or a named function",
            )
            .param("tool_choice"));
        }
    }
    let tools = match req.tool_choice.as_ref().and_then(|t| t.as_str()) {
        Some("none") => None,
        _ => req.tools.as_deref(),
    };
    let prompt = run::chat_prompt(
        &state,
        &req.messages,
        None,
        tools,
        thinking(&req),
        req.chat_template_kwargs.as_ref(),
        req.mm_processor_kwargs.as_ref(),
    )
    .await?;
    let n = req.n.unwrap_or(1) as usize;
    if n == 0 || n > 16 {
        return Err(ApiError::bad_request("n must be between 1 and 16").param("n"));
    }
    let sampling = run::sampling(
        &state,
        &SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            seed: req.seed,
        },
    )?;
    let mut logit_bias = vec![];
    for (k, v) in req.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::bad_request(format!("logit_bias key `{k}` is not a token id"))
                .param("logit_bias")
        })?;
        logit_bias.push((id, v.clamp(-100.0, 100.0)));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0).min(20) as usize),
        (false, Some(k)) if k > 0 => {
            return Err(
                ApiError::bad_request("top_logprobs needs logprobs: true").param("top_logprobs")
            )
        }
        _ => None,
    };
    let params = GenParams {
        max_tokens: run::max_tokens(
            &state,
            prompt.ids.len(),
            req.max_completion_tokens.or(req.max_tokens),
        )?,
        sampling,
        penalties: Penalties {
            presence: req.presence_penalty.unwrap_or(0.0),
            frequency: req.frequency_penalty.unwrap_or(0.0),
            repetition: req.repetition_penalty.unwrap_or(1.0),
            logit_bias,
        },
        stop: req.stop.clone().map(StopSpec::into_vec).unwrap_or_default(),
        logprobs,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        forced_prefix: run::forced_tool_prefix(
            &state,
            req.tool_choice.as_ref(),
            req.tools.as_deref(),
        )?,
    };
    // Submit every choice first, so an overloaded server answers 503 before any stream starts.
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        handles.push(run::submit(
            &state,
            run::engine_request(&state, &prompt, &params, i as u64),
        )?);
    }
    let (tx, rx) = mpsc::channel(64);
    for (i, h) in handles.into_iter().enumerate() {
        tokio::spawn(run::run_choice(
            state.clone(),
            h,
            i,
            prompt.ids.len(),
            params.stop.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let id = crate::ids::random_id("chatcmpl-");
    let model = state.served_model_name.clone();
    if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(stream(id, model, n, include_usage, prompt.ids.len(), rx).into_response())
    } else {
        Ok(
            Json(collect(id, model, n, prompt.ids.len(), logprobs.is_some(), rx).await?)
                .into_response(),
        )
    }
}

async fn collect(
    id: String,
    model: String,
    n: usize,
    prompt_tokens: usize,
    want_logprobs: bool,
    mut rx: mpsc::Receiver<(usize, ChoiceEvent)>,
) -> Result<ChatCompletion, ApiError> {
    let mut choices: Vec<ChatChoice> = (0..n)
        .map(|index| ChatChoice {
            index,
            message: ChatMessage {
                role: "assistant".into(),
                content: None,
                reasoning: None,
                reasoning_content: None,
                tool_calls: vec![],
            },
            logprobs: want_logprobs.then(|| ChoiceLogprobs { content: vec![] }),
            finish_reason: String::new(),
        })
        .collect();
    let (mut completion, mut reasoning) = (0, 0);
    let mut done = 0;
    while let Some((i, ev)) = rx.recv().await {
        let c = &mut choices[i];
        match ev {
            ChoiceEvent::Delta {
                reasoning: r,
                content,
                tool_calls,
                logprobs,
            } => {
                if !r.is_empty() {
                    c.message
                        .reasoning
                        .get_or_insert_with(String::new)
                        .push_str(&r);
                }
                if !content.is_empty() {
                    c.message
                        .content
                        .get_or_insert_with(String::new)
                        .push_str(&content);
                }
                c.message
                    .tool_calls
                    .extend(tool_calls.into_iter().map(|t| ToolCall {
                        id: t.id,
                        kind: t.kind,
                        function: t.function,
                    }));
                if let Some(l) = c.logprobs.as_mut() {
                    l.content.extend(logprobs);
                }
            }
            ChoiceEvent::Done {
                finish_reason,
                completion_tokens,
                reasoning_tokens,
                ..
            } => {
                c.finish_reason = finish_reason;
                completion += completion_tokens;
                reasoning += reasoning_tokens;
                done += 1;
            }
            ChoiceEvent::Error(e) => return Err(e),
        }
    }
    if done < n {
        return Err(ApiError::internal("a choice ended without finishing"));
    }
    for c in &mut choices {
        c.message.reasoning_content = c.message.reasoning.clone();
        if c.message.content.is_none() && c.message.tool_calls.is_empty() {
            c.message.content = Some(String::new());
        }
    }
    Ok(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: run::now_secs(),
        model,
        choices,
        usage: usage(prompt_tokens * n, completion, reasoning),
    })
}

/// Usage over all choices (each choice counts the prompt once, as OpenAI does for `n`).
fn usage(prompt_tokens: usize, completion_tokens: usize, reasoning_tokens: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
        completion_tokens_details: CompletionTokensDetails { reasoning_tokens },
    }
}

fn stream(
    id: String,
    model: String,
    n: usize,
    include_usage: bool,
    prompt_tokens: usize,
    mut rx: mpsc::Receiver<(usize, ChoiceEvent)>,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (out_tx, out_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let created = run::now_secs();
    tokio::spawn(async move {
        let chunk = |choices: Vec<ChunkChoice>, usage: Option<Usage>| {
            let c = ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk".into(),
                created,
                model: model.clone(),
                choices,
                usage,
            };
            Ok(Event::default().data(serde_json::to_string(&c).unwrap_or_default()))
        };
        // First delta of each choice carries the role.
        for index in 0..n {
            let delta = ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                ..Default::default()
            };
            if out_tx
                .send(chunk(
                    vec![ChunkChoice {
                        index,
                        delta,
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                ))
                .await
                .is_err()
            {
                return;
            }
        }
        let (mut completion, mut reasoning) = (0, 0);
        while let Some((index, ev)) = rx.recv().await {
            let frame = match ev {
                ChoiceEvent::Delta {
                    reasoning: r,
                    content,
                    tool_calls,
                    logprobs,
                } => {
                    let opt = |s: String| (!s.is_empty()).then_some(s);
                    let delta = ChatDelta {
                        role: None,
                        reasoning: opt(r.clone()),
                        reasoning_content: opt(r),
                        content: opt(content),
                        tool_calls,
                    };
                    let lp = (!logprobs.is_empty()).then_some(ChoiceLogprobs { content: logprobs });
                    chunk(
                        vec![ChunkChoice {
                            index,
                            delta,
                            logprobs: lp,
                            finish_reason: None,
                        }],
                        None,
                    )
                }
                ChoiceEvent::Done {
                    finish_reason,
                    completion_tokens,
                    reasoning_tokens,
                    ..
                } => {
                    completion += completion_tokens;
                    reasoning += reasoning_tokens;
                    chunk(
                        vec![ChunkChoice {
                            index,
                            delta: ChatDelta::default(),
                            logprobs: None,
                            finish_reason: Some(finish_reason),
                        }],
                        None,
                    )
                }
                ChoiceEvent::Error(e) => {
                    // After the stream started, an error is a data frame of the same shape as a
                    // non-streaming error, then [DONE].
                    let _ = out_tx
                        .send(Ok(Event::default()
                            .data(serde_json::to_string(&e.body()).unwrap_or_default())))
                        .await;
                    let _ = out_tx.send(Ok(Event::default().data("[DONE]"))).await;
                    return;
                }
            };
            if out_tx.send(frame).await.is_err() {
                return; // client gone: dropping rx cancels the choices
            }
        }
        if include_usage {
            let _ = out_tx
                .send(chunk(
                    vec![],
                    Some(usage(prompt_tokens * n, completion, reasoning)),
                ))
                .await;
        }
        let _ = out_tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(out_rx))
}
