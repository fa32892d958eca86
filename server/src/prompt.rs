//! The prompt side: a validated conversation to the token ids the engine runs. The messages are
//! converted to what the chat template reads, rendered with the checkpoint's template,
//! tokenized, and each image (fetched, decoded and preprocessed) replaces its placeholder by a
//! run of soft-token placeholders.

use std::sync::Arc;

use gemma4_model::vision::PreprocessedImage;
use tokenizers::Tokenizer;

use crate::chat_template::ChatTemplate;
use crate::images::{self, ImageRef, ImageSettings};
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

/// What prompt building needs of the server.
pub struct PromptContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub images: &'a ImageSettings,
}

pub async fn build(cx: &PromptContext<'_>, conv: &Conversation) -> Result<Prompt, ApiError> {
    let at = |e: ApiError| {
        if e.param.is_none() && e.status == axum::http::StatusCode::BAD_REQUEST {
            e.param(conv.param)
        } else {
            e
        }
    };
    let refs = image_refs(conv)?;
    images::check_refs(cx.images, &refs).map_err(at)?;
    let Some(template) = cx.template else {
        return Err(ApiError::bad_request(
            "this model has no chat template; use /tokenize and a completion client",
        ));
    };
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
    let ids = encode(cx.tokenizer, &text)?;
    // Every image placeholder of the prompt must be one of the request's images.
    let placeholders = cx
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
    let vision = cx.images.vision.clone();
    let budget = conv
        .max_soft_tokens
        .or(vision.as_ref().map(|v| v.processor.max_soft_tokens));
    let (Some(vision), Some(budget)) = (vision, budget) else {
        return Err(ApiError::bad_request(
            "this model has no vision tower: image inputs are not supported",
        ));
    };
    let loaded = images::load(cx.images, refs, budget).await.map_err(at)?;
    let counts: Vec<usize> = loaded.iter().map(|p| p.num_soft_tokens).collect();
    Ok(Prompt {
        ids: images::expand_placeholders(&ids, &vision, &counts),
        images: loaded,
    })
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
