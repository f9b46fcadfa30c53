//! GGUF files for llama.cpp.
//!
//! * [`ModelExport`]: a fused float model as one f16 GGUF, with its tokenizer and chat
//!   template (`lora fuse --export-gguf`).
//! * [`export_adapter`]: a LoRA adapter for llama.cpp's `--lora` (`lora convert-adapter
//!   --to gguf`).
//!
//! Both write what llama.cpp's own converters (`convert_hf_to_gguf.py`,
//! `convert_lora_to_gguf.py`) write for the same inputs; the tests compare with their output.
#![warn(missing_docs)]

pub mod adapter;
pub mod error;
pub mod file;
pub mod model;
pub mod names;
mod spm;
mod tokens;
pub mod vocab;

pub use adapter::export_adapter;
pub use error::GgufError;
pub use model::ModelExport;
