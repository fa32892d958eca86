//! `POST /v1/responses`: input as a string or a list of items, `instructions`, reasoning items,
//! `max_output_tokens`, function calls, and the streaming events from `response.created` to
//! `response.completed` (or `response.incomplete` / `response.failed`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, ErrorBody};
use super::run::{self, ChoiceEvent, GenParams, SamplingFields};
use super::types::*;
use super::AppState;
use crate::engine::Penalties;

#[utoipa::path(post, path = "/v1/responses", request_body = ResponsesRequest,
    responses((status = 200, description = "A response object, or a stream of response events", body = ResponseObject),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn responses(
    State(state): State<Arc<AppState>>,
    payload: Result<Json<ResponsesRequest>, JsonRejection>,
) -> Response {
    match handle(state.clone(), payload).await {
        Ok(r) => r,
        Err(e) => {
            state.metrics.error();
            e.into_response()
        }
    }
}

fn text_of(content: &Value) -> Result<Value, ApiError> {
    match content {
        Value::String(_) => Ok(content.clone()),
        Value::Array(parts) => {
            let mut out = vec![];
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => out.push(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(Value::Null)})),
                    // Passed on as a chat image part; `chat_prompt` checks and loads it.
                    Some("input_image" | "image_url" | "image") => out.push(p.clone()),
                    other => return Err(ApiError::bad_request(format!("unsupported content part type {other:?}")).param("input")),
                }
            }
            Ok(Value::Array(out))
        }
        _ => Err(
            ApiError::bad_request("message content must be a string or a list of parts")
                .param("input"),
        ),
    }
}

/// Responses input items to chat messages, and the name of each message's item (`input[3]`)
/// for error messages.
fn to_messages(req: &ResponsesRequest) -> Result<(Vec<Value>, Vec<String>), ApiError> {
    let mut msgs = vec![];
    let mut labels = vec![];
    if let Some(i) = &req.instructions {
        msgs.push(json!({"role": "system", "content": i}));
        labels.push("instructions".to_string());
    }
    match &req.input {
        Value::String(s) => {
            msgs.push(json!({"role": "user", "content": s}));
            labels.push("input".to_string());
        }
        Value::Array(items) => {
            for (n, item) in items.iter().enumerate() {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                match kind {
                    "message" => {
                        let role = item.get("role").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::bad_request(format!("input[{n}]: missing role"))
                                .param("input")
                        })?;
                        msgs.push(json!({"role": role, "content": text_of(item.get("content").unwrap_or(&Value::Null))?}));
                        labels.push(format!("input[{n}]"));
                    }
                    "function_call" => {
                        let call = json!({"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": item.get("arguments")}});
                        // Consecutive calls belong to one assistant message.
                        match msgs.last_mut() {
                            Some(last)
                                if last.get("role") == Some(&json!("assistant"))
                                    && last.get("tool_calls").is_some() =>
                            {
                                if let Some(Value::Array(calls)) = last.get_mut("tool_calls") {
                                    calls.push(call);
                                }
                            }
                            _ => {
                                msgs.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
                                labels.push(format!("input[{n}]"));
                            }
                        }
                    }
                    "function_call_output" => {
                        let output = match item.get("output") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v) => v.to_string(),
                            None => String::new(),
                        };
                        msgs.push(json!({"role": "tool", "tool_call_id": item.get("call_id"), "content": output}));
                        labels.push(format!("input[{n}]"));
                    }
                    "reasoning" => {} // earlier reasoning is not re-sent to the model
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "input[{n}]: unsupported item type `{other}`"
                        ))
                        .param("input"))
                    }
                }
            }
        }
        _ => {
            return Err(
                ApiError::bad_request("`input` must be a string or a list of items").param("input"),
            )
        }
    }
    Ok((msgs, labels))
}

/// Responses tools are flat ({type, name, description, parameters}); the template takes chat-style ones.
fn chat_tools(tools: &[Value]) -> Vec<Value> {
    tools
        .iter()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .map(|t| match t.get("function") {
            Some(_) => t.clone(),
            None => json!({"type": "function", "function": {"name": t.get("name"), "description": t.get("description"), "parameters": t.get("parameters")}}),
        })
        .collect()
}

struct Built {
    output: Vec<Value>,
    status: String,
    usage: ResponseUsage,
    incomplete: Option<IncompleteDetails>,
}

fn base(state: &AppState, req: &ResponsesRequest, id: &str, status: &str) -> ResponseObject {
    ResponseObject {
        id: id.to_string(),
        object: "response".into(),
        created_at: run::now_secs(),
        status: status.into(),
        model: state.served_model_name.clone(),
        output: vec![],
        usage: None,
        incomplete_details: None,
        error: None,
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        parallel_tool_calls: true,
        tools: req.tools.clone().unwrap_or_default(),
        tool_choice: req.tool_choice.clone().unwrap_or(json!("auto")),
        temperature: req.temperature,
        top_p: req.top_p,
    }
}

async fn handle(
    state: Arc<AppState>,
    payload: Result<Json<ResponsesRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = payload?;
    state.check_model(req.model.as_deref())?;
    let (messages, labels) = to_messages(&req)?;
    let tools = req.tools.as_deref().map(chat_tools);
    let thinking = req
        .reasoning
        .as_ref()
        .and_then(|r| r.effort.as_ref())
        .map(|e| e != "none");
    let prompt = run::chat_prompt(
        &state,
        &messages,
        Some(&labels),
        tools.as_deref(),
        thinking,
        None,
        req.mm_processor_kwargs.as_ref(),
    )
    .await
    .map_err(|e| {
        if e.param.as_deref() == Some("messages") {
            e.param("input")
        } else {
            e
        }
    })?;
    let sampling = run::sampling(
        &state,
        &SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: None,
            min_p: None,
            seed: req.seed,
        },
    )?;
    let params = GenParams {
        max_tokens: run::max_tokens(&state, prompt.ids.len(), req.max_output_tokens)?,
        sampling,
        penalties: Penalties::none(),
        stop: vec![],
        logprobs: None,
        ignore_eos: false,
        forced_prefix: run::forced_tool_prefix(
            &state,
            req.tool_choice.as_ref(),
            req.tools.as_deref(),
        )?,
    };
    let handle = run::submit(&state, run::engine_request(&state, &prompt, &params, 0))?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run::run_choice(
        state.clone(),
        handle,
        0,
        prompt.ids.len(),
        vec![],
        tx,
    ));
    let id = crate::ids::random_id("resp_");
    if req.stream.unwrap_or(false) {
        Ok(stream(state, req, id, rx).into_response())
    } else {
        let b = collect(rx).await?;
        let mut r = base(&state, &req, &id, &b.status);
        r.output = b.output;
        r.usage = Some(b.usage);
        r.incomplete_details = b.incomplete;
        Ok(Json(r).into_response())
    }
}

fn item_id(prefix: &str) -> String {
    crate::ids::random_id(&format!("{prefix}_"))
}

async fn collect(mut rx: mpsc::Receiver<(usize, ChoiceEvent)>) -> Result<Built, ApiError> {
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut calls = vec![];
    while let Some((_, ev)) = rx.recv().await {
        match ev {
            ChoiceEvent::Delta {
                reasoning: r,
                content: c,
                tool_calls,
                ..
            } => {
                reasoning.push_str(&r);
                content.push_str(&c);
                calls.extend(tool_calls);
            }
            ChoiceEvent::Done {
                finish_reason,
                completion_tokens,
                reasoning_tokens,
                prompt_tokens,
            } => {
                let mut output = vec![];
                if !reasoning.is_empty() {
                    output.push(reasoning_item(&item_id("rs"), &reasoning));
                }
                if !content.is_empty() || calls.is_empty() {
                    output.push(message_item(&item_id("msg"), &content, "completed"));
                }
                for c in &calls {
                    output.push(call_item(&item_id("fc"), c, "completed"));
                }
                let incomplete = finish_reason == "length";
                return Ok(Built {
                    output,
                    status: if incomplete {
                        "incomplete"
                    } else {
                        "completed"
                    }
                    .into(),
                    usage: usage(prompt_tokens, completion_tokens, reasoning_tokens),
                    incomplete: incomplete.then(|| IncompleteDetails {
                        reason: "max_output_tokens".into(),
                    }),
                });
            }
            ChoiceEvent::Error(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the request ended without finishing"))
}

fn usage(prompt: usize, completion: usize, reasoning: usize) -> ResponseUsage {
    ResponseUsage {
        input_tokens: prompt,
        output_tokens: completion,
        total_tokens: prompt + completion,
        input_tokens_details: InputTokensDetails { cached_tokens: 0 },
        output_tokens_details: OutputTokensDetails {
            reasoning_tokens: reasoning,
        },
    }
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": "completed"})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, c: &ToolCallChunk, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": c.id, "name": c.function.name, "arguments": c.function.arguments, "status": status})
}

/// Streams the Responses events. Each event is `event: TYPE` + `data: {..., "type", "sequence_number"}`.
fn stream(
    state: Arc<AppState>,
    req: ResponsesRequest,
    id: String,
    mut rx: mpsc::Receiver<(usize, ChoiceEvent)>,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (out_tx, out_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut emit = |mut v: Value| {
            let kind = v["type"].as_str().unwrap_or("").to_string();
            v["sequence_number"] = json!(seq);
            seq += 1;
            Ok::<_, Infallible>(Event::default().event(kind).data(v.to_string()))
        };
        let mut sends = vec![];
        let start = base(&state, &req, &id, "in_progress");
        sends.push(emit(json!({"type": "response.created", "response": start})));
        sends.push(emit(
            json!({"type": "response.in_progress", "response": start}),
        ));
        for s in sends.drain(..) {
            if out_tx.send(s).await.is_err() {
                return;
            }
        }
        // Open items, in output order.
        let mut output: Vec<Value> = vec![];
        let (mut reasoning, mut content) = (String::new(), String::new());
        let mut reasoning_idx: Option<usize> = None;
        let mut message_idx: Option<usize> = None;
        let (rs_id, msg_id) = (item_id("rs"), item_id("msg"));
        let mut frames: Vec<Value> = vec![];
        let close_reasoning = |idx: usize,
                               text: &str,
                               frames: &mut Vec<Value>,
                               output: &mut Vec<Value>| {
            frames.push(json!({"type": "response.reasoning_text.done", "item_id": rs_id, "output_index": idx, "content_index": 0, "text": text}));
            let item = reasoning_item(&rs_id, text);
            output[idx] = item.clone();
            frames.push(
                json!({"type": "response.output_item.done", "output_index": idx, "item": item}),
            );
        };
        let mut done_reasoning = false;
        while let Some((_, ev)) = rx.recv().await {
            match ev {
                ChoiceEvent::Delta {
                    reasoning: r,
                    content: c,
                    tool_calls,
                    ..
                } => {
                    if !r.is_empty() {
                        let idx = *reasoning_idx.get_or_insert_with(|| {
                            output.push(json!({"type": "reasoning", "id": rs_id, "summary": [], "content": [], "status": "in_progress"}));
                            frames.push(json!({"type": "response.output_item.added", "output_index": output.len() - 1, "item": output[output.len() - 1]}));
                            output.len() - 1
                        });
                        reasoning.push_str(&r);
                        frames.push(json!({"type": "response.reasoning_text.delta", "item_id": rs_id, "output_index": idx, "content_index": 0, "delta": r}));
                    }
                    if (!c.is_empty() || !tool_calls.is_empty()) && !done_reasoning {
                        if let Some(idx) = reasoning_idx {
                            close_reasoning(idx, &reasoning, &mut frames, &mut output);
                        }
                        done_reasoning = true;
                    }
                    if !c.is_empty() {
                        let idx = *message_idx.get_or_insert_with(|| {
                            output.push(json!({"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}));
                            frames.push(json!({"type": "response.output_item.added", "output_index": output.len() - 1, "item": output[output.len() - 1]}));
                            frames.push(json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": output.len() - 1, "content_index": 0,
                                               "part": {"type": "output_text", "text": "", "annotations": []}}));
                            output.len() - 1
                        });
                        content.push_str(&c);
                        frames.push(json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": idx, "content_index": 0, "delta": c, "logprobs": []}));
                    }
                    for call in tool_calls {
                        let fc_id = item_id("fc");
                        let idx = output.len();
                        output.push(call_item(&fc_id, &call, "in_progress"));
                        frames.push(json!({"type": "response.output_item.added", "output_index": idx, "item": call_item(&fc_id, &ToolCallChunk { function: FunctionCall { arguments: String::new(), ..call.function.clone() }, ..call.clone() }, "in_progress")}));
                        frames.push(json!({"type": "response.function_call_arguments.delta", "item_id": fc_id, "output_index": idx, "delta": call.function.arguments}));
                        frames.push(json!({"type": "response.function_call_arguments.done", "item_id": fc_id, "output_index": idx, "arguments": call.function.arguments}));
                        let done = call_item(&fc_id, &call, "completed");
                        output[idx] = done.clone();
                        frames.push(json!({"type": "response.output_item.done", "output_index": idx, "item": done}));
                    }
                }
                ChoiceEvent::Done {
                    finish_reason,
                    completion_tokens,
                    reasoning_tokens,
                    prompt_tokens,
                } => {
                    if !done_reasoning {
                        if let Some(idx) = reasoning_idx {
                            close_reasoning(idx, &reasoning, &mut frames, &mut output);
                        }
                    }
                    if message_idx.is_none() && output.iter().all(|o| o["type"] != "function_call")
                    {
                        // An empty answer still gets its message item.
                        output.push(json!({"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}));
                        frames.push(json!({"type": "response.output_item.added", "output_index": output.len() - 1, "item": output[output.len() - 1]}));
                        frames.push(json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": output.len() - 1, "content_index": 0,
                                           "part": {"type": "output_text", "text": "", "annotations": []}}));
                        message_idx = Some(output.len() - 1);
                    }
                    let incomplete = finish_reason == "length";
                    if let Some(idx) = message_idx {
                        let part = json!({"type": "output_text", "text": content, "annotations": [], "logprobs": []});
                        frames.push(json!({"type": "response.output_text.done", "item_id": msg_id, "output_index": idx, "content_index": 0, "text": content, "logprobs": []}));
                        frames.push(json!({"type": "response.content_part.done", "item_id": msg_id, "output_index": idx, "content_index": 0, "part": part}));
                        let item = message_item(
                            &msg_id,
                            &content,
                            if incomplete {
                                "incomplete"
                            } else {
                                "completed"
                            },
                        );
                        output[idx] = item.clone();
                        frames.push(json!({"type": "response.output_item.done", "output_index": idx, "item": item}));
                    }
                    let mut r = base(
                        &state,
                        &req,
                        &id,
                        if incomplete {
                            "incomplete"
                        } else {
                            "completed"
                        },
                    );
                    r.output = output.clone();
                    r.usage = Some(usage(prompt_tokens, completion_tokens, reasoning_tokens));
                    r.incomplete_details = incomplete.then(|| IncompleteDetails {
                        reason: "max_output_tokens".into(),
                    });
                    frames.push(json!({"type": if incomplete { "response.incomplete" } else { "response.completed" }, "response": r}));
                    for f in frames.drain(..) {
                        let _ = out_tx.send(emit(f)).await;
                    }
                    return;
                }
                ChoiceEvent::Error(e) => {
                    let mut r = base(&state, &req, &id, "failed");
                    r.output = output.clone();
                    r.error = Some(json!({"code": "server_error", "message": e.message}));
                    frames.push(json!({"type": "response.failed", "response": r}));
                    for f in frames.drain(..) {
                        let _ = out_tx.send(emit(f)).await;
                    }
                    return;
                }
            }
            for f in frames.drain(..) {
                if out_tx.send(emit(f)).await.is_err() {
                    return; // client gone: dropping rx cancels the request
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(out_rx))
}
