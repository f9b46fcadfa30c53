//! A Hugging Face tokenizer directory: `tokenizer.json`, `tokenizer_config.json`, the chat
//! template, and the end-of-sequence ids of `config.json` and `generation_config.json`.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::error::DataError;

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    /// The model's embedding rows, when known: every id encoded must be below it.
    rows: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("dir", &self.dir).field("bos_token", &self.bos_token).field("eos_ids", &self.eos_ids).finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads the tokenizer files of a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Io { path, source: std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found") });
        }
        let inner = parse_tokenizer(&path)?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");

        // chat_template.jinja (transformers v5) or the older field of tokenizer_config.json,
        // which may also be a list of named templates.
        let jinja = dir.join("chat_template.jinja");
        let template_file = if jinja.is_file() { jinja.clone() } else { dir.join("tokenizer_config.json") };
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| DataError::Io { path: jinja.clone(), source })?)
        } else {
            match config.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let chat_template =
            source.map(|s| ChatTemplate::new(&s, &template_file, bos_token.as_deref().unwrap_or(""), eos_token.as_deref().unwrap_or(""))).transpose()?;

        let mut eos_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(cfg) = read_json_opt(&dir.join(file))? {
                push_ids(cfg.get("eos_token_id"), &mut eos_ids);
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Ok(Self { inner, dir: dir.to_path_buf(), bos_token, eos_token, eos_ids, chat_template, rows: None })
    }

    /// Binds the tokenizer to a model of `rows` embedding rows (`config.json`'s `vocab_size`):
    /// from then on, encoding text that yields an id at or above it is an error naming the
    /// token, instead of an index past the embedding inside the model. Refuses a tokenizer whose
    /// end-of-sequence token, which training appends, is such an id.
    pub fn for_model(mut self, rows: usize) -> Result<Self, DataError> {
        if let Some(&eos) = self.eos_ids.first()
            && eos as usize >= rows
        {
            return Err(self.beyond(eos, rows));
        }
        self.rows = Some(rows);
        Ok(self)
    }

    /// The error for an id at or above the model's `rows`.
    fn beyond(&self, id: u32, rows: usize) -> DataError {
        let token = self.inner.id_to_token(id).unwrap_or_default();
        DataError::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            message: format!(
                "token `{token}` has id {id}, but the model has {rows} embedding rows (config.json vocab_size): the tokenizer has tokens the checkpoint lacks"
            ),
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (its BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, DataError> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Offsets, DataError> {
        let enc = self.encoding(text, false)?;
        Ok(Offsets { ids: enc.get_ids().to_vec(), bytes: enc.get_offsets().to_vec() })
    }

    fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding, DataError> {
        let enc =
            self.inner.encode(text, add_special_tokens).map_err(|e| DataError::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() })?;
        if let Some(rows) = self.rows
            && let Some(&id) = enc.get_ids().iter().find(|&&id| id as usize >= rows)
        {
            return Err(self.beyond(id, rows));
        }
        Ok(enc)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, DataError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| DataError::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() })
    }

    /// The directory the tokenizer was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// End-of-sequence ids: `generation_config.json`, `config.json` and the tokenizer's `eos_token`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS token string, if the tokenizer declares one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string, if the tokenizer declares one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The id of the tokenizer's own `eos_token` (the end of an assistant turn for chat
    /// models, which TRL appends to completions), else the first of [`Self::eos_ids`].
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.inner.token_to_id(t)).or_else(|| self.eos_ids.first().copied())
    }

    /// The chat template, if the tokenizer has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` through the chat template (as `apply_chat_template(tokenize=False)`).
    pub fn apply_chat_template(&self, messages: &Json, tools: Option<&Json>, add_generation_prompt: bool) -> Result<String, DataError> {
        let template = self.chat_template.as_ref().ok_or_else(|| DataError::NoChatTemplate { dir: self.dir.clone() })?;
        template.render(messages, tools, add_generation_prompt)
    }

    /// Ids of a rendered chat: the template already holds the special tokens, so none are added.
    pub fn encode_chat(&self, messages: &Json, tools: Option<&Json>, add_generation_prompt: bool) -> Result<Vec<u32>, DataError> {
        let text = self.apply_chat_template(messages, tools, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// Token ids with the byte range of the text each came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offsets {
    /// The token ids.
    pub ids: Vec<u32>,
    /// Per token, its `(start, end)` bytes in the text.
    pub bytes: Vec<(usize, usize)>,
}

/// Turns a stream of token ids into text as it is produced, holding back an incomplete
/// UTF-8 sequence until the tokens that complete it arrive. `T` is a reference to the
/// tokenizer: `&Tokenizer`, or an `Arc<Tokenizer>` for a decoder that outlives a borrow.
#[derive(Debug)]
pub struct StreamDecoder<T: Deref<Target = Tokenizer>> {
    tokenizer: T,
    ids: Vec<u32>,
    emitted: String,
}

impl<T: Deref<Target = Tokenizer>> StreamDecoder<T> {
    /// A decoder over `tokenizer`, skipping special tokens.
    pub fn new(tokenizer: T) -> Self {
        Self { tokenizer, ids: Vec::new(), emitted: String::new() }
    }

    /// Adds a token; returns the text that became final, possibly empty.
    pub fn push(&mut self, id: u32) -> Result<String, DataError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return Ok(String::new());
        }
        let new = text[self.emitted.len()..].to_string();
        self.emitted = text;
        Ok(new)
    }

    /// The rest of the text once no more tokens will come.
    pub fn finish(&mut self) -> Result<String, DataError> {
        let text = self.tokenizer.decode(&self.ids, true)?;
        let new = text.strip_prefix(self.emitted.as_str()).unwrap_or(&text).to_string();
        self.emitted = text;
        Ok(new)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

/// Reads `tokenizer.json`. The file is checked to be JSON first, and the tokenizers crate's
/// parse runs under `catch_unwind`: some of its deserializers `expect` on malformed parts
/// (found by data/tests/fuzz.rs: a truncated decoder section panicked), which must be an error
/// naming the file, not a crash.
fn parse_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, DataError> {
    let bad = |message: String| DataError::Tokenizer { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(parsed) => parsed.map_err(|e| bad(e.to_string())),
        Err(panic) => {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(bad(format!("malformed tokenizer: {}", what.unwrap_or_else(|| "the tokenizers crate could not read it".into()))))
        }
    }
}

/// `bos_token` / `eos_token` are a string or an added-token object `{"content": ...}`.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// An id or a list of ids.
fn push_ids(value: Option<&Json>, out: &mut Vec<u32>) {
    let mut push = |v: &Json| {
        if let Some(id) = v.as_u64().and_then(|i| u32::try_from(i).ok())
            && !out.contains(&id)
        {
            out.push(id);
        }
    };
    match value {
        Some(Json::Array(list)) => list.iter().for_each(&mut push),
        Some(v) => push(v),
        None => {}
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Json>, DataError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map(Some).map_err(|source| DataError::Json { path: path.to_path_buf(), source })
}
