//! The choices of one request: submitted to the engine, and read back as API updates by a
//! [`Choices`] stream that polls each choice's engine event channel itself. The HTTP response
//! body (SSE frames, or the collected JSON) consumes that stream directly, so a token goes
//! engine → its request's channel → the response body: one hop, no task in between. Dropping
//! the stream (the client went away, the body was dropped) drops the engine handles, which
//! cancels the choices in the engine.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::Stream;

use crate::http::AppState;
use crate::openai::error::ApiError;
use crate::openai::protocol::{FunctionCall, LogprobContent, ToolCallChunk, TopLogprob};
use crate::openai::request::{ForcedTool, Generation};
use crate::output::detokenize::IncrementalDecoder;
use crate::output::stop::StopMatcher;
use crate::output::tool_grammar;
use crate::output::{OutputParser, ParsedDelta};
use crate::prompt::{self, Prompt};
use gemma4_engine::structured::Format;
use gemma4_engine::TokenLogprob;
use gemma4_engine::{EngineEvent, EngineRequest, FinishReason, RequestHandle, SubmitError};

/// One update of one choice.
#[derive(Debug)]
pub enum ChoiceUpdate {
    Delta(ChoiceDelta),
    Done(ChoiceDone),
    Error(ApiError),
}

#[derive(Debug, Default)]
pub struct ChoiceDelta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ToolCallChunk>,
    pub logprobs: Vec<LogprobContent>,
}

impl ChoiceDelta {
    fn is_empty(&self) -> bool {
        self.reasoning.is_empty()
            && self.content.is_empty()
            && self.tool_calls.is_empty()
            && self.logprobs.is_empty()
    }
}

#[derive(Debug)]
pub struct ChoiceDone {
    /// "stop", "length" or "tool_calls".
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub reasoning_tokens: usize,
}

/// How the tokens of a choice become its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Chat: reasoning, content and tool calls ([`OutputParser`]).
    Chat,
    /// Completions: the plain detokenized text, special tokens skipped. With `prompt_logprobs`,
    /// the engine runs the prompt's first token and is made to emit the rest as a forced prefix
    /// (the engine gives logprobs of emitted tokens only): the choice's first updates are then
    /// the logprobs of the prompt's tokens after the first, without text, and the usage counts
    /// them as prompt.
    Text { prompt_logprobs: bool },
}

/// Builds the prompt of `g` and submits its choices.
pub async fn start(state: &Arc<AppState>, g: &Generation) -> Result<Choices, ApiError> {
    let prompt = prompt::build(state, &g.conversation).await?;
    submit(state, &prompt, g)
}

/// A 400 naming `param` unless a prompt of `prompt_len` tokens and one output token fit the
/// context and the KV cache.
pub fn check_prompt(state: &AppState, prompt_len: usize, param: &str) -> Result<(), ApiError> {
    let limit = state.max_model_len;
    if prompt_len >= limit {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {limit} tokens. However, your request has {prompt_len} input tokens. Please reduce the length of the input messages."
        ))
        .param(param));
    }
    let blocks = state.engine.config().blocks;
    if !blocks.fits(prompt_len + 1) {
        let [need, have] = [
            blocks.needed(0, prompt_len + 1),
            blocks.num_kv_blocks.unwrap_or_default(),
        ];
        return Err(ApiError::bad_request(format!(
            "the prompt ({prompt_len} tokens) and one output token need {} sliding and {} full KV cache blocks of {} tokens; this server has {} and {} (--num-kv-blocks, --kv-cache-memory)",
            need.0[0], need.0[1], blocks.block_size, have.0[0], have.0[1]
        ))
        .param(param));
    }
    Ok(())
}

/// Submits `n` choices of `g` over `prompt`. Every choice is submitted before any is read, so an
/// overloaded server answers 503 before a stream starts; choice i samples with seed + i.
pub fn submit(state: &Arc<AppState>, prompt: &Prompt, g: &Generation) -> Result<Choices, ApiError> {
    submit_as(state, prompt, g, Output::Chat)
}

/// [`submit`], with the choices' text made as `output` says.
pub fn submit_as(
    state: &Arc<AppState>,
    prompt: &Prompt,
    g: &Generation,
    output: Output,
) -> Result<Choices, ApiError> {
    let prompt_len = prompt.ids.len();
    check_prompt(state, prompt_len, g.conversation.param)?;
    let limit = state.max_model_len;
    let left = limit - prompt_len;
    // As vLLM: asking for more than the context leaves is an error, not a silent clamp.
    let max_new_tokens = match g.max_tokens {
        None => left,
        Some((n, param)) if n as usize > left => {
            return Err(ApiError::bad_request(format!(
                "'{param}' is too large: {n}. This model's maximum context length is {limit} tokens and your request has {prompt_len} input tokens ({n} > {limit} - {prompt_len})."
            ))
            .param(param))
        }
        Some((n, _)) => n as usize,
    };
    let vocab = state.tokenizer.get_vocab_size(true) as u32;
    if let Some((id, _)) = g.penalties.logit_bias.iter().find(|(id, _)| *id >= vocab) {
        return Err(ApiError::bad_request(format!(
            "logit_bias names token id {id}, outside the vocabulary (size {vocab})"
        ))
        .param("logit_bias"));
    }
    // Prompt logprobs: the prompt after its first token is replayed as the first tokens of the
    // output (text prompts only: a replayed image placeholder would not be an image).
    let (run, replayed) = match output {
        Output::Text {
            prompt_logprobs: true,
        } => prompt.ids.split_at(prompt_len.min(1)),
        _ => (&prompt.ids[..], &[][..]),
    };
    // A forced call (`required` or a named function) is a grammar over the allowed tools: the
    // name and the arguments follow their schemas. Without a grammar compiler, only its
    // opening is forced (the startup log said structured outputs are off).
    let call_format = match (&g.forced_tool, &state.grammars) {
        (Some(forced), Ok(_)) => Some((
            forced_call_grammar(state, g, forced, g.parallel_tool_calls),
            "tool_choice",
        )),
        _ => None,
    };
    let forced_prefix = match call_format {
        Some(_) => vec![],
        None => prompt::forced_tool_prefix(&state.tokenizer, g.forced_tool.as_ref())?,
    };
    let forced_prefix = [replayed, &forced_prefix].concat();
    let format = g.format.clone().or(call_format);
    // Tools offered under `auto`: the text runs free, and a call the model opens follows the
    // grammar (one call at a time; the next `<|tool_call>` starts another).
    let lazy_format = match (&g.conversation.tools, &format) {
        (Some(_), None) => Some(forced_call_grammar(state, g, &ForcedTool::Any, false)),
        _ => None,
    };
    let lazy_calls = || match (&lazy_format, &state.grammars) {
        (Some(calls), Ok(grammars)) => grammars
            .compile_lazy(calls, state.special.tool_call_start)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("tools: {e}")).param("tools")),
        _ => Ok(None),
    };
    // With thinking on, the model may think before the answer the grammar applies to.
    let thinking = g
        .conversation
        .template_kwargs
        .get("enable_thinking")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
        .then_some((state.special.channel_start, state.special.channel_end));
    let constraint = |(format, param): &(Format, &str)| match &state.grammars {
        Ok(grammars) => grammars
            .compile(format, thinking)
            .map_err(|e| ApiError::bad_request(format!("{param}: {e}")).param(param)),
        Err(why) => Err(ApiError::bad_request(format!(
            "structured outputs are unavailable on this server: {why}"
        ))
        .param(param)),
    };
    // No tools offered (none given, or `tool_choice: "none"`): the model cannot open a call.
    // A completion has no tools: its text is the model's, whatever it writes.
    let mut suppress_ids = state.suppress_ids.clone();
    if g.conversation.tools.is_none() && output == Output::Chat {
        suppress_ids.push(state.special.tool_call_start);
    }
    // One matcher per choice, all compiled before any is submitted.
    let mut constraints = (0..g.n)
        .map(|_| match &format {
            Some(f) => constraint(f).map(Some),
            None => lazy_calls(),
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let mut choices = Vec::with_capacity(g.n);
    for i in 0..g.n {
        let mut sampling = g.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(i as u64);
        let handle = state
            .engine
            .submit(EngineRequest {
                prompt: run.to_vec(),
                max_new_tokens: replayed.len() + max_new_tokens,
                sampling,
                penalties: g.penalties.clone(),
                stop_ids: if g.ignore_eos {
                    vec![]
                } else {
                    state.stop_ids.clone()
                },
                suppress_ids: suppress_ids.clone(),
                logprobs: g.logprobs,
                forced_prefix: forced_prefix.clone(),
                images: prompt.images.clone(),
                constraint: constraints.next().flatten(),
            })
            .map_err(|e| match e {
                SubmitError::QueueFull { .. } | SubmitError::NotReady => {
                    ApiError::unavailable(e.to_string())
                }
            })?;
        let text = match output {
            Output::Chat => Text::Parsed(OutputParser::new(
                state.special.clone(),
                state.tokenizer.clone(),
            )),
            Output::Text { .. } => Text::Plain(IncrementalDecoder::new(state.tokenizer.clone())),
        };
        choices.push(Choice {
            handle: Some(handle),
            text,
            stop: StopMatcher::new(g.stop.clone()),
            replayed: replayed.len(),
            replay_left: replayed.len(),
            prompt_tokens: prompt_len,
            cached_tokens: 0,
            tokens: 0,
            tool_calls: 0,
            start: Instant::now(),
            last: None,
        });
    }
    Ok(Choices {
        state: state.clone(),
        choices,
        ready: VecDeque::new(),
        next: 0,
    })
}

/// The updates of a request's choices, as `(choice index, update)`, in the order the engine
/// produced them; each choice ends with one `Done` or `Error`.
pub struct Choices {
    state: Arc<AppState>,
    choices: Vec<Choice>,
    ready: VecDeque<(usize, ChoiceUpdate)>,
    /// The choice polled first next time (round robin, so that no choice starves the others).
    next: usize,
}

struct Choice {
    /// None once the choice has ended (dropping the handle cancels it in the engine).
    handle: Option<RequestHandle>,
    text: Text,
    stop: StopMatcher,
    /// Prompt tokens replayed as the first output tokens (prompt logprobs), and those of them
    /// still to come.
    replayed: usize,
    replay_left: usize,
    /// The whole prompt, replayed tokens included.
    prompt_tokens: usize,
    cached_tokens: usize,
    tokens: usize,
    tool_calls: usize,
    start: Instant,
    last: Option<Instant>,
}

/// The grammar of a forced tool call: one call (or several, with `parallel_tool_calls`) to the
/// named tool, or to any of the request's tools.
fn forced_call_grammar(
    state: &AppState,
    g: &Generation,
    forced: &ForcedTool,
    parallel: bool,
) -> Format {
    let tools: Vec<(String, Option<serde_json::Value>)> = g
        .conversation
        .tools
        .iter()
        .flatten()
        .filter(|t| match forced {
            ForcedTool::Any => true,
            ForcedTool::Named(name) => &t.function.name == name,
        })
        .map(|t| (t.function.name.clone(), t.function.parameters.clone()))
        .collect();
    let s = &state.special;
    let tokens = tool_grammar::CallTokens {
        open: s.tool_call_start,
        close: s.tool_call_end,
        quote: s.string_delim,
    };
    Format::Lark(tool_grammar::tool_calls(&tools, tokens, parallel))
}

impl Choices {
    pub fn len(&self) -> usize {
        self.choices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.choices.is_empty()
    }

    fn on_event(&mut self, i: usize, ev: Option<EngineEvent>) {
        let state = &self.state;
        let c = &mut self.choices[i];
        let ready = &mut self.ready;
        match ev {
            Some(EngineEvent::Admitted { cached_tokens }) => c.cached_tokens = cached_tokens,
            Some(EngineEvent::Token { id, logprob }) => {
                let now = Instant::now();
                match c.last {
                    None => state
                        .metrics
                        .time_to_first_token(now.duration_since(c.start).as_secs_f64()),
                    Some(t) => state
                        .metrics
                        .inter_token(now.duration_since(t).as_secs_f64()),
                }
                c.last = Some(now);
                c.tokens += 1;
                if c.replay_left > 0 {
                    // A prompt token: its logprob only (the caller has the prompt's text).
                    c.replay_left -= 1;
                    if let Some(lp) = logprob {
                        let delta = ChoiceDelta {
                            logprobs: vec![logprob_content(state, lp)],
                            ..Default::default()
                        };
                        ready.push_back((i, ChoiceUpdate::Delta(delta)));
                    }
                    return;
                }
                let parsed = c.text.push(id);
                let (mut delta, hit) = c.deltas(parsed);
                if let Some(lp) = logprob {
                    delta.logprobs.push(logprob_content(state, lp));
                }
                if !delta.is_empty() {
                    ready.push_back((i, ChoiceUpdate::Delta(delta)));
                }
                if hit {
                    state.metrics.end_to_end(c.start.elapsed().as_secs_f64());
                    let done = c.done("stop", c.tokens);
                    ready.push_back((i, ChoiceUpdate::Done(done)));
                    c.handle = None; // the rest is cancelled
                }
            }
            Some(EngineEvent::Finished {
                reason,
                completion_tokens,
                ..
            }) => {
                let parsed = c.text.finish();
                let (mut delta, _) = c.deltas(parsed);
                delta.content.push_str(&c.stop.flush());
                if !delta.is_empty() {
                    ready.push_back((i, ChoiceUpdate::Delta(delta)));
                }
                state.metrics.end_to_end(c.start.elapsed().as_secs_f64());
                let finish_reason = if c.tool_calls > 0 {
                    "tool_calls"
                } else if reason == FinishReason::Length {
                    "length"
                } else {
                    "stop"
                };
                let done = c.done(finish_reason, completion_tokens);
                ready.push_back((i, ChoiceUpdate::Done(done)));
                c.handle = None;
            }
            Some(EngineEvent::Error(msg)) => {
                state.metrics.error();
                ready.push_back((i, ChoiceUpdate::Error(ApiError::internal(msg))));
                c.handle = None;
            }
            None => {
                let e = ApiError::internal("the engine dropped the request");
                ready.push_back((i, ChoiceUpdate::Error(e)));
                c.handle = None;
            }
        }
    }
}

impl Choice {
    /// Parser output to one delta, content through the stop strings; true at a stop string
    /// (what follows it is dropped).
    fn deltas(&mut self, parsed: Vec<ParsedDelta>) -> (ChoiceDelta, bool) {
        let mut delta = ChoiceDelta::default();
        for d in parsed {
            match d {
                ParsedDelta::Reasoning(t) => delta.reasoning.push_str(&t),
                ParsedDelta::Content(t) => {
                    let (out, hit) = self.stop.push(&t);
                    delta.content.push_str(&out);
                    if hit {
                        return (delta, true);
                    }
                }
                ParsedDelta::ToolCall {
                    index,
                    id,
                    name,
                    arguments,
                } => {
                    self.tool_calls += 1;
                    delta.tool_calls.push(ToolCallChunk {
                        index,
                        id,
                        kind: "function".into(),
                        function: FunctionCall { name, arguments },
                    });
                }
            }
        }
        (delta, false)
    }

    /// The end of the choice after the engine emitted `emitted` tokens (replayed ones included).
    fn done(&self, finish_reason: &'static str, emitted: usize) -> ChoiceDone {
        ChoiceDone {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: emitted.saturating_sub(self.replayed),
            reasoning_tokens: match &self.text {
                Text::Parsed(p) => p.reasoning_tokens(),
                Text::Plain(_) => 0,
            },
        }
    }
}

/// A choice's text as it is made ([`Output`]).
enum Text {
    Parsed(OutputParser),
    Plain(IncrementalDecoder),
}

impl Text {
    fn push(&mut self, id: u32) -> Vec<ParsedDelta> {
        match self {
            Text::Parsed(p) => p.push(&[id]),
            Text::Plain(d) => {
                d.push(&[id]);
                content(d.next_text())
            }
        }
    }

    fn finish(&mut self) -> Vec<ParsedDelta> {
        match self {
            Text::Parsed(p) => p.finish(),
            Text::Plain(d) => content(d.flush()),
        }
    }
}

fn content(text: String) -> Vec<ParsedDelta> {
    match text.is_empty() {
        true => vec![],
        false => vec![ParsedDelta::Content(text)],
    }
}

impl Stream for Choices {
    type Item = (usize, ChoiceUpdate);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(update) = this.ready.pop_front() {
                return Poll::Ready(Some(update));
            }
            let n = this.choices.len();
            let (mut live, mut event) = (false, None);
            for k in 0..n {
                let i = (this.next + k) % n;
                let Some(handle) = this.choices[i].handle.as_mut() else {
                    continue;
                };
                live = true;
                if let Poll::Ready(ev) = handle.events.poll_recv(cx) {
                    this.next = (i + 1) % n;
                    event = Some((i, ev));
                    break;
                }
            }
            match event {
                // An event may produce no update (a token still inside a UTF-8 sequence or a
                // tool call): poll again, since only a Pending poll registers the waker.
                Some((i, ev)) => this.on_event(i, ev),
                None if live => return Poll::Pending,
                None => return Poll::Ready(None),
            }
        }
    }
}

fn logprob_content(state: &AppState, lp: TokenLogprob) -> LogprobContent {
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
