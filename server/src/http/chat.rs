//! `POST /v1/chat/completions`: validate, build the prompt, submit the choices, then answer with
//! the collected completion or a stream of `chat.completion.chunk` server-sent events, both read
//! straight from the [`Choices`] stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::body::ApiJson;
use super::AppState;
use crate::choices::{self, ChoiceUpdate, Choices};
use crate::openai::error::{ApiError, ErrorBody};
use crate::openai::protocol::*;

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "A completion, or a stream of chat.completion.chunk events", body = ChatCompletion),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    payload: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Response {
    super::respond(&state, handle(state.clone(), payload).await)
}

async fn handle(
    state: Arc<AppState>,
    payload: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = payload?;
    state.check_model(req.model.as_deref())?;
    let g = req.validate(&state.default_sampling)?;
    let choices = choices::start(&state, &g).await?;
    let head = Head {
        id: crate::ids::random_id("chatcmpl-"),
        model: state.served_model_name.clone(),
        created: super::now_secs(),
    };
    if g.stream {
        Ok(Sse::new(stream(head, g.include_usage, choices)).into_response())
    } else {
        Ok(Json(collect(head, g.logprobs.is_some(), choices).await?).into_response())
    }
}

/// What every chunk of one completion repeats (chat and legacy completions alike).
pub(super) struct Head {
    pub id: String,
    pub model: String,
    pub created: u64,
}

async fn collect(
    head: Head,
    want_logprobs: bool,
    mut choices: Choices,
) -> Result<ChatCompletion, ApiError> {
    let n = choices.len();
    let mut out: Vec<ChatChoice> = (0..n)
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
    let mut usage = Usage::default();
    let mut done = 0;
    while let Some((i, update)) = choices.next().await {
        let c = &mut out[i];
        match update {
            ChoiceUpdate::Delta(d) => {
                if !d.reasoning.is_empty() {
                    let r = c.message.reasoning.get_or_insert_with(String::new);
                    r.push_str(&d.reasoning);
                }
                if !d.content.is_empty() {
                    let t = c.message.content.get_or_insert_with(String::new);
                    t.push_str(&d.content);
                }
                c.message
                    .tool_calls
                    .extend(d.tool_calls.into_iter().map(|t| ToolCall {
                        id: t.id,
                        kind: t.kind,
                        function: t.function,
                    }));
                if let Some(l) = c.logprobs.as_mut() {
                    l.content.extend(d.logprobs);
                }
            }
            ChoiceUpdate::Done(d) => {
                c.finish_reason = d.finish_reason.into();
                add_usage(&mut usage, &d);
                done += 1;
            }
            ChoiceUpdate::Error(e) => return Err(e),
        }
    }
    if done < n {
        return Err(ApiError::internal("a choice ended without finishing"));
    }
    for c in &mut out {
        c.message.reasoning_content = c.message.reasoning.clone();
        if c.message.content.is_none() && c.message.tool_calls.is_empty() {
            c.message.content = Some(String::new());
        }
    }
    Ok(ChatCompletion {
        id: head.id,
        object: "chat.completion".into(),
        created: head.created,
        model: head.model,
        choices: out,
        usage,
    })
}

/// Usage over all choices (each choice counts the prompt once, as OpenAI does for `n`).
fn add_usage(u: &mut Usage, d: &choices::ChoiceDone) {
    u.prompt_tokens += d.prompt_tokens;
    u.prompt_tokens_details.cached_tokens += d.cached_tokens;
    u.completion_tokens += d.completion_tokens;
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    u.completion_tokens_details.reasoning_tokens += d.reasoning_tokens;
}

/// The SSE stream: a first chunk per choice with the role, one chunk per update, a last chunk
/// with the usage when asked, then `[DONE]`. An error after the stream started is a data frame
/// of the same shape as a non-streaming error, then `[DONE]`.
fn stream(
    head: Head,
    include_usage: bool,
    choices: Choices,
) -> impl Stream<Item = Result<Event, Infallible>> {
    // First the role chunks; the frames after the updates are queued in `tail`.
    let queued: VecDeque<Event> = (0..choices.len())
        .map(|index| {
            let delta = ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                ..Default::default()
            };
            chunk(&head, vec![chunk_choice(index, delta, None, None)], None)
        })
        .collect();
    let state = SseState {
        head,
        include_usage,
        choices,
        usage: Usage::default(),
        queued,
        ended: false,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.queued.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            match st.choices.next().await {
                Some((index, ChoiceUpdate::Delta(d))) => {
                    let opt = |s: String| (!s.is_empty()).then_some(s);
                    let delta = ChatDelta {
                        role: None,
                        reasoning: opt(d.reasoning.clone()),
                        reasoning_content: opt(d.reasoning),
                        content: opt(d.content),
                        tool_calls: d.tool_calls,
                    };
                    let lp = (!d.logprobs.is_empty()).then_some(ChoiceLogprobs {
                        content: d.logprobs,
                    });
                    let c = chunk_choice(index, delta, lp, None);
                    st.queued.push_back(chunk(&st.head, vec![c], None));
                }
                Some((index, ChoiceUpdate::Done(d))) => {
                    add_usage(&mut st.usage, &d);
                    let finish = Some(d.finish_reason.to_string());
                    let c = chunk_choice(index, ChatDelta::default(), None, finish);
                    st.queued.push_back(chunk(&st.head, vec![c], None));
                }
                Some((_, ChoiceUpdate::Error(e))) => {
                    // Dropping the stream with `st` cancels the other choices.
                    st.queued.push_back(data(&e.body()));
                    st.queued.push_back(Event::default().data("[DONE]"));
                    st.ended = true;
                }
                None => {
                    if st.include_usage {
                        let usage = Some(st.usage.clone());
                        st.queued.push_back(chunk(&st.head, vec![], usage));
                    }
                    st.queued.push_back(Event::default().data("[DONE]"));
                    st.ended = true;
                }
            }
        }
    })
}

struct SseState {
    head: Head,
    include_usage: bool,
    choices: Choices,
    usage: Usage,
    queued: VecDeque<Event>,
    ended: bool,
}

fn chunk_choice(
    index: usize,
    delta: ChatDelta,
    logprobs: Option<ChoiceLogprobs>,
    finish_reason: Option<String>,
) -> ChunkChoice {
    ChunkChoice {
        index,
        delta,
        logprobs,
        finish_reason,
    }
}

fn chunk(head: &Head, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> Event {
    data(&ChatCompletionChunk {
        id: head.id.clone(),
        object: "chat.completion.chunk".into(),
        created: head.created,
        model: head.model.clone(),
        choices,
        usage,
    })
}

/// One SSE data frame of JSON.
pub fn data(v: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}
