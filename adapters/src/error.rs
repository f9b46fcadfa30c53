//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, reading or writing adapters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// A setting is out of range.
    #[error("{key}: {message}")]
    Config {
        /// The setting's name.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// `keys` names a projection the model does not have.
    #[error("keys: no projection of the model is called {key:?} (the model has {available})")]
    UnknownKey {
        /// The key given.
        key: String,
        /// The projection names there are.
        available: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not what it should be.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An adapter tensor does not fit the base model.
    #[error("{path}: tensor {name} has shape {found:?}, the base model needs {expected:?}")]
    ShapeMismatch {
        /// The adapter file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The shape the base model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// An adapter tensor names a projection the base model does not have.
    #[error("{path}: tensor {name} adapts {module}, which the base model does not have")]
    UnknownModule {
        /// The adapter file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// The module path it adapts.
        module: String,
    },
}

impl AdapterError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), message: message.into() }
    }
}
