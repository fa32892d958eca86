//! The output side: generated token ids to API text. (Temporary: the parser split brings the
//! rest of this module.)

pub mod stop;

pub use crate::parser::{OutputParser, ParsedDelta, SpecialTokens};
