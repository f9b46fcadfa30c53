//! RMSNorm in one kernel for inference: `x / √(mean(x²) + ε)` in f32, cast to the compute
//! dtype, times the weight, as transformers computes it.
//!
//! The tensor composition (square, mean, add, square root, reciprocal, product, cast, product
//! with the weight) takes three fused launches per norm; a decoded token runs two norms per
//! block. One workgroup of [`UNITS`] invocations per row adds the squares up in a tree
//! reduction, then scales the row.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::decode::{UNITS, workgroup_reduce};

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
}

impl NormOps for Flex {}

impl NormOps for burn_cubecl::CubeBackend {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        if x.shape()[0] > MAX_ROWS || x.dtype != weight.dtype {
            return composed::<Self>(x, weight, eps);
        }
        kernel(x, weight, eps)
    }
}

/// Under autodiff the composition of tracked operations: differentiable.
impl<B: Backend + NormOps, C: CheckpointStrategy> NormOps for Autodiff<B, C> {}

fn composed<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f32) -> FloatTensor<B> {
    let dim = x.shape()[1];
    let dtype = match x.dtype() {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    };
    let x32 = B::float_cast(x, FloatDType::F32);
    let ms = B::float_mean_dim(B::float_mul(x32.clone(), x32.clone()), 1); // [rows, 1]
    let r = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, Scalar::from(eps))));
    let normed = B::float_cast(B::float_mul(x32, r), dtype);
    B::float_mul(normed, B::float_reshape(weight, Shape::new([1, dim]))) // [rows, dim]
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
/// `(x / √(mean(x²) + eps))` in f32, cast back, times `weight`.
pub fn rms_norm(x: burn::tensor::Tensor<2>, weight: burn::tensor::Tensor<1>, eps: f32) -> burn::tensor::Tensor<2> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as NormOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}
