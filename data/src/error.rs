//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a tokenizer, rendering text or loading a dataset.
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
    #[error("chat template of {path}: {message}")]
    Template {
        /// The file it came from (`chat_template.jinja` or `tokenizer_config.json`).
        path: PathBuf,
        /// minijinja's message with its location.
        message: String,
    },
    /// A dataset row is malformed, or does not fit the dataset or the tokenizer.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The JSONL file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A dataset file holds no usable example.
    #[error("{path}: no examples{}", skipped_note(*skipped))]
    EmptyDataset {
        /// The JSONL file.
        path: PathBuf,
        /// Bad rows skipped because `skip_bad_rows` was set.
        skipped: usize,
    },
    /// A dataset has fewer examples than one batch holds.
    #[error("the dataset has {examples} examples, fewer than batch_size {batch_size}")]
    TooFewExamples {
        /// Examples in the dataset.
        examples: usize,
        /// Rows per batch.
        batch_size: usize,
    },
    /// A batch size of zero.
    #[error("batch_size must be at least 1")]
    ZeroBatchSize,
    /// A chat template was needed and the tokenizer has none.
    #[error("{dir} has no chat template (neither chat_template.jinja nor `chat_template` in tokenizer_config.json)")]
    NoChatTemplate {
        /// The tokenizer directory.
        dir: PathBuf,
    },
}

fn skipped_note(skipped: usize) -> String {
    match skipped {
        0 => String::new(),
        1 => " (1 bad row skipped)".to_string(),
        n => format!(" ({n} bad rows skipped)"),
    }
}
