//! The wire types of the OpenAI-compatible API. Requests are typed down to their content parts,
//! so a malformed request is refused by serde with the path of the bad field
//! (`messages[0].content[1].image_url: ...`) before any work, and `/openapi.json` (utoipa)
//! documents these types as they are. Unknown request fields are accepted and ignored, as vLLM
//! does. What serde cannot check (ranges, cross-field rules) is checked once in
//! [`super::request`], which turns a request into the one validated form the rest of the path uses.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A stop string or a list of them.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema, Default)]
pub struct StreamOptions {
    /// A last chunk with the usage of the whole request and no choices.
    pub include_usage: Option<bool>,
}

/// One chat message. Deserialized through [`RawMessage`] so that a bad field is reported by
/// its own path and a missing one by its name.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "role", rename_all = "lowercase", try_from = "RawMessage")]
pub enum Message {
    System {
        content: Content,
    },
    /// Treated as `system` (the template has no developer role).
    Developer {
        content: Content,
    },
    User {
        content: Content,
    },
    Assistant {
        content: Option<Content>,
        /// Earlier thinking, passed to the template (it decides whether to render it).
        /// `reasoning` is accepted as the same field.
        reasoning_content: Option<String>,
        #[serde(default)]
        tool_calls: Vec<ToolCallParam>,
    },
    Tool {
        content: Content,
        /// The call this answers; without it, `name`, else the position in the run of tool
        /// messages, picks the call.
        tool_call_id: Option<String>,
        name: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// The wire form of a message, every field optional; [`Message`] is made from it.
#[derive(Debug, Deserialize)]
pub struct RawMessage {
    role: Role,
    content: Option<Content>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallParam>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

impl TryFrom<RawMessage> for Message {
    type Error = String;

    fn try_from(m: RawMessage) -> Result<Self, String> {
        let content = |c: Option<Content>| {
            c.ok_or_else(|| format!("a {:?} message needs `content`", m.role).to_lowercase())
        };
        Ok(match m.role {
            Role::System => Message::System {
                content: content(m.content)?,
            },
            Role::Developer => Message::Developer {
                content: content(m.content)?,
            },
            Role::User => Message::User {
                content: content(m.content)?,
            },
            Role::Assistant => Message::Assistant {
                content: m.content,
                reasoning_content: m.reasoning_content.or(m.reasoning),
                tool_calls: m.tool_calls.unwrap_or_default(),
            },
            Role::Tool => Message::Tool {
                content: content(m.content)?,
                tool_call_id: m.tool_call_id,
                name: m.name,
            },
        })
    }
}

/// Message content: a string, or a list of parts (text and images).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, try_from = "Value")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl TryFrom<Value> for Content {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        Ok(
            match string_or_list(
                v,
                "content",
                "content must be a string or a list of content parts",
                |_| {},
            )? {
                StringOrList::String(s) => Content::Text(s),
                StringOrList::List(parts) => Content::Parts(parts),
            },
        )
    }
}

enum StringOrList<T> {
    String(String),
    List(Vec<T>),
}

/// A string, or a list deserialized element by element so that a bad element is named by its
/// index (`content[1]: ...`), where an untagged enum would only say that nothing matched.
/// `prepare` may fill in defaults of an element first.
fn string_or_list<T: serde::de::DeserializeOwned>(
    v: Value,
    name: &str,
    expected: &str,
    prepare: impl Fn(&mut Value),
) -> Result<StringOrList<T>, String> {
    match v {
        Value::String(s) => Ok(StringOrList::String(s)),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, mut item)| {
                prepare(&mut item);
                serde_json::from_value(item).map_err(|e| format!("{name}[{i}]: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(StringOrList::List),
        other => Err(format!("{expected}, not {}", json_kind(&other))),
    }
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A content part. Chat's `text` / `image_url`, the Responses API's `input_text` /
/// `output_text` / `input_image`, and the Hugging Face style `image`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    InputText {
        text: String,
    },
    OutputText {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    InputImage {
        image_url: Option<String>,
        /// Not supported (no file store): refused with a message saying so.
        file_id: Option<String>,
    },
    Image {
        url: Option<String>,
        image: Option<String>,
        image_url: Option<ImageUrl>,
    },
}

impl ContentPart {
    /// The text of a text part.
    pub fn text(&self) -> Option<&str> {
        match self {
            ContentPart::Text { text }
            | ContentPart::InputText { text }
            | ContentPart::OutputText { text } => Some(text),
            _ => None,
        }
    }

    /// The URL of an image part: Ok(None) for a text part, Err for an image part without a
    /// usable URL.
    pub fn image_url(&self) -> Result<Option<&str>, String> {
        let url = match self {
            ContentPart::Text { .. }
            | ContentPart::InputText { .. }
            | ContentPart::OutputText { .. } => return Ok(None),
            ContentPart::ImageUrl { image_url } => image_url.url(),
            ContentPart::InputImage { image_url, file_id } => {
                if image_url.is_none() && file_id.is_some() {
                    return Err(
                        "images given by `file_id` are not supported: send a data: URL".into(),
                    );
                }
                image_url.as_deref()
            }
            ContentPart::Image {
                url,
                image,
                image_url,
            } => url
                .as_deref()
                .or(image.as_deref())
                .or(image_url.as_ref().and_then(ImageUrl::url)),
        };
        match url.map(str::trim) {
            Some(u) if !u.is_empty() => Ok(Some(u)),
            _ => Err("the image part has no URL (expected `image_url: {\"url\": \"data:image/png;base64,...\"}`)".into()),
        }
    }
}

/// `"image_url": {"url": ..., "detail": ...}` or `"image_url": "..."`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ImageUrl {
    Url(String),
    Object {
        url: Option<String>,
        /// Accepted and ignored: the image is always resized to the request's soft-token budget.
        detail: Option<String>,
    },
}

impl ImageUrl {
    fn url(&self) -> Option<&str> {
        match self {
            ImageUrl::Url(u) => Some(u),
            ImageUrl::Object { url, .. } => url.as_deref(),
        }
    }
}

/// A tool call of an earlier assistant message.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolCallParam {
    pub id: Option<String>,
    pub function: FunctionCallParam,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionCallParam {
    pub name: String,
    /// JSON text, as the API returned it (an object is accepted too).
    #[schema(value_type = Object)]
    pub arguments: Value,
}

/// A tool the model may call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionDef,
}

/// The only tool type: `"function"`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FunctionType {
    Function,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionDef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema object.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `"none"`, `"auto"`, `"required"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

/// Chat's `tool_choice`: a mode, or `{"type": "function", "function": {"name": ...}}`. The
/// `expecting` text is the error a value of neither form gets (serde's default only says that no
/// variant matched).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = r#"expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}"#
)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Function {
        #[serde(rename = "type")]
        kind: FunctionType,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedFunction {
    pub name: String,
}

/// `response_format` (OpenAI's): free text, any JSON object, or JSON valid under a schema;
/// enforced while sampling (structured outputs). Any other `type` is a 400.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub schema: Option<Value>,
    /// Accepted; the schema is enforced either way (as vLLM).
    pub strict: Option<bool>,
}

/// The Responses API's `text` options.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesText {
    pub format: Option<ResponsesFormat>,
}

/// `text.format`: as `response_format`, with the schema's fields inline.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponsesFormat {
    Text,
    JsonObject,
    JsonSchema(JsonSchemaFormat),
}

/// vLLM's `structured_outputs`: exactly one of these.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StructuredOutputs {
    /// A JSON schema (an object, or its text).
    #[schema(value_type = Object)]
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Any JSON object.
    pub json_object: Option<bool>,
}

/// vLLM's multimodal processor options.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct MmProcessorKwargs {
    /// Soft tokens per image: 70, 140, 280, 560 or 1120 (default: the checkpoint's processor
    /// config).
    pub max_soft_tokens: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub messages: Vec<Message>,
    pub model: Option<String>,
    /// Wins over `max_tokens`.
    pub max_completion_tokens: Option<u32>,
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
    /// Choices to generate (1 to 16).
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f32>>,
    pub response_format: Option<ResponseFormat>,
    /// vLLM's structured outputs (json, regex, choice, grammar).
    pub structured_outputs: Option<StructuredOutputs>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    /// Accepted; the model may always make several calls in one turn.
    pub parallel_tool_calls: Option<bool>,
    /// Anything but "none" turns thinking on.
    pub reasoning_effort: Option<String>,
    /// vLLM extension: keep generating past end-of-turn / eos ids until max_tokens.
    pub ignore_eos: Option<bool>,
    /// Extra variables for the chat template (`enable_thinking`, ...).
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub mm_processor_kwargs: Option<MmProcessorKwargs>,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallChunk {
    pub index: usize,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LogprobContent {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<LogprobContent>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<String>,
    /// Thinking text (vLLM's name).
    pub reasoning: Option<String>,
    /// The same thinking text (SGLang, llama.cpp, Ollama clients).
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    /// "stop", "length" or "tool_calls".
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallChunk>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    /// Plain text to tokenize...
    pub prompt: Option<String>,
    /// ...or chat messages, rendered with the chat template first.
    pub messages: Option<Vec<Message>>,
    /// For `prompt`: add the tokenizer's special tokens (default true).
    pub add_special_tokens: Option<bool>,
    /// For `messages`: end with the opening of the model's turn (default true).
    pub add_generation_prompt: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// As in chat completions: image placeholders are expanded with this budget.
    pub mm_processor_kwargs: Option<MmProcessorKwargs>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VersionResponse {
    pub version: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema, Default)]
pub struct ReasoningOptions {
    pub effort: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    pub input: ResponsesInput,
    pub model: Option<String>,
    /// A system message before the input.
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub reasoning: Option<ReasoningOptions>,
    pub tools: Option<Vec<ResponsesTool>>,
    pub tool_choice: Option<ResponsesToolChoice>,
    /// `text.format`: the answer's format (structured outputs).
    pub text: Option<ResponsesText>,
    pub stream: Option<bool>,
    pub seed: Option<i64>,
    /// vLLM extension, as in chat completions.
    pub mm_processor_kwargs: Option<MmProcessorKwargs>,
    /// Keep the finished response for `GET /v1/responses/{id}` and `previous_response_id`
    /// (default true, as OpenAI).
    pub store: Option<bool>,
    /// Continue a stored response: its conversation and output come before `input` (its
    /// `instructions` do not).
    pub previous_response_id: Option<String>,
    /// Only false: background responses are not supported (a 400).
    pub background: Option<bool>,
}

/// A string (one user message), or a list of input items.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged, try_from = "Value")]
pub enum ResponsesInput {
    Text(String),
    Items(Vec<InputItem>),
}

impl TryFrom<Value> for ResponsesInput {
    type Error = String;

    fn try_from(v: Value) -> Result<Self, String> {
        // An item without `type` is a message, as in OpenAI's API.
        let default_type = |item: &mut Value| {
            if let Value::Object(o) = item {
                o.entry("type").or_insert_with(|| "message".into());
            }
        };
        let expected = "`input` must be a string or a list of items";
        Ok(match string_or_list(v, "input", expected, default_type)? {
            StringOrList::String(s) => ResponsesInput::Text(s),
            StringOrList::List(items) => ResponsesInput::Items(items),
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    Message {
        role: Role,
        content: Content,
    },
    FunctionCall {
        call_id: String,
        name: String,
        /// JSON text.
        arguments: String,
    },
    FunctionCallOutput {
        call_id: String,
        /// Text, or any JSON (sent to the model as its JSON text).
        #[schema(value_type = Object)]
        output: Value,
    },
    /// Earlier reasoning; not sent to the model again.
    Reasoning {},
}

/// A Responses tool: flat, `{"type": "function", "name", "description", "parameters"}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResponsesTool {
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// The Responses `tool_choice`: a mode, or `{"type": "function", "name": ...}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = r#"expected "none", "auto", "required" or {"type": "function", "name": ...}"#
)]
pub enum ResponsesToolChoice {
    Mode(ToolChoiceMode),
    Function {
        #[serde(rename = "type")]
        kind: FunctionType,
        name: String,
    },
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema, Default)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub output_tokens: usize,
    pub total_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens_details: OutputTokensDetails,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// "in_progress", "completed", "incomplete" or "failed".
    pub status: String,
    pub model: String,
    /// Output items: reasoning, message, function_call.
    #[schema(value_type = Vec<Object>)]
    pub output: Vec<Value>,
    pub usage: Option<ResponseUsage>,
    pub incomplete_details: Option<IncompleteDetails>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub parallel_tool_calls: bool,
    pub tools: Vec<ResponsesTool>,
    pub tool_choice: ResponsesToolChoice,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Whether the response is kept (the request's `store`, default true).
    pub store: bool,
    pub previous_response_id: Option<String>,
}

/// The answer of `DELETE /v1/responses/{id}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeletedResponse {
    pub id: String,
    /// "response".
    pub object: String,
    pub deleted: bool,
}
