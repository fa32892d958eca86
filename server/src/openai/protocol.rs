//! Request and response types of the OpenAI-compatible API. The handlers deserialize and
//! serialize exactly these, and `/openapi.json` is generated from them (utoipa). Unknown request
//! fields are accepted and ignored, as vLLM does.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// OpenAI chat messages (system, developer, user, assistant, tool).
    #[schema(value_type = Vec<Object>)]
    pub messages: Vec<Value>,
    pub model: Option<String>,
    /// Wins over `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    #[schema(value_type = Object)]
    pub response_format: Option<Value>,
    #[schema(value_type = Vec<Object>)]
    pub tools: Option<Vec<Value>>,
    /// "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.
    #[schema(value_type = Object)]
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Anything but "none" turns thinking on.
    pub reasoning_effort: Option<String>,
    /// vLLM extension: keep generating past end-of-turn / eos ids until max_tokens.
    pub ignore_eos: Option<bool>,
    #[schema(value_type = Object)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// `{"max_soft_tokens": 70 | 140 | 280 | 560 | 1120}`: soft tokens per image (default: the
    /// checkpoint's processor config).
    #[schema(value_type = Object)]
    pub mm_processor_kwargs: Option<Value>,
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
    #[schema(value_type = Vec<Object>)]
    pub messages: Option<Vec<Value>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    #[schema(value_type = Object)]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// As in chat completions: image placeholders are expanded with this budget.
    #[schema(value_type = Object)]
    pub mm_processor_kwargs: Option<Value>,
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
    /// A string, or a list of input items (messages, function calls, function call outputs).
    #[schema(value_type = Object)]
    pub input: Value,
    pub model: Option<String>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub reasoning: Option<ReasoningOptions>,
    #[schema(value_type = Vec<Object>)]
    pub tools: Option<Vec<Value>>,
    #[schema(value_type = Object)]
    pub tool_choice: Option<Value>,
    pub stream: Option<bool>,
    pub seed: Option<i64>,
    /// `{"max_soft_tokens": 70 | 140 | 280 | 560 | 1120}` (vLLM extension, as in chat completions).
    #[schema(value_type = Object)]
    pub mm_processor_kwargs: Option<Value>,
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
    #[schema(value_type = Object)]
    pub error: Option<Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub parallel_tool_calls: bool,
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    #[schema(value_type = Object)]
    pub tool_choice: Value,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
}
