//! `--quantize` and its options, shared by the commands that load a model.

use anyhow::Result;
use clap::{Args, ValueEnum};
use lora_model::{LoadOptions, ModelConfig, QuantizeAtLoad};
use lora_quant::affine::AffineSpec;

/// `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// MLX-compatible affine quantization (`--q-bits`, `--q-group-size`).
    Affine,
    /// QLoRA NormalFloat4, block 64 (`--double-quant`).
    Nf4,
}

/// Quantizing a float checkpoint as it is loaded.
#[derive(Debug, Clone, Args)]
pub struct QuantArgs {
    /// Quantize the frozen base at load: affine (MLX-compatible) or nf4 (QLoRA).
    #[arg(long, value_enum, value_name = "MODE")]
    pub quantize: Option<QuantMode>,
    /// Bits per weight for affine quantization: 2, 3, 4, 5, 6 or 8.
    #[arg(long, default_value_t = 4, value_name = "BITS")]
    pub q_bits: usize,
    /// Group size for affine quantization: 32, 64 or 128.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub q_group_size: usize,
    /// NF4: also quantize the per-block absmax values to 8 bits.
    #[arg(long)]
    pub double_quant: bool,
    /// Also quantize the embedding and lm_head [default: true for affine, as MLX; false for nf4, as QLoRA].
    #[arg(long, value_name = "BOOL")]
    pub q_embeddings: Option<bool>,
}

impl QuantArgs {
    /// The load options these flags ask for; prints a note when the checkpoint is already
    /// quantized and `--quantize` is given.
    pub fn load_options(&self, config: &ModelConfig) -> Result<LoadOptions> {
        let quantize = match self.quantize {
            None => None,
            Some(QuantMode::Affine) => Some(QuantizeAtLoad::Affine(AffineSpec::new(self.q_bits, self.q_group_size)?)),
            Some(QuantMode::Nf4) => Some(QuantizeAtLoad::Nf4 { double_quant: self.double_quant }),
        };
        if let (Some(_), Some(q)) = (quantize, &config.quantization) {
            eprintln!("--quantize: the checkpoint is already quantized ({} bits, group {}); loading it as it is.", q.default.bits, q.default.group_size);
        }
        let quantize_embeddings = self.q_embeddings.unwrap_or(matches!(self.quantize, Some(QuantMode::Affine)));
        Ok(LoadOptions { quantize, quantize_embeddings })
    }
}
