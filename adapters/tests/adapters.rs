//! Adapters on the tiny Llama fixture: the adapted forward equals the merged weight's, and
//! both file layouts carry the weights without loss.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use lora_adapters::format::{self, AdapterFormat};
use lora_adapters::{AdapterError, AdapterSpec, FineTuneType, Scale, adapter_weights, add_adapters, set_adapters, trainable_count};
use lora_model::{CausalLm, Checkpoint, ModelConfig, Weight};

fn fixture() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llama"))
}

fn load() -> CausalLm {
    let config = ModelConfig::from_dir(fixture()).unwrap();
    let ckpt = Checkpoint::open(fixture()).unwrap();
    CausalLm::load(&config, &ckpt, &Device::flex(), DType::F32, |_| {}).unwrap()
}

fn logits(model: &CausalLm) -> Vec<f32> {
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(vec![1i32, 15, 300, 42, 7, 99], [1, 6]), &model.device());
    model.forward(tokens, None).into_data().convert::<f32>().try_into_vec().unwrap()
}

/// Gives every B random values, so the adapters change the output.
fn randomize_b(model: &mut CausalLm) {
    let mut weights = adapter_weights(model);
    for (i, w) in weights.iter_mut().enumerate() {
        w.b = (0..w.b.len()).map(|j| (((i * 131 + j * 7919) % 1000) as f32 / 1000.0 - 0.5) * 0.05).collect();
    }
    set_adapters(model, &weights, 0.0, Path::new("test")).unwrap();
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn adapted_forward_equals_the_merged_weight() {
    for kind in [FineTuneType::Lora, FineTuneType::Dora] {
        let mut model = load();
        let base = logits(&model);
        let spec = AdapterSpec { fine_tune_type: kind, num_layers: 1, rank: 4, scale: Scale::Alpha { alpha: 8.0, rslora: false }, ..Default::default() };
        let n = add_adapters(&mut model, &spec, 3).unwrap();
        assert_eq!(n, 7, "every projection of the last block");
        // B = 0: the adapted model is the base model.
        assert!(max_diff(&logits(&model), &base) < 1e-6);
        randomize_b(&mut model);
        let adapted = logits(&model);
        assert!(max_diff(&adapted, &base) > 1e-3, "the adapters must change the output");
        // Merge by hand: W' = W + s·B·A (DoRA: rescaled to the magnitude per row).
        let last = model.model.layers.len() - 1;
        for (_, linear) in model.model.layers[last].projections_mut() {
            let adapter = linear.adapter.take().unwrap();
            let mut w = linear.weight.dense() + adapter.delta();
            if let Some(m) = &adapter.magnitude {
                let norm = w.clone().square().sum_dim(1).sqrt(); // [out, 1]
                w = w * (m.val().unsqueeze_dim::<2>(1) / norm);
            }
            linear.weight = Weight::Dense(Param::from_tensor(w));
        }
        let merged = logits(&model);
        let d = max_diff(&adapted, &merged);
        assert!(d < 1e-4, "{kind:?}: adapted and merged logits differ by {d}");
    }
}

#[test]
fn peft_and_mlx_layouts_round_trip() {
    let mut model = load();
    let spec = AdapterSpec {
        num_layers: 2,
        rank: 4,
        keys: Some(vec!["q_proj".into(), "mlp.down_proj".into()]),
        scale: Scale::Raw(20.0),
        dropout: 0.1,
        ..Default::default()
    };
    add_adapters(&mut model, &spec, 5).unwrap();
    randomize_b(&mut model);
    assert_eq!(trainable_count(&model), adapter_weights(&model).iter().map(|w| w.a.len() + w.b.len()).sum::<usize>());
    let original = adapter_weights(&model);
    assert_eq!(original.len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let (peft, mlx) = (dir.path().join("peft"), dir.path().join("mlx"));
    format::save(&peft, AdapterFormat::Peft, &spec, &original, "tests/fixtures/llama", None).unwrap();
    let read = format::load(&peft).unwrap();
    assert_eq!(read.format, AdapterFormat::Peft);
    let modules = |w: &[lora_adapters::AdapterWeights]| w.iter().map(|w| w.module.clone()).collect::<Vec<_>>();
    assert_eq!(modules(&read.weights), modules(&original));
    assert!(read.weights == original, "PEFT round trip changed the weights");
    assert_eq!(read.spec.scale.value(4), 20.0, "lora_alpha = scale·r");
    assert_eq!(read.spec.dropout, 0.1);
    // PEFT -> mlx-lm -> ours: nothing lost.
    format::save(&mlx, AdapterFormat::Mlx, &read.spec, &read.weights, "", None).unwrap();
    let again = format::load(&mlx.join("adapters.safetensors")).unwrap();
    assert_eq!(again.format, AdapterFormat::Mlx);
    assert!(again.weights == original, "PEFT -> mlx-lm -> ours changed the weights");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(mlx.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["lora_parameters"]["scale"], 20.0);
    assert_eq!(config["lora_parameters"]["keys"], serde_json::json!(["self_attn.q_proj", "mlp.down_proj"]));
}

/// Issue 14, defect 6: writing one layout over a directory of the other replaces its adapter
/// whole (the old weights would otherwise win when it is read), and a directory holding both
/// layouts is refused as ambiguous instead of read as either.
#[test]
fn an_adapter_written_over_the_other_layout_replaces_it_and_mixed_directories_are_refused() {
    let mut model = load();
    let spec = AdapterSpec { num_layers: 1, rank: 2, ..Default::default() };
    add_adapters(&mut model, &spec, 1).unwrap();
    randomize_b(&mut model);
    let weights = adapter_weights(&model);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    format::save(&out, AdapterFormat::Mlx, &spec, &weights, "", None).unwrap();
    let mut changed = weights.clone();
    changed[0].b[0] += 1.0;
    format::save(&out, AdapterFormat::Peft, &spec, &changed, "", None).unwrap();
    assert!(!out.join("adapters.safetensors").exists(), "the mlx-lm weights are gone");
    let read = format::load(&out).unwrap();
    assert_eq!(read.format, AdapterFormat::Peft);
    assert!(read.weights == changed);

    std::fs::copy(out.join("adapter_model.safetensors"), out.join("adapters.safetensors")).unwrap();
    let e = format::load(&out).unwrap_err().to_string();
    assert!(e.contains("both") && e.contains(out.to_str().unwrap()), "{e}");
    assert!(format::load(&out.join("adapter_model.safetensors")).is_ok(), "naming the file still works");
}

/// Issue 14, defect 10: a config whose rank disagrees with the tensors is refused, naming the
/// config, both ranks and the module.
#[test]
fn a_config_rank_that_disagrees_with_the_tensors_is_refused() {
    let mut model = load();
    let spec = AdapterSpec { num_layers: 1, rank: 4, scale: Scale::Alpha { alpha: 8.0, rslora: false }, ..Default::default() };
    add_adapters(&mut model, &spec, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    format::save(dir.path(), AdapterFormat::Peft, &spec, &adapter_weights(&model), "", None).unwrap();
    let path = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["r"] = serde_json::json!(16);
    std::fs::write(&path, config.to_string()).unwrap();
    let e = format::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json") && e.contains("rank is 16") && e.contains("rank 4") && e.contains("model.layers.1"), "{e}");
}

#[test]
fn an_adapter_that_does_not_fit_names_the_tensor_and_both_shapes() {
    let mut model = load();
    let spec = AdapterSpec { num_layers: 1, rank: 2, keys: Some(vec!["self_attn.o_proj".into()]), ..Default::default() };
    add_adapters(&mut model, &spec, 0).unwrap();
    let mut weights = adapter_weights(&model);
    let inputs = weights[0].inputs;
    weights[0].inputs = inputs + 1;
    weights[0].a.extend([0.0; 2]);
    let err = set_adapters(&mut model, &weights, 0.0, Path::new("x/adapter_model.safetensors")).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AdapterError::ShapeMismatch { .. }), "{text}");
    assert!(text.contains("self_attn.o_proj.lora_A") && text.contains(&format!("[2, {inputs}]")) && text.contains(&format!("[2, {}]", inputs + 1)), "{text}");

    let err = add_adapters(&mut model, &AdapterSpec { keys: Some(vec!["qproj".into()]), ..Default::default() }, 0).unwrap_err();
    assert!(err.to_string().contains("\"qproj\""), "{err}");
}

/// Issue 14, defect 10: a PEFT adapter whose `target_modules` match none of its tensors' modules
/// (or an mlx-lm one whose `keys` leave some out) was applied anyway, where PEFT and mlx-lm
/// would leave those tensors out; it is an error naming the key and the uncovered module.
#[test]
fn target_modules_that_do_not_cover_the_tensors_are_an_error() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fuse_reference");
    for (kind, weights, key, edit) in [
        ("lora", "adapter_model.safetensors", "target_modules", serde_json::json!(["foo_proj"])),
        ("lora", "adapter_model.safetensors", "target_modules", serde_json::json!(["q_proj", "v_proj"])),
        ("mlx", "adapters.safetensors", "keys", serde_json::json!(["self_attn.q_proj"])),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(source.join(kind).join(weights), dir.path().join(weights)).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source.join(kind).join("adapter_config.json")).unwrap()).unwrap();
        assert!(format::load(&source.join(kind)).is_ok(), "{kind}: the fixture itself loads");
        if kind == "mlx" {
            config["lora_parameters"][key] = edit;
        } else {
            config[key] = edit;
        }
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        let e = format::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains("does not cover model.layers."), "{kind}: {e}");
    }
}

/// Issue 14, defect 11: a `lora_A` of the wrong rank was reported as its `lora_B`, and a
/// module whose `lora_A` is missing was dropped without a word (only B names were there).
#[test]
fn a_damaged_or_missing_lora_a_is_named_as_such() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fuse_reference/lora");
    let bytes = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let a_name = st.names().into_iter().find(|n| n.ends_with("q_proj.lora_A.weight")).unwrap().to_string();
    let write = |drop_a: bool| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(source.join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
        let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            if name == a_name {
                if drop_a {
                    continue;
                }
                // One row fewer: rank r - 1.
                let shape = view.shape().to_vec();
                let row = shape[1] * 4;
                owned.push((name.clone(), vec![shape[0] - 1, shape[1]], view.data()[..view.data().len() - row].to_vec()));
                continue;
            }
            tensors.push((name, view));
        }
        let owned_views: Vec<(String, safetensors::tensor::TensorView)> =
            owned.iter().map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())).collect();
        tensors.extend(owned_views);
        safetensors::serialize_to_file(tensors, None, &dir.path().join("adapter_model.safetensors")).unwrap();
        dir
    };
    let e = format::load(write(false).path()).unwrap_err().to_string();
    assert!(e.contains(&a_name) && !e.contains("lora_B"), "{e}");
    let e = format::load(write(true).path()).unwrap_err().to_string();
    assert!(e.contains(&format!("{a_name} is missing")), "{e}");
}
