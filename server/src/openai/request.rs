//! Chat-completions and Responses requests, checked once and turned into the one form the rest
//! of the path uses ([`Generation`]): what to render (the conversation, its tools and template
//! variables) and how to generate (sampling, penalties, limits, stop strings, logprobs, a forced
//! tool call). Every check that serde cannot do is here, with the parameter it names.

use gemma4_model::vision::preprocess::SUPPORTED_SOFT_TOKENS;
use gemma4_model::SamplingParams;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::protocol::*;
use gemma4_engine::structured::Format;
use gemma4_engine::Penalties;

/// The most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;
/// The most alternatives per position (`top_logprobs`), as OpenAI.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What the chat template renders.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// Where message i came from, for error messages: `messages[2]`, `input[0]`, `instructions`.
    pub labels: Vec<String>,
    /// The request field the messages came from (`messages` or `input`), for errors' `param`.
    pub param: &'static str,
    /// Chat-style tools for the template; None when there are none or `tool_choice` is "none".
    pub tools: Option<Vec<Tool>>,
    /// Extra template variables (`chat_template_kwargs`), `enable_thinking` included when the
    /// request decides it.
    pub template_kwargs: Map<String, Value>,
    /// Soft tokens per image, when the request sets it (else the checkpoint's default).
    pub max_soft_tokens: Option<usize>,
    /// End the prompt with the template's opening of the model's turn (false only for
    /// `/tokenize` requests that ask so).
    pub add_generation_prompt: bool,
}

impl Conversation {
    pub fn label(&self, i: usize) -> String {
        self.labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("{}[{i}]", self.param))
    }

    /// Puts `earlier` (a stored response's conversation, `previous_response_id`) before the
    /// request's own messages, after its first `at` (its instructions), labelled by the stored
    /// response's id. For Responses requests, whose labels name every message.
    pub fn continue_from(&mut self, at: usize, earlier: Vec<Message>, id: &str) {
        let at = at.min(self.labels.len()).min(self.messages.len());
        let labels = (0..earlier.len()).map(|k| format!("previous_response_id {id} message {k}"));
        self.labels.splice(at..at, labels);
        self.messages.splice(at..at, earlier);
    }
}

/// A tool call the answer must start with (`tool_choice` "required" or a named function).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForcedTool {
    Any,
    Named(String),
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub conversation: Conversation,
    pub n: usize,
    /// As requested (at least 1), with the field it came from: the prompt and this must fit
    /// the context (checked once the prompt is built).
    pub max_tokens: Option<(u32, &'static str)>,
    pub sampling: SamplingParams,
    pub penalties: Penalties,
    pub stop: Vec<String>,
    /// Some(k): the sampled token's logprob and the k most likely alternatives.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
    pub forced_tool: Option<ForcedTool>,
    /// More than one call in a turn (`parallel_tool_calls`, default true).
    pub parallel_tool_calls: bool,
    /// What the answer must follow, and the request field it came from.
    pub format: Option<(Format, &'static str)>,
    pub stream: bool,
    pub include_usage: bool,
}

pub(crate) fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::bad_request(message).param(param)
}

impl ChatCompletionRequest {
    pub fn validate(self, defaults: &SamplingParams) -> Result<Generation, ApiError> {
        let thinking = self
            .chat_template_kwargs
            .as_ref()
            .and_then(|k| k.get("enable_thinking"))
            .and_then(Value::as_bool)
            .or(reasoning_effort(
                self.reasoning_effort.as_deref(),
                "reasoning_effort",
            )?);
        let n = choice_count(self.n)?;
        let tools = self.tools.unwrap_or_default();
        for (i, t) in tools.iter().enumerate() {
            check_tool(&t.function, &format!("tools[{i}].function"))?;
        }
        let forced_tool = match &self.tool_choice {
            None | Some(ToolChoice::Mode(ToolChoiceMode::Auto | ToolChoiceMode::None)) => None,
            Some(ToolChoice::Mode(ToolChoiceMode::Required)) => Some(ForcedTool::Any),
            Some(ToolChoice::Function { function, .. }) => {
                Some(ForcedTool::Named(function.name.clone()))
            }
        };
        check_forced(&forced_tool, tools.iter().map(|t| t.function.name.as_str()))?;
        let tools_off = matches!(
            self.tool_choice,
            Some(ToolChoice::Mode(ToolChoiceMode::None))
        );
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err(bad(
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"),
                    "top_logprobs",
                ))
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, Some(k)) if k > 0 => {
                return Err(bad("top_logprobs needs logprobs: true", "top_logprobs"))
            }
            _ => None,
        };
        let (stream, include_usage) = streaming(self.stream, self.stream_options)?;
        Ok(Generation {
            conversation: Conversation {
                labels: vec![],
                param: "messages",
                tools: (!tools.is_empty() && !tools_off).then_some(tools),
                template_kwargs: template_kwargs(self.chat_template_kwargs, thinking),
                max_soft_tokens: max_soft_tokens(self.mm_processor_kwargs.as_ref())?,
                add_generation_prompt: true,
                messages: nonempty(self.messages, "messages")?,
            },
            n,
            max_tokens: max_tokens(
                self.max_completion_tokens.or(self.max_tokens),
                match self.max_completion_tokens {
                    Some(_) => "max_completion_tokens",
                    None => "max_tokens",
                },
            )?,
            sampling: sampling(
                defaults,
                self.temperature,
                self.top_p,
                self.top_k,
                self.min_p,
                self.seed,
            )?,
            penalties: penalties(
                self.presence_penalty,
                self.frequency_penalty,
                self.repetition_penalty,
                logit_bias(self.logit_bias.as_ref())?,
            )?,
            stop: stop_strings(self.stop),
            logprobs,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            format: chat_format(self.response_format, self.structured_outputs, &forced_tool)?,
            forced_tool,
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
            stream,
            include_usage,
        })
    }
}

/// `n`: 1 when not given, at most [`MAX_CHOICES`].
pub(crate) fn choice_count(n: Option<u32>) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(bad(format!("n must be between 1 and {MAX_CHOICES}"), "n"));
    }
    Ok(n as usize)
}

/// `stream`, and `stream_options.include_usage`: options only with a stream, as vLLM.
pub(crate) fn streaming(
    stream: Option<bool>,
    options: Option<StreamOptions>,
) -> Result<(bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    if options.is_some() && !stream {
        return Err(bad(
            "stream_options can only be given when stream is true",
            "stream_options",
        ));
    }
    Ok((
        stream,
        options.and_then(|o| o.include_usage).unwrap_or(false),
    ))
}

/// `logit_bias`: token ids (as strings) to biases, clamped to [-100, 100].
pub(crate) fn logit_bias(
    bias: Option<&std::collections::HashMap<String, f32>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out = vec![];
    for (k, v) in bias.into_iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            bad(
                format!("logit_bias key `{k}` is not a token id"),
                "logit_bias",
            )
        })?;
        out.push((id, v.clamp(-100.0, 100.0)));
    }
    Ok(out)
}

/// `stop` as a list, empty strings dropped.
pub(crate) fn stop_strings(stop: Option<Stop>) -> Vec<String> {
    match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect()
}

/// The format a chat request asks for: `response_format` or vLLM's `structured_outputs` (not
/// both); a 400 names what is wrong.
pub(crate) fn chat_format(
    response_format: Option<ResponseFormat>,
    structured: Option<StructuredOutputs>,
    forced_tool: &Option<ForcedTool>,
) -> Result<Option<(Format, &'static str)>, ApiError> {
    let format = match (response_format, structured) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "give response_format or structured_outputs, not both",
                "structured_outputs",
            ))
        }
        (Some(rf), None) => response_format_of(rf)?.map(|f| (f, "response_format")),
        (None, Some(so)) => Some((structured_outputs_of(so)?, "structured_outputs")),
        (None, None) => None,
    };
    not_with_forced_tool(format, forced_tool)
}

/// A format and a forced tool call are not combined yet: a 400.
fn not_with_forced_tool(
    format: Option<(Format, &'static str)>,
    forced_tool: &Option<ForcedTool>,
) -> Result<Option<(Format, &'static str)>, ApiError> {
    match (&format, forced_tool) {
        (Some((_, param)), Some(_)) => Err(bad(
            format!(
                "tool_choice \"required\" or a named function cannot be combined with {param} yet"
            ),
            "tool_choice",
        )),
        _ => Ok(format),
    }
}

fn response_format_of(rf: ResponseFormat) -> Result<Option<Format>, ApiError> {
    Ok(match rf {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(Format::JsonObject),
        ResponseFormat::JsonSchema { json_schema } => match json_schema.schema {
            Some(schema) => Some(Format::JsonSchema(schema)),
            None => {
                return Err(bad(
                    "response_format.json_schema.schema is required",
                    "response_format",
                ))
            }
        },
    })
}

fn structured_outputs_of(so: StructuredOutputs) -> Result<Format, ApiError> {
    let param = "structured_outputs";
    let mut found = vec![];
    if let Some(json) = so.json {
        let schema = match json {
            Value::String(text) => serde_json::from_str(&text)
                .map_err(|e| bad(format!("structured_outputs.json is not JSON: {e}"), param))?,
            v => v,
        };
        found.push(Format::JsonSchema(schema));
    }
    if let Some(rx) = so.regex {
        found.push(Format::Regex(rx));
    }
    if let Some(choice) = so.choice {
        found.push(Format::Choice(choice));
    }
    if let Some(grammar) = so.grammar {
        found.push(Format::Lark(grammar));
    }
    if so.json_object == Some(true) {
        found.push(Format::JsonObject);
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(bad(
            "structured_outputs needs one of json, regex, choice, grammar, json_object",
            param,
        )),
        _ => Err(bad(
            "structured_outputs takes only one of json, regex, choice, grammar, json_object",
            param,
        )),
    }
}

impl ResponsesRequest {
    pub fn validate(&self, defaults: &SamplingParams) -> Result<Generation, ApiError> {
        if self.background == Some(true) {
            return Err(bad("background responses are not supported", "background"));
        }
        let (messages, labels) = self.messages()?;
        let thinking = reasoning_effort(
            self.reasoning.as_ref().and_then(|r| r.effort.as_deref()),
            "reasoning",
        )?;
        let tools: Vec<Tool> = self
            .tools
            .iter()
            .flatten()
            .map(|t| Tool {
                kind: FunctionType::Function,
                function: FunctionDef {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    parameters: t.parameters.clone(),
                    strict: t.strict,
                },
            })
            .collect();
        for (i, t) in tools.iter().enumerate() {
            check_tool(&t.function, &format!("tools[{i}]"))?;
        }
        let forced_tool = match &self.tool_choice {
            None | Some(ResponsesToolChoice::Mode(ToolChoiceMode::Auto | ToolChoiceMode::None)) => {
                None
            }
            Some(ResponsesToolChoice::Mode(ToolChoiceMode::Required)) => Some(ForcedTool::Any),
            Some(ResponsesToolChoice::Function { name, .. }) => {
                Some(ForcedTool::Named(name.clone()))
            }
        };
        check_forced(&forced_tool, tools.iter().map(|t| t.function.name.as_str()))?;
        let tools_off = matches!(
            self.tool_choice,
            Some(ResponsesToolChoice::Mode(ToolChoiceMode::None))
        );
        Ok(Generation {
            conversation: Conversation {
                messages: nonempty(messages, "input")?,
                labels,
                param: "input",
                tools: (!tools.is_empty() && !tools_off).then_some(tools),
                template_kwargs: template_kwargs(None, thinking),
                max_soft_tokens: max_soft_tokens(self.mm_processor_kwargs.as_ref())?,
                add_generation_prompt: true,
            },
            n: 1,
            max_tokens: max_tokens(self.max_output_tokens, "max_output_tokens")?,
            sampling: sampling(
                defaults,
                self.temperature,
                self.top_p,
                None,
                None,
                self.seed,
            )?,
            penalties: Penalties::none(),
            stop: vec![],
            logprobs: None,
            ignore_eos: false,
            format: self.format(&forced_tool)?,
            forced_tool,
            parallel_tool_calls: true,
            stream: self.stream.unwrap_or(false),
            include_usage: false,
        })
    }

    /// `text.format` as a format (`text`: none).
    fn format(
        &self,
        forced_tool: &Option<ForcedTool>,
    ) -> Result<Option<(Format, &'static str)>, ApiError> {
        let rf = match self.text.as_ref().and_then(|t| t.format.clone()) {
            None | Some(ResponsesFormat::Text) => return Ok(None),
            Some(ResponsesFormat::JsonObject) => ResponseFormat::JsonObject,
            Some(ResponsesFormat::JsonSchema(json_schema)) => {
                ResponseFormat::JsonSchema { json_schema }
            }
        };
        let format = response_format_of(rf)
            .map_err(|e| e.param("text.format"))?
            .map(|f| (f, "text.format"));
        not_with_forced_tool(format, forced_tool)
    }

    /// Input items to chat messages: `instructions` first as a system message, consecutive
    /// function calls as one assistant message, function call outputs as tool messages. With
    /// each message, the name of the item it came from.
    fn messages(&self) -> Result<(Vec<Message>, Vec<String>), ApiError> {
        let mut msgs = vec![];
        let mut labels = vec![];
        if let Some(i) = &self.instructions {
            msgs.push(Message::System {
                content: Content::Text(i.clone()),
            });
            labels.push("instructions".to_string());
        }
        let items = match &self.input {
            ResponsesInput::Text(s) => {
                msgs.push(Message::User {
                    content: Content::Text(s.clone()),
                });
                labels.push("input".to_string());
                return Ok((msgs, labels));
            }
            ResponsesInput::Items(items) => items,
        };
        Self::item_messages(items, &mut msgs, &mut labels)?;
        Ok((msgs, labels))
    }

    /// Appends input items (or a stored response's output items) to `msgs` as chat messages,
    /// each labelled by its item.
    pub fn item_messages(
        items: &[InputItem],
        msgs: &mut Vec<Message>,
        labels: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        for (n, item) in items.iter().enumerate() {
            match item {
                InputItem::Message { role, content } => {
                    let content = content.clone();
                    msgs.push(match role {
                        Role::System => Message::System { content },
                        Role::Developer => Message::Developer { content },
                        Role::User => Message::User { content },
                        Role::Assistant => Message::Assistant {
                            content: Some(content),
                            reasoning_content: None,
                            tool_calls: vec![],
                        },
                        Role::Tool => {
                            return Err(bad(
                                format!("input[{n}]: tool results are `function_call_output` items, not `tool` messages"),
                                "input",
                            ))
                        }
                    });
                    labels.push(format!("input[{n}]"));
                }
                InputItem::FunctionCall {
                    call_id,
                    name,
                    arguments,
                } => {
                    let call = ToolCallParam {
                        id: Some(call_id.clone()),
                        function: FunctionCallParam {
                            name: name.clone(),
                            arguments: Value::String(arguments.clone()),
                        },
                    };
                    // Consecutive calls belong to one assistant message.
                    match msgs.last_mut() {
                        Some(Message::Assistant {
                            content: None,
                            tool_calls,
                            ..
                        }) if !tool_calls.is_empty() => tool_calls.push(call),
                        _ => {
                            msgs.push(Message::Assistant {
                                content: None,
                                reasoning_content: None,
                                tool_calls: vec![call],
                            });
                            labels.push(format!("input[{n}]"));
                        }
                    }
                }
                InputItem::FunctionCallOutput { call_id, output } => {
                    let text = match output {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    msgs.push(Message::Tool {
                        content: Content::Text(text),
                        tool_call_id: Some(call_id.clone()),
                        name: None,
                    });
                    labels.push(format!("input[{n}]"));
                }
                InputItem::Reasoning {} => {}
            }
        }
        Ok(())
    }
}

impl TokenizeRequest {
    /// The conversation of a `/tokenize` request given as `messages`.
    pub fn conversation(&self) -> Result<Conversation, ApiError> {
        Ok(Conversation {
            messages: nonempty(self.messages.clone().unwrap_or_default(), "messages")?,
            labels: vec![],
            param: "messages",
            tools: None,
            template_kwargs: self.chat_template_kwargs.clone().unwrap_or_default(),
            max_soft_tokens: max_soft_tokens(self.mm_processor_kwargs.as_ref())?,
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
        })
    }
}

fn nonempty(messages: Vec<Message>, param: &str) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(bad(format!("`{param}` must not be empty"), param));
    }
    Ok(messages)
}

/// `tool_choice` "required" needs tools; a named one must be among them.
fn check_forced<'a>(
    forced: &Option<ForcedTool>,
    mut names: impl Iterator<Item = &'a str>,
) -> Result<(), ApiError> {
    match forced {
        None => Ok(()),
        Some(ForcedTool::Any) => match names.next() {
            Some(_) => Ok(()),
            None => Err(bad("tool_choice \"required\" needs `tools`", "tool_choice")),
        },
        Some(ForcedTool::Named(name)) => match names.any(|n| n == name) {
            true => Ok(()),
            false => Err(bad(
                format!("tool_choice names `{name}`, which is not among `tools`"),
                "tool_choice",
            )),
        },
    }
}

fn template_kwargs(
    kwargs: Option<Map<String, Value>>,
    thinking: Option<bool>,
) -> Map<String, Value> {
    let mut kwargs = kwargs.unwrap_or_default();
    if let Some(t) = thinking {
        kwargs.insert("enable_thinking".into(), Value::Bool(t));
    }
    kwargs
}

fn max_soft_tokens(mm: Option<&MmProcessorKwargs>) -> Result<Option<usize>, ApiError> {
    match mm.and_then(|m| m.max_soft_tokens) {
        None => Ok(None),
        Some(n) if SUPPORTED_SOFT_TOKENS.contains(&(n as usize)) => Ok(Some(n as usize)),
        Some(n) => Err(bad(
            format!("mm_processor_kwargs.max_soft_tokens must be one of 70, 140, 280, 560 or 1120, not {n}"),
            "mm_processor_kwargs",
        )),
    }
}

pub(crate) fn max_tokens(
    requested: Option<u32>,
    param: &'static str,
) -> Result<Option<(u32, &'static str)>, ApiError> {
    match requested {
        Some(0) => Err(bad(format!("{param} must be at least 1"), param)),
        n => Ok(n.map(|n| (n, param))),
    }
}

/// The efforts OpenAI defines; "none" turns thinking off, any other on.
const REASONING_EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];

fn reasoning_effort(effort: Option<&str>, param: &str) -> Result<Option<bool>, ApiError> {
    match effort {
        None => Ok(None),
        Some(e) if REASONING_EFFORTS.contains(&e) => Ok(Some(e != "none")),
        Some(e) => Err(bad(
            format!(
                "reasoning effort `{e}` is not one of {}",
                REASONING_EFFORTS.join(", ")
            ),
            param,
        )),
    }
}

/// vLLM's ranges: presence and frequency penalties in [-2, 2], a repetition penalty above 0.
pub(crate) fn penalties(
    presence: Option<f32>,
    frequency: Option<f32>,
    repetition: Option<f32>,
    logit_bias: Vec<(u32, f32)>,
) -> Result<Penalties, ApiError> {
    for (value, param) in [
        (presence, "presence_penalty"),
        (frequency, "frequency_penalty"),
    ] {
        if let Some(v) = value.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(bad(format!("{param} must be in [-2, 2], not {v}"), param));
        }
    }
    let repetition = repetition.unwrap_or(1.0);
    if !(repetition > 0.0 && repetition.is_finite()) {
        return Err(bad(
            format!("repetition_penalty must be greater than 0, not {repetition}"),
            "repetition_penalty",
        ));
    }
    Ok(Penalties {
        presence: presence.unwrap_or(0.0),
        frequency: frequency.unwrap_or(0.0),
        repetition,
        logit_bias,
    })
}

/// A tool's name must be usable in the Gemma call syntax (`call:NAME{...}`), as OpenAI's rule
/// has it, and its parameters must look like a JSON Schema of an object's fields: the grammar
/// of calls is built from them.
fn check_tool(f: &FunctionDef, at: &str) -> Result<(), ApiError> {
    let name_ok = (1..=64).contains(&f.name.len())
        && f.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if !name_ok {
        return Err(bad(
            format!(
                "{at}.name `{}` must be 1 to 64 letters, digits, `_`, `-` or `.`",
                f.name
            ),
            "tools",
        ));
    }
    let Some(params) = &f.parameters else {
        return Ok(());
    };
    let at = format!("{at}.parameters");
    let schema_error = |why: String| Err(bad(format!("{at}: {why}"), "tools"));
    let Value::Object(o) = params else {
        return schema_error(format!(
            "must be a JSON Schema object, not {}",
            super::protocol::json_kind(params)
        ));
    };
    const TYPES: [&str; 7] = [
        "object", "string", "number", "integer", "boolean", "array", "null",
    ];
    let known = |t: &Value| t.as_str().is_some_and(|t| TYPES.contains(&t));
    match o.get("type") {
        None => {}
        Some(t) if known(t) => {}
        Some(Value::Array(ts)) if !ts.is_empty() && ts.iter().all(known) => {}
        Some(t) => return schema_error(format!("`type` {t} is not a JSON Schema type")),
    }
    match o.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            if let Some((k, _)) = props
                .iter()
                .find(|(_, v)| !matches!(v, Value::Object(_) | Value::Bool(_)))
            {
                return schema_error(format!("`properties.{k}` must be a schema (an object)"));
            }
        }
        Some(p) => {
            return schema_error(format!(
                "`properties` must be an object, not {}",
                super::protocol::json_kind(p)
            ))
        }
    }
    match o.get("required") {
        None => Ok(()),
        Some(Value::Array(r)) if r.iter().all(Value::is_string) => Ok(()),
        Some(_) => schema_error("`required` must be a list of property names".into()),
    }
}

/// The request's sampling over the server's defaults (the checkpoint's generation config).
pub(crate) fn sampling(
    d: &SamplingParams,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
) -> Result<SamplingParams, ApiError> {
    let temperature = temperature.unwrap_or(d.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            format!("temperature {temperature} must be between 0 and 2"),
            "temperature",
        ));
    }
    let top_p = top_p.unwrap_or(d.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("top_p {top_p} must be in (0, 1]"), "top_p"));
    }
    let top_k = match top_k {
        None => d.top_k,
        Some(k) if k <= 0 => 0, // -1 / 0 disable, as vLLM
        Some(k) => k as usize,
    };
    let min_p = min_p.unwrap_or(d.min_p);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(bad(format!("min_p {min_p} must be in [0, 1]"), "min_p"));
    }
    Ok(SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        // Unseeded requests still differ from each other.
        seed: seed.map_or_else(crate::ids::random_u64, |s| s as u64),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// The sampling defaults of the request tests (a checkpoint's generation config).
    pub(crate) fn defaults() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            min_p: 0.0,
            seed: 0,
        }
    }

    fn chat(extra: Value) -> Result<Generation, String> {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req: ChatCompletionRequest = serde_json::from_value(body).map_err(|e| e.to_string())?;
        req.validate(&defaults())
            .map_err(|e| format!("{} [{}]", e.message, e.param.unwrap_or_default()))
    }

    #[test]
    fn every_check_names_its_parameter() {
        let bad = [
            (json!({"messages": []}), "[messages]"),
            (json!({"n": 0}), "[n]"),
            (json!({"n": 17}), "[n]"),
            (json!({"temperature": 2.5}), "[temperature]"),
            (json!({"top_p": 0.0}), "[top_p]"),
            (json!({"min_p": 1.5}), "[min_p]"),
            (json!({"max_tokens": 0}), "[max_tokens]"),
            (json!({"logit_bias": {"x": 1.0}}), "[logit_bias]"),
            (json!({"top_logprobs": 3}), "[top_logprobs]"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "[top_logprobs]",
            ),
            (json!({"presence_penalty": -3.0}), "[presence_penalty]"),
            (json!({"frequency_penalty": 2.5}), "[frequency_penalty]"),
            (json!({"repetition_penalty": 0.0}), "[repetition_penalty]"),
            (json!({"repetition_penalty": -1.0}), "[repetition_penalty]"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "[stream_options]",
            ),
            (json!({"reasoning_effort": "bogus"}), "[reasoning_effort]"),
            (
                json!({"max_completion_tokens": 0}),
                "[max_completion_tokens]",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
                "tools[0].function.parameters: must be a JSON Schema object, not a string [tools]",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}]}),
                "not a JSON Schema type [tools]",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]}),
                "`properties` must be an object, not a number [tools]",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 1}}}}]}),
                "`properties.a` must be a schema",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "a"}}}]}),
                "`required` must be a list",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b{"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "not a number",
            ),
            (
                json!({"messages": [{"role": "user", "content": {"text": "hi"}}]}),
                "not an object",
            ),
            (json!({"tool_choice": "required"}), "[tool_choice]"),
            (
                json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "[tool_choice]",
            ),
            (
                json!({"mm_processor_kwargs": {"max_soft_tokens": 100}}),
                "[mm_processor_kwargs]",
            ),
            (
                json!({"tool_choice": "sometimes"}),
                r#"expected "none", "auto""#,
            ),
            (json!({"stop": 3}), "untagged enum Stop"),
            (json!({"tools": 1}), "expected a sequence"),
        ];
        for (extra, needle) in bad {
            let e = chat(extra.clone()).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn fields_reach_the_generation() {
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}});
        let g = chat(json!({
            "n": 3, "max_completion_tokens": 9, "max_tokens": 4, "temperature": 0.5, "top_k": -1,
            "seed": 7, "stop": ["a", ""], "logprobs": true, "top_logprobs": 20,
            "logit_bias": {"12": 500.0}, "tools": [tool], "tool_choice": "required",
            "reasoning_effort": "low", "stream": true, "stream_options": {"include_usage": true},
            "presence_penalty": -2.0, "repetition_penalty": 0.5,
            "mm_processor_kwargs": {"max_soft_tokens": 280},
        }))
        .unwrap();
        assert_eq!((g.n, g.max_tokens), (3, Some((9, "max_completion_tokens"))));
        assert_eq!(g.sampling.temperature, 0.5);
        assert_eq!((g.sampling.top_k, g.sampling.seed), (0, 7));
        assert_eq!(g.stop, ["a"]);
        assert_eq!(g.logprobs, Some(MAX_TOP_LOGPROBS as usize));
        assert_eq!(g.penalties.logit_bias, [(12, 100.0)]);
        assert_eq!(g.forced_tool, Some(ForcedTool::Any));
        assert!(g.stream && g.include_usage);
        let c = &g.conversation;
        assert_eq!(c.template_kwargs["enable_thinking"], json!(true));
        assert_eq!(c.max_soft_tokens, Some(280));
        assert_eq!(c.tools.as_ref().map(Vec::len), Some(1));
        // "none" hides the tools from the template.
        let g = chat(json!({"tools": [tool], "tool_choice": "none"})).unwrap();
        assert!(g.conversation.tools.is_none() && g.forced_tool.is_none());
        // chat_template_kwargs.enable_thinking wins over reasoning_effort.
        let g = chat(
            json!({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": false}}),
        )
        .unwrap();
        assert_eq!(
            g.conversation.template_kwargs["enable_thinking"],
            json!(false)
        );
    }

    #[test]
    fn responses_input_items_become_messages() {
        let req: ResponsesRequest = serde_json::from_value(json!({
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": {"ok": true}},
                {"type": "reasoning"},
            ],
            "tool_choice": {"type": "function", "name": "f"},
            "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "g"}],
        }))
        .unwrap();
        let g = req.validate(&defaults()).unwrap();
        let c = &g.conversation;
        assert_eq!(
            c.labels,
            ["instructions", "input[0]", "input[1]", "input[3]"]
        );
        match &c.messages[2] {
            Message::Assistant { tool_calls, .. } => assert_eq!(tool_calls.len(), 2),
            other => panic!("{other:?}"),
        }
        match &c.messages[3] {
            Message::Tool {
                content: Content::Text(t),
                tool_call_id,
                ..
            } => {
                assert_eq!(
                    (t.as_str(), tool_call_id.as_deref()),
                    (r#"{"ok":true}"#, Some("c1"))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(g.forced_tool, Some(ForcedTool::Named("f".into())));
        let bad: Result<ResponsesRequest, _> =
            serde_json::from_value(json!({"input": [{"type": "web_search_call"}]}));
        assert!(bad.unwrap_err().to_string().contains("input[0]"));
    }

    #[test]
    fn a_continuation_goes_after_the_instructions_with_its_labels() {
        let req: ResponsesRequest = serde_json::from_value(json!({
            "instructions": "be brief",
            "input": [{"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
            "previous_response_id": "resp_1",
        }))
        .unwrap();
        let mut g = req.validate(&defaults()).unwrap();
        let earlier = vec![
            Message::User {
                content: Content::Text("weather?".into()),
            },
            Message::Assistant {
                content: None,
                reasoning_content: None,
                tool_calls: vec![],
            },
        ];
        g.conversation.continue_from(1, earlier, "resp_1");
        let c = &g.conversation;
        assert_eq!(
            c.labels,
            [
                "instructions",
                "previous_response_id resp_1 message 0",
                "previous_response_id resp_1 message 1",
                "input[0]"
            ]
        );
        let kinds: Vec<_> = c
            .messages
            .iter()
            .map(|m| match m {
                Message::System { .. } => "system",
                Message::User { .. } => "user",
                Message::Assistant { .. } => "assistant",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["system", "user", "assistant", "other"]);
        let background: ResponsesRequest =
            serde_json::from_value(json!({"input": "hi", "background": true})).unwrap();
        let e = background.validate(&defaults()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("background"));
    }
}
