//! llama.cpp's names: the architecture, and each Hugging Face tensor's GGUF name.
//!
//! llama.cpp's `llama` architecture applies rotary embeddings to interleaved pairs of a
//! head's dimensions, where transformers rotates its two halves; llama.cpp's converter
//! therefore reorders the rows of `q_proj` and `k_proj` ([`rope_rows`]). Qwen models use
//! llama.cpp's NeoX rotation, which is transformers' own, and keep their rows.

use std::path::Path;

use lora_model::{Architecture, ModelConfig};

use crate::GgufError;

/// A llama.cpp architecture this crate writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    /// `llama`: Llama and Mistral.
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen3`.
    Qwen3,
}

impl GgufArch {
    /// The architecture of `config`'s model.
    pub fn of(config: &ModelConfig) -> Self {
        match config.arch {
            Architecture::Llama | Architecture::Mistral => Self::Llama,
            Architecture::Qwen2 => Self::Qwen2,
            Architecture::Qwen3 => Self::Qwen3,
        }
    }

    /// `general.architecture`, and the prefix of the model's hyperparameter keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// Whether q and k rows are reordered for llama.cpp's interleaved rotation.
    pub fn reorders_rope_rows(self) -> bool {
        self == Self::Llama
    }
}

/// The GGUF name of the Hugging Face tensor `name` (`model.layers.3.self_attn.q_proj.weight`
/// becomes `blk.3.attn_q.weight`); `None` for tensors llama.cpp does not read
/// (`rotary_emb.inv_freq`). A tensor of no known role is an error naming it.
pub fn tensor_name(name: &str, source: &Path) -> Result<Option<String>, GgufError> {
    let unknown = || GgufError::unsupported(source, format!("tensor {name} has no GGUF name (llama.cpp's llama, qwen2 and qwen3 do not have it)"));
    if name.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Ok(Some(f.to_string()));
    }
    let rest = name.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (block, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let block: usize = block.parse().map_err(|_| unknown())?;
    let (module, kind) = rest.rsplit_once('.').ok_or_else(unknown)?;
    if kind != "weight" && kind != "bias" {
        return Err(unknown());
    }
    let role = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return Err(unknown()),
    };
    Ok(Some(format!("blk.{block}.{role}.{kind}")))
}

/// The number of heads whose rows `name` holds, when its rows must be reordered for
/// llama.cpp's rotation (`q_proj` and `k_proj` weights and biases of the `llama` arch).
pub fn rope_heads(arch: GgufArch, config: &ModelConfig, name: &str) -> Option<usize> {
    if !arch.reorders_rope_rows() {
        return None;
    }
    let module = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias"))?;
    if module.ends_with("self_attn.q_proj") {
        Some(config.num_heads)
    } else if module.ends_with("self_attn.k_proj") {
        Some(config.num_kv_heads)
    } else {
        None
    }
}

/// Reorders the rows of `values` (`[rows, cols]`, row-major) from transformers' rotation
/// layout to llama.cpp's: within each of `heads` heads, row `t·half + j` moves to `2j + t`.
pub fn rope_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..half {
                let from = (h * head_dim + t * half + j) * cols;
                let to = (h * head_dim + 2 * j + t) * cols;
                out[to..to + cols].copy_from_slice(&values[from..from + cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        let p = Path::new("model.safetensors");
        let name = |n: &str| tensor_name(n, p).unwrap();
        assert_eq!(name("model.layers.12.self_attn.q_proj.weight").as_deref(), Some("blk.12.attn_q.weight"));
        assert_eq!(name("model.layers.0.self_attn.k_proj.bias").as_deref(), Some("blk.0.attn_k.bias"));
        assert_eq!(name("model.layers.1.mlp.down_proj.weight").as_deref(), Some("blk.1.ffn_down.weight"));
        assert_eq!(name("model.layers.1.post_attention_layernorm.weight").as_deref(), Some("blk.1.ffn_norm.weight"));
        assert_eq!(name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
        let err = tensor_name("model.layers.0.mlp.experts.0.w1.weight", p).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.mlp.experts.0.w1.weight"), "{err}");
    }

    #[test]
    fn rope_rows_interleave_the_halves_of_each_head() {
        // Two heads of four rows, one column: [a0 a1 b0 b1] per head becomes [a0 b0 a1 b1].
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(rope_rows(&v, 8, 2), vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    }
}
