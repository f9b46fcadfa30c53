//! Hostile tokenizer files read by GGUF export (issue 14, "Fuzzing and hostile files"): the
//! SentencePiece fixture's `tokenizer.model` (protobuf), `tokenizer.json`,
//! `tokenizer_config.json` and an `added_tokens.json`, with bytes overwritten, inserted or cut
//! off, read as `fuse --gguf` reads them, and the byte-level BPE fixture's files likewise.
//! Every case must end in metadata or an error, never a panic.

use lora_testkit::{budget, edits, fixture, insert, mutate};
use proptest::prelude::*;

const FILES: [&str; 4] = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "added_tokens.json"];

proptest! {
    #![proptest_config(budget(100))]

    #[test]
    fn mutated_tokenizer_files_are_errors_not_panics(
        which in 0..FILES.len(),
        spm in any::<bool>(),
        edits in edits(1..8),
        insert in insert(b"{}[]\":,0-9\x00\x08\x0a\x12\x1a\xff", 8),
        cut in prop::option::of(any::<usize>()),
    ) {
        let src = fixture(if spm { "gguf_reference/mistral_spm" } else { "llama" });
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "model.safetensors" {
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        std::fs::write(dir.path().join("added_tokens.json"), br#"{"<extra>": 399}"#).unwrap();
        let name = FILES[which];
        let bytes = std::fs::read(dir.path().join(name)).unwrap_or_default();
        std::fs::write(dir.path().join(name), mutate(&bytes, &edits, bytes.len(), Some(&insert), cut)).unwrap();
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
        let vocab = config["vocab_size"].as_u64().unwrap() as usize;
        let _ = lora_gguf::vocab::tokenizer_metadata(dir.path(), &config, vocab, spm);
    }
}
