//! Load-time errors. Every variant names the file, field or tensor at fault, so a damaged or
//! unsupported checkpoint is refused with a message a user can act on (never a panic). Also the
//! errors of a forward pass and of writing a synthetic checkpoint.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {msg}", path.display())]
    Json { path: PathBuf, msg: String },
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("unsupported model feature `{field}`: {msg}")]
    Unsupported { field: String, msg: String },
    #[error("{}: not a valid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}`: dtype {found} is not supported here (expected {expected})")]
    Dtype {
        name: String,
        expected: String,
        found: String,
    },
    #[error("tensor `{name}`: {msg}")]
    BadValue { name: String, msg: String },
    #[error("tensor `{name}` is stored in more than one file ({first} and {second})")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("the checkpoint holds tensors the model does not use: {names}")]
    Unused { names: String },
}

impl LoadError {
    pub(crate) fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        LoadError::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn unsupported(field: impl Into<String>, msg: impl Into<String>) -> Self {
        LoadError::Unsupported {
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// Errors of a forward pass or a generation call (bad token ids, context overflow).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RunError {
    #[error("token id {id} at position {position} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    #[error("sequence of {len} tokens exceeds the context limit of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("invalid sampling parameter `{field}`: {msg}")]
    Sampling { field: &'static str, msg: String },
    #[error("the input has {expected} image placeholders but {got} soft tokens were given")]
    SoftTokens { expected: usize, got: usize },
    #[error("this checkpoint has no vision tower")]
    NoVision,
    #[error("image: {0}")]
    Image(String),
    #[error(transparent)]
    OutOfBlocks(#[from] crate::cache::OutOfBlocks),
}

/// Errors of writing a synthetic checkpoint (`synth`).
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset `{0}` (31b, 31b-6l, 31b-2l, small, tiny)")]
    UnknownPreset(String),
    #[error("writing {}: {msg}", path.display())]
    Write { path: PathBuf, msg: String },
}

impl SynthError {
    pub(crate) fn write(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        SynthError::Write {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}
