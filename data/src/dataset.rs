//! JSONL datasets in the three formats of mlx-lm (`mlx_lm/tuner/datasets.py`), tokenized
//! the way mlx-lm tokenizes them:
//!
//! - `{"text": ...}`: the text with the tokenizer's BOS, and an EOS appended when the
//!   tokenizer did not end it with one.
//! - `{"prompt": ..., "completion": ...}`: a user turn and an assistant turn through the chat
//!   template (with the row's `tools`, if any, as mlx-lm); without a template, `prompt`
//!   (with BOS) then `completion` then EOS.
//! - `{"messages": [...], "tools": [...]}`: the conversation through the chat template.
//!
//! The format is read from the keys of each row (`prompt` and `completion` first, then
//! `messages`, then `text`, as mlx-lm's `create_dataset`), and every row of a file must have
//! the same one. With `mask_prompt` only the completion, or every assistant message of a chat
//! (mlx-lm trains on the last one only), is trained on.
//!
//! ```
//! use std::io::Write as _;
//! use std::path::Path;
//! use lora_data::{ReadOptions, Tokenizer, load_jsonl};
//!
//! let tok = Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2"))?;
//! let mut file = tempfile::NamedTempFile::new().unwrap();
//! writeln!(file, r#"{{"prompt": "Hi", "completion": "Hello!"}}"#).unwrap();
//! let data = load_jsonl(file.path(), &tok, &ReadOptions { mask_prompt: true, ..Default::default() })?;
//! let ex = &data.examples[0];
//! assert!(tok.decode(&ex.tokens[ex.offset()..], false)?.starts_with("Hello!"));
//! # Ok::<(), lora_data::DataError>(())
//! ```

use std::ops::Range;
use std::path::Path;

use serde_json::{Map, Value as Json};

use crate::error::DataError;
use crate::tokenizer::Tokenizer;

/// The keys a row's fields are read from (mlx-lm's `text_feature`, `prompt_feature`,
/// `completion_feature` and `chat_feature`; `tools` is fixed there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeys {
    /// Plain text rows. Default `"text"`.
    pub text: String,
    /// The prompt of a prompt/completion row. Default `"prompt"`.
    pub prompt: String,
    /// The completion of a prompt/completion row. Default `"completion"`.
    pub completion: String,
    /// The message list of a chat row. Default `"messages"`.
    pub messages: String,
    /// The optional tool list handed to the chat template. Default `"tools"`.
    pub tools: String,
}

/// How [`load_jsonl`] and [`load_dir`] read rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// The keys the rows' fields are read from.
    pub keys: DataKeys,
    /// Train on completions only: prompt tokens get no loss (not allowed for text rows).
    /// Default false.
    pub mask_prompt: bool,
    /// Count bad rows in [`Loaded::skipped`] and leave them out, instead of failing on the
    /// first. Default false.
    pub skip_bad_rows: bool,
    /// The longest row accepted, in bytes ([`DEFAULT_MAX_ROW_BYTES`] by default): tokenizing
    /// takes about 200 bytes of memory per byte of text, so one runaway row could take all of
    /// it. A longer row is a bad row, named by its line.
    pub max_row_bytes: usize,
    /// Read preference rows (TRL's `{"prompt", "chosen", "rejected"}`, as strings or as
    /// message lists, or `{"chosen", "rejected"}` conversations sharing their first messages)
    /// into pairs of examples, chosen then rejected ([`Example`] pairs: see [`load_jsonl`]),
    /// and nothing else. Default false, where such rows are refused.
    pub preference: bool,
}

/// The default [`ReadOptions::max_row_bytes`]: 4 MiB, about a million tokens of text.
pub const DEFAULT_MAX_ROW_BYTES: usize = 4 << 20;

impl Default for ReadOptions {
    fn default() -> Self {
        Self { keys: DataKeys::default(), mask_prompt: false, skip_bad_rows: false, max_row_bytes: DEFAULT_MAX_ROW_BYTES, preference: false }
    }
}

impl Default for DataKeys {
    fn default() -> Self {
        Self {
            text: "text".to_string(),
            prompt: "prompt".to_string(),
            completion: "completion".to_string(),
            messages: "messages".to_string(),
            tools: "tools".to_string(),
        }
    }
}

/// One tokenized row.
///
/// The model reads `tokens[..n - 1]` and predicts `tokens[1..]`. Target token `j`
/// (`1 <= j < n`) is trained on iff it lies in one of `targets`: `[0, n)` without a mask,
/// `[offset, n)` for a masked prompt (mlx-lm's `steps >= offset && steps < length` mask,
/// `offset` the index of the first completion token), and one range per assistant turn for a
/// masked chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, special tokens included.
    pub tokens: Vec<u32>,
    /// The token ranges trained on, in order and disjoint.
    pub targets: Vec<Range<usize>>,
    /// Where each row packed into this sequence begins ([`crate::pack`]); empty for a single row.
    pub starts: Vec<usize>,
}

impl Example {
    /// Every token a target (an unmasked row).
    pub fn new(tokens: Vec<u32>) -> Self {
        let n = tokens.len();
        Self { tokens, targets: std::iter::once(0..n).collect(), starts: Vec::new() }
    }

    /// The tokens from `offset` on are the targets (a masked prompt).
    pub fn from_offset(tokens: Vec<u32>, offset: usize) -> Self {
        let n = tokens.len();
        Self { tokens, targets: std::iter::once(offset.min(n)..n).collect(), starts: Vec::new() }
    }

    /// The index of the first target token (the row's length when there is none).
    pub fn offset(&self) -> usize {
        self.targets.first().map_or(self.tokens.len(), |r| r.start)
    }

    /// Target tokens once the row is cut to its first `len` tokens (the first token is never a
    /// target: nothing predicts it).
    pub fn targets_within(&self, len: usize) -> usize {
        let len = len.min(self.tokens.len());
        self.targets.iter().map(|r| r.end.min(len).saturating_sub(r.start.max(1))).sum()
    }
}

/// The examples of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Bad rows left out because `skip_bad_rows` was set.
    pub skipped: usize,
}

/// The splits of a dataset directory; `None` where the file is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// `train.jsonl`.
    pub train: Option<Loaded>,
    /// `valid.jsonl`.
    pub valid: Option<Loaded>,
    /// `test.jsonl`.
    pub test: Option<Loaded>,
}

/// Reads `train.jsonl`, `valid.jsonl` and `test.jsonl` from `dir`, each that exists, with
/// [`load_jsonl`]. A missing directory, or one holding none of the three, is an error.
pub fn load_dir(dir: &Path, tokenizer: &Tokenizer, options: &ReadOptions) -> Result<Splits, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Io { path: dir.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "dataset directory not found") });
    }
    let load = |name: &str| {
        let path = dir.join(format!("{name}.jsonl"));
        if path.is_file() {
            load_jsonl(&path, tokenizer, options).map(Some)
        } else if path.exists() {
            // A device (/dev/zero would be read without end), a FIFO or a directory.
            Err(DataError::Invalid { path, message: "is not a regular file".to_string() })
        } else {
            Ok(None)
        }
    };
    let splits = Splits { train: load("train")?, valid: load("valid")?, test: load("test")? };
    if splits.train.is_none() && splits.valid.is_none() && splits.test.is_none() {
        return Err(DataError::Invalid { path: dir.to_path_buf(), message: "holds none of train.jsonl, valid.jsonl, test.jsonl".to_string() });
    }
    Ok(splits)
}

/// Reads and tokenizes a JSONL file, one example per non-blank line; with
/// [`ReadOptions::preference`] two, the chosen completion's then the rejected one's, each
/// trained on its completion only, tokenized as TRL's DPO tokenizes them.
///
/// A bad row (invalid JSON, a missing key, a field of the wrong type, an empty completion,
/// a conversation the template refuses) fails with its file and line, or with
/// [`ReadOptions::skip_bad_rows`] is counted in [`Loaded::skipped`] and left out. Rows whose
/// format differs from the first row's, `mask_prompt` on text rows, and chat rows for a
/// tokenizer without a chat template always fail. A file without examples is an error.
pub fn load_jsonl(path: &Path, tokenizer: &Tokenizer, options: &ReadOptions) -> Result<Loaded, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let mut reader = RowReader {
        tokenizer,
        keys: &options.keys,
        mask_prompt: options.mask_prompt,
        max_row_bytes: options.max_row_bytes,
        preference: options.preference,
        format: None,
    };
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let raw = if line == 1 { raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw) } else { raw };
        match reader.row(raw, line) {
            Ok(row) => examples.extend(row),
            Err(RowError::Bad(_)) if options.skip_bad_rows => skipped += 1,
            Err(RowError::Bad(message) | RowError::Fatal(message)) => {
                return Err(DataError::Row { path: path.to_path_buf(), line, message });
            }
        }
    }
    if examples.is_empty() {
        return Err(DataError::EmptyDataset { path: path.to_path_buf(), skipped });
    }
    Ok(Loaded { examples, skipped })
}

/// What went wrong with a row: `Bad` rows may be skipped, `Fatal` ones concern the whole file.
enum RowError {
    Bad(String),
    Fatal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Completions,
    Chat,
    Preference,
}

impl Format {
    /// The keys that identify the format, quoted, for messages.
    fn describe(self, keys: &DataKeys) -> String {
        match self {
            Format::Text => format!("{:?}", keys.text),
            Format::Completions => format!("{:?}/{:?}", keys.prompt, keys.completion),
            Format::Chat => format!("{:?}", keys.messages),
            Format::Preference => "\"chosen\"/\"rejected\"".to_string(),
        }
    }
}

/// A row's fields, of the right types.
enum Row<'a> {
    Text(&'a str),
    Completion {
        prompt: &'a str,
        completion: &'a str,
        tools: Option<&'a Json>,
    },
    Chat {
        messages: &'a Json,
        tools: Option<&'a Json>,
    },
    /// Strings, or message lists; `prompt` absent where the two conversations begin alike.
    Preference {
        prompt: Option<&'a Json>,
        chosen: &'a Json,
        rejected: &'a Json,
        tools: Option<&'a Json>,
    },
}

struct RowReader<'a> {
    tokenizer: &'a Tokenizer,
    keys: &'a DataKeys,
    mask_prompt: bool,
    max_row_bytes: usize,
    preference: bool,
    /// The file's format and the line it was taken from.
    format: Option<(Format, usize)>,
}

impl RowReader<'_> {
    /// The examples of one line: none for a blank line, two for a preference row.
    fn row(&mut self, raw: &[u8], line: usize) -> Result<Vec<Example>, RowError> {
        if raw.len() > self.max_row_bytes {
            return Err(RowError::Bad(format!(
                "the row is {} bytes, more than the {} accepted; split it, or raise --max-seq-length if such long sequences are meant",
                raw.len(),
                self.max_row_bytes
            )));
        }
        let text = std::str::from_utf8(raw).map_err(|_| RowError::Bad("not valid UTF-8".to_string()))?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let value: Json = serde_json::from_str(text).map_err(|e| RowError::Bad(json_problem(&e)))?;
        let Json::Object(object) = &value else {
            return Err(RowError::Bad("not a JSON object".to_string()));
        };
        let format = self.detect(object).ok_or_else(|| {
            let k = self.keys;
            if self.preference {
                RowError::Bad("missing key: expected \"chosen\" and \"rejected\"".to_string())
            } else {
                RowError::Bad(format!("missing key: expected one of {:?}, {:?}/{:?}, {:?}", k.text, k.prompt, k.completion, k.messages))
            }
        })?;
        self.check_format(format, line)?;
        match self.fields(object, format).map_err(RowError::Bad)? {
            Row::Preference { prompt, chosen, rejected, tools } => {
                let (chosen, rejected) = preference_pair(self.tokenizer, prompt, chosen, rejected, tools)?;
                Ok(vec![chosen, rejected])
            }
            row => self.tokenize(row).map(|e| vec![e]),
        }
    }

    /// mlx-lm's order: prompt and completion, then messages, then text.
    fn detect(&self, object: &Map<String, Json>) -> Option<Format> {
        let k = self.keys;
        let pair = object.contains_key("chosen") && object.contains_key("rejected");
        if self.preference {
            pair.then_some(Format::Preference)
        } else if object.contains_key(&k.prompt) && object.contains_key(&k.completion) {
            Some(Format::Completions)
        } else if object.contains_key(&k.messages) {
            Some(Format::Chat)
        } else if object.contains_key(&k.text) {
            Some(Format::Text)
        } else {
            // Refused by `check_format`, with the flag that reads it.
            pair.then_some(Format::Preference)
        }
    }

    /// The first row fixes the file's format; it must suit `mask_prompt` and the tokenizer.
    fn check_format(&mut self, format: Format, line: usize) -> Result<(), RowError> {
        if let Some((first, first_line)) = self.format {
            if first != format {
                return Err(RowError::Fatal(format!(
                    "row has {} but line {first_line} has {}; all rows of a file must have the same format",
                    format.describe(self.keys),
                    first.describe(self.keys)
                )));
            }
            return Ok(());
        }
        if format == Format::Preference && !self.preference {
            return Err(RowError::Fatal("a preference row (\"chosen\"/\"rejected\"): train on preferences with --objective dpo or orpo".to_string()));
        }
        if format == Format::Text && self.mask_prompt {
            return Err(RowError::Fatal(format!(
                "mask_prompt needs {} or {} rows, and this file has {} rows",
                Format::Completions.describe(self.keys),
                Format::Chat.describe(self.keys),
                format.describe(self.keys)
            )));
        }
        if format == Format::Chat && self.tokenizer.chat_template().is_none() {
            return Err(RowError::Fatal(format!("{} rows need a chat template and {} has none", format.describe(self.keys), self.tokenizer.dir().display())));
        }
        self.format = Some((format, line));
        Ok(())
    }

    /// Checks the types of the format's fields.
    fn fields<'v>(&self, object: &'v Map<String, Json>, format: Format) -> Result<Row<'v>, String> {
        let k = self.keys;
        let tools = match object.get(&k.tools) {
            None | Some(Json::Null) => None,
            Some(tools @ Json::Array(_)) => Some(tools),
            Some(_) => return Err(format!("{:?} is not an array", k.tools)),
        };
        match format {
            Format::Text => Ok(Row::Text(non_empty_string(object, &k.text)?)),
            Format::Completions => {
                let prompt = object[&k.prompt].as_str().ok_or_else(|| format!("{:?} is not a string", k.prompt))?;
                let completion = non_empty_string(object, &k.completion)?;
                Ok(Row::Completion { prompt, completion, tools })
            }
            Format::Preference => {
                let (chosen, rejected) = (&object["chosen"], &object["rejected"]);
                let prompt = object.get(&k.prompt);
                let conversation = match (prompt, chosen, rejected) {
                    (Some(Json::String(_)) | None, Json::String(_), Json::String(_)) => false,
                    (Some(Json::Array(_)) | None, Json::Array(_), Json::Array(_)) => true,
                    _ => return Err(format!("{:?}, \"chosen\" and \"rejected\" must be all strings or all message lists", k.prompt)),
                };
                if !conversation && prompt.is_none() {
                    return Err(format!("missing key {:?}: string completions need their prompt", k.prompt));
                }
                for (key, value) in [(k.prompt.as_str(), prompt), ("chosen", Some(chosen)), ("rejected", Some(rejected))] {
                    match value {
                        Some(Json::String(text)) if key != k.prompt && text.trim().is_empty() => return Err(format!("{key:?} is empty")),
                        Some(messages @ Json::Array(_)) => check_messages(messages, key, false)?,
                        _ => {}
                    }
                }
                if conversation && self.tokenizer.chat_template().is_none() {
                    return Err(format!("message lists need a chat template and {} has none", self.tokenizer.dir().display()));
                }
                Ok(Row::Preference { prompt, chosen, rejected, tools })
            }
            Format::Chat => {
                let messages = &object[&k.messages];
                check_messages(messages, &k.messages, self.mask_prompt)?;
                Ok(Row::Chat { messages, tools })
            }
        }
    }

    fn tokenize(&self, row: Row<'_>) -> Result<Example, RowError> {
        let tok = self.tokenizer;
        let bad = |e: DataError| RowError::Bad(e.to_string());
        let eos = || tok.eos_ids().first().copied().ok_or_else(|| no_eos(tok));
        let example = match row {
            Row::Text(text) => Example::new(with_eos(tok.encode(text, true).map_err(bad)?, tok, eos()?)),
            Row::Completion { prompt, completion, tools } if tok.chat_template().is_some() => {
                let user = serde_json::json!({"role": "user", "content": prompt});
                let assistant = serde_json::json!({"role": "assistant", "content": completion});
                let tokens = tok.encode_chat(&Json::Array(vec![user.clone(), assistant]), tools, false).map_err(bad)?;
                let offset = if self.mask_prompt { tok.encode_chat(&Json::Array(vec![user]), tools, true).map_err(bad)?.len() } else { 0 };
                Example::from_offset(tokens, offset)
            }
            Row::Completion { prompt, completion, .. } => {
                let mut tokens = tok.encode(prompt, true).map_err(bad)?;
                let offset = if self.mask_prompt { tokens.len() } else { 0 };
                tokens.extend(tok.encode(completion, false).map_err(bad)?);
                tokens.push(eos()?);
                Example::from_offset(tokens, offset)
            }
            Row::Chat { messages, tools } if self.mask_prompt => self.assistant_turns(messages, tools)?,
            Row::Chat { messages, tools } => Example::new(tok.encode_chat(messages, tools, false).map_err(bad)?),
            Row::Preference { .. } => unreachable!("read by preference_pair"),
        };
        if example.targets_within(usize::MAX) == 0 {
            return Err(RowError::Bad(format!("the prompt takes all {} tokens; nothing is left to train on", example.tokens.len())));
        }
        Ok(example)
    }

    /// A chat whose every assistant turn is trained on, and nothing else: the spans
    /// [`ChatTemplate::assistant_spans`](crate::chat::ChatTemplate::assistant_spans) finds,
    /// as the tokens that overlap them. Without `{% generation %}` blocks the last message's
    /// targets are mlx-lm's, everything after the rendered chat before it with the generation
    /// prompt.
    fn assistant_turns(&self, messages: &Json, tools: Option<&Json>) -> Result<Example, RowError> {
        let tok = self.tokenizer;
        let bad = |e: DataError| RowError::Bad(e.to_string());
        let template = tok.chat_template().ok_or_else(|| RowError::Fatal(format!("{} has no chat template", tok.dir().display())))?;
        let found = template.assistant_spans(messages, tools).map_err(bad)?;
        let encoded = tok.encode_with_offsets(&found.text).map_err(bad)?;
        let mut targets: Vec<Range<usize>> = found.spans.iter().filter_map(|span| overlapping(&encoded.bytes, span)).collect();
        let tokens = encoded.ids;
        if !found.from_blocks {
            let list = messages.as_array().map(Vec::as_slice).unwrap_or_default();
            let prompt = Json::Array(list[..list.len().saturating_sub(1)].to_vec());
            let offset = tok.encode_chat(&prompt, tools, true).map_err(bad)?.len();
            targets.pop();
            if targets.last().is_some_and(|r| r.end > offset) {
                return Err(RowError::Bad("an earlier assistant turn ends after the last one begins in the rendered chat".into()));
            }
            targets.push(offset.min(tokens.len())..tokens.len());
        }
        Ok(Example { tokens, targets, starts: Vec::new() })
    }
}

/// The error of a tokenizer without an end-of-sequence token.
fn no_eos(tok: &Tokenizer) -> RowError {
    RowError::Fatal(format!("{} declares no end-of-sequence token", tok.dir().display()))
}

/// `ids` ending in an end-of-sequence token: `eos` appended unless one is there.
fn with_eos(mut ids: Vec<u32>, tok: &Tokenizer, eos: u32) -> Vec<u32> {
    if ids.last().is_none_or(|t| !tok.eos_ids().contains(t) && *t != eos) {
        ids.push(eos);
    }
    ids
}

/// A preference row's two examples, chosen then rejected, each the prompt followed by its
/// completion and trained on the completion only, as TRL's DPO tokenizes them:
///
/// - strings: the prompt and `prompt + completion` are tokenized with the tokenizer's special
///   tokens (its BOS), and the EOS id is appended to the completion (unless it ends in one);
/// - message lists: the prompt rendered through the chat template with the generation prompt,
///   and the prompt followed by the completion's messages rendered without it; where there is
///   no prompt the messages the two conversations begin with are the prompt.
///
/// The prompt's tokens are those of the tokenized prompt that both sequences begin with: where
/// the tokenizer merges the prompt's last characters into the completion's first token, that
/// token counts as the completion's.
fn preference_pair(tok: &Tokenizer, prompt: Option<&Json>, chosen: &Json, rejected: &Json, tools: Option<&Json>) -> Result<(Example, Example), RowError> {
    let bad = |e: DataError| RowError::Bad(e.to_string());
    let (prompt_ids, chosen_ids, rejected_ids) = match (prompt, chosen, rejected) {
        (Some(Json::String(p)), Json::String(c), Json::String(r)) => {
            let eos = tok.eos_token_id().ok_or_else(|| no_eos(tok))?;
            let side = |completion: &str| tok.encode(&format!("{p}{completion}"), true).map(|ids| with_eos(ids, tok, eos)).map_err(bad);
            (tok.encode(p, true).map_err(bad)?, side(c)?, side(r)?)
        }
        (prompt, Json::Array(c), Json::Array(r)) => {
            let (prompt, c, r) = match prompt {
                Some(Json::Array(p)) => (p.clone(), c.as_slice(), r.as_slice()),
                _ => {
                    let shared = c.iter().zip(r).take_while(|(a, b)| a == b).count();
                    if shared == 0 || shared == c.len() || shared == r.len() {
                        return Err(RowError::Bad(
                            "without a prompt, \"chosen\" and \"rejected\" must begin with the same messages and differ after them".into(),
                        ));
                    }
                    (c[..shared].to_vec(), &c[shared..], &r[shared..])
                }
            };
            let side = |completion: &[Json]| {
                let all: Vec<Json> = prompt.iter().chain(completion).cloned().collect();
                tok.encode_chat(&Json::Array(all), tools, false).map_err(bad)
            };
            (tok.encode_chat(&Json::Array(prompt.clone()), tools, true).map_err(bad)?, side(c)?, side(r)?)
        }
        _ => unreachable!("the types are checked by RowReader::fields"),
    };
    let shared = |ids: &[u32]| prompt_ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
    let split = shared(&chosen_ids).min(shared(&rejected_ids));
    let (chosen, rejected) = (Example::from_offset(chosen_ids, split), Example::from_offset(rejected_ids, split));
    if chosen.targets_within(usize::MAX) == 0 || rejected.targets_within(usize::MAX) == 0 {
        return Err(RowError::Bad("a completion has no tokens of its own after the prompt".into()));
    }
    Ok((chosen, rejected))
}

/// The tokens (by their byte ranges `offsets`) that overlap `span`, as one range; `None` when
/// none does.
fn overlapping(offsets: &[(usize, usize)], span: &Range<usize>) -> Option<Range<usize>> {
    let first = offsets.iter().position(|&(start, end)| end > span.start && start < span.end)?;
    let count = offsets[first..].iter().take_while(|&&(start, _)| start < span.end).count();
    Some(first..first + count)
}

/// `object[key]` as a string that is not empty or only whitespace.
fn non_empty_string<'v>(object: &'v Map<String, Json>, key: &str) -> Result<&'v str, String> {
    let s = object[key].as_str().ok_or_else(|| format!("{key:?} is not a string"))?;
    if s.trim().is_empty() {
        return Err(format!("{key:?} is empty"));
    }
    Ok(s)
}

/// A non-empty list of `{role, content}` objects with string roles. `content` is a string,
/// or absent or null on a message with `tool_calls`. The last message must not be empty,
/// and with `mask_prompt` it must be the assistant's.
fn check_messages(messages: &Json, key: &str, mask_prompt: bool) -> Result<(), String> {
    let list = messages.as_array().ok_or_else(|| format!("{key:?} is not an array"))?;
    let Some(last) = list.last() else {
        return Err(format!("{key:?} is empty"));
    };
    for (i, message) in list.iter().enumerate() {
        let message = message.as_object().ok_or_else(|| format!("{key:?}[{i}] is not an object"))?;
        if !message.get("role").is_some_and(Json::is_string) {
            return Err(format!("{key:?}[{i}] has no string \"role\""));
        }
        let content_ok = match message.get("content") {
            Some(Json::String(_)) => true,
            None | Some(Json::Null) => message.contains_key("tool_calls"),
            Some(_) => false,
        };
        if !content_ok {
            return Err(format!("{key:?}[{i}] has no string \"content\""));
        }
    }
    if last.get("content").and_then(Json::as_str).is_some_and(|c| c.trim().is_empty()) {
        return Err(format!("the last message of {key:?} is empty"));
    }
    let role = last["role"].as_str().unwrap_or_default();
    if mask_prompt && role != "assistant" {
        return Err(format!("the last message of {key:?} has role {role:?}; mask_prompt trains on a last \"assistant\" message"));
    }
    Ok(())
}

/// serde_json's message without its "at line 1 column N", which would read as a file line.
fn json_problem(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
    format!("invalid JSON: {message} (column {})", e.column())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    fn tokenizer(name: &str) -> Tokenizer {
        Tokenizer::from_dir(&fixture(name)).unwrap()
    }

    /// The llama fixture's tokenizer without its chat_template.jinja.
    fn tokenizer_without_template() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"] {
            std::fs::copy(fixture("llama").join(file), dir.path().join(file)).unwrap();
        }
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert!(tok.chat_template().is_none());
        (dir, tok)
    }

    /// A JSONL file named `name` in a fresh directory.
    fn jsonl(name: &str, lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        (dir, path)
    }

    fn load(path: &Path, tok: &Tokenizer, mask_prompt: bool) -> Result<Loaded, DataError> {
        load_jsonl(path, tok, &ReadOptions { mask_prompt, ..Default::default() })
    }

    fn error(path: &Path, tok: &Tokenizer, mask_prompt: bool) -> String {
        load(path, tok, mask_prompt).unwrap_err().to_string()
    }

    #[test]
    fn text_rows_get_bos_and_one_eos() {
        let tok = tokenizer("llama");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"text": "Hello world"}"#, r#"{"text": "Hi<|eot_id|>"}"#]);
        let data = load(&path, &tok, false).unwrap();
        let mut want = tok.encode("Hello world", true).unwrap();
        assert_eq!(want[0], 0, "the llama fixture adds <|bos|> = 0");
        want.push(7);
        assert_eq!(data.examples[0], Example::new(want));
        // Already ends with an EOS id: none is added.
        let want = tok.encode("Hi<|eot_id|>", true).unwrap();
        assert_eq!(*want.last().unwrap(), 7);
        assert_eq!(data.examples[1], Example::new(want));
        assert_eq!(data.skipped, 0);
    }

    fn load_pairs(path: &Path, tok: &Tokenizer) -> Result<Loaded, DataError> {
        load_jsonl(path, tok, &ReadOptions { preference: true, ..ReadOptions::default() })
    }

    /// Conversations without a prompt: their shared first messages are the prompt, rendered
    /// with the generation prompt; each completion is the rest of its conversation.
    #[test]
    fn preference_conversations_without_a_prompt_share_their_first_messages() {
        let tok = tokenizer("qwen2");
        let user = json!({"role": "user", "content": "Capital of France?"});
        let (good, bad) = (json!({"role": "assistant", "content": "Paris."}), json!({"role": "assistant", "content": "Rome."}));
        let row = json!({"chosen": [user, good], "rejected": [user, bad]}).to_string();
        let (_d, path) = jsonl("train.jsonl", &[&row]);
        let pairs = load_pairs(&path, &tok).unwrap().examples;
        let prompt = tok.encode_chat(&json!([user]), None, true).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].tokens, tok.encode_chat(&json!([user, good]), None, false).unwrap());
        assert_eq!(pairs[1].tokens, tok.encode_chat(&json!([user, bad]), None, false).unwrap());
        for e in &pairs {
            assert_eq!(e.offset(), prompt.len());
            assert_eq!(e.tokens[..e.offset()], prompt[..]);
        }
    }

    /// String rows: the prompt with the tokenizer's BOS, each completion after it ending in
    /// the tokenizer's own EOS token.
    #[test]
    fn preference_strings_end_in_the_eos_token() {
        let tok = tokenizer("llama");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"prompt": "Say hi.", "chosen": " Hello!", "rejected": " No."}"#]);
        let pairs = load_pairs(&path, &tok).unwrap().examples;
        let prompt = tok.encode("Say hi.", true).unwrap();
        let eos = tok.eos_token_id().unwrap();
        for (e, text) in pairs.iter().zip(["Say hi. Hello!", "Say hi. No."]) {
            let mut want = tok.encode(text, true).unwrap();
            want.push(eos);
            assert_eq!(e.tokens, want);
            assert_eq!(e.offset(), prompt.len());
        }
    }

    /// Bad preference rows name their problem and line; a row with "chosen" and "rejected"
    /// among SFT keys trains as SFT, and preference rows without --objective are refused.
    #[test]
    fn bad_preference_rows_are_named_and_sft_keys_win() {
        let tok = tokenizer("qwen2");
        let cases = [
            (r#"{"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#, "all strings or all message lists"),
            (r#"{"prompt": "p", "chosen": [], "rejected": []}"#, "all strings or all message lists"),
            (r#"{"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]}"#, "\"chosen\" is empty"),
            (r#"{"prompt": [{"role": "user", "content": "p"}], "chosen": [3], "rejected": [{"role": "assistant", "content": "b"}]}"#, "is not an object"),
            (r#"{"chosen": "a", "rejected": "b"}"#, "need their prompt"),
            (r#"{"prompt": "p", "chosen": " ", "rejected": "b"}"#, "\"chosen\" is empty"),
            (r#"{"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "p"}]}"#, "differ after them"),
            (r#"{"text": "just text"}"#, "expected \"chosen\" and \"rejected\""),
        ];
        for (row, want) in cases {
            let (_d, path) = jsonl("train.jsonl", &[row]);
            let e = load_pairs(&path, &tok).unwrap_err().to_string();
            assert!(e.contains("train.jsonl:1") && e.contains(want), "{row}: {e}");
        }
        let (_d, path) = jsonl("train.jsonl", &[r#"{"text": "t", "chosen": "a", "rejected": "b"}"#]);
        assert_eq!(load(&path, &tok, false).unwrap().examples.len(), 1);
        let (_d, path) = jsonl("train.jsonl", &[r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#]);
        assert!(load(&path, &tok, false).unwrap_err().to_string().contains("--objective dpo or orpo"));
    }

    #[test]
    fn completions_use_the_chat_template_and_mask_up_to_the_assistant_turn() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"prompt": "What is 2+2?", "completion": "Four."}"#]);
        let messages = json!([
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
        ]);
        let want = tok.encode_chat(&messages, None, false).unwrap();
        let prompt = tok.encode_chat(&json!([{"role": "user", "content": "What is 2+2?"}]), None, true).unwrap();

        let plain = load(&path, &tok, false).unwrap();
        assert_eq!(plain.examples[0], Example::new(want.clone()));

        let masked = load(&path, &tok, true).unwrap();
        let ex = &masked.examples[0];
        assert_eq!(ex.tokens, want);
        assert_eq!(ex.offset(), prompt.len());
        assert_eq!(ex.tokens[..ex.offset()], prompt[..], "the prompt is a prefix of the whole");
        let rest = tok.decode(&ex.tokens[ex.offset()..], false).unwrap();
        assert!(rest.starts_with("Four."), "{rest:?}");
        let head = tok.decode(&ex.tokens[..ex.offset()], false).unwrap();
        assert!(head.ends_with("<|im_start|>assistant\n"), "{head:?}");
    }

    #[test]
    fn completions_without_a_template_concatenate_prompt_completion_eos() {
        let (_t, tok) = tokenizer_without_template();
        let (_d, path) = jsonl("train.jsonl", &[r#"{"prompt": "Say hi.", "completion": " hi"}"#]);
        let prompt = tok.encode("Say hi.", true).unwrap();
        let mut want = prompt.clone();
        want.extend(tok.encode(" hi", false).unwrap());
        want.push(7);
        assert_eq!(load(&path, &tok, false).unwrap().examples[0], Example::new(want.clone()));
        let masked = &load(&path, &tok, true).unwrap().examples[0];
        assert_eq!(*masked, Example::from_offset(want, prompt.len()));
        assert_eq!(tok.decode(&masked.tokens[masked.offset()..], false).unwrap(), " hi<|eot_id|>");
    }

    /// The text of each trained span of `ex`.
    fn trained_text(tok: &Tokenizer, ex: &Example) -> Vec<String> {
        ex.targets.iter().map(|r| tok.decode(&ex.tokens[r.clone()], false).unwrap()).collect()
    }

    /// Issue 16, item 2: with the prompt masked, every assistant message of a chat is trained on
    /// (its content and the end of its turn), and nothing of the system and user turns; the last
    /// one's targets are still mlx-lm's (everything after the chat before it with the
    /// generation prompt). The spans are checked by hand for each template.
    #[test]
    fn messages_train_on_every_assistant_turn_when_masked() {
        let turns = [
            ("qwen2", vec!["Hello.<|im_end|>\n", "Paris.<|im_end|>\n"]),
            ("qwen3", vec!["Hello.<|im_end|>\n", "Paris.<|im_end|>\n"]),
            ("llama", vec!["Hello.<|eot_id|>", "Paris.<|eot_id|>"]),
            // The mistral fixture has a Llama-3 style template with the llama tokenizer.
            ("mistral", vec!["Hello.<|eot_id|>", "Paris.<|eot_id|>"]),
        ];
        for (name, want_text) in turns {
            let tok = tokenizer(name);
            let row = json!({
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                ]
            });
            let (_d, path) = jsonl("train.jsonl", &[&row.to_string()]);
            let messages = &row["messages"];
            let want = tok.encode_chat(messages, None, false).unwrap();
            let prompt = Json::Array(messages.as_array().unwrap()[..4].to_vec());
            let prompt = tok.encode_chat(&prompt, None, true).unwrap();

            assert_eq!(load(&path, &tok, false).unwrap().examples[0], Example::new(want.clone()), "{name}");
            let ex = &load(&path, &tok, true).unwrap().examples[0];
            assert_eq!(ex.tokens, want, "{name}");
            assert_eq!(ex.targets.last().unwrap(), &(prompt.len()..want.len()), "{name}");
            assert_eq!(trained_text(&tok, ex), want_text, "{name}");
        }
    }

    #[test]
    fn messages_pass_tools_to_the_template() {
        let tok = tokenizer("qwen2");
        let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]);
        let messages = json!([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]);
        let row = json!({"messages": messages, "tools": tools});
        let (_d, path) = jsonl("train.jsonl", &[&row.to_string()]);
        let ex = &load(&path, &tok, false).unwrap().examples[0];
        let with_tools = tok.encode_chat(&messages, Some(&tools), false).unwrap();
        assert_eq!(ex.tokens, with_tools);
        assert_ne!(ex.tokens, tok.encode_chat(&messages, None, false).unwrap(), "the template shows the tools");
    }

    #[test]
    fn custom_keys_are_used_for_detection_and_messages() {
        let tok = tokenizer("qwen2");
        let keys = DataKeys { prompt: "question".into(), completion: "answer".into(), ..DataKeys::default() };
        let (_d, path) = jsonl("train.jsonl", &[r#"{"question": "Q?", "answer": "A."}"#, r#"{"question": "Q?", "answer": ""}"#]);
        let err = load_jsonl(&path, &tok, &ReadOptions { keys: keys.clone(), ..Default::default() }).unwrap_err().to_string();
        assert!(err.ends_with("train.jsonl:2: \"answer\" is empty"), "{err}");
        let data = load_jsonl(&path, &tok, &ReadOptions { keys, skip_bad_rows: true, ..Default::default() }).unwrap();
        assert_eq!((data.examples.len(), data.skipped), (1, 1));
    }

    #[test]
    fn every_bad_row_error_names_file_line_and_problem() {
        let tok = tokenizer("qwen2");
        let good = r#"{"prompt": "p", "completion": "c"}"#;
        let cases: &[(&str, &str)] = &[
            (r#"{"prompt": "p", "completion": "c""#, "invalid JSON: EOF while parsing an object (column 33)"),
            ("[1, 2]", "not a JSON object"),
            (r#"{"input": "x"}"#, r#"missing key: expected one of "text", "prompt"/"completion", "messages""#),
            (r#"{"prompt": 3, "completion": "c"}"#, r#""prompt" is not a string"#),
            (r#"{"prompt": "p", "completion": null}"#, r#""completion" is not a string"#),
            (r#"{"prompt": "p", "completion": "  "}"#, r#""completion" is empty"#),
            (r#"{"prompt": "p", "completion": "c", "tools": {}}"#, r#""tools" is not an array"#),
        ];
        for (bad, problem) in cases {
            // Line 1 good, line 2 blank (skipped silently), line 3 bad.
            let (_d, path) = jsonl("train.jsonl", &[good, "", bad]);
            let err = error(&path, &tok, false);
            assert_eq!(err, format!("{}:3: {problem}", path.display()));
        }

        let chat_cases: &[(&str, &str)] = &[
            (r#"{"messages": "hi"}"#, r#""messages" is not an array"#),
            (r#"{"messages": []}"#, r#""messages" is empty"#),
            (r#"{"messages": ["hi"]}"#, r#""messages"[0] is not an object"#),
            (r#"{"messages": [{"content": "hi"}]}"#, r#""messages"[0] has no string "role""#),
            (r#"{"messages": [{"role": "user", "content": 5}]}"#, r#""messages"[0] has no string "content""#),
            (r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}"#, r#"the last message of "messages" is empty"#),
        ];
        let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
        for (bad, problem) in chat_cases {
            let (_d, path) = jsonl("valid.jsonl", &[good, bad]);
            assert_eq!(error(&path, &tok, false), format!("{}:2: {problem}", path.display()));
        }

        let (_d, path) = jsonl("train.jsonl", &[r#"{"text": ""}"#]);
        assert_eq!(error(&path, &tok, false), format!("{}:1: \"text\" is empty", path.display()));
    }

    #[test]
    fn masked_messages_must_end_with_an_assistant_message() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"messages": [{"role": "user", "content": "q"}]}"#]);
        assert_eq!(
            error(&path, &tok, true),
            format!("{}:1: the last message of \"messages\" has role \"user\"; mask_prompt trains on a last \"assistant\" message", path.display())
        );
        assert_eq!(load(&path, &tok, false).unwrap().examples.len(), 1, "unmasked, any last role trains");
    }

    #[test]
    fn template_errors_are_bad_rows() {
        // The llama template raises on a conversation without a user message.
        let tok = tokenizer("llama");
        let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
        let bad = r#"{"messages": [{"role": "assistant", "content": "a"}]}"#;
        let (_d, path) = jsonl("train.jsonl", &[good, bad, good]);
        let err = error(&path, &tok, false);
        assert!(err.starts_with(&format!("{}:2: chat template of ", path.display())) && err.contains("chat_template.jinja"), "{err}");
        assert!(err.contains("Conversations must contain a user message"), "{err}");
        let data = load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..Default::default() }).unwrap();
        assert_eq!((data.examples.len(), data.skipped), (2, 1));
    }

    #[test]
    fn skip_bad_rows_counts_and_keeps_file_order() {
        let tok = tokenizer("llama");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"text": "a"}"#, "not json", r#"{"text": 1}"#, "", r#"{"text": "b"}"#, r#"{"other": 1}"#]);
        let data = load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..Default::default() }).unwrap();
        assert_eq!(data.skipped, 3);
        let first: Vec<u32> = [tok.encode("a", true).unwrap(), vec![7]].concat();
        let second: Vec<u32> = [tok.encode("b", true).unwrap(), vec![7]].concat();
        assert_eq!(data.examples, vec![Example::new(first), Example::new(second)]);
    }

    #[test]
    fn mixed_formats_fail_even_when_skipping() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &["", r#"{"text": "a"}"#, r#"{"prompt": "p", "completion": "c"}"#]);
        let want = format!("{}:3: row has \"prompt\"/\"completion\" but line 2 has \"text\"; all rows of a file must have the same format", path.display());
        assert_eq!(error(&path, &tok, false), want);
        assert_eq!(load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..Default::default() }).unwrap_err().to_string(), want);
    }

    #[test]
    fn prompt_and_completion_win_over_messages_as_in_mlx_lm() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"prompt": "p", "completion": "c", "messages": 1, "text": 2}"#]);
        let want = tok.encode_chat(&json!([{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]), None, false).unwrap();
        assert_eq!(load(&path, &tok, false).unwrap().examples[0].tokens, want);
    }

    #[test]
    fn mask_prompt_on_text_rows_is_refused() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &[r#"{"text": "a"}"#]);
        assert_eq!(
            error(&path, &tok, true),
            format!("{}:1: mask_prompt needs \"prompt\"/\"completion\" or \"messages\" rows, and this file has \"text\" rows", path.display())
        );
    }

    #[test]
    fn chat_rows_need_a_chat_template() {
        let (tok_dir, tok) = tokenizer_without_template();
        let (_d, path) = jsonl("train.jsonl", &[r#"{"messages": [{"role": "user", "content": "q"}]}"#]);
        assert_eq!(
            error(&path, &tok, false),
            format!("{}:1: \"messages\" rows need a chat template and {} has none", path.display(), tok_dir.path().display())
        );
    }

    #[test]
    fn files_without_examples_are_errors() {
        let tok = tokenizer("qwen2");
        let (_d, path) = jsonl("train.jsonl", &["", "  "]);
        assert_eq!(error(&path, &tok, false), format!("{}: no examples", path.display()));
        let (_d, path) = jsonl("train.jsonl", &["{", "[]"]);
        let err = load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..Default::default() }).unwrap_err().to_string();
        assert_eq!(err, format!("{}: no examples (2 bad rows skipped)", path.display()));
        let missing = path.with_file_name("absent.jsonl");
        assert!(error(&missing, &tok, false).starts_with(&format!("cannot read {}", missing.display())));
    }

    #[test]
    fn crlf_bom_and_invalid_utf8_lines() {
        let tok = tokenizer("llama");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        std::fs::write(&path, b"\xef\xbb\xbf{\"text\": \"a\"}\r\n\xff\xfe\r\n").unwrap();
        assert_eq!(error(&path, &tok, false), format!("{}:2: not valid UTF-8", path.display()));
        let data = load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..Default::default() }).unwrap();
        assert_eq!((data.examples.len(), data.skipped), (1, 1));
        assert_eq!(data.examples[0].tokens, [tok.encode("a", true).unwrap(), vec![7]].concat());
    }

    #[test]
    fn load_dir_reads_the_splits_that_exist() {
        let tok = tokenizer("llama");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.jsonl"), "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").unwrap();
        std::fs::write(dir.path().join("valid.jsonl"), "{\"text\": \"c\"}\n").unwrap();
        let splits = load_dir(dir.path(), &tok, &ReadOptions::default()).unwrap();
        assert_eq!(splits.train.unwrap().examples.len(), 2);
        assert_eq!(splits.valid.unwrap().examples.len(), 1);
        assert!(splits.test.is_none());

        let empty = tempfile::tempdir().unwrap();
        let err = load_dir(empty.path(), &tok, &ReadOptions::default()).unwrap_err().to_string();
        assert_eq!(err, format!("{}: holds none of train.jsonl, valid.jsonl, test.jsonl", empty.path().display()));
        let missing = dir.path().join("nope");
        let err = load_dir(&missing, &tok, &ReadOptions::default()).unwrap_err().to_string();
        assert_eq!(err, format!("cannot read {}: dataset directory not found", missing.display()));
    }

    /// Issue 14, defect 4: a row longer than the limit is a bad row named by its line (or
    /// skipped with skip_bad_rows) before it is parsed or tokenized.
    #[test]
    fn a_huge_row_is_refused_by_its_line_before_tokenizing() {
        let tok = tokenizer("llama");
        let huge = format!("{{\"text\": \"{}\"}}", "a ".repeat(3 << 20));
        let (_dir, path) = jsonl("huge", &["{\"text\": \"fine\"}", &huge, "{\"text\": \"also fine\"}"]);
        let options = ReadOptions { max_row_bytes: 1 << 20, ..Default::default() };
        let started = std::time::Instant::now();
        let err = load_jsonl(&path, &tok, &options).unwrap_err().to_string();
        assert!(err.contains(":2: the row is") && err.contains("1048576"), "{err}");
        assert_eq!(load_jsonl(&path, &tok, &ReadOptions { skip_bad_rows: true, ..options }).unwrap().skipped, 1);
        assert!(started.elapsed().as_secs() < 10, "not tokenized");
    }

    /// Issue 14, defect 11: a split that exists but is no regular file (a device, a FIFO, a
    /// directory) is named as such, never read (/dev/zero has no end) nor called missing.
    #[cfg(unix)]
    #[test]
    fn a_split_that_is_not_a_regular_file_is_named_as_such() {
        let tok = tokenizer("llama");
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("train.jsonl")).unwrap();
        std::fs::create_dir(dir.path().join("valid.jsonl")).unwrap();
        let err = load_dir(dir.path(), &tok, &ReadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("train.jsonl") && err.contains("not a regular file"), "{err}");
    }
}
