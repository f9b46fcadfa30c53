//! The low-rank adapter a projection can carry: LoRA, optionally with DoRA's magnitude.
//!
//! The adapted projection computes `x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ` with `W` frozen (dense
//! or packed), never the dense `W + scale·B·A`: backward then needs only the input gradient
//! through the base, and the only weight-shaped gradients are those of `A` and `B`.
//! Choosing which projections get one, initializing and saving them is `lora-adapters`'s
//! work; this is the arithmetic.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor};

use lora_kernels::tensor::float_dtype;

use crate::weight::Weight;

/// `A` `[rank, in]` and `B` `[out, rank]` in PEFT's layout (`lora_A.weight`, `lora_B.weight`),
/// held in f32 whatever the compute dtype: they are the master weights the optimizer updates.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[rank, in]`.
    pub a: Param<Tensor<2>>,
    /// `[out, rank]`.
    pub b: Param<Tensor<2>>,
    /// DoRA's magnitude, `[out]`: the adapted weight's row norms are rescaled to it.
    pub magnitude: Option<Param<Tensor<1>>>,
    /// The factor on `B·A` (mlx-lm's `scale`; PEFT's `alpha/r` or `alpha/√r`).
    pub scale: f64,
    /// Probability of zeroing an input of the adapter path while training.
    pub dropout: f64,
    /// Whether dropout is active (training) or not (evaluation, inference).
    pub training: bool,
    /// The seed of this adapter's dropout mask ([`crate::CausalLm::seed_dropout`]).
    pub dropout_seed: u64,
}

impl LoraAdapter {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale·B·A` `[out, in]` in f32: what merging adds to the base weight.
    pub fn delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()) * self.scale
    }

    /// The adapted output for `x` `[m, in]`, given the base's `y = x·Wᵀ` `[m, out]` (without
    /// bias) and the base weight (read only by DoRA): `[m, out]`.
    pub fn forward(&self, x: Tensor<2>, y: Tensor<2>, base: &Weight) -> Tensor<2> {
        let dtype = float_dtype(x.dtype());
        let dropped = self.training && self.dropout > 0.0;
        let x = if dropped {
            let keep = 1.0 - self.dropout;
            // Seeded here, not drawn from the stream: a block run again (gradient
            // checkpointing's recomputation) drops the same inputs as its first run.
            x.device().seed(self.dropout_seed);
            x.clone() * x.random_like(Distribution::Bernoulli(keep)) * (1.0 / keep)
        } else {
            x
        };
        let (a, b) = (self.a.val().cast(dtype), self.b.val().cast(dtype));
        let Some(magnitude) = &self.magnitude else {
            // One operation: the thin products as kernels of their own on a GPU, a backward
            // that keeps only x, A, B and the [m, rank] x·Aᵀ.
            return lora_kernels::lora::lora_add(x, a, b, y, self.scale as f32);
        };
        let lora = x.clone().matmul(a.transpose()).matmul(b.transpose()) * self.scale; // [m, out]
        // DoRA (PEFT): m/‖W + s·B·A‖ per output row, the norm detached from the graph.
        let w = base.dense().cast(burn::tensor::FloatDType::F32) + self.delta().detach();
        let norm = w.square().sum_dim(1).sqrt().squeeze_dim::<1>(1).detach(); // [out]
        let factor = (magnitude.val() / norm).cast(dtype).unsqueeze::<2>(); // [1, out]
        // y + (f - 1)·x·Wᵀ + f·lora; under dropout PEFT takes the middle term from the
        // dropped input.
        if dropped { y + base.matmul_t(x) * (factor.clone() - 1.0) + lora * factor } else { y * factor.clone() + lora * factor }
    }
}
