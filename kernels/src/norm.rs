//! RMSNorm in one kernel: `x / √(mean(x²) + ε)` in f32, cast to the compute dtype, times the
//! weight, as transformers computes it; and its input gradient in one more.
//!
//! The tensor composition (square, mean, add, square root, reciprocal, product, cast, product
//! with the weight) takes three fused launches per norm, and its backward under autodiff
//! several more; a training step runs four per block (forward and backward). (A decoded token
//! on a GPU runs none of its own: the products after them compute them, see
//! [`crate::matvec::rms_factor`].) One workgroup of [`UNITS`] invocations per row adds the squares up in a tree
//! reduction, then scales the row. Backward, with `g = dy·w` and `r = 1/√(mean(x²) + ε)`:
//! `dx = r·g − x·r³·mean(g·x)`, both sums in one pass over the row.
//! The weight's gradient (only where the weight is trained, which LoRA never does) is the
//! composition `Σ_rows dy·x̂`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{FloatDType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::decode::{UNITS, workgroup_reduce};
use crate::tensor::float_dtype;

/// Rows one launch covers (the workgroup count's limit in one dimension).
const MAX_ROWS: usize = 65_535;

/// RMSNorm as one operation.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait NormOps: Backend {
    /// `x` `[rows, dim]`, `weight` `[dim]` in `x`'s dtype: `(x / √(mean(x²) + eps))` computed in
    /// f32, cast to `x`'s dtype, times `weight`: `[rows, dim]`.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        composed::<Self>(x, weight, eps)
    }

    /// The gradient of [`NormOps::rms_norm`] with respect to `x` for the output gradient `dy`
    /// `[rows, dim]`: `[rows, dim]` in `x`'s dtype, computed in f32.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, dy: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        composed_backward::<Self>(x, weight, dy, eps)
    }
}

impl NormOps for Flex {}

impl NormOps for burn_cubecl::CubeBackend {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        if x.shape()[0] > MAX_ROWS || x.dtype != weight.dtype {
            return composed::<Self>(x, weight, eps);
        }
        kernel(x, weight, eps)
    }

    fn rms_norm_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, dy: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        if x.shape()[0] > MAX_ROWS || x.dtype != weight.dtype || dy.dtype != x.dtype || dy.shape() != x.shape() {
            return composed_backward::<Self>(x, weight, dy, eps);
        }
        backward_kernel(x, weight, dy, eps)
    }
}

#[derive(Debug)]
struct NormBackward;

impl<B: Backend + NormOps> Backward<B, 2> for NormBackward {
    /// `(x, weight, eps)`.
    type State = (FloatTensor<B>, FloatTensor<B>, f32);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, weight, eps) = ops.state;
        if let Some(node) = weight_node {
            grads.register::<B>(node.id, weight_grad::<B>(x.clone(), weight.clone(), dy.clone(), eps));
        }
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rms_norm_backward(x, weight, dy, eps));
        }
    }
}

/// Under autodiff the forward's kernel and a backward of its own, which keeps only `x`.
impl<B: Backend + NormOps, C: CheckpointStrategy> NormOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        match NormBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let out = B::rms_norm(x.clone(), weight.clone(), eps);
                prep.finish((x, weight, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.into_primitive(), weight.into_primitive(), eps)),
        }
    }
}

/// `1 / √(mean(x²) + eps)` `[rows, 1]` in f32 and `x` in f32.
fn inverse_rms<B: Backend>(x: FloatTensor<B>, eps: f32) -> (FloatTensor<B>, FloatTensor<B>) {
    let x32 = B::float_cast(x, FloatDType::F32);
    let ms = B::float_mean_dim(B::float_mul(x32.clone(), x32.clone()), 1); // [rows, 1]
    (B::float_recip(B::float_sqrt(B::float_add_scalar(ms, Scalar::from(eps)))), x32)
}

/// `x / √(mean(x²) + eps)` computed in f32 and cast back to `x`'s dtype, before the weight.
fn normalized<B: Backend>(x: FloatTensor<B>, eps: f32) -> FloatTensor<B> {
    let dtype = float_dtype(x.dtype());
    let (r, x32) = inverse_rms::<B>(x, eps);
    B::float_cast(B::float_mul(x32, r), dtype)
}

fn composed_backward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, dy: FloatTensor<B>, eps: f32) -> FloatTensor<B> {
    let dim = x.shape()[1];
    let dtype = float_dtype(x.dtype());
    let (r, x32) = inverse_rms::<B>(x, eps);
    let w32 = B::float_reshape(B::float_cast(weight, FloatDType::F32), Shape::new([1, dim]));
    let g = B::float_mul(B::float_cast(dy, FloatDType::F32), w32); // [rows, dim]
    let mean_gx = B::float_mean_dim(B::float_mul(g.clone(), x32.clone()), 1); // [rows, 1]
    let r3 = B::float_mul(B::float_mul(r.clone(), r.clone()), r.clone());
    let dx = B::float_sub(B::float_mul(g, r), B::float_mul(x32, B::float_mul(r3, mean_gx)));
    B::float_cast(dx, dtype)
}

/// `Σ_rows dy · x̂` `[dim]` in the weight's dtype, `x̂` the normalized rows cast to `x`'s dtype.
fn weight_grad<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, dy: FloatTensor<B>, eps: f32) -> FloatTensor<B> {
    let dim = x.shape()[1];
    let normed = B::float_cast(normalized::<B>(x, eps), FloatDType::F32);
    let sum = B::float_sum_dim(B::float_mul(B::float_cast(dy, FloatDType::F32), normed), 0); // [1, dim]
    B::float_cast(B::float_reshape(sum, Shape::new([dim])), float_dtype(weight.dtype()))
}

/// [`NormOps::rms_norm`] as tensor operations (differentiable under autodiff).
pub fn composed<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f32) -> FloatTensor<B> {
    let dim = x.shape()[1];
    B::float_mul(normalized::<B>(x, eps), B::float_reshape(weight, Shape::new([1, dim]))) // [rows, dim]
}

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(x: &Tensor<F>, weight: &Tensor<F>, out: &mut Tensor<F>, eps: f32, #[define(F)] _dtype: ElemType) {
    let unit = UNIT_POS as usize;
    let row = CUBE_POS_X as usize;
    let dim = x.shape(1);
    let base = row * dim;
    let mut red = Shared::<[f32]>::new_slice(comptime!(UNITS));
    let mut squares = 0f32;
    for j in range_stepped(unit, dim, comptime!(UNITS)) {
        let v = f32::cast_from(x[base + j]);
        squares += v * v;
    }
    let total = workgroup_reduce(&mut red, squares, false);
    let r = 1.0f32 / (total / f32::cast_from(dim) + eps).sqrt();
    for j in range_stepped(unit, dim, comptime!(UNITS)) {
        out[base + j] = F::cast_from(f32::cast_from(x[base + j]) * r) * weight[j];
    }
}

/// `dx` for one row per workgroup: `Σx²` and `Σ g·x` (`g = dy·w`) in one pass, then `dx = r·g −
/// x·r³·Σ(g·x)/dim`.
#[cube(launch_unchecked)]
fn rms_norm_backward_kernel<F: Float>(x: &Tensor<F>, weight: &Tensor<F>, dy: &Tensor<F>, dx: &mut Tensor<F>, eps: f32, #[define(F)] _dtype: ElemType) {
    let unit = UNIT_POS as usize;
    let row = CUBE_POS_X as usize;
    let dim = x.shape(1);
    let base = row * dim;
    let mut red = Shared::<[f32]>::new_slice(comptime!(UNITS));
    let mut squares = 0f32;
    let mut dot = 0f32;
    for j in range_stepped(unit, dim, comptime!(UNITS)) {
        let v = f32::cast_from(x[base + j]);
        squares += v * v;
        dot += f32::cast_from(dy[base + j]) * f32::cast_from(weight[j]) * v;
    }
    let n = f32::cast_from(dim);
    let total = workgroup_reduce(&mut red, squares, false);
    let dot_total = workgroup_reduce(&mut red, dot, false);
    let r = 1.0f32 / (total / n + eps).sqrt();
    let c = r * r * r * dot_total / n;
    for j in range_stepped(unit, dim, comptime!(UNITS)) {
        let g = f32::cast_from(dy[base + j]) * f32::cast_from(weight[j]);
        dx[base + j] = F::cast_from(r * g - c * f32::cast_from(x[base + j]));
    }
}

fn backward_kernel(x: CubeTensor, weight: CubeTensor, dy: CubeTensor, eps: f32) -> CubeTensor {
    let [rows, dim] = x.shape().dims();
    let dx = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([rows, dim]), x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: `x` and `dy` are contiguous `[rows, dim]` and `weight` `[dim]` in one dtype
    // (checked); each workgroup reads and writes its own row only.
    unsafe {
        rms_norm_backward_kernel::launch_unchecked(
            &dx.client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(weight).into_tensor_arg(),
            into_contiguous(dy).into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            eps,
            dtype,
        )
    }
    dx
}

fn kernel(x: CubeTensor, weight: CubeTensor, eps: f32) -> CubeTensor {
    let [rows, dim] = x.shape().dims();
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([rows, dim]), x.dtype);
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: `x` is contiguous `[rows, dim]` and `weight` `[dim]`; each workgroup reads and
    // writes its own row only.
    unsafe {
        rms_norm_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(weight).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            eps,
            dtype,
        )
    }
    out
}

/// RMSNorm of the rows of `x` `[rows, dim]` with `weight` `[dim]` (in `x`'s dtype):
/// `(x / √(mean(x²) + eps))` in f32, cast back, times `weight`. Differentiable in both, with a
/// backward of its own (one kernel for `x`'s gradient on a GPU).
pub fn rms_norm(x: burn::tensor::Tensor<2>, weight: burn::tensor::Tensor<1>, eps: f32) -> burn::tensor::Tensor<2> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as NormOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}
