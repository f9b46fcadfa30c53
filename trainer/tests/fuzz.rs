//! Hostile resume files (issue 14, "Fuzzing and hostile files"): a resume file of a LoRA on the
//! llama fixture with random bytes of its safetensors header overwritten, or cut short, read
//! back as `train --resume` reads it. Every case must end in `Ok` or an error, never a panic.
//! The case count is fixed so CI's time stays bounded.

use burn::tensor::{DType, Device};
use lora_adapters::{AdapterSpec, FineTuneType, Init, Scale, add_adapters};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_testkit::{budget, edits, fixture, mutate};
use lora_trainer::checkpoint::{restore, to_bytes};
use lora_trainer::{Optimizer, OptimizerConfig, OptimizerKind, State};
use proptest::prelude::*;

const CASES: u32 = 200;

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
    #![proptest_config(budget(CASES))]

    #[test]
    fn a_mutated_resume_file_is_an_error_not_a_panic(edits in edits(1..6), cut in prop::option::of(any::<usize>())) {
        let mut model = adapted_model();
        let optimizer = OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.01, ..Default::default() };
        let bytes = to_bytes(&model, &State::new(Optimizer::new(optimizer))).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let out = mutate(&bytes, &edits, header, None, cut);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trainer_state.safetensors");
        std::fs::write(&path, &out).unwrap();
        let _ = restore(&mut model, &path);
    }
}
