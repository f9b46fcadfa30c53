//! What the two tokenizer readers ([`crate::vocab`] for tokenizer.json, `spm` for a
//! SentencePiece model) share: GGUF's token types, which added tokens read as control tokens,
//! and reading an optional JSON file of the model directory.

use std::path::Path;

use serde_json::Value as Json;

use crate::GgufError;

/// GGUF token types (llama.cpp's `llama_token_type`, sentencepiece's piece types).
pub(crate) mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The JSON of `path`, `None` when there is no such file.
pub(crate) fn read_json(path: &Path) -> Result<Option<Json>, GgufError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| GgufError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| GgufError::invalid(path, e.to_string()))
}

/// Whether an added token that is not marked special still reads as a control token.
pub(crate) fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}
