//! Rotary position embeddings in one kernel: the projection's output `[b, s, heads, d]` in,
//! the rotated heads `[b, heads, s, d]` out.
//!
//! `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [-x₂, x₁]`; the tables come with the
//! first half of `sin` negated (`lora_model`'s `Rope::tables`), so the rotation reads
//! `x·cos + [x₂, x₁]·sin`. The tensor composition (a transposition, a flip of the halves and
//! the products) takes several launches per rotated tensor; this is one, one invocation per
//! output element, in f32.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Slice};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

/// Rotary embeddings as one operation.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait RopeOps: Backend {
    /// `x` `[b, s, n, d]`, `cos` and signed `sin` `[s, d]` (or `[b·s, d]`: a table per row, for
    /// rows whose positions differ) in `x`'s dtype -> `[b, n, s, d]`, heads `0..rotated` rotated
    /// and the others copied.
    #[fusion(dtype = x, shape = Shape::new([x[0], x[2], x[1], x[3]]))]
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        composed::<Self>(x, cos, sin, rotated)
    }
}

impl RopeOps for Flex {}

impl RopeOps for burn_cubecl::CubeBackend {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        let d = x.shape()[3];
        let [b, s, _, _] = x.shape().dims();
        let rows = cos.shape()[0];
        if !d.is_multiple_of(2) || x.dtype != cos.dtype || x.dtype != sin.dtype || (rows != s && rows != b * s) || sin.shape() != cos.shape() {
            return composed::<Self>(x, cos, sin, rotated);
        }
        kernel(x, cos, sin, rotated)
    }
}

/// Under autodiff the composition of tracked operations: differentiable (training).
impl<B: Backend + RopeOps, C: CheckpointStrategy> RopeOps for Autodiff<B, C> {}

fn composed<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>, rotated: usize) -> FloatTensor<B> {
    let [b, s, n, d] = x.shape().dims();
    let x = B::float_swap_dims(x, 1, 2); // [b, n, s, d]
    let (x, rest) = if rotated < n {
        let head = |start, end| B::float_slice(x.clone(), &[Slice::from(0..b), Slice::from(start..end), Slice::from(0..s), Slice::from(0..d)]);
        (head(0, rotated), Some(head(rotated, n)))
    } else {
        (x, None)
    };
    let r = rotated.min(n);
    let halves = B::float_reshape(x.clone(), Shape::new([b * r * s, 2, d / 2]));
    let swapped = B::float_reshape(B::float_flip(halves, &[1]), Shape::new([b, r, s, d])); // [x₂, x₁]
    let tables = cos.shape()[0] / s.max(1); // 1, or one per row
    let cos = B::float_reshape(cos, Shape::new([tables, 1, s, d]));
    let sin = B::float_reshape(sin, Shape::new([tables, 1, s, d]));
    let out = B::float_add(B::float_mul(x, cos), B::float_mul(swapped, sin));
    match rest {
        Some(rest) => B::float_cat(vec![out, rest], 1),
        None => out,
    }
}

#[cube(launch_unchecked)]
fn rotary_kernel<F: Float>(x: &Tensor<F>, cos: &Tensor<F>, sin: &Tensor<F>, out: &mut Tensor<F>, rotated: usize, #[define(F)] _dtype: ElemType) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    // out [b, n, s, d] from x [b, s, n, d].
    let (n, s, d) = (out.shape(1), out.shape(2), out.shape(3));
    let j = pos % d;
    let t = (pos / d) % s;
    let head = (pos / (d * s)) % n;
    let row = pos / (d * s * n);
    let half = d / 2;
    let partner = if j < half { j + half } else { j - half };
    let base = ((row * s + t) * n + head) * d;
    // One table for every row, or one per row.
    let mut at = t * d + j;
    if cos.shape(0) != s {
        at = (row * s + t) * d + j;
    }
    if head < rotated {
        let value = f32::cast_from(x[base + j]) * f32::cast_from(cos[at]) + f32::cast_from(x[base + partner]) * f32::cast_from(sin[at]);
        out[pos] = F::cast_from(value);
    } else {
        out[pos] = x[base + j];
    }
}

fn kernel(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, rotated: usize) -> CubeTensor {
    let [b, s, n, d] = x.shape().dims();
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([b, n, s, d]), x.dtype);
    let elements = b * n * s * d;
    let cube_dim = CubeDim::new(&out.client, elements);
    let count = calculate_cube_count_elemwise(&out.client, elements, cube_dim);
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: the operands are contiguous, `x` `[b, s, n, d]` and the tables `[s, d]` or
    // `[b·s, d]` (`rotary` checked); every
    // index is decomposed from an output position below `out.len()`.
    unsafe {
        rotary_kernel::launch_unchecked(
            &out.client,
            count,
            cube_dim,
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(cos).into_tensor_arg(),
            into_contiguous(sin).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rotated,
            dtype,
        )
    }
    out
}

/// Rotates `x` `[b, s, heads, d]` by the tables `cos` and signed `sin` `[s, d]`, or `[b·s, d]`
/// with a table per row (the first half of `sin` negated) -> `[b, heads, s, d]`; only heads `0..rotated` are rotated, the
/// others are copied (query and key heads ahead of value heads in one tensor).
pub fn rotary(x: burn::tensor::Tensor<4>, cos: burn::tensor::Tensor<2>, sin: burn::tensor::Tensor<2>, rotated: usize) -> burn::tensor::Tensor<4> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as RopeOps>::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch(), rotated))
}
