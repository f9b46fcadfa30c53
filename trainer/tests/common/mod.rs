//! What the reference tests share.

use std::path::{Path, PathBuf};

use lora_adapters::format;
use lora_model::CausalLm;

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
