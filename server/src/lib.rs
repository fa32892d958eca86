//! The serving side of gemma4: an engine that runs requests over the model with continuous
//! batching (knows nothing of HTTP), the prompt side (chat template), the output side (thinking and
//! tool-call parser), and the OpenAI-compatible HTTP layer over them.

pub mod bench;
pub mod chat_template;
pub mod choices;
pub mod engine;
pub mod http;
pub mod ids;
pub mod images;
pub mod openai;
pub mod output;
pub mod prompt;
pub mod serve;
pub mod synth;
