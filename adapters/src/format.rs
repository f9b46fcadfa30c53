//! Adapter directories in PEFT's layout and in mlx-lm's, read and written.
//!
//! - PEFT: `adapter_config.json` and `adapter_model.safetensors`, tensors
//!   `base_model.model.<module>.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]`,
//!   DoRA's `.lora_magnitude_vector` `[out]`; the scale is `lora_alpha/r` (or `/√r`).
//! - mlx-lm: `adapter_config.json` and `adapters.safetensors`, tensors `<module>.lora_a`
//!   `[in, r]`, `.lora_b` `[r, out]`, DoRA's `.m` `[out]`; the scale is used as written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_model::checkpoint::{decode_floats, encode_floats};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value as Json, json};

use crate::AdapterError;
use crate::attach::AdapterWeights;
use crate::io::write_atomic;
use crate::spec::{AdapterSpec, FineTuneType, Scale};

/// The two adapter layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterFormat {
    /// Hugging Face PEFT (the default: PEFT, vLLM and transformers load it).
    #[default]
    Peft,
    /// mlx-lm.
    Mlx,
}

impl AdapterFormat {
    /// The weights file's name in an adapter directory.
    pub fn weights_file(self) -> &'static str {
        match self {
            Self::Peft => "adapter_model.safetensors",
            Self::Mlx => "adapters.safetensors",
        }
    }
}

/// The config file's name in both layouts.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// An adapter read from disk.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// The layout it was in.
    pub format: AdapterFormat,
    /// What its config says (rank, scale, dropout, type, layers, keys).
    pub spec: AdapterSpec,
    /// The weights, one entry per adapted projection.
    pub weights: Vec<AdapterWeights>,
    /// The weights file read.
    pub path: PathBuf,
}

impl AdapterFile {
    /// The directory the adapter was read from.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Reads an adapter: `path` is an adapter directory, or a weights file beside its
/// `adapter_config.json` (mlx-lm's `--resume-adapter-file`). The layout is detected from
/// the weights file's name, or its tensor names.
pub fn load(path: &Path) -> Result<AdapterFile, AdapterError> {
    let (dir, weights_path) = if path.is_dir() {
        let found: Vec<PathBuf> = [AdapterFormat::Peft, AdapterFormat::Mlx].into_iter().map(|f| path.join(f.weights_file())).filter(|p| p.is_file()).collect();
        if found.len() > 1 {
            return Err(AdapterError::invalid(
                path,
                "holds both adapter_model.safetensors (PEFT) and adapters.safetensors (mlx-lm), so which adapter it is is ambiguous; remove one, or name the weights file itself",
            ));
        }
        let weights = found.into_iter().next().ok_or_else(|| {
            AdapterError::invalid(path, "not an adapter directory: neither adapter_model.safetensors (PEFT) nor adapters.safetensors (mlx-lm)")
        })?;
        (path.to_path_buf(), weights)
    } else if path.is_file() {
        (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
    } else {
        return Err(AdapterError::invalid(path, "no such adapter file or directory"));
    };
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| AdapterError::io(&config_path, e))?;
    let config: Json = serde_json::from_str(&text).map_err(|e| AdapterError::invalid(&config_path, e.to_string()))?;
    let bytes = std::fs::read(&weights_path).map_err(|e| AdapterError::io(&weights_path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| AdapterError::invalid(&weights_path, e.to_string()))?;
    let peft = st.names().iter().any(|n| n.ends_with(".lora_A.weight"));
    let format = if peft { AdapterFormat::Peft } else { AdapterFormat::Mlx };
    let spec = match format {
        AdapterFormat::Peft => peft_spec(&config, &config_path)?,
        AdapterFormat::Mlx => mlx_spec(&config, &config_path)?,
    };
    let weights = read_weights(&st, format, &spec, &weights_path)?;
    let stated = match format {
        AdapterFormat::Peft => field(&config, "r"),
        AdapterFormat::Mlx => config.get("lora_parameters").and_then(|p| field(p, "rank")),
    };
    if let Some(r) = stated.and_then(Json::as_u64)
        && let Some(w) = weights.iter().find(|w| w.rank as u64 != r)
    {
        return Err(AdapterError::invalid(
            &config_path,
            format!("the rank is {r} here, but the tensors of {} in {} have rank {}", w.module, weights_path.display(), w.rank),
        ));
    }
    if let Some(keys) = &spec.keys
        && let Some(w) = weights.iter().find(|w| !keys.iter().any(|k| w.module == *k || w.module.ends_with(&format!(".{k}"))))
    {
        let name = if format == AdapterFormat::Peft { "target_modules" } else { "lora_parameters.keys" };
        return Err(AdapterError::invalid(
            &config_path,
            format!(
                "{name} {keys:?} does not cover {}, whose tensors are in {}: {} would leave them out, so the adapter would not be the one trained; list the module there",
                w.module,
                weights_path.display(),
                if format == AdapterFormat::Peft { "PEFT" } else { "mlx-lm" }
            ),
        ));
    }
    Ok(AdapterFile { format, spec, weights, path: weights_path })
}

fn field<'a>(config: &'a Json, key: &str) -> Option<&'a Json> {
    config.get(key).filter(|v| !v.is_null())
}

fn peft_spec(config: &Json, path: &Path) -> Result<AdapterSpec, AdapterError> {
    if let Some(t) = field(config, "peft_type").and_then(Json::as_str)
        && t != "LORA"
    {
        return Err(AdapterError::invalid(path, format!("peft_type {t:?} is not supported (only LORA)")));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(config, key).and_then(Json::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(AdapterError::invalid(path, format!("{key} is not supported: every adapted projection must share r and lora_alpha")));
        }
    }
    let num = |key: &str, default: f64| {
        field(config, key).map_or(Some(default), Json::as_f64).ok_or_else(|| AdapterError::invalid(path, format!("{key} must be a number")))
    };
    let rank = num("r", 8.0)? as usize;
    let alpha = num("lora_alpha", 8.0)?;
    let rslora = field(config, "use_rslora").and_then(Json::as_bool).unwrap_or(false);
    let dora = field(config, "use_dora").and_then(Json::as_bool).unwrap_or(false);
    let keys = match field(config, "target_modules") {
        Some(Json::Array(list)) => Some(list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()),
        _ => None,
    };
    Ok(AdapterSpec {
        fine_tune_type: if dora { FineTuneType::Dora } else { FineTuneType::Lora },
        num_layers: -1,
        keys,
        rank,
        scale: Scale::Alpha { alpha, rslora },
        dropout: num("lora_dropout", 0.0)?,
        init: Default::default(),
    })
}

fn mlx_spec(config: &Json, path: &Path) -> Result<AdapterSpec, AdapterError> {
    let params = field(config, "lora_parameters").cloned().unwrap_or(json!({}));
    let num = |v: Option<&Json>, key: &str, default: f64| {
        v.map_or(Some(default), Json::as_f64).ok_or_else(|| AdapterError::invalid(path, format!("{key} must be a number")))
    };
    let kind = match field(config, "fine_tune_type").and_then(Json::as_str) {
        Some("lora") | None => {
            if field(config, "use_dora").and_then(Json::as_bool).unwrap_or(false) {
                FineTuneType::Dora
            } else {
                FineTuneType::Lora
            }
        }
        Some("dora") => FineTuneType::Dora,
        Some(other) => return Err(AdapterError::invalid(path, format!("fine_tune_type {other:?} is not an adapter (lora or dora)"))),
    };
    let num_layers = num(field(config, "num_layers").or(field(config, "lora_layers")), "num_layers", 16.0)? as i64;
    let keys = match field(&params, "keys") {
        Some(Json::Array(list)) => Some(list.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()),
        _ => None,
    };
    Ok(AdapterSpec {
        fine_tune_type: kind,
        num_layers,
        keys,
        rank: num(field(&params, "rank"), "rank", 8.0)? as usize,
        scale: Scale::Raw(num(field(&params, "scale"), "scale", 20.0)?),
        dropout: num(field(&params, "dropout"), "dropout", 0.0)?,
        init: Default::default(),
    })
}

/// f32 values of a tensor stored as f32, f16 or bf16.
fn floats(view: &TensorView, name: &str, path: &Path) -> Result<Vec<f32>, AdapterError> {
    decode_floats(view.data(), view.dtype())
        .ok_or_else(|| AdapterError::invalid(path, format!("tensor {name} has dtype {:?}; adapters are f32, f16 or bf16", view.dtype())))
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

fn read_weights(st: &SafeTensors, format: AdapterFormat, spec: &AdapterSpec, path: &Path) -> Result<Vec<AdapterWeights>, AdapterError> {
    let (a_suffix, b_suffix, m_suffix, prefix) = match format {
        AdapterFormat::Peft => (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", "base_model.model."),
        AdapterFormat::Mlx => (".lora_a", ".lora_b", ".m", ""),
    };
    // Ordered as the model holds them: by block, then projection.
    let mut modules: BTreeMap<(usize, usize, String), String> = BTreeMap::new();
    for name in st.names() {
        if let Some(stem) = name.strip_suffix(a_suffix) {
            let module = stem.strip_prefix(prefix).unwrap_or(stem).to_string();
            let (layer, proj) = match module.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
                Some((i, p)) => (i.parse().unwrap_or(usize::MAX), lora_model::PROJECTIONS.iter().position(|x| *x == p).unwrap_or(usize::MAX)),
                None => (usize::MAX, usize::MAX),
            };
            modules.insert((layer, proj, module), stem.to_string());
        } else if !name.ends_with(b_suffix) && !name.ends_with(m_suffix) {
            return Err(AdapterError::invalid(path, format!("tensor {name} is not a LoRA tensor of the {format:?} layout")));
        }
    }
    // A B (or magnitude) tensor without its A: the module's A is what is missing.
    for name in st.names() {
        let stem = name.strip_suffix(b_suffix).or_else(|| name.strip_suffix(m_suffix));
        if let Some(stem) = stem
            && !modules.values().any(|s| s == stem)
        {
            return Err(AdapterError::invalid(path, format!("tensor {stem}{a_suffix} is missing (its neighbour {name} is there)")));
        }
    }
    if modules.is_empty() {
        return Err(AdapterError::invalid(path, "holds no adapter tensors"));
    }
    let mut out = Vec::with_capacity(modules.len());
    for ((_, _, module), stem) in modules {
        let get = |suffix: &str| {
            let name = format!("{stem}{suffix}");
            st.tensor(&name).map(|v| (name.clone(), v)).map_err(|_| AdapterError::invalid(path, format!("tensor {name} is missing")))
        };
        let (a_name, a) = get(a_suffix)?;
        let (b_name, b) = get(b_suffix)?;
        let two = |name: &str, v: &TensorView| match v.shape() {
            [x, y] => Ok([*x, *y]),
            s => Err(AdapterError::invalid(path, format!("tensor {name} has shape {s:?}; expected 2 dimensions"))),
        };
        let ([a0, a1], [b0, b1]) = (two(&a_name, &a)?, two(&b_name, &b)?);
        // To PEFT's layout: A [r, in], B [out, r].
        let (rank, inputs, outputs, av, bv) = match format {
            AdapterFormat::Peft => (a0, a1, b0, floats(&a, &a_name, path)?, floats(&b, &b_name, path)?),
            AdapterFormat::Mlx => (a1, a0, b1, transpose(&floats(&a, &a_name, path)?, a0, a1), transpose(&floats(&b, &b_name, path)?, b0, b1)),
        };
        let b_rank = if format == AdapterFormat::Peft { b1 } else { b0 };
        if b_rank != rank {
            // The one whose rank the config does not state is the damaged one (B when the
            // config states neither).
            if b_rank == spec.rank {
                let expected = if format == AdapterFormat::Peft { vec![b_rank, a1] } else { vec![a0, b_rank] };
                return Err(AdapterError::ShapeMismatch { path: path.to_path_buf(), name: a_name, expected, found: a.shape().to_vec() });
            }
            let expected = if format == AdapterFormat::Peft { vec![b0, rank] } else { vec![rank, b1] };
            return Err(AdapterError::ShapeMismatch { path: path.to_path_buf(), name: b_name, expected, found: b.shape().to_vec() });
        }
        let magnitude = match st.tensor(&format!("{stem}{m_suffix}")) {
            Ok(m) => Some(floats(&m, &format!("{stem}{m_suffix}"), path)?),
            Err(_) if spec.fine_tune_type == FineTuneType::Dora => {
                return Err(AdapterError::invalid(path, format!("tensor {stem}{m_suffix} is missing (the config says DoRA)")));
            }
            Err(_) => None,
        };
        out.push(AdapterWeights { module, a: av, b: bv, magnitude, rank, inputs, outputs, scale: spec.scale.value(rank) });
    }
    Ok(out)
}

/// The weights file's bytes in `format`.
pub fn weights_bytes(weights: &[AdapterWeights], format: AdapterFormat) -> Result<Vec<u8>, AdapterError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for w in weights {
        match format {
            AdapterFormat::Peft => {
                let p = format!("base_model.model.{}", w.module);
                tensors.push((format!("{p}.lora_A.weight"), vec![w.rank, w.inputs], encode_floats(&w.a, Dtype::F32)));
                tensors.push((format!("{p}.lora_B.weight"), vec![w.outputs, w.rank], encode_floats(&w.b, Dtype::F32)));
                if let Some(m) = &w.magnitude {
                    tensors.push((format!("{p}.lora_magnitude_vector"), vec![w.outputs], encode_floats(m, Dtype::F32)));
                }
            }
            AdapterFormat::Mlx => {
                let p = &w.module;
                tensors.push((format!("{p}.lora_a"), vec![w.inputs, w.rank], encode_floats(&transpose(&w.a, w.rank, w.inputs), Dtype::F32)));
                tensors.push((format!("{p}.lora_b"), vec![w.rank, w.outputs], encode_floats(&transpose(&w.b, w.outputs, w.rank), Dtype::F32)));
                if let Some(m) = &w.magnitude {
                    tensors.push((format!("{p}.m"), vec![w.outputs], encode_floats(m, Dtype::F32)));
                }
            }
        }
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, shape, data)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), data).expect("shape matches the data"))).collect();
    let metadata = (format == AdapterFormat::Peft).then(|| [("format".to_string(), "pt".to_string())].into());
    safetensors::serialize(views, metadata).map_err(|e| AdapterError::invalid(Path::new(format.weights_file()), e.to_string()))
}

/// The `adapter_config.json` for `spec` in `format`. `layers` are the adapted blocks;
/// `extra` (the run's resolved settings) is merged into an mlx-lm config, as mlx-lm writes
/// all of its arguments there.
pub fn config_json(spec: &AdapterSpec, format: AdapterFormat, layers: &[usize], base_model: &str, extra: Option<&serde_json::Map<String, Json>>) -> Json {
    let keys: Vec<String> = crate::attach::select_projections(spec.keys.as_deref()).unwrap_or_default().iter().map(|s| s.to_string()).collect();
    match format {
        AdapterFormat::Peft => {
            let (alpha, rslora) = match spec.scale {
                Scale::Alpha { alpha, rslora } => (alpha, rslora),
                Scale::Raw(s) => (s * spec.rank as f64, false),
            };
            let short: Vec<&str> = keys.iter().map(|k| k.rsplit('.').next().unwrap_or(k)).collect();
            json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base_model,
                "r": spec.rank,
                "lora_alpha": alpha,
                "lora_dropout": spec.dropout,
                "use_rslora": rslora,
                "use_dora": spec.fine_tune_type == FineTuneType::Dora,
                "target_modules": short,
                "layers_to_transform": layers,
                "layers_pattern": "layers",
                "bias": "none",
                "fan_in_fan_out": false,
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": null,
                "rank_pattern": {},
                "alpha_pattern": {},
            })
        }
        AdapterFormat::Mlx => {
            let mut config = extra.cloned().unwrap_or_default();
            config.insert("fine_tune_type".into(), json!(spec.fine_tune_type));
            config.insert("num_layers".into(), json!(spec.num_layers));
            config.insert("lora_parameters".into(), json!({ "rank": spec.rank, "scale": spec.scale.value(spec.rank), "dropout": spec.dropout, "keys": keys }));
            Json::Object(config)
        }
    }
}

/// Writes an adapter directory: the config and the weights, each atomically.
pub fn save(
    dir: &Path,
    format: AdapterFormat,
    spec: &AdapterSpec,
    weights: &[AdapterWeights],
    base_model: &str,
    extra: Option<&serde_json::Map<String, Json>>,
) -> Result<(), AdapterError> {
    std::fs::create_dir_all(dir).map_err(|e| AdapterError::io(dir, e))?;
    let mut layers: Vec<usize> =
        weights.iter().filter_map(|w| w.module.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok())).collect();
    layers.dedup();
    let config = config_json(spec, format, &layers, base_model, extra);
    write_atomic(&dir.join(format.weights_file()), &weights_bytes(weights, format)?)?;
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialize");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    // The directory's adapter is replaced whole: the other layout's weights, which would be
    // read against the new config, go.
    let other = dir.join(
        match format {
            AdapterFormat::Peft => AdapterFormat::Mlx,
            AdapterFormat::Mlx => AdapterFormat::Peft,
        }
        .weights_file(),
    );
    match std::fs::remove_file(&other) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AdapterError::io(&other, e)),
        _ => Ok(()),
    }
}
