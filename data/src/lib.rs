//! Text to tokens: Hugging Face tokenizers, chat templates and end-of-sequence ids.
//!
//! ```no_run
//! let tok = lora_data::Tokenizer::from_dir(std::path::Path::new("tests/fixtures/llama"))?;
//! let ids = tok.encode("Hello", true)?;
//! let text = tok.decode(&ids, true)?;
//! # Ok::<(), lora_data::DataError>(())
//! ```
#![warn(missing_docs)]

pub mod chat;
pub mod error;
pub mod tokenizer;

pub use chat::ChatTemplate;
pub use error::DataError;
pub use tokenizer::{StreamDecoder, Tokenizer};
