//! Hostile checkpoints (issue 14, "Fuzzing and hostile files"): the llama fixture's
//! `model.safetensors` and `config.json` with random bytes overwritten, inserted or cut off,
//! read as `generate` and `train` read them. Every case must end in `Ok` or an error, never a
//! panic; safetensors sizes are checked against the file, so no case allocates more than the
//! file holds. The case count is fixed (`CASES` per target) so CI's time stays bounded.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const CASES: u32 = 300;

/// The budget: `LORA_FUZZ_CASES` cases per target (default [`CASES`]) drawn from the seed
/// `LORA_FUZZ_SEED` (default fixed, so every CI run tries the same inputs); a longer local run
/// raises the count and varies the seed.
fn budget() -> Config {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = var("LORA_FUZZ_CASES").map_or(CASES, |c| c.min(u64::from(u32::MAX)) as u32);
    Config { cases, rng_seed: RngSeed::Fixed(var("LORA_FUZZ_SEED").unwrap_or(0x10ca)), failure_persistence: None, ..Config::default() }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// `bytes` with each `(position, byte)` written (positions folded into `0..window`), then cut
/// to `cut` bytes when given.
fn mutate(bytes: &[u8], edits: &[(usize, u8)], window: usize, cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(at, b) in edits {
        let at = at % window.min(out.len()).max(1);
        if let Some(slot) = out.get_mut(at) {
            *slot = b;
        }
    }
    if let Some(cut) = cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

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
    #![proptest_config(budget())]

    /// Bytes of the safetensors header (its length prefix and JSON table) overwritten or the
    /// file cut short.
    #[test]
    fn a_mutated_safetensors_header_is_an_error_not_a_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in prop::option::of(any::<usize>())) {
        let bytes = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let dir = directory_with("model.safetensors", &mutate(&bytes, &edits, header, cut));
        read_all(dir.path());
    }

    /// `config.json` with bytes overwritten or cut short (numbers, types and structure broken).
    #[test]
    fn a_mutated_config_json_is_an_error_not_a_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in prop::option::of(any::<usize>())) {
        let bytes = std::fs::read(fixture("llama").join("config.json")).unwrap();
        let dir = directory_with("config.json", &mutate(&bytes, &edits, bytes.len(), cut));
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
