//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while writing a GGUF file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An input is not something llama.cpp's GGUF can hold.
    #[error("{path}: {message}")]
    Unsupported {
        /// The input file (config.json, tokenizer.json, the adapter).
        path: PathBuf,
        /// What is not supported, and what is.
        message: String,
    },
    /// An input file is malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The GGUF writer refused the data.
    #[error("{path}: {message}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The writer's complaint.
        message: String,
    },
}

impl GgufError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn unsupported(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Unsupported { path: path.to_path_buf(), message: message.into() }
    }

    pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), message: message.into() }
    }
}
