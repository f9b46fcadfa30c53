//! Hostile resume files (issue 14, "Fuzzing and hostile files"): a resume file of a LoRA on the
//! llama fixture with random bytes of its safetensors header overwritten, or cut short, read
//! back as `train --resume` reads it. Every case must end in `Ok` or an error, never a panic.
//! The case count is fixed so CI's time stays bounded.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use lora_adapters::{AdapterSpec, FineTuneType, Init, Scale, add_adapters};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_trainer::checkpoint::{restore, to_bytes};
use lora_trainer::{Optimizer, OptimizerConfig, OptimizerKind, State};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const CASES: u32 = 200;

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

fn adapted_model() -> CausalLm {
    let dir = fixture("llama");
    let config = ModelConfig::from_dir(&dir).unwrap();
    // On an autodiff device, as `train` loads it: restoring marks the adapters trainable.
    let mut model = CausalLm::load(&config, &Checkpoint::open(&dir).unwrap(), &Device::flex().autodiff(), DType::F32, |_| {}).unwrap();
    let spec = AdapterSpec {
        fine_tune_type: FineTuneType::Lora,
        num_layers: -1,
        keys: Some(vec!["q_proj".into(), "v_proj".into()]),
        rank: 4,
        scale: Scale::Alpha { alpha: 8.0, rslora: false },
        dropout: 0.0,
        init: Init::Kaiming,
    };
    add_adapters(&mut model, &spec, 0).unwrap();
    model
}

proptest! {
    #![proptest_config(budget())]

    #[test]
    fn a_mutated_resume_file_is_an_error_not_a_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in prop::option::of(any::<usize>())) {
        let mut model = adapted_model();
        let optimizer = OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.01, betas: (0.9, 0.999), eps: 1e-8, momentum: 0.0 };
        let bytes = to_bytes(&model, &State::new(Optimizer::new(optimizer))).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut out = bytes.clone();
        for &(at, b) in &edits {
            out[at % header] = b;
        }
        if let Some(cut) = cut {
            out.truncate(cut % (out.len() + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trainer_state.safetensors");
        std::fs::write(&path, &out).unwrap();
        let _ = restore(&mut model, &path);
    }
}
