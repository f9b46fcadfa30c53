//! A SentencePiece `tokenizer.model` (Llama 2, Mistral 7B) as GGUF's `llama` tokenizer:
//! every piece with its score and type, as llama.cpp's converter reads them through the
//! sentencepiece library; then the added tokens of `added_tokens.json` and
//! `tokenizer_config.json`'s `added_tokens_decoder`.
//!
//! The file is a protobuf `ModelProto`; only the fields read here are declared, and prost
//! skips the rest.

use std::path::Path;

use prost::Message;
use serde_json::Value as Json;

use crate::GgufError;
use crate::file::Meta;
use crate::tokens::{looks_special, read_json, token_type};

/// `sentencepiece_model.proto`'s `ModelProto`, as far as it is read.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    /// The vocabulary, in id order.
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

/// The score of padding ids past the model's pieces, and of added tokens.
const PAD_SCORE: f32 = -10000.0;
const ADDED_SCORE: f32 = -1000.0;

/// `tokenizer.ggml.{model, pre, tokens, scores, token_type}` for the SentencePiece model at
/// `path`, in a model directory `dir` with `vocab_size` embedding rows, whose
/// tokenizer_config.json (with its path) is `config`.
pub fn metadata(dir: &Path, path: &Path, config: Option<(&Json, &Path)>, vocab_size: usize) -> Result<Vec<(String, Meta)>, GgufError> {
    let bytes = std::fs::read(path).map_err(|e| GgufError::io(path, e))?;
    let model = ModelProto::decode(bytes.as_slice()).map_err(|e| GgufError::invalid(path, format!("not a SentencePiece model: {e}")))?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![PAD_SCORE; vocab_size];
    let mut types = vec![token_type::UNUSED; vocab_size];
    for (id, p) in model.pieces.iter().enumerate().take(vocab_size) {
        tokens[id] = p.piece.clone().unwrap_or_default();
        scores[id] = p.score.unwrap_or(0.0);
        // sentencepiece's IsUnknown/IsControl/IsUnused/IsByte; a user-defined piece reads as normal.
        types[id] = match p.kind.unwrap_or(1) {
            k @ (token_type::UNKNOWN | token_type::CONTROL | token_type::UNUSED | token_type::BYTE) => k,
            _ => token_type::NORMAL,
        };
    }

    // added_tokens.json: {"content": id}.
    let added_path = dir.join("added_tokens.json");
    if let Some(added) = read_json(&added_path)? {
        for (content, id) in added.as_object().ok_or_else(|| GgufError::invalid(&added_path, "not an object"))? {
            let id = id.as_u64().ok_or_else(|| GgufError::invalid(&added_path, format!("{content:?} has no integer id")))? as usize;
            if id < vocab_size {
                (tokens[id], scores[id], types[id]) = (content.clone(), ADDED_SCORE, token_type::USER_DEFINED);
            }
        }
    }
    // tokenizer_config.json's added_tokens_decoder: {"id": {"content", "special"}}.
    if let Some((config, config_path)) = config
        && let Some(decoder) = config["added_tokens_decoder"].as_object()
    {
        for (id, entry) in decoder {
            let (Ok(id), Some(content)) = (id.parse::<usize>(), entry["content"].as_str()) else {
                return Err(GgufError::invalid(config_path, format!("added_tokens_decoder: entry {id:?} has no integer id or content")));
            };
            if id >= vocab_size {
                continue;
            }
            let special = entry["special"] == Json::Bool(true) || looks_special(content);
            tokens[id] = if special { content.to_string() } else { content.replace('\u{2581}', " ") };
            types[id] = if special { token_type::CONTROL } else { token_type::USER_DEFINED };
            scores[id] = ADDED_SCORE;
        }
    }

    Ok(vec![
        ("tokenizer.ggml.model".into(), Meta::Str("llama".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("default".into())),
        ("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)),
        ("tokenizer.ggml.scores".into(), Meta::F32Array(scores)),
        ("tokenizer.ggml.token_type".into(), Meta::I32Array(types)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_scores_and_types_are_read_and_padded() {
        let model = ModelProto {
            pieces: vec![
                Piece { piece: Some("<unk>".into()), score: Some(0.0), kind: Some(2) },
                Piece { piece: Some("<s>".into()), score: Some(0.0), kind: Some(3) },
                Piece { piece: Some("<0x41>".into()), score: Some(0.0), kind: Some(6) },
                Piece { piece: Some("\u{2581}the".into()), score: Some(-3.0), kind: None },
                Piece { piece: Some("<mine>".into()), score: Some(0.0), kind: Some(4) },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.model");
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        let meta = metadata(dir.path(), &path, None, 6).unwrap();
        let get = |k: &str| meta.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(
            get("tokenizer.ggml.tokens"),
            Meta::StrArray(vec!["<unk>".into(), "<s>".into(), "<0x41>".into(), "\u{2581}the".into(), "<mine>".into(), "[PAD5]".into()])
        );
        assert_eq!(get("tokenizer.ggml.scores"), Meta::F32Array(vec![0.0, 0.0, 0.0, -3.0, 0.0, PAD_SCORE]));
        assert_eq!(get("tokenizer.ggml.token_type"), Meta::I32Array(vec![2, 3, 6, 1, 1, 5]));

        std::fs::write(&path, b"\xff\xff not protobuf").unwrap();
        let err = metadata(dir.path(), &path, None, 6).unwrap_err().to_string();
        assert!(err.contains("tokenizer.model"), "{err}");
    }
}
