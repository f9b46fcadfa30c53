//! Hostile adapter files (issue 14, "Fuzzing and hostile files"): the PEFT and mlx-lm adapters
//! of `tests/fixtures/fuse_reference` with random bytes of their config or of their weights'
//! safetensors header overwritten, or the files cut short, loaded as `generate --adapter-path`
//! loads them and put on the llama fixture. Every case must end in `Ok` or an error, never a
//! panic. The case count is fixed so CI's time stays bounded.

use burn::tensor::{DType, Device};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_testkit::{budget, edits, fixture, mutate};
use proptest::prelude::*;

const CASES: u32 = 200;

proptest! {
    #![proptest_config(budget(CASES))]

    #[test]
    fn mutated_adapter_files_are_errors_not_panics(
        mlx in any::<bool>(),
        weights in any::<bool>(),
        edits in edits(1..6),
        cut in prop::option::of(any::<usize>()),
    ) {
        let source = fixture("fuse_reference").join(if mlx { "mlx" } else { "lora" });
        let weights_file = if mlx { "adapters.safetensors" } else { "adapter_model.safetensors" };
        let dir = tempfile::tempdir().unwrap();
        for f in ["adapter_config.json", weights_file] {
            std::fs::copy(source.join(f), dir.path().join(f)).unwrap();
        }
        let name = if weights { weights_file } else { "adapter_config.json" };
        let bytes = std::fs::read(source.join(name)).unwrap();
        // The weights' header only: the floats after it are any value already.
        let window = if weights { 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize } else { bytes.len() };
        std::fs::write(dir.path().join(name), mutate(&bytes, &edits, window, None, cut)).unwrap();
        if let Ok(file) = lora_adapters::format::load(dir.path()) {
            let model_dir = fixture("llama");
            let config = ModelConfig::from_dir(&model_dir).unwrap();
            let mut model = CausalLm::load(&config, &Checkpoint::open(&model_dir).unwrap(), &Device::flex(), DType::F32, |_| {}).unwrap();
            let _ = lora_adapters::set_adapters(&mut model, &file.weights, 0.0, &file.path);
        }
    }
}
