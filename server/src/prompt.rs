//! The prompt side: a validated conversation to the token ids the engine runs. The messages are
//! converted to what the chat template reads, rendered with the checkpoint's template,
//! tokenized, and each image (fetched, decoded and preprocessed) replaces its placeholder by a
//! run of soft-token placeholders.

use std::sync::Arc;

use gemma4_model::vision::PreprocessedImage;
use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::http::AppState;
use crate::images::{self, ImageRef};
use crate::openai::error::ApiError;
use crate::openai::messages;
use crate::openai::protocol::{Content, Message};
use crate::openai::request::{Conversation, ForcedTool};

/// A rendered, tokenized prompt, with its images: each image is a run of `num_soft_tokens`
/// image placeholder ids in `ids` (between `<|image>` and `<image|>`), in order.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<Arc<PreprocessedImage>>,
}

/// Builds the prompt of `conv`: a cheap bound first (a conversation whose text cannot fit the
/// context is refused before any work), then rendering and tokenizing on the CPU pool, then the
/// images (fetched, decoded on the blocking pool).
pub async fn build(state: &Arc<AppState>, conv: &Conversation) -> Result<Prompt, ApiError> {
    let at = |e: ApiError| {
        if e.param.is_none() && e.status == axum::http::StatusCode::BAD_REQUEST {
            e.param(conv.param)
        } else {
            e
        }
    };
    let refs = image_refs(conv)?;
    images::check_refs(&state.images, &refs).map_err(at)?;
    let Some(template) = state.template.clone() else {
        return Err(ApiError::bad_request(
            "this model has no chat template; use /tokenize and a completion client",
        ));
    };
    check_text_fits(state, conversation_text_bytes(conv), conv.param)?;
    let ids = {
        let (st, conv) = (state.clone(), conv.clone());
        state
            .cpu
            .run(move || render(&st, &template, &conv))
            .await??
    };
    // Every image placeholder of the prompt must be one of the request's images.
    let placeholders = state
        .images
        .image_token_id
        .map_or(0, |id| ids.iter().filter(|&&t| t == id).count());
    if placeholders != refs.len() {
        return Err(ApiError::bad_request(if refs.is_empty() {
            "the prompt contains the image placeholder token `<|image|>` but the request has no image".to_string()
        } else {
            format!(
                "the chat template rendered {placeholders} image placeholders for the request's {} images (images are taken in user, system and assistant messages; the text must not contain `<|image|>`)",
                refs.len()
            )
        })
        .param(conv.param));
    }
    if refs.is_empty() {
        return Ok(Prompt {
            ids,
            images: vec![],
        });
    }
    let vision = state.images.vision.clone();
    let budget = conv
        .max_soft_tokens
        .or(vision.as_ref().map(|v| v.processor.max_soft_tokens));
    let (Some(vision), Some(budget)) = (vision, budget) else {
        return Err(ApiError::bad_request(
            "this model has no vision tower: image inputs are not supported",
        ));
    };
    let loaded = images::load(&state.images, &state.cpu, refs, budget)
        .await
        .map_err(at)?;
    let counts: Vec<usize> = loaded.iter().map(|p| p.num_soft_tokens).collect();
    Ok(Prompt {
        ids: images::expand_placeholders(&ids, &vision, &counts),
        images: loaded,
    })
}

/// The chat template's text of `conv`, tokenized (on the CPU pool).
fn render(
    state: &AppState,
    template: &ChatTemplate,
    conv: &Conversation,
) -> Result<Vec<u32>, ApiError> {
    let converted =
        messages::to_template(&conv.messages, template.tool_results(), &|i| conv.label(i))
            .map_err(|e| ApiError::bad_request(e).param(conv.param))?;
    let tools: Option<Vec<serde_json::Value>> = conv.tools.as_ref().map(|t| {
        t.iter()
            .map(|t| serde_json::to_value(t).expect("tools serialize"))
            .collect()
    });
    let text = template
        .render(
            &converted,
            tools.as_deref(),
            conv.add_generation_prompt,
            &conv.template_kwargs,
        )
        .map_err(|e| ApiError::bad_request(format!("rendering the chat template: {e}")))?;
    check_text_fits(state, text.len(), conv.param)?;
    encode(&state.tokenizer, &text)
}

/// Bytes of the message text every template renders whole (system, developer, user and tool
/// content; an assistant's earlier turns may be cut by the template, so they are not counted).
fn conversation_text_bytes(conv: &Conversation) -> usize {
    let content_bytes = |c: &Content| match c {
        Content::Text(t) => t.len(),
        Content::Parts(parts) => parts.iter().filter_map(|p| p.text()).map(str::len).sum(),
    };
    conv.messages
        .iter()
        .map(|m| match m {
            Message::System { content }
            | Message::Developer { content }
            | Message::User { content }
            | Message::Tool { content, .. } => content_bytes(content),
            Message::Assistant { .. } => 0,
        })
        .sum()
}

/// Refuses text that cannot fit the context whatever its tokenization: no token covers more
/// than `max_token_bytes` bytes of text, so `bytes / max_token_bytes` tokens at least.
pub fn check_text_fits(state: &AppState, bytes: usize, param: &str) -> Result<(), ApiError> {
    let at_least = bytes / state.max_token_bytes.max(1);
    let limit = state.max_model_len;
    if at_least >= limit {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {limit} tokens. However, your request has at least {at_least} input tokens ({bytes} bytes of text; no token is longer than {} bytes). Please reduce the length of the input messages.",
            state.max_token_bytes
        ))
        .param(param));
    }
    Ok(())
}

/// The most bytes of text one token can stand for: the longest vocabulary entry, as long as
/// the tokenizer's normalizer cannot shrink text (none, or Gemma's replacement of ' ' by '▁',
/// which lengthens it); else no bound (1 token per byte would be wrong), so `usize::MAX`.
pub fn max_token_bytes(tokenizer: &Tokenizer) -> usize {
    use tokenizers::normalizers::NormalizerWrapper;
    let lengthens_only = match tokenizer.get_normalizer() {
        None => true,
        Some(NormalizerWrapper::Replace(r)) => {
            let r = serde_json::to_value(r).unwrap_or_default();
            let from = r["pattern"]["String"].as_str().map(str::len);
            let to = r["content"].as_str().map(str::len);
            matches!((from, to), (Some(f), Some(t)) if f <= t)
        }
        Some(_) => false,
    };
    if !lengthens_only {
        return usize::MAX;
    }
    tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(usize::MAX)
}

/// The image parts of the conversation, in order, each with where it is in the request.
fn image_refs(conv: &Conversation) -> Result<Vec<ImageRef>, ApiError> {
    let mut refs = vec![];
    for (i, m) in conv.messages.iter().enumerate() {
        let (content, is_tool) = match m {
            Message::System { content }
            | Message::Developer { content }
            | Message::User { content } => (Some(content), false),
            Message::Assistant { content, .. } => (content.as_ref(), false),
            Message::Tool { content, .. } => (Some(content), true),
        };
        let Some(Content::Parts(parts)) = content else {
            continue;
        };
        for (j, part) in parts.iter().enumerate() {
            let location = format!("{}.content[{j}]", conv.label(i));
            let url = part
                .image_url()
                .map_err(|e| ApiError::bad_request(format!("{location}: {e}")).param(conv.param))?;
            let Some(url) = url else { continue };
            if is_tool {
                return Err(ApiError::bad_request(format!(
                    "{location}: images in tool messages are not supported"
                ))
                .param(conv.param));
            }
            refs.push(ImageRef {
                location,
                url: url.to_string(),
            });
        }
    }
    Ok(refs)
}

/// The ids the answer is made to start with for a forced tool call: the Gemma 4 tool-call
/// syntax (`<|tool_call>call:` and, when named, `NAME{`), so the model must call a tool (and
/// the named one) instead of being checked afterwards.
pub fn forced_tool_prefix(
    tokenizer: &Tokenizer,
    forced: Option<&ForcedTool>,
) -> Result<Vec<u32>, ApiError> {
    match forced {
        None => Ok(vec![]),
        Some(ForcedTool::Any) => encode(tokenizer, "<|tool_call>call:"),
        Some(ForcedTool::Named(name)) => encode(tokenizer, &format!("<|tool_call>call:{name}{{")),
    }
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
        .get_ids()
        .to_vec())
}
