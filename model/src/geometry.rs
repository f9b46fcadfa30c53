//! Named model shapes for benchmarks: a [`ModelConfig`] without a checkpoint, whose weights
//! come from [`Checkpoint::random`](crate::Checkpoint::random).
//!
//! The shapes are those of the published configs (Llama-3.2-1B, Llama-3.1-8B, ...); only the
//! weights are random. `bench/peer_peft.py` holds the same table for the PyTorch side.

use crate::config::{Architecture, ModelConfig, RopeScaling};

/// The shape of a decoder-only transformer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `lm_head` shares the embedding.
    pub tied: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// Bias on q/k/v (Qwen2).
    pub qkv_bias: bool,
}

/// `(name, geometry)` of every named shape.
pub const GEOMETRIES: [(&str, Geometry); 7] = [
    ("tiny", Geometry { hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2, vocab: 256, tied: true, rope_theta: 10_000.0, qkv_bias: false }),
    (
        "smollm-135m",
        Geometry { hidden: 576, intermediate: 1536, layers: 30, heads: 9, kv_heads: 3, vocab: 49_152, tied: true, rope_theta: 10_000.0, qkv_bias: false },
    ),
    (
        "llama-1b",
        Geometry { hidden: 2048, intermediate: 8192, layers: 16, heads: 32, kv_heads: 8, vocab: 128_256, tied: true, rope_theta: 500_000.0, qkv_bias: false },
    ),
    (
        "llama-3b",
        Geometry { hidden: 3072, intermediate: 8192, layers: 28, heads: 24, kv_heads: 8, vocab: 128_256, tied: true, rope_theta: 500_000.0, qkv_bias: false },
    ),
    (
        "llama-8b",
        Geometry {
            hidden: 4096,
            intermediate: 14_336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            vocab: 128_256,
            tied: false,
            rope_theta: 500_000.0,
            qkv_bias: false,
        },
    ),
    (
        "qwen2-0.5b",
        Geometry { hidden: 896, intermediate: 4864, layers: 24, heads: 14, kv_heads: 2, vocab: 151_936, tied: true, rope_theta: 1_000_000.0, qkv_bias: true },
    ),
    (
        "mistral-7b",
        Geometry {
            hidden: 4096,
            intermediate: 14_336,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            vocab: 32_768,
            tied: false,
            rope_theta: 1_000_000.0,
            qkv_bias: false,
        },
    ),
];

impl Geometry {
    /// The shape called `name` (see [`GEOMETRIES`]).
    pub fn named(name: &str) -> Option<Self> {
        GEOMETRIES.iter().find(|(n, _)| *n == name).map(|(_, g)| *g)
    }

    /// The names of [`GEOMETRIES`], comma-separated, for messages.
    pub fn names() -> String {
        GEOMETRIES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    /// Checks that the heads divide the widths.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.vocab];
        if positive.contains(&0) {
            return Err("every size must be at least 1".into());
        }
        if !self.hidden.is_multiple_of(self.heads) || !(self.hidden / self.heads).is_multiple_of(2) {
            return Err(format!("hidden {} is not an even head width times {} heads", self.hidden, self.heads));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!("{} key/value heads do not divide {} heads", self.kv_heads, self.heads));
        }
        Ok(())
    }

    /// The model config of this shape: Llama (Qwen2 with a q/k/v bias), bf16, RMSNorm ε 1e-5.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            arch: if self.qkv_bias { Architecture::Qwen2 } else { Architecture::Llama },
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_layers: self.layers,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            rms_norm_eps: 1e-5,
            vocab_size: self.vocab,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: self.tied,
            qkv_bias: self.qkv_bias,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            layer_windows: vec![None; self.layers],
            checkpoint_dtype: Some("bfloat16".into()),
            quantization: None,
            max_positions: None,
        }
    }

    /// Parameters, embedding and head included.
    pub fn parameters(&self) -> usize {
        let c = self.config();
        let d = c.head_dim;
        let attn = self.hidden * (self.heads * d) * 2 + self.hidden * (self.kv_heads * d) * 2;
        let block = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden;
        let head = if self.tied { 0 } else { self.vocab * self.hidden };
        self.layers * block + self.vocab * self.hidden + head + self.hidden
    }

    /// Matrix-product FLOPs per trained token of a LoRA step over `seq` positions: forward
    /// `2·W`, backward through the frozen weights for the input gradient only (`2·W`), and
    /// attention's two products (forward once, backward twice; causal, so half the square).
    /// The adapters' own thin products are left out. Same formula as `bench/peer_peft.py`.
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let d = self.hidden / self.heads;
        let attn_w = self.hidden * (self.heads * d) * 2 + self.hidden * (self.kv_heads * d) * 2;
        let weights = self.layers * (attn_w + 3 * self.hidden * self.intermediate) + self.vocab * self.hidden;
        let attention = self.layers as f64 * 2.0 * 2.0 * (self.heads * d) as f64 * seq as f64 / 2.0;
        4.0 * weights as f64 + 3.0 * attention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_shapes_have_their_published_parameter_counts() {
        // Llama-3.2-1B: 1.24 B (tied); Llama-3.1-8B: 8.03 B; Qwen2-0.5B: 0.49 B (tied, biased).
        let count = |n: &str| Geometry::named(n).unwrap().parameters() as f64 / 1e9;
        assert!((count("llama-1b") - 1.236).abs() < 0.005, "{}", count("llama-1b"));
        // SmolLM-135M: 134.5 M (tied).
        assert!((count("smollm-135m") - 0.1345).abs() < 0.0005, "{}", count("smollm-135m"));
        assert!((count("llama-8b") - 8.030).abs() < 0.005, "{}", count("llama-8b"));
        // Qwen2's q/k/v biases are not in `parameters` (1 k of 494 M).
        assert!((count("qwen2-0.5b") - 0.494).abs() < 0.005, "{}", count("qwen2-0.5b"));
        for (_, g) in GEOMETRIES {
            g.validate().unwrap();
        }
        assert!(Geometry { heads: 5, ..GEOMETRIES[2].1 }.validate().is_err());
    }
}
