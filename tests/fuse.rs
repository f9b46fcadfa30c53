//! `lora fuse`, `lora convert-adapter` and adapters at inference, against PEFT's and
//! mlx-lm's own results (`tests/fixtures/fuse_reference`, made by its script).

mod common;

use std::path::Path;
use std::process::Output;

use common::{all_logits, copy_files, fixture, fuse_reference, load_model, lora, max_diff, s, tensors};
use lora_model::CausalLm;
use serde_json::Value;

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("fuse_reference/expected.json")).unwrap()).unwrap()
}

fn load(dir: &Path) -> CausalLm {
    load_model(dir)
}

/// Last-position logits of `model` on the reference ids.
fn logits(model: &CausalLm) -> Vec<f32> {
    let ids: Vec<i32> = expected()["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
    let n = ids.len();
    let all = all_logits(model, ids);
    all[all.len() - all.len() / n..].to_vec()
}

fn reference_logits(key: &str) -> Vec<f32> {
    expected()[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn with_adapter(base: &Path, adapter: &Path) -> CausalLm {
    let mut model = load(base);
    let file = lora_adapters::format::load(adapter).unwrap();
    lora_adapters::set_adapters(&mut model, &file.weights, 0.0, &file.path).unwrap();
    model
}

#[test]
fn fused_weights_equal_peft_merge_and_unload_and_the_unmerged_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["lora", "dora"] {
        let adapter = fixture("fuse_reference").join(kind);
        let out = tmp.path().join(kind);
        ok(&lora(&["fuse", "--model", "tests/fixtures/llama", "--adapter-path", s(&adapter), "--save-path", s(&out)]));
        // The weights, against PEFT's merge_and_unload().
        let (ours, peft) = (tensors(&out.join("model.safetensors")), tensors(&fixture("fuse_reference").join(format!("{kind}_merged.safetensors"))));
        assert_eq!(ours.iter().map(|t| &t.0).collect::<Vec<_>>(), peft.iter().map(|t| &t.0).collect::<Vec<_>>(), "{kind}");
        let worst = ours.iter().zip(&peft).map(|(a, b)| max_diff(&a.1, &b.1)).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{kind}: fused weights differ from PEFT's by {worst}");
        // A complete model directory.
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
            assert!(out.join(f).is_file(), "{kind}: {f}");
        }
        // Base plus the unmerged adapter, the fused model, and PEFT.
        let unmerged = logits(&with_adapter(&fixture("llama"), &adapter));
        let fused = logits(&load(&out));
        let d = max_diff(&unmerged, &fused);
        assert!(d < 1e-5, "{kind}: unmerged vs fused logits {d}");
        let d = max_diff(&unmerged, &reference_logits(kind));
        assert!(d < 1e-4, "{kind}: unmerged logits vs PEFT's {d}");
    }
}

#[test]
fn an_mlx_lm_adapter_gives_mlx_lms_logits() {
    // Over the 4-bit fixture, whose logits match mlx-lm's without an adapter.
    let unmerged = logits(&with_adapter(&fixture("llama_mlx_q4"), &fixture("fuse_reference/mlx")));
    let d = max_diff(&unmerged, &reference_logits("mlx"));
    assert!(d < 1e-4, "logits differ from mlx-lm's by {d}");
}

#[test]
fn a_four_bit_base_fuses_to_four_bits_or_to_float_and_the_cost_is_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let (q, f) = (tmp.path().join("q4"), tmp.path().join("float"));
    let base = fixture("llama_mlx_q4");
    let adapter = fixture("fuse_reference/mlx");
    ok(&lora(&["fuse", "--model", s(&base), "--adapter-path", s(&adapter), "--save-path", s(&q)]));
    ok(&lora(&["fuse", "--model", s(&base), "--adapter-path", s(&adapter), "--save-path", s(&f), "--dequantize"]));
    let config = |d: &Path| -> Value { serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap() };
    assert!(config(&q).get("quantization").is_some(), "the 4-bit output keeps its quantization section");
    assert!(config(&f).get("quantization").is_none(), "the float output has none");
    // The float fuse is exact: it equals the quantized base with the adapter unmerged.
    let unmerged = logits(&with_adapter(&base, &adapter));
    let float = logits(&load(&f));
    assert!(max_diff(&unmerged, &float) < 1e-4, "{}", max_diff(&unmerged, &float));
    // Quantizing the merged weights again costs some accuracy: measured, and bounded.
    let cost = max_diff(&logits(&load(&q)), &float);
    eprintln!("4-bit fuse: max logit difference against the float fuse {cost:.4}");
    assert!(cost > 0.0 && cost < 1.0, "{cost}");
}

#[test]
fn fuse_refuses_to_overwrite_and_names_a_misfit_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = fuse_reference("tests/fixtures/llama", s(&out), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    let o = fuse_reference("tests/fixtures/llama", "tests/fixtures/llama", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("inputs"), "{}", String::from_utf8_lossy(&o.stderr));
    // With --force the old contents are replaced, atomically.
    ok(&fuse_reference("tests/fixtures/llama", s(&out), &["--force", "--dtype", "f16"]));
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["dtype"], "float16");
    // An adapter for another model: the first tensor that does not fit, with both shapes.
    let o = fuse_reference("tests/fixtures/qwen3", s(&tmp.path().join("x")), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("model.layers.0.self_attn.q_proj.lora_B") && err.contains("[96, 4]") && err.contains("[64, 4]"), "{err}");
    assert!(!tmp.path().join("x").exists(), "nothing half-written");
    // The same failure with --force over an existing output: the old output stays whole and
    // nothing is left beside it (no temporary or set-aside directory).
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let o = fuse_reference("tests/fixtures/qwen3", s(&out), &["--force"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["out"]);
}

/// The tree under `dir`: every file's path and bytes, sorted.
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// README: "the inputs are never written", with --force too: fuse and convert-adapter refuse a
/// save path that is, holds or lies inside the model or the adapter. On copies, so that a
/// broken check could not touch tests/fixtures.
#[test]
fn force_never_writes_fuse_or_convert_output_into_their_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter) = (tmp.path().join("m"), tmp.path().join("a"));
    for (from, to) in [(fixture("llama"), &model), (fixture("fuse_reference").join("lora"), &adapter)] {
        std::fs::create_dir(to).unwrap();
        copy_files(&from, to);
    }
    let before = tree(tmp.path());
    for out in [model.clone(), adapter.clone(), tmp.path().to_path_buf(), model.join("sub")] {
        let o = lora(&["fuse", "--model", s(&model), "--adapter-path", s(&adapter), "--save-path", s(&out), "--force"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", out.display());
        assert!(err.contains("inputs"), "{err}");
        assert_eq!(tree(tmp.path()), before, "{}", out.display());
    }
    for out in [adapter.clone(), tmp.path().to_path_buf(), adapter.join("sub")] {
        let o = lora(&["convert-adapter", "--adapter-path", s(&adapter), "--save-path", s(&out), "--force"]);
        assert_eq!(o.status.code(), Some(2), "{}: {}", out.display(), String::from_utf8_lossy(&o.stderr));
        assert_eq!(tree(tmp.path()), before, "{}", out.display());
    }
}

#[test]
fn convert_adapter_round_trips_peft_and_mlx() {
    let tmp = tempfile::tempdir().unwrap();
    let (mlx, back) = (tmp.path().join("mlx"), tmp.path().join("peft"));
    ok(&lora(&["convert-adapter", "--adapter-path", "tests/fixtures/fuse_reference/dora", "--save-path", s(&mlx)]));
    assert!(mlx.join("adapters.safetensors").is_file());
    ok(&lora(&["convert-adapter", "--adapter-path", s(&mlx), "--save-path", s(&back)]));
    let (a, b) = (tensors(&back.join("adapter_model.safetensors")), tensors(&fixture("fuse_reference/dora/adapter_model.safetensors")));
    assert_eq!(a, b, "PEFT -> mlx-lm -> PEFT loses nothing");
    let o = lora(&["convert-adapter", "--adapter-path", s(&mlx), "--save-path", s(&back)]);
    assert_eq!(o.status.code(), Some(2), "a non-empty save path is refused");
}

#[test]
fn generate_applies_several_weighted_adapters() {
    let greedy = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", "tests/fixtures/llama", "--prompt", "Hello, world!", "--max-tokens", "12", "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = lora(&args);
        ok(&o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (a, b) = ("tests/fixtures/fuse_reference/lora", "tests/fixtures/fuse_reference/mlx");
    let one = greedy(&["--adapter-path", a]);
    assert_ne!(one, greedy(&[]), "the adapter changes the output");
    assert_eq!(greedy(&["--adapter-path", a, "--adapter-path", b, "--adapter-scales", "1,0"]), one);
    assert_eq!(greedy(&["--adapter-path", b, "--adapter-path", a, "--adapter-scales", "0,1"]), one);
    let o = lora(&["generate", "--model", "tests/fixtures/llama", "--prompt", "x", "--adapter-path", a, "--adapter-scales", "1,2"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Issue 14, defect 6, as a user meets it: `convert-adapter --force` into a directory holding
/// the other layout leaves only the new adapter, which is what is read back.
#[test]
fn convert_adapter_force_over_the_other_layout_leaves_only_the_new_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("fuse_reference/lora").join(f), out.join(f)).unwrap();
    }
    ok(&lora(&["convert-adapter", "--adapter-path", "tests/fixtures/fuse_reference/dora", "--to", "mlx", "--save-path", s(&out), "--force"]));
    assert!(!out.join("adapter_model.safetensors").exists() && out.join("adapters.safetensors").is_file());
    let read = lora_adapters::format::load(&out).unwrap();
    let dora = lora_adapters::format::load(&fixture("fuse_reference/dora")).unwrap();
    assert!(read.weights == dora.weights, "the new adapter is the one read");
}

/// Issue 14, defect 9: fuse copies the model's known files only (a user's other files, here a
/// secret, stay behind), and not through a link that leaves the model directory; a Hugging Face
/// cache snapshot, whose every file links into the cache's `blobs/`, still fuses completely.
#[cfg(unix)]
#[test]
fn fuse_copies_only_the_known_files_and_never_through_a_link_out() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    copy_files(&fixture("llama"), &model);
    std::fs::write(model.join("notes.txt"), "private").unwrap();
    let secret = tmp.path().join("id_rsa");
    std::fs::write(&secret, "secret").unwrap();
    std::fs::remove_file(model.join("generation_config.json")).unwrap();
    symlink(&secret, model.join("generation_config.json")).unwrap();
    let out = tmp.path().join("fused");
    let o = fuse_reference(s(&model), s(&out), &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("outside the model directory"));
    assert!(!out.join("notes.txt").exists() && !out.join("generation_config.json").exists());
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // Issue 14, defect 12: the weights are as readable as their siblings.
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode();
    assert_eq!(mode("model.safetensors"), mode("config.json"));

    // models--x/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays it out.
    let repo = tmp.path().join("models--x");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots/0123abc"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(fixture("llama")).unwrap() {
        let entry = entry.unwrap();
        let blob = blobs.join(format!("blob-{}", entry.file_name().to_string_lossy()));
        std::fs::copy(entry.path(), &blob).unwrap();
        symlink(Path::new("../../blobs").join(blob.file_name().unwrap()), snapshot.join(entry.file_name())).unwrap();
    }
    let out = tmp.path().join("fused-cache");
    ok(&fuse_reference(s(&snapshot), s(&out), &[]));
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        assert!(out.join(f).is_file() && !out.join(f).is_symlink(), "{f}");
    }
}

/// Issue 14, defect 12: the fused `model.safetensors` was private (0600, as the safetensors
/// crate writes its files) while the `config.json` beside it was 0644. Under a umask of 022
/// both are 0644. (The files copied from the model keep the model's own modes.)
#[cfg(unix)]
#[test]
fn fused_weights_have_the_file_mode_of_their_siblings() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused");
    let args = ["fuse", "--model", "tests/fixtures/llama", "--adapter-path", "tests/fixtures/fuse_reference/lora", "--save-path", s(&out)];
    ok(&common::lora_with_umask("022", &args));
    let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("config.json"), 0o644, "config.json is written as the umask says");
    assert_eq!(mode("model.safetensors"), 0o644, "model.safetensors is {:o}", mode("model.safetensors"));
}
