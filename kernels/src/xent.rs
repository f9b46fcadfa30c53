//! The head's cross-entropy over one chunk of logits as one operation: every row's target NLL
//! and, at once, the gradient of the weighted sum of those NLLs in the logits,
//! `weight·(softmax − onehot(target))`. The loss needs no graph through the logits: whoever
//! calls it multiplies that gradient by the head itself.
//!
//! On the CPU (flex, f32) it is [`crate::cpu::cross_entropy`], one pass per row on every core;
//! elsewhere the composition of tensor operations (fused on a GPU).

use crate::cpu::{f32s, flex_f32};
use burn::backend::Scalar;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Shape, Tensor};

/// Cross-entropy with its gradient.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait CrossEntropyOps: Backend {
    /// `logits` `[rows, vocab]` f32, `targets` `[rows, 1]`, `weights` `[rows, 1]` f32 ->
    /// (`[rows, 1]` f32: `logsumexp(row) − row[target]`, `[rows, vocab]` f32:
    /// `weight·(softmax(row) − onehot(target))`). Rows of weight 0 may give 0 as their NLL.
    #[fusion(default)]
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, weights: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::<Self>(logits, targets, weights)
    }
}

/// [`CrossEntropyOps::cross_entropy`] as tensor operations.
fn composed<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>, weights: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let rows = logits.shape()[0];
    let device = logits.device();
    let max = B::float_max_dim(logits.clone(), 1); // [rows, 1]
    let e = B::float_exp(B::float_sub(logits.clone(), max.clone()));
    let total = B::float_sum_dim(e.clone(), 1); // [rows, 1]
    let lse = B::float_add(max, B::float_log(total.clone()));
    let nll = B::float_sub(lse, B::float_gather(1, logits, targets.clone()));
    let minus_one = B::float_full(Shape::new([rows, 1]), Scalar::from(-1.0f32), &device, FloatDType::F32);
    let onehot_minus = B::float_scatter(1, B::float_div(e, total), targets, minus_one, IndexingUpdateOp::Add);
    (nll, B::float_mul(onehot_minus, weights))
}

impl CrossEntropyOps for Flex {
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, weights: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [rows, vocab] = logits.shape().dims();
        let fits =
            logits.dtype() == DType::F32 && weights.dtype() == DType::F32 && weights.shape().num_elements() == rows && targets.shape().num_elements() == rows;
        let targets_i64: Option<Vec<i64>> = fits
            .then(|| {
                let t = targets.clone().to_contiguous();
                match t.dtype() {
                    DType::I64 => t.as_slice::<i64>().map(<[i64]>::to_vec),
                    DType::I32 => t.as_slice::<i32>().map(|s| s.iter().map(|&v| i64::from(v)).collect()),
                    _ => None,
                }
            })
            .flatten();
        let Some(targets) = targets_i64 else {
            return composed::<Self>(logits, targets, weights);
        };
        let weights = weights.to_contiguous();
        let mut grad = f32s(&logits.to_contiguous()).to_vec();
        let nll = crate::cpu::cross_entropy(&mut grad, vocab, &targets, f32s(&weights));
        (flex_f32(nll, [rows, 1]), flex_f32(grad, [rows, vocab]))
    }
}

impl CrossEntropyOps for burn_cubecl::CubeBackend {}

/// Under autodiff the inner backend's operation on the values: the outputs are leaves without a
/// graph (the gradient is an output, not something backward derives).
impl<B: Backend + CrossEntropyOps, C: CheckpointStrategy> CrossEntropyOps for Autodiff<B, C> {
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>, weights: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (nll, grad) = B::cross_entropy(Self::inner(logits), targets, Self::inner(weights));
        (Self::from_inner(nll), Self::from_inner(grad))
    }
}

/// [`CrossEntropyOps::cross_entropy`] on tensors: `logits` `[rows, vocab]` f32, `targets`
/// `[rows, 1]`, `weights` `[rows, 1]` f32 -> (every row's NLL `[rows, 1]`, the gradient of
/// `Σ weight·nll` in the logits `[rows, vocab]`).
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>, weights: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
    let (nll, grad) = <Dispatch as CrossEntropyOps>::cross_entropy(logits.into_dispatch(), targets.into_dispatch(), weights.into_dispatch());
    (Tensor::from_dispatch(nll), Tensor::from_dispatch(grad))
}
