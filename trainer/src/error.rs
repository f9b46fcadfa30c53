//! The error type of this crate.

use std::path::PathBuf;

/// What can stop a run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The data cannot be batched (too few examples for the batch size, ...).
    #[error(transparent)]
    Data(#[from] lora_data::DataError),
    /// Saving or loading adapters failed.
    #[error(transparent)]
    Adapter(#[from] lora_adapters::AdapterError),
    /// The loss is NaN or infinite.
    #[error("the training loss is {loss} at iteration {iteration}")]
    NonFinite {
        /// The iteration (1-based).
        iteration: usize,
        /// The loss.
        loss: f64,
    },
    /// f16 training overflowed: the loss is not finite, or the gradients overflow at every
    /// loss scale.
    #[error(
        "the training loss or its gradients overflow f16 at iteration {iteration} (loss {loss}): f16 holds magnitudes up to 65504; train with --dtype f32 (or bf16 where the device has it)"
    )]
    Overflow {
        /// The iteration (1-based).
        iteration: usize,
        /// The loss.
        loss: f64,
    },
    /// The resume state could not be serialized.
    #[error("saving the resume state: {0}")]
    State(String),
    /// A file or directory of the run could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A resume file is unreadable or does not fit the run.
    #[error("{path}: {message}")]
    Resume {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}
