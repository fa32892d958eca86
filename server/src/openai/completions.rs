//! The legacy completions API (`POST /v1/completions`) as vLLM serves it: the wire types, and the
//! checks that turn a request into the prompts to run and one [`Generation`] for all of them.
//! There is no chat template, no thinking and no tool calls: a prompt is text (tokenized as is,
//! with the tokenizer's special tokens unless `add_special_tokens` is false) or token ids, and a
//! choice's text is the detokenized output.

use std::collections::HashMap;

use gemma4_model::SamplingParams;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::ApiError;
use super::protocol::{
    json_kind, PromptTokensDetails, ResponseFormat, Stop, StreamOptions, StructuredOutputs,
};
use super::request::{self, bad, Conversation, Generation, MAX_TOP_LOGPROBS};

/// `max_tokens` when the request leaves it out (OpenAI's and vLLM's default).
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids.
/// Each prompt is generated on its own.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, try_from = "Value")]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

impl TryFrom<Value> for CompletionPrompt {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        let expected = "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids";
        let items = match v {
            Value::String(s) => return Ok(CompletionPrompt::Text(s)),
            Value::Array(items) => items,
            other => return Err(format!("{expected}, not {}", json_kind(&other))),
        };
        let ids = |items: Vec<Value>, at: &str| -> Result<Vec<u32>, String> {
            items
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .ok_or_else(|| {
                            format!("{at}[{i}]: a token id is a non-negative integer, not {t}")
                        })
                })
                .collect()
        };
        Ok(match items.first() {
            None | Some(Value::String(_)) => CompletionPrompt::Texts(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| match s {
                        Value::String(s) => Ok(s),
                        other => Err(format!(
                            "prompt[{i}]: {expected}, and this list holds {} after a string",
                            json_kind(&other)
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(Value::Number(_)) => CompletionPrompt::Ids(ids(items, "prompt")?),
            Some(Value::Array(_)) => CompletionPrompt::IdLists(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, list)| match list {
                        Value::Array(list) => ids(list, &format!("prompt[{i}]")),
                        other => Err(format!(
                            "prompt[{i}]: {expected}, and this list holds {} after a list",
                            json_kind(&other)
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(format!(
                    "prompt[0]: {expected}, not a list holding {}",
                    json_kind(other)
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: CompletionPrompt,
    pub model: Option<String>,
    /// Default 16; 0 only with `echo` (the prompt alone comes back).
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM extension; 0 or -1 turn it off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// Choices per prompt (1 to 16); choice `index` is prompt index × n + j.
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// The sampled token's logprob and the `logprobs` most likely tokens at each position
    /// (at most 20).
    pub logprobs: Option<u32>,
    /// The prompt's text before the generated text; with `logprobs`, the prompt's tokens come
    /// with their logprobs too (the first one's is null).
    pub echo: Option<bool>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f32>>,
    /// vLLM extension: keep generating past end-of-turn / eos ids until max_tokens.
    pub ignore_eos: Option<bool>,
    /// vLLM extension: text prompts are tokenized with the tokenizer's special tokens (`<bos>`
    /// first); default true.
    pub add_special_tokens: Option<bool>,
    /// Not supported: given and not empty, a 400.
    pub suffix: Option<String>,
    /// Only null, 1 or `n` (no server-side best-of).
    pub best_of: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured outputs (json, regex, choice, grammar).
    pub structured_outputs: Option<StructuredOutputs>,
}

/// One prompt of a request, before tokenizing.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A validated completions request: its prompts and how to generate from each.
#[derive(Debug, Clone)]
pub struct CompletionJob {
    pub prompts: Vec<PromptInput>,
    pub add_special_tokens: bool,
    pub echo: bool,
    /// `conversation` is empty; `max_tokens` is Some(0) only with `echo`.
    pub generation: Generation,
}

impl CompletionRequest {
    pub fn validate(self, defaults: &SamplingParams) -> Result<CompletionJob, ApiError> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad("suffix is not supported", "suffix"));
        }
        let n = request::choice_count(self.n)?;
        if let Some(b) = self.best_of.filter(|&b| b != 1 && b as usize != n) {
            return Err(bad(
                format!("best_of {b} is not supported: only null, 1 or n ({n})"),
                "best_of",
            ));
        }
        let logprobs = match self.logprobs {
            Some(k) if k > MAX_TOP_LOGPROBS => {
                return Err(bad(
                    format!("logprobs must be at most {MAX_TOP_LOGPROBS}, not {k}"),
                    "logprobs",
                ))
            }
            k => k.map(|k| k as usize),
        };
        let echo = self.echo.unwrap_or(false);
        let (stream, include_usage) = request::streaming(self.stream, self.stream_options)?;
        let max_tokens = match self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) {
            0 if echo => Some((0, "max_tokens")),
            n => request::max_tokens(Some(n), "max_tokens")?,
        };
        let penalties = request::penalties(
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            request::logit_bias(self.logit_bias.as_ref())?,
        )?;
        // With prompt logprobs the engine replays the prompt as output (`Output::Text`), so
        // penalties on the output's tokens would count the prompt's too.
        if echo && logprobs.is_some() && max_tokens.map(|(n, _)| n) != Some(0) {
            for (param, value) in [
                ("presence_penalty", penalties.presence),
                ("frequency_penalty", penalties.frequency),
            ] {
                if value != 0.0 {
                    return Err(bad(
                        format!("{param} cannot be combined with echo and logprobs yet"),
                        param,
                    ));
                }
            }
        }
        let prompts = prompts(self.prompt)?;
        Ok(CompletionJob {
            prompts,
            add_special_tokens: self.add_special_tokens.unwrap_or(true),
            echo,
            generation: Generation {
                conversation: Conversation {
                    messages: vec![],
                    labels: vec![],
                    param: "prompt",
                    tools: None,
                    template_kwargs: Default::default(),
                    max_soft_tokens: None,
                    add_generation_prompt: false,
                },
                n,
                max_tokens,
                sampling: request::sampling(
                    defaults,
                    self.temperature,
                    self.top_p,
                    self.top_k,
                    self.min_p,
                    self.seed,
                )?,
                penalties,
                stop: request::stop_strings(self.stop),
                logprobs,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                forced_tool: None,
                parallel_tool_calls: false,
                format: request::chat_format(self.response_format, self.structured_outputs, &None)?,
                stream,
                include_usage,
            },
        })
    }
}

/// The prompts of `prompt`; none of them, and the list, may be empty.
fn prompts(prompt: CompletionPrompt) -> Result<Vec<PromptInput>, ApiError> {
    let prompts: Vec<PromptInput> = match prompt {
        CompletionPrompt::Text(s) => vec![PromptInput::Text(s)],
        CompletionPrompt::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
        CompletionPrompt::Ids(ids) => vec![PromptInput::Ids(ids)],
        CompletionPrompt::IdLists(v) => v.into_iter().map(PromptInput::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(bad("`prompt` must not be empty", "prompt"));
    }
    for (i, p) in prompts.iter().enumerate() {
        let empty = match p {
            PromptInput::Text(s) => s.is_empty(),
            PromptInput::Ids(ids) => ids.is_empty(),
        };
        if empty {
            let at = match prompts.len() {
                1 => "`prompt`".to_string(),
                _ => format!("`prompt[{i}]`"),
            };
            return Err(bad(format!("{at} must not be empty"), "prompt"));
        }
    }
    Ok(prompts)
}

/// A completion, and each chunk of a streamed one (`object: "text_completion"` both).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always in a completion; in a stream, only in the last chunk (with no choices) when
    /// `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// "stop" or "length"; null in a streamed chunk before the choice's last.
    pub finish_reason: Option<String>,
}

/// The legacy logprobs: one entry per token in each list.
#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null for the prompt's first token (nothing precedes it).
    pub token_logprobs: Vec<Option<f32>>,
    /// The token and the `logprobs` most likely ones, text to logprob.
    #[schema(value_type = Vec<Option<HashMap<String, f32>>>)]
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Where each token starts: the sum of the lengths (in characters) of the tokens before it.
    pub text_offset: Vec<usize>,
}

/// Token texts to logprobs, most likely first; serialized as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl Serialize for TopLogprobs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct CompletionUsage {
    /// Each prompt counted once, whatever `n` (as vLLM).
    pub prompt_tokens: usize,
    /// Over all choices.
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// `cached_tokens`: prompt tokens whose KV came from the prefix cache, for each prompt
    /// those every choice of it reused.
    pub prompt_tokens_details: PromptTokensDetails,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::tests::defaults;
    use serde_json::json;

    fn validate(body: Value) -> Result<CompletionJob, String> {
        let req: CompletionRequest = serde_json::from_value(body).map_err(|e| e.to_string())?;
        req.validate(&defaults())
            .map_err(|e| format!("{} [{}]", e.message, e.param.unwrap_or_default()))
    }

    #[test]
    fn prompts_of_every_form() {
        let forms = [
            (json!("hi"), 1),
            (json!(["a", "b", "c"]), 3),
            (json!([2, 17, 40]), 1),
            (json!([[2, 17], [5]]), 2),
        ];
        for (prompt, count) in forms {
            let job = validate(json!({ "prompt": prompt })).unwrap();
            assert_eq!(job.prompts.len(), count, "{prompt}");
        }
        let job = validate(json!({"prompt": [[2, 17], [5]]})).unwrap();
        assert!(matches!(&job.prompts[1], PromptInput::Ids(ids) if ids == &[5]));
        let g = &job.generation;
        assert_eq!(g.max_tokens, Some((DEFAULT_MAX_TOKENS, "max_tokens")));
        assert_eq!(g.conversation.param, "prompt");
        assert!(job.add_special_tokens && !job.echo);
    }

    #[test]
    fn every_check_names_its_parameter() {
        let bad = [
            (json!({"prompt": ""}), "[prompt]"),
            (json!({"prompt": []}), "[prompt]"),
            (
                json!({"prompt": ["a", ""]}),
                "`prompt[1]` must not be empty [prompt]",
            ),
            (json!({"prompt": [[1], []]}), "[prompt]"),
            (json!({"prompt": "a", "suffix": "b"}), "[suffix]"),
            (json!({"prompt": "a", "best_of": 2}), "[best_of]"),
            (json!({"prompt": "a", "n": 0}), "[n]"),
            (json!({"prompt": "a", "logprobs": 21}), "[logprobs]"),
            (json!({"prompt": "a", "max_tokens": 0}), "[max_tokens]"),
            (json!({"prompt": "a", "temperature": 3.0}), "[temperature]"),
            (
                json!({"prompt": "a", "logit_bias": {"x": 1}}),
                "[logit_bias]",
            ),
            (
                json!({"prompt": "a", "echo": true, "logprobs": 1, "presence_penalty": 0.5}),
                "[presence_penalty]",
            ),
            (
                json!({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "[response_format]",
            ),
            (json!({"prompt": 3}), "not a number"),
            (json!({"prompt": [1, -2]}), "prompt[1]: a token id"),
            (json!({"prompt": [1, "a"]}), "prompt[1]"),
            (json!({"prompt": [[1], [2.5]]}), "prompt[1][0]"),
            (json!({"prompt": [{}]}), "not a list holding an object"),
        ];
        for (body, needle) in bad {
            let e = validate(body.clone()).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
        // What is allowed: an empty suffix, best_of equal to n, max_tokens 0 with echo.
        for body in [
            json!({"prompt": "a", "suffix": ""}),
            json!({"prompt": "a", "n": 2, "best_of": 2}),
            json!({"prompt": "a", "echo": true, "max_tokens": 0, "logprobs": 20}),
            json!({"prompt": "a", "echo": true, "max_tokens": 0, "logprobs": 1, "presence_penalty": 0.5}),
        ] {
            validate(body.clone()).unwrap_or_else(|e| panic!("{body}: {e}"));
        }
    }

    #[test]
    fn top_logprobs_serialize_as_an_object_in_order() {
        let t = TopLogprobs(vec![("b".into(), -0.5), ("a".into(), -1.0)]);
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"b":-0.5,"a":-1.0}"#);
    }
}
