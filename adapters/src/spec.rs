//! What an adapter is: its type, rank, scale, dropout and where it goes.

use serde::{Deserialize, Serialize};

use crate::AdapterError;

/// LoRA, or DoRA (LoRA plus a learned magnitude per output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FineTuneType {
    /// `W + scale·B·A`.
    #[default]
    Lora,
    /// DoRA: the adapted weight's row norms are rescaled to a learned magnitude.
    Dora,
}

/// How `A` is initialized (`B` always starts at zero, so training starts from the base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Uniform in ±1/√in: PEFT's kaiming-uniform (a = √5) and mlx-lm's init.
    #[default]
    Kaiming,
    /// Normal with standard deviation 1/rank (PEFT's `init_lora_weights = "gaussian"`).
    Gaussian,
}

/// The factor on `B·A`, in either convention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// mlx-lm's `scale`, used as it is (mlx-lm's default is 20.0).
    Raw(f64),
    /// PEFT's `lora_alpha`: the scale is alpha/rank, or alpha/√rank with rsLoRA.
    Alpha {
        /// `lora_alpha`.
        alpha: f64,
        /// `use_rslora`.
        rslora: bool,
    },
}

impl Scale {
    /// The factor for `rank`.
    pub fn value(&self, rank: usize) -> f64 {
        match *self {
            Self::Raw(s) => s,
            Self::Alpha { alpha, rslora: false } => alpha / rank as f64,
            Self::Alpha { alpha, rslora: true } => alpha / (rank as f64).sqrt(),
        }
    }
}

/// Which projections get an adapter, and its hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// LoRA or DoRA.
    pub fine_tune_type: FineTuneType,
    /// The last `num_layers` blocks get adapters; -1 means all (mlx-lm's default is 16).
    pub num_layers: i64,
    /// Projections by name (`self_attn.q_proj`, or PEFT's short `q_proj`); `None` means every
    /// linear projection in attention and the MLP.
    pub keys: Option<Vec<String>>,
    /// The rank `r`.
    pub rank: usize,
    /// The factor on `B·A`.
    pub scale: Scale,
    /// Dropout on the adapter's input while training, in [0, 1).
    pub dropout: f64,
    /// How `A` starts.
    pub init: Init,
}

impl Default for AdapterSpec {
    /// mlx-lm's defaults: LoRA on every projection of the last 16 blocks, rank 8, scale 20.
    fn default() -> Self {
        Self { fine_tune_type: FineTuneType::Lora, num_layers: 16, keys: None, rank: 8, scale: Scale::Raw(20.0), dropout: 0.0, init: Init::Kaiming }
    }
}

impl AdapterSpec {
    /// Checks the ranges, naming the setting that is wrong.
    pub fn validate(&self) -> Result<(), AdapterError> {
        let bad = |key: &str, message: String| Err(AdapterError::Config { key: key.into(), message });
        if self.rank == 0 {
            return bad("rank", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("must be in [0, 1), got {}", self.dropout));
        }
        if self.num_layers == 0 || self.num_layers < -1 {
            return bad("num_layers", format!("must be positive or -1 (all blocks), got {}", self.num_layers));
        }
        if !self.scale.value(self.rank).is_finite() {
            return bad("scale", "must be finite".into());
        }
        if let Some(keys) = &self.keys
            && keys.is_empty()
        {
            return bad("keys", "names no projection".into());
        }
        Ok(())
    }

    /// The blocks that get adapters, of `blocks` in all: the last `num_layers`.
    pub fn layers(&self, blocks: usize) -> std::ops::Range<usize> {
        let n = if self.num_layers < 0 { blocks } else { (self.num_layers as usize).min(blocks) };
        blocks - n..blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_follows_both_conventions() {
        assert_eq!(Scale::Raw(20.0).value(8), 20.0);
        assert_eq!(Scale::Alpha { alpha: 16.0, rslora: false }.value(8), 2.0);
        assert_eq!(Scale::Alpha { alpha: 16.0, rslora: true }.value(16), 4.0);
    }

    #[test]
    fn num_layers_counts_back_from_the_last_block() {
        let spec = |n| AdapterSpec { num_layers: n, ..Default::default() };
        assert_eq!(spec(2).layers(5), 3..5);
        assert_eq!(spec(-1).layers(5), 0..5);
        assert_eq!(spec(16).layers(5), 0..5);
    }

    #[test]
    fn bad_values_name_their_setting() {
        let err = AdapterSpec { rank: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.starts_with("rank:"), "{err}");
        let err = AdapterSpec { dropout: 1.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.starts_with("dropout:"), "{err}");
        let err = AdapterSpec { num_layers: -2, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.starts_with("num_layers:"), "{err}");
    }
}
