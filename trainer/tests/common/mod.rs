//! What the trainer's tests share.
// Each test crate uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use lora_adapters::{format, set_adapters};
use lora_data::{Example, ReadOptions, Tokenizer, load_jsonl};
use lora_model::{CausalLm, Checkpoint, ModelConfig};

/// The repository's `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The largest difference between `model`'s adapter weights and those of the adapter saved in
/// `dir` (same modules in the same order).
pub fn largest_adapter_difference(model: &CausalLm, dir: &Path) -> f32 {
    let saved = format::load(dir).unwrap();
    let ours = lora_adapters::adapter_weights(model);
    assert_eq!(ours.len(), saved.weights.len(), "{}: adapted modules", dir.display());
    let mut max = 0f32;
    for (a, b) in ours.iter().zip(&saved.weights) {
        assert_eq!(a.module, b.module);
        for (x, y) in a.a.iter().chain(&a.b).zip(b.a.iter().chain(&b.b)) {
            max = max.max((x - y).abs());
        }
    }
    max
}

/// The llama fixture on `device` with the train_reference's initial adapter (on all 7
/// projections, A and B non-zero) at dropout `dropout`, and the reference's training rows.
pub fn model_and_rows(device: &Device, dropout: f64) -> (CausalLm, Vec<Example>) {
    let base = fixtures().join("llama");
    let reference = fixtures().join("train_reference");
    let config = ModelConfig::from_dir(&base).unwrap();
    let mut model = CausalLm::load(&config, &Checkpoint::open(&base).unwrap(), device, DType::F32, |_| {}).unwrap().no_grad();
    let initial = format::load(&reference.join("initial")).unwrap();
    set_adapters(&mut model, &initial.weights, dropout, &initial.path).unwrap();
    let tokenizer = Tokenizer::from_dir(&base).unwrap();
    let rows = load_jsonl(&reference.join("data/train.jsonl"), &tokenizer, &ReadOptions::default()).unwrap().examples;
    (model, rows)
}

/// The largest elementwise difference between two lists of gradients.
pub fn max_diff(a: &[Tensor<1>], b: &[Tensor<1>]) -> f32 {
    assert_eq!(a.len(), b.len(), "as many gradients");
    a.iter().zip(b).map(|(x, y)| (x.clone() - y.clone()).abs().max().into_scalar::<f32>()).fold(0.0, f32::max)
}
