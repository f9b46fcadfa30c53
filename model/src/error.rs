//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or building the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: serde_json::Error,
    },
    /// `config.json` holds a value this crate cannot use.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `model_type` names an architecture this crate does not implement.
    #[error("{path}: unsupported model_type `{found}`; supported model types: {supported}")]
    UnsupportedModelType {
        /// The config file.
        path: PathBuf,
        /// The `model_type` found.
        found: String,
        /// The supported ones, comma separated.
        supported: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from {path}")]
    MissingTensor {
        /// The Hugging Face key.
        name: String,
        /// The file (or index) it was looked up in.
        path: PathBuf,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("tensor `{name}` in {path} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The Hugging Face key.
        name: String,
        /// The file that holds it.
        path: PathBuf,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// Quantized tensors that do not fit together, or a quantization that cannot apply.
    #[error("{path}: {source}")]
    Quant {
        /// The checkpoint file or directory.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        source: lora_quant::QuantError,
    },
    /// A tensor is stored in a dtype this loader does not read.
    #[error("tensor `{name}` in {path} is stored as {found}; expected F32, F16 or BF16")]
    UnsupportedDType {
        /// The Hugging Face key.
        name: String,
        /// The file that holds it.
        path: PathBuf,
        /// The dtype in the file.
        found: String,
    },
    /// The directory holds only PyTorch pickle weights.
    #[error(
        "{dir} holds only PyTorch pickle weights ({files}); pickle files can run arbitrary code \
         when loaded, so they are refused. Convert the checkpoint to safetensors first, e.g. \
         with transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out)`"
    )]
    PickleOnly {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The `.bin` files found.
        files: String,
    },
    /// The directory holds no weights at all.
    #[error("{dir} holds no model weights: expected model.safetensors or model.safetensors.index.json")]
    NoWeights {
        /// The checkpoint directory.
        dir: PathBuf,
    },
}
