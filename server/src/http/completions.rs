//! `POST /v1/completions`: validate, tokenize each prompt, submit its choices (plain text out:
//! no thinking or tool-call parsing), then answer with the collected completion or a stream of
//! `text_completion` chunks, both read from the merged `Choices` streams of the prompts.
//! Choice `index` is prompt index × n + j, as vLLM.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use tokenizers::Tokenizer;

use super::body::ApiJson;
use super::chat::{data, Head};
use super::AppState;
use crate::choices::{self, ChoiceDone, ChoiceUpdate, Output};
use crate::openai::completions::*;
use crate::openai::error::{ApiError, ErrorBody};
use crate::openai::protocol::{LogprobContent, PromptTokensDetails};
use crate::openai::request::Generation;
use crate::output::detokenize::decode;
use crate::prompt::Prompt;

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion, or a stream of text_completion chunks", body = Completion),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    payload: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Response {
    super::respond(&state, handle(state.clone(), payload).await)
}

async fn handle(
    state: Arc<AppState>,
    payload: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = payload?;
    state.check_model(req.model.as_deref())?;
    let job = req.validate(&state.default_sampling)?;
    let g = &job.generation;
    let prompts = tokenize(&state, job.prompts, job.add_special_tokens).await?;
    // Every prompt fits before any is submitted.
    for p in &prompts {
        choices::check_prompt(&state, p.ids.len(), "prompt")?;
    }
    let shape = Shape {
        n: g.n,
        echo: job.echo,
        logprobs: g.logprobs.is_some(),
    };
    let prompts: Vec<PromptText> = prompts
        .into_iter()
        .map(|p| p.text(&state.tokenizer, &shape))
        .collect();
    let updates = submit(&state, &prompts, g, &shape)?;
    let head = Head {
        id: crate::ids::random_id("cmpl-"),
        model: state.served_model_name.clone(),
        created: super::now_secs(),
    };
    if g.stream {
        let s = stream(head, shape, prompts, g.include_usage, updates);
        Ok(Sse::new(s).into_response())
    } else {
        Ok(Json(collect(head, &shape, &prompts, updates).await?).into_response())
    }
}

/// How the choices' answers are shaped.
struct Shape {
    n: usize,
    echo: bool,
    logprobs: bool,
}

/// A tokenized prompt and the text it was given as.
struct Tokenized {
    ids: Vec<u32>,
    text: Option<String>,
}

/// A prompt, and what the answer of each of its choices starts with.
struct PromptText {
    ids: Vec<u32>,
    /// With `echo`: the prompt as given, or its ids decoded (special tokens kept), as vLLM.
    echo: String,
    /// The first prompt token's text: with `echo` and `logprobs`, its entry has no logprob.
    first_token: String,
    /// With `echo` and `logprobs`: the logprob entries of the prompt's other tokens that come
    /// before the generated ones (`Output::Text`).
    replayed: usize,
}

impl Tokenized {
    fn text(self, tok: &Tokenizer, shape: &Shape) -> PromptText {
        let echo = match (shape.echo, self.text) {
            (false, _) => String::new(),
            (true, Some(text)) => text,
            (true, None) => decode(tok, &self.ids, false),
        };
        PromptText {
            echo,
            first_token: decode(tok, &self.ids[..1], false),
            replayed: match shape.echo && shape.logprobs {
                true => self.ids.len() - 1,
                false => 0,
            },
            ids: self.ids,
        }
    }
}

/// The prompts' ids, on the CPU pool (a long text takes a while to tokenize).
async fn tokenize(
    state: &AppState,
    prompts: Vec<PromptInput>,
    add_special_tokens: bool,
) -> Result<Vec<Tokenized>, ApiError> {
    // A text that cannot fit the context is refused before it is tokenized.
    for p in &prompts {
        if let PromptInput::Text(text) = p {
            crate::prompt::check_text_fits(state, text.len(), "prompt")?;
        }
    }
    let tok = state.tokenizer.clone();
    let many = prompts.len() > 1;
    state
        .cpu
        .run(move || {
            let vocab = tok.get_vocab_size(true);
            prompts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let at = match many {
                        true => format!("prompt[{i}]"),
                        false => "prompt".to_string(),
                    };
                    let bad =
                        |m: String| ApiError::bad_request(format!("{at}: {m}")).param("prompt");
                    let (ids, text) = match p {
                        PromptInput::Text(text) => {
                            let ids = tok
                                .encode(text.as_str(), add_special_tokens)
                                .map_err(|e| bad(format!("tokenizing: {e}")))?
                                .get_ids()
                                .to_vec();
                            (ids, Some(text))
                        }
                        PromptInput::Ids(ids) => {
                            if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                                return Err(bad(format!(
                                    "token id {t} is outside the vocabulary (size {vocab})"
                                )));
                            }
                            (ids, None)
                        }
                    };
                    if ids.is_empty() {
                        return Err(bad("the prompt has no tokens".into()));
                    }
                    Ok(Tokenized { ids, text })
                })
                .collect()
        })
        .await?
}

type Updates = SelectAll<BoxStream<'static, (usize, ChoiceUpdate)>>;

/// Submits the choices of every prompt; their updates merged, indexed prompt × n + j.
fn submit(
    state: &Arc<AppState>,
    prompts: &[PromptText],
    g: &Generation,
    shape: &Shape,
) -> Result<Updates, ApiError> {
    let prompt_logprobs = shape.echo && shape.logprobs;
    let mut sources = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.iter().enumerate() {
        let base = p * g.n;
        let source = if g.max_tokens.map(|(n, _)| n) == Some(0) && prompt.replayed == 0 {
            // Nothing to generate and no prompt logprob to compute: the echo is the answer.
            let prompt_tokens = prompt.ids.len();
            stream::iter((0..g.n).map(move |j| {
                let done = ChoiceDone {
                    finish_reason: "length",
                    prompt_tokens,
                    cached_tokens: 0,
                    completion_tokens: 0,
                    reasoning_tokens: 0,
                };
                (base + j, ChoiceUpdate::Done(done))
            }))
            .boxed()
        } else {
            let prompt = Prompt {
                ids: prompt.ids.clone(),
                images: vec![],
            };
            let output = Output::Text { prompt_logprobs };
            choices::submit_as(state, &prompt, g, output)?
                .map(move |(j, update)| (base + j, update))
                .boxed()
        };
        sources.push(source);
    }
    Ok(stream::select_all(sources))
}

async fn collect(
    head: Head,
    shape: &Shape,
    prompts: &[PromptText],
    mut updates: Updates,
) -> Result<Completion, ApiError> {
    let mut out: Vec<(String, Vec<Entry>, Option<&'static str>)> = (0..prompts.len() * shape.n)
        .map(|i| {
            let p = &prompts[i / shape.n];
            (p.echo.clone(), first_entries(p, shape), None)
        })
        .collect();
    let mut usage = UsageSum::new(prompts.len());
    while let Some((i, update)) = updates.next().await {
        let (text, entries, finish) = &mut out[i];
        match update {
            ChoiceUpdate::Delta(d) => {
                text.push_str(&d.content);
                entries.extend(d.logprobs.into_iter().map(Entry::from));
            }
            ChoiceUpdate::Done(d) => {
                *finish = Some(d.finish_reason);
                usage.add(i / shape.n, &d);
            }
            ChoiceUpdate::Error(e) => return Err(e),
        }
    }
    let choices = out
        .into_iter()
        .enumerate()
        .map(|(index, (text, entries, finish))| {
            let finish =
                finish.ok_or_else(|| ApiError::internal("a choice ended without finishing"))?;
            Ok(CompletionChoice {
                index,
                text,
                logprobs: shape.logprobs.then(|| logprobs(entries, &mut 0)),
                finish_reason: Some(finish.into()),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Completion {
        id: head.id,
        object: "text_completion".into(),
        created: head.created,
        model: head.model,
        choices,
        usage: Some(usage.total()),
    })
}

/// One token of the legacy logprobs.
struct Entry {
    token: String,
    logprob: Option<f32>,
    top: Option<TopLogprobs>,
}

impl From<LogprobContent> for Entry {
    /// The token's logprob, and the token with the alternatives (as vLLM: the token first, then
    /// the most likely ones, each text once). -inf is -9999, as OpenAI and vLLM send it.
    fn from(lp: LogprobContent) -> Self {
        let finite = |x: f32| x.max(-9999.0);
        let mut top = vec![(lp.token.clone(), finite(lp.logprob))];
        for t in lp.top_logprobs {
            if !top.iter().any(|(s, _)| *s == t.token) {
                top.push((t.token, finite(t.logprob)));
            }
        }
        Entry {
            token: lp.token,
            logprob: Some(finite(lp.logprob)),
            top: Some(TopLogprobs(top)),
        }
    }
}

/// The entries an answer starts with: with `echo` and `logprobs`, the first prompt token's,
/// which has no logprob (nothing precedes it).
fn first_entries(p: &PromptText, shape: &Shape) -> Vec<Entry> {
    match shape.echo && shape.logprobs {
        true => vec![Entry {
            token: p.first_token.clone(),
            logprob: None,
            top: None,
        }],
        false => vec![],
    }
}

/// Entries as the legacy lists; `offset` is where the first token's text starts and moves past
/// the last one's.
fn logprobs(entries: Vec<Entry>, offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for e in entries {
        out.text_offset.push(*offset);
        *offset += e.token.chars().count();
        out.tokens.push(e.token);
        out.token_logprobs.push(e.logprob);
        out.top_logprobs.push(e.top);
    }
    out
}

/// Usage over all prompts and choices: each prompt's tokens once (as vLLM), the completion
/// tokens of every choice, and for each prompt the cached tokens all its choices reused.
struct UsageSum {
    prompts: Vec<Option<(usize, usize)>>,
    completion_tokens: usize,
}

impl UsageSum {
    fn new(prompts: usize) -> Self {
        UsageSum {
            prompts: vec![None; prompts],
            completion_tokens: 0,
        }
    }

    fn add(&mut self, prompt: usize, d: &ChoiceDone) {
        self.completion_tokens += d.completion_tokens;
        let p = &mut self.prompts[prompt];
        let cached = p.map_or(d.cached_tokens, |(_, c)| c.min(d.cached_tokens));
        *p = Some((d.prompt_tokens, cached));
    }

    fn total(&self) -> CompletionUsage {
        let (prompt_tokens, cached_tokens) = self
            .prompts
            .iter()
            .flatten()
            .fold((0, 0), |(p, c), (pt, ct)| (p + pt, c + ct));
        CompletionUsage {
            prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: prompt_tokens + self.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A streamed choice: its echo until sent, and where its next token's text starts.
struct Streamed {
    /// The echo chunk not sent yet: the prompt's text and the logprob entries of its tokens so
    /// far; sent once `held` is 0.
    echo: Option<(String, Vec<Entry>)>,
    /// Replayed prompt entries still to come before the echo is complete.
    held: usize,
    offset: usize,
}

struct SseState {
    head: Head,
    shape: Shape,
    include_usage: bool,
    updates: Updates,
    choices: Vec<Streamed>,
    usage: UsageSum,
    queued: VecDeque<Event>,
    ended: bool,
}

/// The SSE stream: per choice the echo (once the prompt's logprobs are in, when asked), a chunk
/// per update and a last one with the finish reason; a chunk with the usage and no choices when
/// asked; then `[DONE]`. An error after the stream started is a data frame of the same shape as
/// a non-streaming error, then `[DONE]`.
fn stream(
    head: Head,
    shape: Shape,
    prompts: Vec<PromptText>,
    include_usage: bool,
    updates: Updates,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let choices = (0..prompts.len() * shape.n)
        .map(|i| {
            let p = &prompts[i / shape.n];
            Streamed {
                echo: shape
                    .echo
                    .then(|| (p.echo.clone(), first_entries(p, &shape))),
                held: p.replayed,
                offset: 0,
            }
        })
        .collect();
    let mut st = SseState {
        head,
        shape,
        include_usage,
        updates,
        choices,
        usage: UsageSum::new(prompts.len()),
        queued: VecDeque::new(),
        ended: false,
    };
    for i in 0..st.choices.len() {
        if st.choices[i].held == 0 {
            st.send_echo(i);
        }
    }
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.queued.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            match st.updates.next().await {
                Some((i, ChoiceUpdate::Delta(d))) => {
                    let mut entries: Vec<Entry> = d.logprobs.into_iter().map(Entry::from).collect();
                    let c = &mut st.choices[i];
                    if c.held > 0 {
                        let rest = entries.split_off(c.held.min(entries.len()));
                        c.held -= entries.len();
                        if let Some((_, echoed)) = c.echo.as_mut() {
                            echoed.append(&mut entries);
                        }
                        entries = rest;
                        if c.held == 0 {
                            st.send_echo(i);
                        }
                    }
                    if !d.content.is_empty() || !entries.is_empty() {
                        st.send(i, d.content, entries, None);
                    }
                }
                Some((i, ChoiceUpdate::Done(d))) => {
                    st.usage.add(i / st.shape.n, &d);
                    st.send_echo(i); // (sent already unless the prompt's logprobs fell short)
                    let finish = Some(d.finish_reason.to_string());
                    st.send(i, String::new(), vec![], finish);
                }
                Some((_, ChoiceUpdate::Error(e))) => {
                    // Dropping the stream with `st` cancels the other choices.
                    st.queued.push_back(data(&e.body()));
                    st.queued.push_back(Event::default().data("[DONE]"));
                    st.ended = true;
                }
                None => {
                    if st.include_usage {
                        let usage = Some(st.usage.total());
                        let frame = st.chunk(vec![], usage);
                        st.queued.push_back(frame);
                    }
                    st.queued.push_back(Event::default().data("[DONE]"));
                    st.ended = true;
                }
            }
        }
    })
}

impl SseState {
    /// Queues choice `i`'s echo, unless sent already (or not asked for).
    fn send_echo(&mut self, i: usize) {
        if let Some((text, entries)) = self.choices[i].echo.take() {
            self.send(i, text, entries, None);
        }
    }

    fn send(&mut self, index: usize, text: String, entries: Vec<Entry>, finish: Option<String>) {
        let c = &mut self.choices[index];
        let logprobs =
            (self.shape.logprobs && finish.is_none()).then(|| logprobs(entries, &mut c.offset));
        let choice = CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: finish,
        };
        let frame = self.chunk(vec![choice], None);
        self.queued.push_back(frame);
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<CompletionUsage>) -> Event {
        data(&Completion {
            id: self.head.id.clone(),
            object: "text_completion".into(),
            created: self.head.created,
            model: self.head.model.clone(),
            choices,
            usage,
        })
    }
}
