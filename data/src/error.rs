//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a tokenizer or rendering text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: serde_json::Error,
    },
    /// A file holds a value of the wrong shape.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizers crate refused the tokenizer or the text.
    #[error("{path}: {message}")]
    Tokenizer {
        /// `tokenizer.json`.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },
    /// The chat template failed to compile or to render.
    #[error("chat template: {message}")]
    Template {
        /// minijinja's message with its location.
        message: String,
    },
    /// A chat template was needed and the tokenizer has none.
    #[error("{dir} has no chat template (neither chat_template.jinja nor `chat_template` in tokenizer_config.json)")]
    NoChatTemplate {
        /// The tokenizer directory.
        dir: PathBuf,
    },
}
