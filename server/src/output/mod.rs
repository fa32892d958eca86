//! The output side: a request's generated token ids in, reasoning (thinking), content and
//! tool-call deltas out, incrementally, for the OpenAI-compatible API.

mod channel;
pub mod gemma_args;

pub use channel::{OutputParser, ParsedDelta, SpecialTokens};
