//! `POST /v1/responses`: input as a string or a list of items, `instructions`, reasoning items,
//! `max_output_tokens`, function calls, and the streaming events from `response.created` to
//! `response.completed` (or `response.incomplete` / `response.failed`), read straight from the
//! [`Choices`] stream. Finished responses are stored (`store`) for `GET` and `DELETE
//! /v1/responses/{id}` and continued with `previous_response_id`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use super::body::ApiJson;
use super::response_store::StoredResponse;
use super::AppState;
use crate::choices::{self, ChoiceDelta, ChoiceDone, ChoiceUpdate, Choices};
use crate::openai::error::{ApiError, ErrorBody};
use crate::openai::protocol::*;

#[utoipa::path(post, path = "/v1/responses", request_body = ResponsesRequest,
    responses((status = 200, description = "A response object, or a stream of response events", body = ResponseObject),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn responses(
    State(state): State<Arc<AppState>>,
    payload: Result<ApiJson<ResponsesRequest>, ApiError>,
) -> Response {
    super::respond(&state, handle(state.clone(), payload).await)
}

async fn handle(
    state: Arc<AppState>,
    payload: Result<ApiJson<ResponsesRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = payload?;
    state.check_model(req.model.as_deref())?;
    let mut g = req.validate(&state.default_sampling)?;
    // The request's own messages start after its instructions.
    let own = usize::from(req.instructions.is_some());
    if let Some(id) = &req.previous_response_id {
        let earlier = state
            .responses
            .get(id)
            .ok_or_else(|| ApiError::response_not_found(id, "previous_response_id"))?;
        g.conversation
            .continue_from(own, continuation(&earlier)?, id);
    }
    let choices = choices::start(&state, &g).await?;
    let store = req.store.unwrap_or(true);
    // A continuation of this response starts from its messages without the instructions.
    let keep = store.then(|| Keep {
        state: state.clone(),
        conversation: g.conversation.messages.split_off(own),
    });
    let base = ResponseObject {
        id: crate::ids::random_id("resp_"),
        object: "response".into(),
        created_at: super::now_secs(),
        status: "in_progress".into(),
        model: state.served_model_name.clone(),
        output: vec![],
        usage: None,
        incomplete_details: None,
        error: None,
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        parallel_tool_calls: true,
        tools: req.tools.unwrap_or_default(),
        tool_choice: req
            .tool_choice
            .unwrap_or(ResponsesToolChoice::Mode(ToolChoiceMode::Auto)),
        temperature: req.temperature,
        top_p: req.top_p,
        store,
        previous_response_id: req.previous_response_id,
    };
    let events = ResponseEvents::new(base);
    if g.stream {
        Ok(Sse::new(stream(events, choices, keep)).into_response())
    } else {
        Ok(Json(collect(events, choices, keep).await?).into_response())
    }
}

/// A stored response's conversation, then its output as the assistant's turn: the message's
/// text and the function calls (reasoning is not sent again; the template drops earlier
/// thinking anyway), read back as input items so that a continuation prompts exactly as a
/// request that sends the same items itself.
fn continuation(stored: &StoredResponse) -> Result<Vec<Message>, ApiError> {
    let items = stored
        .response
        .output
        .iter()
        .map(|item| serde_json::from_value::<InputItem>(item.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal(format!("a stored output item does not read back: {e}")))?;
    let mut messages = stored.conversation.clone();
    ResponsesRequest::item_messages(&items, &mut messages, &mut vec![])?;
    Ok(messages)
}

/// Where a finished response goes (`store`): the store, with the conversation it ran on.
struct Keep {
    state: Arc<AppState>,
    conversation: Vec<Message>,
}

impl Keep {
    fn finish(self, response: &ResponseObject) {
        self.state.responses.insert(StoredResponse {
            response: response.clone(),
            conversation: self.conversation,
        });
    }
}

#[utoipa::path(get, path = "/v1/responses/{response_id}",
    params(("response_id" = String, Path, description = "The `id` of a stored response")),
    responses((status = 200, description = "The stored response, as the POST answered it", body = ResponseObject),
              (status = 401, body = ErrorBody), (status = 404, description = "Not stored, deleted, evicted or expired", body = ErrorBody)))]
pub async fn get_response(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let answer = response_id(id).and_then(|id| match state.responses.get(&id) {
        Some(stored) => Ok(Json(&stored.response).into_response()),
        None => Err(ApiError::response_not_found(&id, "response_id")),
    });
    super::respond(&state, answer)
}

#[utoipa::path(delete, path = "/v1/responses/{response_id}",
    params(("response_id" = String, Path, description = "The `id` of a stored response")),
    responses((status = 200, body = DeletedResponse),
              (status = 401, body = ErrorBody), (status = 404, description = "Not stored, deleted, evicted or expired", body = ErrorBody)))]
pub async fn delete_response(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let answer = response_id(id).and_then(|id| match state.responses.delete(&id) {
        true => Ok(Json(DeletedResponse {
            id,
            object: "response".into(),
            deleted: true,
        })
        .into_response()),
        false => Err(ApiError::response_not_found(&id, "response_id")),
    });
    super::respond(&state, answer)
}

fn response_id(id: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request(e.body_text()).param("response_id"))
}

async fn collect(
    mut ev: ResponseEvents,
    mut choices: Choices,
    keep: Option<Keep>,
) -> Result<ResponseObject, ApiError> {
    while let Some((_, update)) = choices.next().await {
        match update {
            ChoiceUpdate::Delta(d) => {
                ev.delta(d);
            }
            ChoiceUpdate::Done(d) => {
                ev.done(d);
                if let Some(keep) = keep {
                    keep.finish(&ev.response);
                }
                return Ok(ev.response);
            }
            ChoiceUpdate::Error(e) => return Err(e),
        }
    }
    Err(ApiError::internal("the request ended without finishing"))
}

/// The events of a response (`event: TYPE` + `data: {..., "type", "sequence_number"}`), then
/// the end of the stream. The finished response (completed, incomplete or failed) is stored
/// before its last event is sent.
fn stream(
    mut events: ResponseEvents,
    choices: Choices,
    keep: Option<Keep>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = events.start();
    stream::unfold(
        (events, choices, VecDeque::from(start), false, keep),
        |(mut ev, mut choices, mut queued, mut ended, mut keep)| async move {
            loop {
                if let Some(frame) = queued.pop_front() {
                    let event = ev.emit(frame);
                    return Some((Ok(event), (ev, choices, queued, ended, keep)));
                }
                if ended {
                    return None;
                }
                let frames = match choices.next().await {
                    Some((_, ChoiceUpdate::Delta(d))) => ev.delta(d),
                    Some((_, ChoiceUpdate::Done(d))) => {
                        ended = true;
                        ev.done(d)
                    }
                    Some((_, ChoiceUpdate::Error(e))) => {
                        ended = true;
                        ev.failed(e)
                    }
                    None => {
                        ended = true;
                        ev.failed(ApiError::internal("the request ended without finishing"))
                    }
                };
                queued.extend(frames);
                if ended {
                    if let Some(keep) = keep.take() {
                        keep.finish(&ev.response);
                    }
                }
            }
        },
    )
}

/// A response being built from its choice's updates: the output items in order, and the
/// streaming events that open, fill and close them.
struct ResponseEvents {
    response: ResponseObject,
    reasoning: String,
    content: String,
    reasoning_idx: Option<usize>,
    message_idx: Option<usize>,
    done_reasoning: bool,
    rs_id: String,
    msg_id: String,
    seq: u64,
}

fn item_id(prefix: &str) -> String {
    crate::ids::random_id(&format!("{prefix}_"))
}

impl ResponseEvents {
    fn new(response: ResponseObject) -> Self {
        ResponseEvents {
            response,
            reasoning: String::new(),
            content: String::new(),
            reasoning_idx: None,
            message_idx: None,
            done_reasoning: false,
            rs_id: item_id("rs"),
            msg_id: item_id("msg"),
            seq: 0,
        }
    }

    /// One SSE event: named by the frame's type, numbered in order.
    fn emit(&mut self, mut frame: Value) -> Event {
        let kind = frame["type"].as_str().unwrap_or("").to_string();
        frame["sequence_number"] = json!(self.seq);
        self.seq += 1;
        Event::default().event(kind).data(frame.to_string())
    }

    fn start(&mut self) -> Vec<Value> {
        let r = &self.response;
        vec![
            json!({"type": "response.created", "response": r}),
            json!({"type": "response.in_progress", "response": r}),
        ]
    }

    fn output(&mut self) -> &mut Vec<Value> {
        &mut self.response.output
    }

    fn close_reasoning(&mut self, frames: &mut Vec<Value>) {
        if self.done_reasoning {
            return;
        }
        self.done_reasoning = true;
        let Some(idx) = self.reasoning_idx else {
            return;
        };
        let (rs_id, text) = (&self.rs_id, &self.reasoning);
        frames.push(json!({"type": "response.reasoning_text.done", "item_id": rs_id, "output_index": idx, "content_index": 0, "text": text}));
        let item = reasoning_item(rs_id, text);
        frames
            .push(json!({"type": "response.output_item.done", "output_index": idx, "item": item}));
        self.response.output[idx] = item;
    }

    fn open_message(&mut self, frames: &mut Vec<Value>) -> usize {
        if let Some(idx) = self.message_idx {
            return idx;
        }
        let msg_id = self.msg_id.clone();
        let item = json!({"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []});
        self.output().push(item.clone());
        let idx = self.response.output.len() - 1;
        frames
            .push(json!({"type": "response.output_item.added", "output_index": idx, "item": item}));
        frames.push(json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": idx, "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": []}}));
        self.message_idx = Some(idx);
        idx
    }

    fn delta(&mut self, d: ChoiceDelta) -> Vec<Value> {
        let mut frames = vec![];
        if !d.reasoning.is_empty() {
            let idx = match self.reasoning_idx {
                Some(idx) => idx,
                None => {
                    let item = json!({"type": "reasoning", "id": self.rs_id, "summary": [], "content": [], "status": "in_progress"});
                    self.output().push(item.clone());
                    let idx = self.response.output.len() - 1;
                    frames.push(json!({"type": "response.output_item.added", "output_index": idx, "item": item}));
                    self.reasoning_idx = Some(idx);
                    idx
                }
            };
            self.reasoning.push_str(&d.reasoning);
            frames.push(json!({"type": "response.reasoning_text.delta", "item_id": self.rs_id, "output_index": idx, "content_index": 0, "delta": d.reasoning}));
        }
        if !d.content.is_empty() || !d.tool_calls.is_empty() {
            self.close_reasoning(&mut frames);
        }
        if !d.content.is_empty() {
            let idx = self.open_message(&mut frames);
            self.content.push_str(&d.content);
            frames.push(json!({"type": "response.output_text.delta", "item_id": self.msg_id, "output_index": idx, "content_index": 0, "delta": d.content, "logprobs": []}));
        }
        for call in d.tool_calls {
            let fc_id = item_id("fc");
            let idx = self.response.output.len();
            let added = json!({"type": "function_call", "id": fc_id, "call_id": call.id, "name": call.function.name, "arguments": "", "status": "in_progress"});
            self.output().push(added.clone());
            frames.push(
                json!({"type": "response.output_item.added", "output_index": idx, "item": added}),
            );
            frames.push(json!({"type": "response.function_call_arguments.delta", "item_id": fc_id, "output_index": idx, "delta": call.function.arguments}));
            frames.push(json!({"type": "response.function_call_arguments.done", "item_id": fc_id, "output_index": idx, "arguments": call.function.arguments}));
            let done = json!({"type": "function_call", "id": fc_id, "call_id": call.id, "name": call.function.name, "arguments": call.function.arguments, "status": "completed"});
            self.response.output[idx] = done.clone();
            frames.push(
                json!({"type": "response.output_item.done", "output_index": idx, "item": done}),
            );
        }
        frames
    }

    fn done(&mut self, d: ChoiceDone) -> Vec<Value> {
        let mut frames = vec![];
        self.close_reasoning(&mut frames);
        let calls = self
            .response
            .output
            .iter()
            .any(|o| o["type"] == "function_call");
        if self.message_idx.is_none() && !calls {
            // An empty answer still gets its message item.
            self.open_message(&mut frames);
        }
        let incomplete = d.finish_reason == "length";
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        if let Some(idx) = self.message_idx {
            let (msg_id, content) = (&self.msg_id, &self.content);
            let part =
                json!({"type": "output_text", "text": content, "annotations": [], "logprobs": []});
            frames.push(json!({"type": "response.output_text.done", "item_id": msg_id, "output_index": idx, "content_index": 0, "text": content, "logprobs": []}));
            frames.push(json!({"type": "response.content_part.done", "item_id": msg_id, "output_index": idx, "content_index": 0, "part": part}));
            let item = json!({"type": "message", "id": msg_id, "status": status, "role": "assistant", "content": [part]});
            frames.push(
                json!({"type": "response.output_item.done", "output_index": idx, "item": item}),
            );
            self.response.output[idx] = item;
        }
        let r = &mut self.response;
        r.status = status.into();
        r.usage = Some(ResponseUsage {
            input_tokens: d.prompt_tokens,
            output_tokens: d.completion_tokens,
            total_tokens: d.prompt_tokens + d.completion_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: d.cached_tokens,
            },
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: d.reasoning_tokens,
            },
        });
        r.incomplete_details = incomplete.then(|| IncompleteDetails {
            reason: "max_output_tokens".into(),
        });
        let kind = if incomplete {
            "response.incomplete"
        } else {
            "response.completed"
        };
        frames.push(json!({"type": kind, "response": r}));
        frames
    }

    fn failed(&mut self, e: ApiError) -> Vec<Value> {
        let r = &mut self.response;
        r.status = "failed".into();
        r.error = Some(json!({"code": "server_error", "message": e.message}));
        vec![json!({"type": "response.failed", "response": r})]
    }
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": "completed"})
}
