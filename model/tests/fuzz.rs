//! Hostile checkpoints (issue 14, "Fuzzing and hostile files"): the llama fixture's
//! `model.safetensors` and `config.json`, and the sharded fixture's index, with random bytes overwritten, inserted or cut off,
//! read as `generate` and `train` read them. Every case must end in `Ok` or an error, never a
//! panic; safetensors sizes are checked against the file, so no case allocates more than the
//! file holds. The case count is fixed (`CASES` per target) so CI's time stays bounded.

use std::path::Path;

use burn::tensor::{DType, Device};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_testkit::{budget, edits, fixture, mutate};
use proptest::prelude::*;

const CASES: u32 = 300;

/// A model directory with the fixture's files and `name` replaced by `bytes`.
fn directory_with(name: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join(name), bytes).unwrap();
    dir
}

/// What loading reads: the config, the checkpoint's table, every tensor the table names, and
/// the model built from both on the CPU.
fn read_all(dir: &Path) {
    let config = ModelConfig::from_dir(dir);
    if let Ok(ckpt) = Checkpoint::open(dir) {
        if let Ok(config) = &config {
            let _ = CausalLm::load(config, &ckpt, &Device::flex(), DType::F32, |_| {});
        }
        let names: Vec<String> = ckpt.names().into_iter().map(str::to_string).collect();
        for name in names {
            if let Ok(shape) = ckpt.shape(&name) {
                let _ = ckpt.read_f32(&name, &shape);
            }
            let _ = ckpt.read_u32(&name);
        }
    }
}

proptest! {
    #![proptest_config(budget(CASES))]

    /// Bytes of the safetensors header (its length prefix and JSON table) overwritten or the
    /// file cut short.
    #[test]
    fn a_mutated_safetensors_header_is_an_error_not_a_panic(edits in edits(1..8), cut in prop::option::of(any::<usize>())) {
        let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let dir = directory_with("model.safetensors", &mutate(&bytes, &edits, header, None, cut));
        read_all(dir.path());
    }

    /// `config.json` with bytes overwritten or cut short (numbers, types and structure broken).
    #[test]
    fn a_mutated_config_json_is_an_error_not_a_panic(edits in edits(1..8), cut in prop::option::of(any::<usize>())) {
        let bytes = std::fs::read(fixture("llama").join("config.json")).unwrap();
        let dir = directory_with("config.json", &mutate(&bytes, &edits, bytes.len(), None, cut));
        read_all(dir.path());
    }

    /// `config.json` whose sizes are replaced by hostile numbers (0, huge, negative).
    #[test]
    fn hostile_config_numbers_are_errors_not_panics(key in prop::sample::select(vec!["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps", "sliding_window"]), value in prop::sample::select(vec!["0", "-1", "1e30", "18446744073709551615", "9223372036854775807", "1.5", "null", "\"7\"", "[]", "{}", "NaN"])) {
        let text = std::fs::read_to_string(fixture("llama").join("config.json")).unwrap();
        let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let parsed = serde_json::from_str(value).unwrap_or(serde_json::Value::Null);
        json.insert(key.to_string(), parsed);
        let dir = directory_with("config.json", serde_json::to_string(&json).unwrap().as_bytes());
        read_all(dir.path());
    }
}

proptest! {
    #![proptest_config(budget(100))]

    /// A sharded checkpoint's `model.safetensors.index.json` with bytes overwritten or cut
    /// short (shard names, the weight map's structure), read as the loader reads it.
    #[test]
    fn a_mutated_shard_index_is_an_error_not_a_panic(edits in edits(1..8), cut in prop::option::of(any::<usize>())) {
        let src = fixture("llama_sharded");
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let index = std::fs::read(src.join("model.safetensors.index.json")).unwrap();
        std::fs::write(dir.path().join("model.safetensors.index.json"), mutate(&index, &edits, index.len(), None, cut)).unwrap();
        read_all(dir.path());
    }
}
