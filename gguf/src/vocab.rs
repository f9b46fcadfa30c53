//! The tokenizer as GGUF metadata: `tokenizer.ggml.*` and `tokenizer.chat_template`, read
//! from a model directory's `tokenizer.json`, `tokenizer_config.json`, `config.json` and
//! chat template files, as llama.cpp's converter reads them.
//!
//! Byte-level BPE tokenizers are supported (GGUF's `gpt2` tokenizer model: Llama 3,
//! Qwen 2/2.5/3, GPT-2 style). llama.cpp does not run a tokenizer's own pre-tokenizer regex;
//! it knows a fixed set by name (`tokenizer.ggml.pre`), so the regex must be one of those.
//! SentencePiece tokenizers (Llama 2, Mistral 7B) are refused with a message saying so.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;

use crate::GgufError;
use crate::file::Meta;
use crate::tokens::{looks_special, read_json, token_type};

/// Pre-tokenizer regexes as tokenizer.json writes them, and the name llama.cpp knows each by.
const KNOWN_PRE: &[(&str, &str)] = &[
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", "llama-bpe"),
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", "qwen2"),
    (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", "qwen35"),
];

/// The special-token kinds llama.cpp's converter looks for, with their GGUF key names.
const SPECIAL: &[(&str, &str)] = &[
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("unk", "unknown_token_id"),
    ("sep", "seperator_token_id"),
    ("pad", "padding_token_id"),
    ("cls", "cls_token_id"),
    ("mask", "mask_token_id"),
];

/// The name llama.cpp knows `pre_tokenizer`'s splitting by.
fn pre_tokenizer_name(pre: &Json, path: &Path) -> Result<&'static str, GgufError> {
    let unsupported = |what: String| {
        GgufError::unsupported(
            path,
            format!("{what}: llama.cpp only knows a fixed set of pre-tokenizers; supported here are GPT-2's byte level, Llama 3's and Qwen 2's"),
        )
    };
    match pre["type"].as_str() {
        Some("ByteLevel") if pre["use_regex"].as_bool() != Some(false) => Ok("gpt-2"),
        Some("Sequence") => {
            let parts = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or_default();
            let regex = parts.iter().find(|p| p["type"] == "Split").and_then(|p| p["pattern"]["Regex"].as_str());
            let byte_level = parts.iter().any(|p| p["type"] == "ByteLevel" && p["use_regex"].as_bool() == Some(false));
            match regex {
                Some(r) if byte_level && parts.len() == 2 => KNOWN_PRE
                    .iter()
                    .find(|(known, _)| *known == r)
                    .map(|(_, name)| *name)
                    .ok_or_else(|| unsupported(format!("the pre-tokenizer splits on {r:?}"))),
                _ => Err(unsupported("the pre-tokenizer sequence is not a split and a byte-level mapping".into())),
            }
        }
        other => Err(unsupported(format!("the pre-tokenizer is {}", other.unwrap_or("missing")))),
    }
}

/// The tokenizer metadata of the model in `dir`, whose config.json is `model_config`, with
/// `vocab_size` rows of embeddings. `sentencepiece` says a `tokenizer.model` beside it is read when tokenizer.json is not a
/// byte-level BPE, as llama.cpp's converter does for its `llama` architecture (Llama 2,
/// Mistral).
pub fn tokenizer_metadata(dir: &Path, model_config: &Json, vocab_size: usize, sentencepiece: bool) -> Result<Vec<(String, Meta)>, GgufError> {
    let path = dir.join("tokenizer.json");
    let tokenizer = read_json(&path)?.ok_or_else(|| GgufError::unsupported(&path, "GGUF export needs the model's tokenizer.json, and there is none"))?;
    let config_path = dir.join("tokenizer_config.json");
    let config = read_json(&config_path)?;
    let special = || SpecialTokens::read(dir, &tokenizer, config.as_ref(), model_config, vocab_size).map(SpecialTokens::metadata);
    let spm = dir.join("tokenizer.model");
    let model = &tokenizer["model"];
    // A byte-level BPE tokenizer.json wins over a tokenizer.model beside it (some Llama 3
    // directories carry tiktoken's file under that name).
    let byte_level = model["type"] == "BPE" && model["byte_fallback"].as_bool() != Some(true);
    if sentencepiece && !byte_level && spm.is_file() {
        let mut meta = crate::spm::metadata(dir, &spm, config.as_ref().map(|c| (c, config_path.as_path())), vocab_size)?;
        if let Some(add) = config.as_ref().and_then(|c| c["add_prefix_space"].as_bool()) {
            meta.push(("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(add)));
        }
        meta.extend(special()?);
        return Ok(meta);
    }
    if !byte_level {
        return Err(GgufError::unsupported(
            &path,
            format!(
                "the tokenizer is a {} model{}; GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen), and SentencePiece ones (Llama 2, Mistral) of a Llama or Mistral model from their tokenizer.model, which {}",
                model["type"].as_str().unwrap_or("unknown"),
                if model["byte_fallback"] == true { " with byte fallback" } else { "" },
                if sentencepiece { "this directory does not have" } else { "this architecture does not use" }
            ),
        ));
    }
    let pre = pre_tokenizer_name(&tokenizer["pre_tokenizer"], &path)?;

    // Tokens by id: the BPE vocabulary, then the added tokens.
    let invalid = |m: String| GgufError::invalid(&path, m);
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in model["vocab"].as_object().ok_or_else(|| invalid("model.vocab is not an object".into()))? {
        let id = id.as_u64().ok_or_else(|| invalid(format!("model.vocab: {token:?} has no integer id")))? as usize;
        by_id.insert(id, (token.clone(), token_type::NORMAL));
    }
    for t in tokenizer["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(invalid(format!("added_tokens: entry {t} has no id or content")));
        };
        let entry = if t["special"] == true || looks_special(content) {
            (content.to_string(), token_type::CONTROL)
        } else {
            (content.replace('\u{2581}', " "), token_type::USER_DEFINED)
        };
        by_id.insert(id as usize, entry);
    }
    if let Some((&max, _)) = by_id.last_key_value()
        && max >= vocab_size
    {
        return Err(invalid(format!("token id {max} is beyond the model's vocab_size {vocab_size}")));
    }
    let (tokens, types): (Vec<String>, Vec<i32>) =
        (0..vocab_size).map(|i| by_id.remove(&i).unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED))).unzip();

    // Merges, in either of tokenizer.json's spellings.
    let merges: Vec<String> = match model["merges"].as_array() {
        Some(list) => list
            .iter()
            .map(|m| match m {
                Json::String(s) => Ok(s.clone()),
                Json::Array(pair) if pair.len() == 2 => {
                    let part = |v: &Json| v.as_str().map(|s| s.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect::<String>());
                    match (part(&pair[0]), part(&pair[1])) {
                        (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                        _ => Err(invalid(format!("model.merges: {m} is not a pair of strings"))),
                    }
                }
                _ => Err(invalid(format!("model.merges: {m} is not a merge"))),
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };

    let mut meta: Vec<(String, Meta)> = vec![
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32Array(types)),
    ];
    if !merges.is_empty() {
        meta.push(("tokenizer.ggml.merges".into(), Meta::StrArray(merges)));
    }
    meta.extend(special()?);
    Ok(meta)
}

/// Special token ids, whether BOS/EOS/SEP are added, and the chat template.
#[derive(Default)]
struct SpecialTokens {
    ids: BTreeMap<&'static str, u32>,
    add: BTreeMap<&'static str, bool>,
    chat_template: Vec<(String, Meta)>,
}

impl SpecialTokens {
    /// As gguf-py's `SpecialVocab` reads them from tokenizer.json, tokenizer_config.json
    /// (`config`) and config.json (`model_config`); ids at or past `vocab_size` are left out.
    fn read(dir: &Path, tokenizer: &Json, config: Option<&Json>, model_config: &Json, vocab_size: usize) -> Result<Self, GgufError> {
        let mut s = Self::default();
        let added = tokenizer["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
        let content = |key: &str| -> Option<String> {
            let v = &config?[key];
            v.as_str().or_else(|| v["content"].as_str()).map(str::to_string)
        };
        let bos = content("bos_token").or_else(|| content("cls_token"));
        let eos = content("eos_token").or_else(|| content("sep_token"));

        // What the post-processor adds decides add_bos/add_eos before tokenizer_config does.
        let post = &tokenizer["post_processor"];
        let processors = post["processors"].as_array().cloned().unwrap_or_else(|| vec![post.clone()]);
        let mut bos_name = bos.clone();
        for p in &processors {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    s.add.entry("bos").or_insert(false);
                    s.add.entry("eos").or_insert(false);
                }
                Some("TemplateProcessing") => {
                    let special = |e: Option<&Json>| e.and_then(|e| e["SpecialToken"]["id"].as_str()).map(str::to_string);
                    let single = p["single"].as_array().map(Vec::as_slice).unwrap_or_default();
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        first = special(single.first());
                        last = special(single.last());
                        if let Some(first) = &first {
                            if bos_name.is_none() {
                                bos_name = Some(first.clone());
                            }
                            s.add.insert("bos", Some(first) == bos_name.as_ref());
                        }
                        if let Some(last) = &last {
                            s.add.insert("eos", Some(last) == eos.as_ref());
                        }
                    }
                    // The pair template: a separator between A and B is add_sep.
                    let mut pair = p["pair"].as_array().map(Vec::as_slice).unwrap_or_default();
                    if first.is_some() && special(pair.first()) == first {
                        pair = &pair[1..];
                    }
                    if last.is_some() && special(pair.last()) == last {
                        pair = &pair[..pair.len() - 1];
                    }
                    if pair.len() > 2 && pair[0]["Sequence"]["id"] == "A" && pair[pair.len() - 1]["Sequence"]["id"] == "B" {
                        let middle = &pair[1..pair.len() - 1];
                        let sep = content("sep_token");
                        let is_sep = |e: &Json| special(Some(e)).is_some_and(|id| Some(&id) == sep.as_ref() || Some(&id) == eos.as_ref());
                        let add = (is_sep(&middle[0]) && last.is_none()) || (middle.len() == 2 && is_sep(&middle[1]));
                        s.add.insert("sep", add);
                    }
                }
                _ => {}
            }
        }
        if let Some(config) = config {
            for (kind, _) in SPECIAL {
                if let Some(add) = config[format!("add_{kind}_token")].as_bool() {
                    s.add.entry(kind).or_insert(add);
                }
                let name = match *kind {
                    "bos" => bos_name.clone(),
                    "eos" => eos.clone(),
                    _ => content(&format!("{kind}_token")),
                };
                if let Some(id) = name.and_then(|n| added.iter().find(|t| t["content"] == n.as_str())).and_then(|t| t["id"].as_u64())
                    && (id as usize) < vocab_size
                {
                    s.ids.insert(kind, id as u32);
                }
            }
            s.chat_template = match &config["chat_template"] {
                Json::Null => chat_template_file(dir)?.map(|t| template_metadata(&Json::String(t))).unwrap_or_default(),
                t => template_metadata(t),
            };
        }
        // config.json fills the ids tokenizer_config.json left unset.
        for (kind, _) in SPECIAL {
            if let Some(id) = model_config[format!("{kind}_token_id")].as_u64().filter(|&id| (id as usize) < vocab_size) {
                s.ids.entry(kind).or_insert(id as u32);
            }
        }
        Ok(s)
    }

    /// `tokenizer.ggml.*_token_id`, `tokenizer.ggml.add_*_token` and the chat template.
    fn metadata(self) -> Vec<(String, Meta)> {
        let mut meta = Vec::new();
        for (kind, key) in SPECIAL {
            if let Some(id) = self.ids.get(kind) {
                meta.push((format!("tokenizer.ggml.{key}"), Meta::U32(*id)));
            }
        }
        // gguf-py writes these three; llama.cpp reads no others.
        for (kind, add) in self.add.iter().filter(|(k, _)| matches!(**k, "bos" | "eos" | "sep")) {
            meta.push((format!("tokenizer.ggml.add_{kind}_token"), Meta::Bool(*add)));
        }
        meta.extend(self.chat_template);
        meta
    }
}

/// The chat template keys: a template string is `tokenizer.chat_template`; a list of named
/// templates (`[{"name", "template"}]`) gives the `default` one that key, each other one
/// `tokenizer.chat_template.<name>`, and their names `tokenizer.chat_templates`.
fn template_metadata(template: &Json) -> Vec<(String, Meta)> {
    match template {
        Json::String(t) => vec![("tokenizer.chat_template".into(), Meta::Str(t.clone()))],
        Json::Array(list) => {
            let mut meta = Vec::new();
            let mut names = Vec::new();
            for entry in list {
                let (Some(name), Some(t)) = (entry["name"].as_str(), entry["template"].as_str()) else { continue };
                if name == "default" {
                    meta.push(("tokenizer.chat_template".into(), Meta::Str(t.into())));
                } else {
                    meta.push((format!("tokenizer.chat_template.{name}"), Meta::Str(t.into())));
                    names.push(name.to_string());
                }
            }
            if !names.is_empty() {
                meta.push(("tokenizer.chat_templates".into(), Meta::StrArray(names)));
            }
            meta
        }
        _ => Vec::new(),
    }
}

/// `chat_template.jinja`, or the template in `chat_template.json`.
fn chat_template_file(dir: &Path) -> Result<Option<String>, GgufError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| GgufError::io(&jinja, e));
    }
    Ok(read_json(&dir.join("chat_template.json"))?.and_then(|j| j["chat_template"].as_str().map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_named_as_llama_cpp_names_them() {
        let p = Path::new("tokenizer.json");
        assert_eq!(pre_tokenizer_name(&json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}), p).unwrap(), "gpt-2");
        // As Llama 3's and Qwen 2.5's tokenizer.json spell them.
        let split = |regex: &str| -> Json {
            serde_json::from_str(&format!(
                r#"{{"type": "Sequence", "pretokenizers": [
                {{"type": "Split", "pattern": {{"Regex": "{regex}"}}, "behavior": "Isolated", "invert": false}},
                {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}}]}}"#
            ))
            .unwrap()
        };
        let llama3 =
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
        assert_eq!(pre_tokenizer_name(&llama3, p).unwrap(), "llama-bpe");
        let qwen2 = split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
        assert_eq!(pre_tokenizer_name(&qwen2, p).unwrap(), "qwen2");
        let other = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}+"}}, {"type": "ByteLevel", "use_regex": false}]});
        let err = pre_tokenizer_name(&other, p).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("\\\\p{N}+"), "{err}");
        assert!(pre_tokenizer_name(&json!({"type": "Metaspace"}), p).is_err());
    }

    #[test]
    fn named_chat_templates_are_written_as_gguf_py_writes_them() {
        let list = json!([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]);
        assert_eq!(
            template_metadata(&list),
            vec![
                ("tokenizer.chat_template".into(), Meta::Str("D".into())),
                ("tokenizer.chat_template.tool_use".into(), Meta::Str("T".into())),
                ("tokenizer.chat_templates".into(), Meta::StrArray(vec!["tool_use".into()])),
            ]
        );
    }
}
