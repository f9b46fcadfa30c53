//! Parity with transformers on the tiny random fixtures of `tests/fixtures/`
//! (made by `tests/fixtures/make_fixtures.py`): logits at every position, a left-padded
//! batch, and greedy continuations, on the CPU backend and on wgpu.
//!
//! Tolerances: f32 logits within 1e-4 (max abs); bf16 compute within 0.25 of the f32
//! reference (logits reach ~5; transformers' own bf16 run is 0.11 away).

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use lora_model::device::wgpu_device;
use lora_model::{CausalLm, Checkpoint, ModelConfig, Sampler, SamplingConfig, generate};
use serde_json::Value;

const F32_TOL: f32 = 1e-4;
const BF16_TOL: f32 = 0.25;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

struct Expected {
    json: Value,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Expected {
    fn load(name: &str) -> Self {
        let dir = fixture(name);
        let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                (n, v.shape().to_vec(), data)
            })
            .collect();
        Self { json, tensors }
    }

    fn tensor(&self, name: &str) -> (&[usize], &[f32]) {
        let (_, s, d) = self.tensors.iter().find(|(n, _, _)| n == name).unwrap();
        (s, d)
    }

    fn ids(&self, key: &str) -> Vec<i64> {
        self.json[key].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    }
}

fn load(name: &str, device: &Device, dtype: DType) -> CausalLm {
    let dir = fixture(name);
    let config = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    CausalLm::load(&config, &ckpt, device, dtype, |_| {}).unwrap()
}

fn tokens(ids: &[i64], batch: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [batch, ids.len() / batch]), device)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits at every position of the reference prompt, against `reference` (a fixture name).
fn check_logits(name: &str, reference: &str, device: &Device, dtype: DType, key: &str, tol: f32) {
    let exp = Expected::load(reference);
    let model = load(name, device, dtype);
    let ids = exp.ids("logits_input_ids");
    let logits = model.forward(tokens(&ids, 1, device), None);
    let got: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().unwrap();
    let (shape, want) = exp.tensor(key);
    assert_eq!(shape, [ids.len(), want.len() / ids.len()]);
    let diff = max_abs_diff(&got, want);
    eprintln!("{name} {key} {dtype:?}: max abs diff {diff:e}");
    assert!(diff < tol, "{name}: logits differ from transformers by {diff} (tolerance {tol})");
}

/// A left-padded batch of two: real positions must match transformers.
fn check_padded(name: &str, device: &Device) {
    let exp = Expected::load(name);
    let model = load(name, device, DType::F32);
    let padded = &exp.json["padded"];
    let rows: Vec<Vec<i64>> = serde_json::from_value(padded["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<i64>> = serde_json::from_value(padded["attention_mask"].clone()).unwrap();
    let flat: Vec<i64> = rows.concat();
    let flags: Vec<bool> = mask.concat().iter().map(|&m| m == 1).collect();
    let logits = model.forward(tokens(&flat, 2, device), Some(&flags));
    let got: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().unwrap();
    let (shape, want) = exp.tensor("padded_logits");
    let vocab = shape[2];
    let mut worst = 0.0f32;
    for (pos, &real) in flags.iter().enumerate() {
        if real {
            let r = pos * vocab..(pos + 1) * vocab;
            worst = worst.max(max_abs_diff(&got[r.clone()], &want[r]));
        }
    }
    eprintln!("{name} padded: max abs diff {worst:e}");
    assert!(worst < F32_TOL, "{name}: padded-batch logits differ by {worst}");
}

/// Greedy continuations of every reference prompt, with the KV cache.
fn check_greedy(name: &str, device: &Device, prompts: usize) {
    let exp = Expected::load(name);
    let model = load(name, device, DType::F32);
    let eos: Vec<u32> = {
        let dir = fixture(name);
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
        match &cfg["eos_token_id"] {
            Value::Array(a) => a.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            v => vec![v.as_u64().unwrap() as u32],
        }
    };
    for case in exp.json["prompts"].as_array().unwrap().iter().take(prompts) {
        let prompt: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["greedy_ids"].clone()).unwrap();
        let mut got = Vec::new();
        let mut sampler = Sampler::new(SamplingConfig::default());
        generate(&model, &prompt, 20, &eos, &mut sampler, |t| got.push(t));
        assert_eq!(got, want, "{name}: greedy ids differ for prompt {:?}", case["prompt"]);
    }
}

const FIXTURES: &[&str] = &["llama", "qwen2", "mistral", "qwen3"];

#[test]
fn cpu_f32_logits_match_transformers() {
    for name in FIXTURES {
        check_logits(name, name, &Device::flex(), DType::F32, "logits", F32_TOL);
    }
}

#[test]
fn cpu_sharded_checkpoint_loads_the_same_model() {
    check_logits("llama_sharded", "llama", &Device::flex(), DType::F32, "logits", F32_TOL);
}

#[test]
fn cpu_bf16_checkpoint_in_f32_matches_transformers() {
    check_logits("llama_bf16", "llama_bf16", &Device::flex(), DType::F32, "logits", F32_TOL);
}

#[test]
fn cpu_bf16_compute_is_within_tolerance() {
    check_logits("llama_bf16", "llama_bf16", &Device::flex(), DType::BF16, "logits", BF16_TOL);
    check_logits("llama_bf16", "llama_bf16", &Device::flex(), DType::BF16, "logits_half", BF16_TOL);
}

#[test]
fn cpu_padding_mask_matches_transformers() {
    for name in FIXTURES {
        check_padded(name, &Device::flex());
    }
}

#[test]
fn cpu_greedy_ids_match_transformers() {
    for name in FIXTURES {
        check_greedy(name, &Device::flex(), 3);
    }
}

/// The wgpu device, or `None` (test skipped) when this machine has no adapter. CI sets
/// `LORA_REQUIRE_WGPU=1` so that a missing adapter fails instead of skipping.
fn wgpu() -> Option<Device> {
    let device = wgpu_device();
    if device.is_none() {
        assert!(std::env::var_os("LORA_REQUIRE_WGPU").is_none(), "LORA_REQUIRE_WGPU is set but no wgpu adapter was found");
        eprintln!("no wgpu adapter: skipping");
    }
    device
}

#[test]
fn wgpu_f32_logits_match_transformers() {
    let Some(device) = wgpu() else { return };
    for name in FIXTURES {
        check_logits(name, name, &device, DType::F32, "logits", F32_TOL);
    }
    check_padded("mistral", &device);
}

#[test]
fn wgpu_greedy_ids_match_transformers() {
    let Some(device) = wgpu() else { return };
    for name in FIXTURES {
        check_greedy(name, &device, 1);
    }
}
