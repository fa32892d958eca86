//! The output side: a request's generated token ids in, reasoning (thinking), content and
//! tool-call deltas out, incrementally, for the OpenAI-compatible API.
//!
//! - `channel`: [`OutputParser`], the per-request state machine that follows Gemma 4's markers
//!   (thought channel, tool-call blocks) and drops special tokens;
//! - [`detokenize`]: ids to text as they arrive, never half a character;
//! - [`gemma_args`]: the text of a tool-call block to names and JSON arguments (no tokenizer);
//! - [`stop`]: stop strings over the streamed content.

mod channel;
pub mod detokenize;
pub mod gemma_args;
pub mod stop;
pub mod tool_grammar;

pub use channel::{OutputParser, ParsedDelta, SpecialTokens};

/// The tokenizer the tests decode with: a tiny vocabulary with Gemma 4's special tokens and byte
/// fallback.
#[cfg(test)]
mod fixture {
    use std::sync::{Arc, OnceLock};

    use tokenizers::Tokenizer;

    pub const TOKENIZER: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/tiny-31b-recipe/tokenizer.json"
    );

    pub fn tokenizer() -> Arc<Tokenizer> {
        static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
        TOK.get_or_init(|| {
            Arc::new(Tokenizer::from_file(TOKENIZER).expect("fixture tokenizer loads"))
        })
        .clone()
    }
}
