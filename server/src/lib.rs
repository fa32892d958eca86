//! The serving side of gemma4 over the engine (`gemma4-engine`: runs requests over the model with
//! continuous batching, knows nothing of HTTP): the prompt side (chat template), the output side
//! (thinking and tool-call parser), and the OpenAI-compatible HTTP layer over them.

pub mod chat_template;
pub mod choices;
pub mod cpu;
pub mod http;
pub mod ids;
pub mod images;
pub mod openai;
pub mod output;
pub mod prompt;
pub mod serve;
