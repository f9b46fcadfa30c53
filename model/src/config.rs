//! Model configuration in two layers: [`HfConfig`], a serde mirror of `config.json`
//! exactly as Hugging Face writes it (both the older Hub spelling and the transformers v5
//! one), and [`ModelConfig`], the checked configuration the model is built from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lora_quant::affine::AffineSpec;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ModelError;

/// The `model_type` values this crate can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// `config.json` as Hugging Face writes it. Fields this crate does not use are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3`.
    pub model_type: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads; absent means as many as query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; absent means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Activation of the MLP gate; only `silu` is supported.
    pub hidden_act: Option<String>,
    /// Older spelling of the RoPE base.
    pub rope_theta: Option<f64>,
    /// Older spelling of the RoPE scaling parameters.
    pub rope_scaling: Option<Value>,
    /// transformers v5 spelling: `rope_theta`, `rope_type` and the scaling parameters.
    pub rope_parameters: Option<Value>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Bias on the attention projections (Llama, Qwen3).
    pub attention_bias: Option<bool>,
    /// Bias on the MLP projections (Llama).
    pub mlp_bias: Option<bool>,
    /// Sliding-window width in tokens.
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether the sliding window is used at all.
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: layers below this index use full attention.
    pub max_window_layers: Option<usize>,
    /// transformers v5: `full_attention` or `sliding_attention` for each layer.
    pub layer_types: Option<Vec<String>>,
    /// Older spelling of the checkpoint dtype.
    pub torch_dtype: Option<String>,
    /// transformers v5 spelling of the checkpoint dtype.
    pub dtype: Option<String>,
    /// End-of-sequence id, a single id or a list.
    pub eos_token_id: Option<Value>,
    /// MLX quantization parameters, when the checkpoint is quantized.
    pub quantization: Option<Value>,
    /// The same, as newer mlx-lm and transformers also spell it.
    pub quantization_config: Option<Value>,
    /// The longest sequence the model was made for.
    pub max_position_embeddings: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}

/// The architecture family: decides which biases and norms exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3/3.1/3.2.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 and Qwen2.5.
    Qwen2,
    /// Qwen3 (dense).
    Qwen3,
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor of low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// The checked configuration the model is built from.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm on each head of q and k (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window width per layer; `None` is full causal attention.
    pub layer_windows: Vec<Option<usize>>,
    /// The checkpoint's dtype as written in config.json (`float32`, `bfloat16`, ...), if any.
    pub checkpoint_dtype: Option<String>,
    /// The checkpoint's own quantization (an MLX quantized checkpoint), if any.
    pub quantization: Option<MlxQuantization>,
    /// `max_position_embeddings`: the longest sequence the model was made for, if stated.
    pub max_positions: Option<usize>,
}

/// The `quantization` section of an MLX checkpoint's config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct MlxQuantization {
    /// Bits and group size of every quantized layer without an override.
    pub default: AffineSpec,
    /// Per-layer bits and group size, keyed by module path (`model.layers.0.mlp.down_proj`).
    pub overrides: HashMap<String, AffineSpec>,
}

impl MlxQuantization {
    /// The spec of the module at `path`.
    pub fn spec(&self, path: &str) -> AffineSpec {
        self.overrides.get(path).copied().unwrap_or(self.default)
    }

    fn from_value(v: &Value) -> Result<Self, String> {
        let spec = |v: &Value, at: &str| -> Result<AffineSpec, String> {
            let mode = v.get("mode").and_then(Value::as_str).unwrap_or("affine");
            if mode != "affine" {
                return Err(format!("quantization{at}: mode `{mode}` is not supported (supported: affine)"));
            }
            let int = |key: &str, default: u64| -> Result<usize, String> {
                match v.get(key) {
                    None => Ok(default as usize),
                    Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| format!("quantization{at}.{key}: expected an integer, found {x}")),
                }
            };
            AffineSpec::new(int("bits", 4)?, int("group_size", 64)?).map_err(|e| format!("quantization{at}: {e}"))
        };
        if let Some(method) = v.get("quant_method") {
            return Err(format!("quantization method {method} is not supported: load the float checkpoint with --quantize, or an MLX quantized one"));
        }
        let default = spec(v, "")?;
        let mut overrides = HashMap::new();
        if let Some(map) = v.as_object() {
            for (k, val) in map {
                if val.is_object() {
                    overrides.insert(k.clone(), spec(val, &format!(".{k}"))?);
                }
            }
        }
        Ok(Self { default, overrides })
    }
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
    }
}

impl ModelConfig {
    /// Reads `config.json` from a checkpoint directory and checks it.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let hf = HfConfig::from_file(&path)?;
        Self::from_hf(&hf, &path)
    }

    /// Checks a parsed `config.json`; `path` is only used in error messages.
    pub fn from_hf(hf: &HfConfig, path: &Path) -> Result<Self, ModelError> {
        let err = |message: String| ModelError::Config { path: PathBuf::from(path), message };
        let model_type = hf.model_type.as_deref().unwrap_or("<missing>");
        let arch = match model_type {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            other => {
                return Err(ModelError::UnsupportedModelType {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                    supported: SUPPORTED_MODEL_TYPES.join(", "),
                });
            }
        };
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(err(format!("hidden_act `{act}` is not supported (only `silu`)")));
        }
        if hf.num_attention_heads == 0 || hf.num_hidden_layers == 0 || hf.hidden_size == 0 {
            return Err(err("num_attention_heads, num_hidden_layers and hidden_size must be > 0".into()));
        }
        // Sizes far beyond any released model are a damaged file; refusing them keeps every
        // allocation sized by them (per-layer tables, the model itself) bounded.
        let limits = [
            ("num_hidden_layers", hf.num_hidden_layers, 4096),
            ("hidden_size", hf.hidden_size, 1 << 20),
            ("intermediate_size", hf.intermediate_size, 1 << 22),
            ("num_attention_heads", hf.num_attention_heads, 1 << 14),
            ("num_key_value_heads", hf.num_key_value_heads.unwrap_or(0), 1 << 14),
            ("head_dim", hf.head_dim.unwrap_or(0), 1 << 14),
            ("vocab_size", hf.vocab_size, 1 << 24),
        ];
        if let Some((name, value, max)) = limits.iter().find(|(_, v, max)| v > max) {
            return Err(err(format!("{name} {value} is larger than any model this tool loads (at most {max})")));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if num_kv_heads == 0 || !hf.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(err(format!("num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})", hf.num_attention_heads)));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.hidden_size.is_multiple_of(hf.num_attention_heads) => hf.hidden_size / hf.num_attention_heads,
            None => {
                return Err(err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({}) and head_dim is absent",
                    hf.hidden_size, hf.num_attention_heads
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim ({head_dim}) must be even for RoPE")));
        }
        let (rope_theta, rope_scaling) = rope_from_hf(hf).map_err(err)?;
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias, qk_norm) = match arch {
            Architecture::Llama => (attention_bias, attention_bias, false),
            Architecture::Mistral => (false, false, false),
            Architecture::Qwen2 => (true, false, false),
            Architecture::Qwen3 => (attention_bias, attention_bias, true),
        };
        let mlp_bias = arch == Architecture::Llama && hf.mlp_bias.unwrap_or(false);
        let layer_windows = layer_windows(hf, arch).map_err(err)?;
        Ok(Self {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            vocab_size: hf.vocab_size,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            layer_windows,
            checkpoint_dtype: hf.dtype.clone().or_else(|| hf.torch_dtype.clone()),
            max_positions: hf.max_position_embeddings,
            quantization: match hf.quantization.as_ref().or(hf.quantization_config.as_ref()) {
                Some(q) if !q.is_null() => Some(MlxQuantization::from_value(q).map_err(err)?),
                _ => None,
            },
        })
    }
}

/// Reads the RoPE base and scaling from either spelling of config.json.
fn rope_from_hf(hf: &HfConfig) -> Result<(f64, RopeScaling), String> {
    // transformers v5 folds everything into `rope_parameters`; older files keep
    // `rope_theta` at the top level and the scaling in `rope_scaling`.
    let params = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p), _) if !p.is_null() => Some(p),
        (_, Some(s)) if !s.is_null() => Some(s),
        _ => None,
    };
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(hf.rope_theta).unwrap_or(10_000.0);
    let Some(params) = params else {
        return Ok((theta, RopeScaling::None));
    };
    let rope_type = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        params.get(key).and_then(Value::as_f64).ok_or_else(|| format!("rope scaling `{rope_type}` needs a numeric `{key}`"))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!("rope_type `{other}` is not supported (supported: default, linear, llama3)"));
        }
    };
    Ok((theta, scaling))
}

/// The sliding window of every layer, following transformers' rules per family.
fn layer_windows(hf: &HfConfig, arch: Architecture) -> Result<Vec<Option<usize>>, String> {
    let n = hf.num_hidden_layers;
    let window = hf.sliding_window;
    if let Some(types) = &hf.layer_types {
        if types.len() != n {
            return Err(format!("layer_types has {} entries for {n} layers", types.len()));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window.map(Some).ok_or_else(|| "a layer uses sliding_attention but sliding_window is null".to_string()),
                other => Err(format!("layer type `{other}` is not supported")),
            })
            .collect();
    }
    Ok(match arch {
        Architecture::Mistral => vec![window; n],
        Architecture::Qwen2 | Architecture::Qwen3 if hf.use_sliding_window == Some(true) => {
            let first = hf.max_window_layers.unwrap_or(0);
            (0..n).map(|i| if i >= first { window } else { None }).collect()
        }
        _ => vec![None; n],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ModelError> {
        let hf: HfConfig = serde_json::from_str(json).unwrap();
        ModelConfig::from_hf(&hf, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 10"#;

    /// Found by tests/fuzz.rs: a config.json with `num_hidden_layers` 2^63 - 1 aborted on a
    /// capacity overflow (the per-layer window table) instead of being an error.
    #[test]
    fn a_huge_layer_count_is_an_error_not_a_capacity_overflow() {
        let json = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 9223372036854775807,
            "num_attention_heads": 4, "vocab_size": 10}"#;
        let e = parse(json).unwrap_err().to_string();
        assert!(e.contains("num_hidden_layers 9223372036854775807 is larger than any model"), "{e}");
        let json = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100000000}"#;
        assert!(parse(json).unwrap_err().to_string().contains("vocab_size 100000000"));
    }

    #[test]
    fn old_and_new_rope_spellings_agree() {
        let old = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3",
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert_eq!(old.rope_theta, new.rope_theta);
        assert!(matches!(old.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn kv_heads_default_to_heads_and_head_dim_to_hidden_over_heads() {
        let c = parse(&format!(r#"{{"model_type": "mistral", {BASE}}}"#)).unwrap();
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
    }

    #[test]
    fn qwen2_sliding_window_is_off_unless_enabled() {
        let c = parse(&format!(r#"{{"model_type": "qwen2", {BASE}, "sliding_window": 4, "use_sliding_window": false}}"#)).unwrap();
        assert_eq!(c.layer_windows, vec![None, None]);
        assert!(c.qkv_bias && !c.o_bias);
        let m = parse(&format!(r#"{{"model_type": "mistral", {BASE}, "sliding_window": 4}}"#)).unwrap();
        assert_eq!(m.layer_windows, vec![Some(4), Some(4)]);
    }

    #[test]
    fn unknown_model_type_lists_supported_ones() {
        let e = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("gpt2") && msg.contains("llama, mistral, qwen2, qwen3"), "{msg}");
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let e = parse(&format!(r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#)).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }
}
