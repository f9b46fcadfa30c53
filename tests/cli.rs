//! End-to-end tests of the `lora` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).output().expect("run lora")
}

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap()
}

fn greedy(model: &Path, prompt: &str, device: &str) -> Output {
    lora(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--temp", "0",
        "--ignore-chat-template", "--max-tokens", "20", "--device", device,
    ])
}

#[test]
fn generate_greedy_text_matches_transformers_on_every_fixture() {
    for name in ["llama", "qwen2", "mistral", "qwen3", "llama_sharded"] {
        let reference = if name == "llama_sharded" { "llama" } else { name };
        for case in expected(reference)["prompts"].as_array().unwrap() {
            let out = greedy(&fixture(name), case["prompt"].as_str().unwrap(), "cpu");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name}: {stderr}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), case["greedy_text"].as_str().unwrap(), "{name}");
            assert!(stderr.contains("Prompt:") && stderr.contains("tokens-per-sec"), "{stderr}");
            assert!(stderr.contains("Peak memory:"), "{stderr}");
        }
    }
}

#[test]
fn generate_applies_the_chat_template_by_default() {
    // The chat prompt is a different token sequence from the raw one, so the greedy
    // continuation (of a random model) differs; with the template ignored it is the raw one.
    let prompt = expected("qwen2")["prompts"][0].clone();
    let raw = greedy(&fixture("qwen2"), prompt["prompt"].as_str().unwrap(), "cpu");
    let chat = lora(&[
        "generate", "--model", fixture("qwen2").to_str().unwrap(), "--prompt",
        prompt["prompt"].as_str().unwrap(), "--temp", "0", "--max-tokens", "20", "--device", "cpu",
        "--system", "Be brief.",
    ]);
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    assert_eq!(String::from_utf8_lossy(&raw.stdout), prompt["greedy_text"].as_str().unwrap());
    assert_ne!(chat.stdout, raw.stdout);
}

#[test]
fn generate_samples_reproducibly_with_a_seed() {
    let run = |seed: &str| {
        let out = lora(&[
            "generate", "--model", fixture("llama").to_str().unwrap(), "--prompt", "Hello",
            "--temp", "0.8", "--top-p", "0.9", "--top-k", "50", "--repetition-penalty", "1.1",
            "--seed", seed, "--max-tokens", "12", "--device", "cpu",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn generate_help_documents_every_flag() {
    let out = lora(&["generate", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model", "--prompt", "--max-tokens", "--temp", "--top-p", "--top-k", "--repetition-penalty",
        "--seed", "--system", "--ignore-chat-template", "--device", "--dtype",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// A copy of the llama fixture in a temporary directory, for breaking.
fn broken_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Rewrites model.safetensors through `edit`, which may drop or replace tensors.
fn rewrite_weights(dir: &Path, edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some((shape, data)) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            kept.push((name, shape, data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &path).unwrap();
}

fn assert_fails_with(dir: &Path, needles: &[&str]) {
    let out = greedy(dir, "Hello", "cpu");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert!(out.stdout.is_empty(), "nothing should reach stdout on error");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
}

#[test]
fn a_missing_tensor_is_named_with_its_file() {
    let dir = broken_copy();
    rewrite_weights(dir.path(), |name, s, d| (name != "model.layers.1.mlp.up_proj.weight").then_some((s, d)));
    assert_fails_with(dir.path(), &["model.layers.1.mlp.up_proj.weight", "model.safetensors", "missing"]);
}

#[test]
fn a_shape_mismatch_names_both_shapes() {
    let dir = broken_copy();
    rewrite_weights(dir.path(), |name, s, d| {
        if name == "model.layers.0.self_attn.k_proj.weight" {
            // [32, 64] stored as [64, 32]
            Some((vec![s[1], s[0]], d))
        } else {
            Some((s, d))
        }
    });
    assert_fails_with(dir.path(), &["model.layers.0.self_attn.k_proj.weight", "[64, 32]", "[32, 64]"]);
}

#[test]
fn an_unknown_model_type_lists_the_supported_ones() {
    let dir = broken_copy();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&path, text).unwrap();
    assert_fails_with(dir.path(), &["gpt_neox", "llama, mistral, qwen2, qwen3"]);
}

#[test]
fn a_pickle_only_checkpoint_is_refused_with_a_reason() {
    let dir = broken_copy();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    assert_fails_with(dir.path(), &["pytorch_model.bin", "pickle", "safetensors"]);
}

#[test]
fn generate_on_wgpu_matches_the_cpu() {
    if lora_model::device::wgpu_device().is_none() {
        assert!(std::env::var_os("LORA_REQUIRE_WGPU").is_none(), "LORA_REQUIRE_WGPU is set but no wgpu adapter was found");
        eprintln!("no wgpu adapter: skipping");
        return;
    }
    let case = expected("mistral")["prompts"][0].clone();
    let out = lora(&[
        "generate", "--model", fixture("mistral").to_str().unwrap(), "--prompt",
        case["prompt"].as_str().unwrap(), "--temp", "0", "--ignore-chat-template", "--max-tokens",
        "20", "--device", "wgpu", "--dtype", "f32",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), case["greedy_text"].as_str().unwrap());
}
