//! The Llama-family transformer (Llama 1–3.2, Mistral, Qwen2/2.5, Qwen3), loaded from
//! Hugging Face safetensors checkpoints, with a cache-free forward pass for training and a
//! KV-cached one for generation.
//!
//! ```no_run
//! use burn::tensor::{DType, Device};
//! use lora_model::{Checkpoint, CausalLm, ModelConfig};
//!
//! let dir = std::path::Path::new("tests/fixtures/llama");
//! let config = ModelConfig::from_dir(dir)?;
//! let ckpt = Checkpoint::open(dir)?;
//! let model = CausalLm::load(&config, &ckpt, &Device::flex(), DType::F32, |_| {})?;
//! # Ok::<(), lora_model::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub use lora_kernels::device;
pub mod error;
pub mod generate;
pub mod geometry;
pub mod llama;
pub mod lora;
pub mod rope;
pub mod sampling;
pub mod weight;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, HfConfig, MlxQuantization, ModelConfig, RopeScaling};
pub use error::ModelError;
pub use generate::{Decoding, GenerationStats, generate};
pub use geometry::Geometry;
pub use llama::{AttentionPath, BlockInputs, CausalLm, KvCache, Linear, PROJECTIONS};
pub use lora::LoraAdapter;
pub use sampling::{Sampler, SamplingConfig};
pub use weight::{LoadEvent, LoadOptions, QuantizeAtLoad, Weight};
