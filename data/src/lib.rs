//! Text to tokens: Hugging Face tokenizers, chat templates and end-of-sequence ids; JSONL
//! datasets tokenized as mlx-lm tokenizes them, and length-bucketed batches.
//!
//! ```no_run
//! let tok = lora_data::Tokenizer::from_dir(std::path::Path::new("tests/fixtures/llama"))?;
//! let ids = tok.encode("Hello", true)?;
//! let text = tok.decode(&ids, true)?;
//! # Ok::<(), lora_data::DataError>(())
//! ```
#![warn(missing_docs)]

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod pack;
pub mod tokenizer;

pub use batch::{Batch, Batcher, collate, count_too_long, count_without_targets, padding_fraction, pair_lengths, pair_rows};
pub use chat::{AssistantSpans, ChatTemplate};
pub use dataset::{DEFAULT_MAX_ROW_BYTES, DataKeys, Example, Loaded, ReadOptions, Splits, load_dir, load_jsonl};
pub use error::DataError;
pub use pack::pack;
pub use tokenizer::{Offsets, StreamDecoder, Tokenizer};
