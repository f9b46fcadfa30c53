//! GGUF export (`lora fuse --export-gguf`, `lora convert-adapter --to gguf`) against
//! llama.cpp's own converters and llama.cpp's own logits (`tests/fixtures/gguf_reference`,
//! made by its script).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::process::Output;

use common::{all_logits, fixture, fuse_reference, load_model, lora, max_diff, s, stderr};
use gguf_rs_lib::format::metadata::MetadataValue;
use gguf_rs_lib::reader::GGUFFileReader;
use gguf_rs_lib::tensor::TensorType;
use lora_model::CausalLm;
use lora_model::checkpoint::decode_floats;
use safetensors::Dtype;
use serde_json::Value;

/// Metadata llama.cpp's converters take from a model card or a directory's name: not the model.
const DESCRIPTIVE: &[&str] = &["general.name", "general.size_label", "general.tags", "general.base_model."];

/// Keys we write for every architecture where llama.cpp's converter writes them for some
/// (Llama, or a config.json with `head_dim`): each holds the value llama.cpp would derive.
const DERIVED: &[&str] = &[".attention.key_length", ".attention.value_length", ".rope.dimension_count", ".vocab_size"];

struct Gguf {
    metadata: BTreeMap<String, MetadataValue>,
    /// name -> (type, ne, values as f32)
    tensors: BTreeMap<String, (TensorType, Vec<u64>, Vec<f32>)>,
}

/// `lora convert-adapter --adapter-path <adapter> --to gguf --model <model> --save-path <save>
/// <extra>`.
fn to_gguf(adapter: &str, model: &str, save: &str, extra: &[&str]) -> Output {
    let args = ["convert-adapter", "--adapter-path", adapter, "--to", "gguf", "--model", model, "--save-path", save];
    lora(&[&args[..], extra].concat())
}

fn read(path: &Path) -> Gguf {
    let mut r = GGUFFileReader::new(File::open(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let metadata = r.metadata().data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let infos: Vec<_> = r.tensor_infos().to_vec();
    let mut tensors = BTreeMap::new();
    for info in infos {
        let data = r.load_tensor_data(info.name()).unwrap().unwrap();
        let dtype = match info.tensor_type() {
            TensorType::F32 => Dtype::F32,
            TensorType::F16 => Dtype::F16,
            t => panic!("{}: unexpected type {t:?}", info.name()),
        };
        let values = decode_floats(data.as_slice(), dtype).unwrap();
        tensors.insert(info.name().to_string(), (info.tensor_type(), info.shape().dims().to_vec(), values));
    }
    Gguf { metadata, tensors }
}

/// Ours holds every key of the reference with the same value (descriptive keys aside) and no
/// others (but [`DERIVED`] ones), and the same tensors with the same types and shapes; f16
/// values within one unit in the last place, f32 values within 1e-6 relative.
fn assert_matches(ours: &Path, reference: &Path) {
    let (a, b) = (read(ours), read(reference));
    for key in a.metadata.keys() {
        let allowed = b.metadata.contains_key(key) || DESCRIPTIVE.iter().chain(DERIVED).any(|d| key.starts_with(d) || key.ends_with(d));
        assert!(allowed, "{}: {key} is not in llama.cpp's converter's output", ours.display());
    }
    for (key, value) in &b.metadata {
        if DESCRIPTIVE.iter().any(|d| key.starts_with(d)) {
            continue;
        }
        let mine = a.metadata.get(key).unwrap_or_else(|| panic!("{}: {key} missing (reference: {value:?})", ours.display()));
        assert_eq!(mine, value, "{}: {key}", ours.display());
    }
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>(), "{}", ours.display());
    for (name, (ty, ne, values)) in &a.tensors {
        let (rty, rne, rvalues) = &b.tensors[name];
        assert_eq!((ty, ne), (rty, rne), "{name}");
        for (x, y) in values.iter().zip(rvalues) {
            let close = match ty {
                TensorType::F16 => (half::f16::from_f32(*x).to_bits() as i32 - half::f16::from_f32(*y).to_bits() as i32).abs() <= 1,
                _ => (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
            };
            assert!(close, "{name}: {x} against llama.cpp's converter's {y}");
        }
    }
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("gguf_reference/expected.json")).unwrap()).unwrap()
}

/// Logits at every position of the reference ids, `[n * vocab]`.
fn logits(model: &CausalLm) -> Vec<f32> {
    all_logits(model, expected()["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect())
}

/// llama.cpp's logits (`[n][vocab]` in expected.json), flattened.
fn llama_cpp_logits(key: &str) -> Vec<f32> {
    expected()[key].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)).collect()
}

/// Our tokenizer (the `tokenizers` crate on the model's tokenizer.json, special tokens
/// added) gives the reference text the ids llama.cpp gave it (`expected[key]`).
fn assert_tokenizes_as_llama_cpp(model: &str, key: &str) {
    let e = expected();
    let tokenizer = tokenizers::Tokenizer::from_file(fixture(model).join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode(e["text"].as_str().unwrap(), true).unwrap().get_ids().to_vec();
    let llama_cpp: Vec<u32> = e[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, llama_cpp, "{model}");
}

/// A copy of the fixture model `name` at `to`.
fn copy_model(name: &str, to: &Path) -> std::path::PathBuf {
    std::fs::create_dir(to).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to.to_path_buf()
}

/// `lora fuse` of `adapter` into `model`, saving to `fused` and exporting `gguf`.
fn fuse_with_gguf(model: &Path, adapter: &Path, fused: &Path, gguf: &Path) {
    ok(&lora(&["fuse", "--model", s(model), "--adapter-path", s(adapter), "--save-path", s(fused), "--export-gguf", s(gguf)]));
}

/// llama.cpp's logits at every position (`expected[key]`, run on the converter's file, which
/// equals ours by `assert_matches`) are those of our fused model in `fused`, within f16
/// weights' rounding.
fn assert_llama_cpp_logits(fused: &Path, key: &str) {
    let diff = max_diff(&logits(&load_model(fused)), &llama_cpp_logits(key));
    eprintln!("{key}: llama.cpp's logits on the converter's file (equal to ours) against ours, max difference {diff}");
    assert!(diff < 0.02, "{key}: llama.cpp's logits differ from ours by {diff}");
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Files and directories in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn export_gguf_writes_what_llama_cpp_converts_and_llama_cpp_runs_it_as_we_do() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("llama.gguf");
    let fused = tmp.path().join("fused");
    fuse_with_gguf(&fixture("llama"), &fixture("fuse_reference/lora"), &fused, &gguf);
    // The Llama fixture has grouped-query attention (q/k rows reordered for llama.cpp's
    // rotation) and Llama 3.1 rope scaling (a rope_freqs tensor).
    assert_matches(&gguf, &fixture("gguf_reference/llama_lora_f16.gguf"));
    assert_eq!(entries(tmp.path()), ["fused", "llama.gguf"], "no temporary file is left");

    // llama.cpp ran the converter's file (equal to ours, as just checked; the fixture script's
    // --check mode runs llama.cpp on ours directly) on the reference ids: its logits at every
    // position are our fused model's, within f16 weights' rounding.
    assert_llama_cpp_logits(&fused, "fused");

    // And its tokenizer, built from that file's tokenizer metadata (equal to ours), splits
    // text as our tokenizer does.
    assert_tokenizes_as_llama_cpp("llama", "llama_cpp_tokens");
}

#[test]
fn a_byte_level_tokenizer_json_wins_over_a_tokenizer_model_beside_it() {
    // Some Llama 3 directories carry tiktoken's vocabulary under the name tokenizer.model.
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model("llama", &tmp.path().join("llama"));
    std::fs::write(model.join("tokenizer.model"), "IQ== 0\nIg== 1\n").unwrap();
    let gguf = tmp.path().join("llama.gguf");
    fuse_with_gguf(&model, &fixture("fuse_reference/lora"), &tmp.path().join("fused"), &gguf);
    assert_matches(&gguf, &fixture("gguf_reference/llama_lora_f16.gguf"));
}

#[test]
fn qwen_and_mistral_models_export_as_llama_cpp_converts_them() {
    // Qwen2: q/k/v biases, tied embeddings. Qwen3: q/k norms, head_dim 24 (not
    // hidden/heads). Neither reorders rows: llama.cpp rotates them as transformers does.
    // Mistral (as 7B v0.3): GGUF's llama, with a SentencePiece tokenizer.model whose pieces,
    // scores and types become GGUF's `llama` tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    for (model, key) in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gguf_reference/mistral_spm", "mistral_spm")] {
        let gguf = tmp.path().join(format!("{key}.gguf"));
        let fused = tmp.path().join(key);
        fuse_with_gguf(&fixture(model), &fixture(&format!("gguf_reference/{key}_lora")), &fused, &gguf);
        assert_matches(&gguf, &fixture(&format!("gguf_reference/{key}_lora_f16.gguf")));
        assert_llama_cpp_logits(&fused, key);
    }
    // llama.cpp's SentencePiece tokenizer, from the metadata we write, splits text as ours.
    assert_tokenizes_as_llama_cpp("gguf_reference/mistral_spm", "mistral_spm_llama_cpp_tokens");
}

#[test]
fn gguf_lora_adapters_match_llama_cpp_s_converter_and_its_logits() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, adapter, reference) in [
        ("llama", "fuse_reference/lora", "lora.gguf"),
        ("qwen2", "gguf_reference/qwen2_lora", "qwen2_lora.gguf"),
        ("qwen3", "gguf_reference/qwen3_lora", "qwen3_lora.gguf"),
        ("gguf_reference/mistral_spm", "gguf_reference/mistral_spm_lora", "mistral_spm_lora.gguf"),
    ] {
        let out = tmp.path().join(reference);
        ok(&to_gguf(s(&fixture(adapter)), s(&fixture(model)), s(&out), &[]));
        assert_matches(&out, &fixture("gguf_reference").join(reference));
    }
    // llama.cpp with the base GGUF and `--lora lora.gguf` gives the logits of our base with
    // the adapter unmerged.
    let mut model = load_model(&fixture("llama"));
    let file = lora_adapters::format::load(&fixture("fuse_reference/lora")).unwrap();
    lora_adapters::set_adapters(&mut model, &file.weights, 0.0, &file.path).unwrap();
    let diff = max_diff(&logits(&model), &llama_cpp_logits("adapter"));
    eprintln!("llama.cpp --lora against our unmerged adapter, max difference {diff}");
    assert!(diff < 0.02, "llama.cpp's logits with the GGUF adapter differ from ours by {diff}");
}

#[test]
fn alpha_is_what_makes_llama_cpp_apply_each_adapter_s_own_scale() {
    // llama.cpp applies alpha / rank. rsLoRA's scale is lora_alpha / sqrt(rank), so the file
    // carries lora_alpha · sqrt(rank) (llama.cpp's converter copies lora_alpha and so
    // applies rsLoRA adapters at the wrong scale); mlx-lm's raw scale s carries s · rank.
    let tmp = tempfile::tempdir().unwrap();
    let rs = tmp.path().join("rslora");
    std::fs::create_dir(&rs).unwrap();
    let src = fixture("fuse_reference/lora");
    std::fs::copy(src.join("adapter_model.safetensors"), rs.join("adapter_model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    config["use_rslora"] = Value::Bool(true);
    std::fs::write(rs.join("adapter_config.json"), config.to_string()).unwrap();
    for (adapter, model, alpha) in [(rs.as_path(), "llama", 8.0 * 2.0), (&fixture("fuse_reference/mlx"), "llama_mlx_q4", 2.0 * 4.0)] {
        let out = tmp.path().join("out.gguf");
        ok(&to_gguf(s(adapter), s(&fixture(model)), s(&out), &["--force"]));
        let g = read(&out);
        assert_eq!(g.metadata["adapter.lora.alpha"], MetadataValue::F32(alpha), "{}", adapter.display());
        // B as trained (v_proj is not reordered).
        let file = lora_adapters::format::load(adapter).unwrap();
        let v = file.weights.iter().find(|w| w.module == "model.layers.1.self_attn.v_proj").unwrap();
        assert_eq!(g.tensors["blk.1.attn_v.weight.lora_b"].2, v.b);
        assert_eq!(g.tensors["blk.1.attn_v.weight.lora_a"].2, v.a);
    }
}

#[test]
fn a_quantized_base_exports_its_dequantized_fusion() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("q4.gguf");
    let float = tmp.path().join("float");
    ok(&lora(&[
        "fuse",
        "--model",
        "tests/fixtures/llama_mlx_q4",
        "--adapter-path",
        "tests/fixtures/fuse_reference/mlx",
        "--save-path",
        s(&float),
        "--dequantize",
        "--dtype",
        "f32",
        "--export-gguf",
        s(&gguf),
    ]));
    let g = read(&gguf);
    // The GGUF holds the float fusion in f16: compare one adapted and one plain weight.
    let bytes = std::fs::read(float.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (hf, name) in [("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"), ("model.embed_tokens.weight", "token_embd.weight")] {
        let t = st.tensor(hf).unwrap();
        let want: Vec<f32> = decode_floats(t.data(), t.dtype()).unwrap().into_iter().map(|v| half::f16::from_f32(v).to_f32()).collect();
        let (ty, ne, values) = &g.tensors[name];
        assert_eq!((*ty, ne.iter().rev().map(|&d| d as usize).collect::<Vec<_>>()), (TensorType::F16, t.shape().to_vec()), "{name}");
        assert_eq!(values, &want, "{name}");
    }
}

#[test]
fn what_gguf_cannot_hold_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // DoRA: llama.cpp's --lora has no magnitude.
    let out = tmp.path().join("dora.gguf");
    let o = to_gguf("tests/fixtures/fuse_reference/dora", "tests/fixtures/llama", s(&out), &[]);
    assert!(!o.status.success() && stderr(&o).contains("DoRA"), "{}", stderr(&o));
    // No base model.
    let o = lora(&["convert-adapter", "--adapter-path", "tests/fixtures/fuse_reference/lora", "--to", "gguf", "--save-path", s(&out)]);
    assert!(!o.status.success() && stderr(&o).contains("--model"), "{}", stderr(&o));
    // An adapter for another model names the tensor and both shapes.
    let o = to_gguf("tests/fixtures/fuse_reference/lora", "tests/fixtures/mistral", s(&out), &[]);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("q_proj.lora_B") && stderr(&o).contains("[64, 4]") && stderr(&o).contains("[128, 4]"), "{}", stderr(&o));
    assert_eq!(entries(tmp.path()), Vec::<String>::new());

    // A copy of the llama fixture named `name` with its tokenizer.json edited, fused with a
    // GGUF export that must fail: its stderr.
    let refused = |name: &str, edit: &dyn Fn(&mut Value)| -> String {
        let model = copy_model("llama", &tmp.path().join(name));
        let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap()).unwrap();
        edit(&mut tok);
        std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
        let gguf = tmp.path().join(format!("{name}.gguf"));
        let o = fuse_reference(s(&model), s(&tmp.path().join("fused")), &["--export-gguf", s(&gguf)]);
        assert!(!o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    // A SentencePiece tokenizer without its tokenizer.model: llama.cpp's gpt2 vocabulary
    // cannot hold it, and the scores are in tokenizer.model. Neither the model directory nor
    // the GGUF is written.
    let err = refused("spm", &|tok| tok["model"]["byte_fallback"] = Value::Bool(true));
    assert!(err.contains("tokenizer.json") && err.contains("tokenizer.model"), "{err}");
    assert_eq!(entries(tmp.path()), ["spm"]);

    // A pre-tokenizer llama.cpp has no name for (a split on digits before the byte-level
    // mapping): refused by name, and again nothing is written.
    let err = refused("unk", &|tok| {
        tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
    });
    assert!(err.contains("tokenizer.json") && err.contains("pre-tokenizer"), "{err}");
    assert_eq!(entries(tmp.path()), ["spm", "unk"]);
    std::fs::remove_dir_all(tmp.path().join("unk")).unwrap();

    // Sliding-window attention: llama.cpp's llama architecture would attend past the window
    // (on the Mistral fixture, window 8, its logits at position 10 are off by 7.7).
    let o = fuse_reference("tests/fixtures/mistral", s(&tmp.path().join("fused")), &["--export-gguf", s(&tmp.path().join("m.gguf"))]);
    assert!(!o.status.success() && stderr(&o).contains("sliding-window"), "{}", stderr(&o));
    assert_eq!(entries(tmp.path()), ["spm"]);

    // A GGUF inside the save path would go with the directory it replaces; one inside an
    // input would write into it. Spelled differently, they are still caught.
    std::fs::create_dir(tmp.path().join("fused")).unwrap();
    for (save, gguf) in [("fused", "./fused/m.gguf"), ("./fused", "fused/sub/m.gguf"), ("fused2", "tests/fixtures/llama/m.gguf")] {
        let save = tmp.path().join(save);
        let gguf = if gguf.starts_with("tests/") { common::root().join(gguf) } else { tmp.path().join(gguf) };
        let o = fuse_reference("tests/fixtures/llama", s(&save), &["--export-gguf", s(&gguf), "--force"]);
        assert!(!o.status.success() && stderr(&o).contains("inside"), "{}", stderr(&o));
    }
    assert!(!fixture("llama/m.gguf").exists());
    std::fs::remove_dir(tmp.path().join("fused")).unwrap();

    // An existing file is not replaced without --force.
    let taken = tmp.path().join("taken.gguf");
    std::fs::write(&taken, b"mine").unwrap();
    let o = to_gguf("tests/fixtures/fuse_reference/lora", "tests/fixtures/llama", s(&taken), &[]);
    assert!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
    // With --force it is replaced, and only then.
    ok(&to_gguf("tests/fixtures/fuse_reference/lora", "tests/fixtures/llama", s(&taken), &["--force"]));
    assert_matches(&taken, &fixture("gguf_reference/lora.gguf"));
}
