//! Attention of one new query position over a preallocated key/value cache, in one kernel;
//! and the greedy choice of the next token ([`greedy_pick`]), in another.
//!
//! Decoding a token costs a fixed host overhead per launched kernel, which at batch 1 exceeds
//! the GPU time of the small operations of a step. The tensor composition of a decode step's
//! attention (the scores' matmul, scaling, cast, mask, the softmax's reductions, the
//! probabilities' matmul, the copies between) is about ten launches per layer; this is one.
//!
//! One workgroup of [`UNITS`] invocations per (row, query head) holds the scaled query and all
//! of its `capacity` scores in workgroup memory: each invocation scores whole key rows, the
//! maximum and the sum meet in a tree reduction, then invocations split the head's dimensions
//! and the keys to add up the weighted values. Masked positions (unwritten cache, a sliding
//! window) come as an additive f32 bias of `f32::MIN`. Query head `i` reads key/value head
//! `i / (heads / kv_heads)` (grouped-query attention, no copy).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{FloatDType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::*;

/// Invocations per workgroup.
pub const UNITS: usize = 256;
/// The largest cache the kernel holds the scores of (32 KiB of workgroup memory); a larger one
/// takes the tensor composition.
pub const MAX_CAPACITY: usize = 8192;

/// Attention of one query position over a cache.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait DecodeOps: Backend {
    /// `q` `[b, h, 1, d]`, `keys` and `values` `[b, kv, capacity, d]`, `bias` `[b, capacity]`
    /// (f32: 0 where the query may look, `f32::MIN` where not):
    /// `softmax(q·kᵀ/√d + bias)·v` `[b, h, 1, d]` in the dtype of `q`.
    #[fusion(dtype = q, shape = Shape::new([q[0], q[1], q[2], q[3]]))]
    fn decode_attention(q: FloatTensor<Self>, keys: FloatTensor<Self>, values: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Self>(q, keys, values, bias)
    }
}

impl DecodeOps for Flex {}

impl DecodeOps for burn_cubecl::CubeBackend {
    fn decode_attention(q: FloatTensor<Self>, keys: FloatTensor<Self>, values: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let [_, h, s, d] = q.shape().dims();
        let [_, kv, capacity, _] = keys.shape().dims();
        let fits = s == 1 && capacity <= MAX_CAPACITY && d <= UNITS && UNITS.is_multiple_of(d) && kv > 0 && h.is_multiple_of(kv);
        if !fits || q.dtype != keys.dtype || q.dtype != values.dtype || bias.dtype != burn::tensor::DType::F32 {
            return composed::<Self>(q, keys, values, bias);
        }
        kernel(q, keys, values, bias)
    }
}

/// The greedy choice from logits as one operation.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait PickOps: Backend {
    /// `logits` `[1, vocab]` -> `[2]` f32: the index of the first largest logit, and 0 when every
    /// logit is finite (not 0 otherwise: NaN or 1).
    #[fusion(dtype = burn::tensor::DType::F32, shape = Shape::new([2]))]
    fn greedy_pick(logits: FloatTensor<Self>) -> FloatTensor<Self> {
        // x - x is 0 for every finite x and NaN for infinities and NaN; their sum tells which.
        let check = Self::float_cast(Self::float_sum(Self::float_sub(logits.clone(), logits.clone())), FloatDType::F32); // [1]
        let id = Self::int_into_float(Self::float_argmax(logits, 1, burn::tensor::IntDType::I64), FloatDType::F32); // [1, 1]
        Self::float_cat(vec![Self::float_reshape(id, Shape::new([1])), check], 0)
    }
}

impl PickOps for Flex {}

impl PickOps for burn_cubecl::CubeBackend {
    fn greedy_pick(logits: FloatTensor<Self>) -> FloatTensor<Self> {
        pick_kernel(logits)
    }
}

impl<B: Backend + PickOps, C: CheckpointStrategy> PickOps for Autodiff<B, C> {}

/// Under autodiff the composition of tracked operations: differentiable, if ever needed.
impl<B: Backend + DecodeOps, C: CheckpointStrategy> DecodeOps for Autodiff<B, C> {}

/// The same attention as tensor operations (the CPU's path, and the GPU's where the kernel
/// does not apply).
fn composed<B: Backend>(q: FloatTensor<B>, keys: FloatTensor<B>, values: FloatTensor<B>, bias: FloatTensor<B>) -> FloatTensor<B> {
    let [b, h, s, d] = q.shape().dims();
    let [_, kv, t, _] = keys.shape().dims();
    let rep = h / kv;
    let dtype = match q.dtype() {
        burn::tensor::DType::F16 => FloatDType::F16,
        burn::tensor::DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    };
    let qg = B::float_reshape(q, Shape::new([b, kv, rep * s, d]));
    let scores = B::float_matmul(qg, B::float_swap_dims(keys, 2, 3)); // [b, kv, rep·s, t]
    let scores = B::float_mul_scalar(B::float_cast(scores, FloatDType::F32), Scalar::from(1.0 / (d as f64).sqrt()));
    let bias = B::float_reshape(bias, Shape::new([b, 1, 1, t]));
    let scores = B::float_add(scores, bias);
    let max = B::float_max_dim(scores.clone(), 3);
    let e = B::float_exp(B::float_sub(scores, max));
    let sum = B::float_sum_dim(e.clone(), 3);
    let p = B::float_cast(B::float_div(e, sum), dtype);
    let out = B::float_matmul(p, values); // [b, kv, rep·s, d]
    B::float_reshape(out, Shape::new([b, h, s, d]))
}

/// Sums `value` over the workgroup's [`UNITS`] invocations (`max` instead when `take_max`);
/// every invocation gets the result.
#[cube]
pub(crate) fn workgroup_reduce(red: &mut Shared<[f32]>, value: f32, #[comptime] take_max: bool) -> f32 {
    let unit = UNIT_POS as usize;
    red[unit] = value;
    sync_cube();
    #[unroll]
    for step in 0..8u32 {
        let stride = comptime!(UNITS >> (step + 1));
        if unit < stride {
            if comptime!(take_max) {
                red[unit] = max(red[unit], red[unit + stride]);
            } else {
                red[unit] += red[unit + stride];
            }
        }
        sync_cube();
    }
    let total = red[0];
    sync_cube();
    total
}

#[cube(launch_unchecked)]
fn decode_attention_kernel<F: Float>(
    q: &Tensor<F>,
    keys: &Tensor<F>,
    values: &Tensor<F>,
    bias: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[comptime] capacity: usize,
    #[comptime] d: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS as usize;
    let head = CUBE_POS_X as usize;
    let row = CUBE_POS_Y as usize;
    let (h, kv) = (q.shape(1), keys.shape(1));
    let group = head / (h / kv);
    let qbase = (row * h + head) * d;
    let kbase = (row * kv + group) * capacity * d;
    let mut qs = Shared::<[f32]>::new_slice(d);
    let mut scores = Shared::<[f32]>::new_slice(capacity);
    let mut red = Shared::<[f32]>::new_slice(comptime!(UNITS));
    let scale = 1.0f32 / f32::cast_from(d).sqrt();
    for j in range_stepped(unit, d, comptime!(UNITS)) {
        qs[j] = f32::cast_from(q[qbase + j]) * scale;
    }
    sync_cube();

    // Scores: one key row per invocation at a time.
    let mut local_max = f32::new(-3.4028235e38); // f32::MIN
    for t in range_stepped(unit, capacity, comptime!(UNITS)) {
        let b = bias[row * capacity + t];
        let mut score = b;
        if b > f32::new(-3.4028235e38) {
            let key = kbase + t * d;
            let mut dot = 0f32;
            for j in 0..d {
                dot += qs[j] * f32::cast_from(keys[key + j]);
            }
            score = dot + b;
        }
        scores[t] = score;
        local_max = max(local_max, score);
    }
    let m = workgroup_reduce(&mut red, local_max, true);

    let mut local_sum = 0f32;
    for t in range_stepped(unit, capacity, comptime!(UNITS)) {
        let p = (scores[t] - m).exp();
        scores[t] = p;
        local_sum += p;
    }
    let total = workgroup_reduce(&mut red, local_sum, false);

    // Weighted values: invocation u adds dimension u % d over the keys t ≡ u / d.
    let parts = comptime!(UNITS / d);
    let j = unit % d;
    let part = unit / d;
    let mut acc = 0f32;
    for t in range_stepped(part, capacity, parts) {
        acc += scores[t] * f32::cast_from(values[kbase + t * d + j]);
    }
    red[unit] = acc;
    sync_cube();
    if unit < d {
        let mut sum = 0f32;
        for p in 0..parts {
            sum += red[unit + p * d];
        }
        out[qbase + unit] = F::cast_from(sum / total);
    }
}

fn kernel(
    q: burn_cubecl::tensor::CubeTensor,
    keys: burn_cubecl::tensor::CubeTensor,
    values: burn_cubecl::tensor::CubeTensor,
    bias: burn_cubecl::tensor::CubeTensor,
) -> burn_cubecl::tensor::CubeTensor {
    let [b, h, s, d] = q.shape().dims();
    let capacity = keys.shape()[2];
    let out = empty_device_dtype(q.client.clone(), q.device.clone(), Shape::new([b, h, s, d]), q.dtype);
    let dtype = dtype_to_storage_type(q.dtype);
    // SAFETY: the operands are contiguous with the shapes checked by the caller (`s` 1, `d`
    // divides UNITS, `kv` divides `h`, capacity within MAX_CAPACITY, bias `[b, capacity]`);
    // every index stays within its row, head and capacity.
    unsafe {
        decode_attention_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(h as u32, b as u32, 1),
            CubeDim::new_1d(UNITS as u32),
            into_contiguous(q).into_tensor_arg(),
            into_contiguous(keys).into_tensor_arg(),
            into_contiguous(values).into_tensor_arg(),
            into_contiguous(bias).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            capacity,
            d,
            dtype,
        )
    }
    out
}

#[cube(launch_unchecked)]
fn greedy_pick_kernel<F: Float>(logits: &Tensor<F>, out: &mut Tensor<f32>, #[define(F)] _dtype: ElemType) {
    let unit = UNIT_POS as usize;
    let vocab = logits.len();
    let mut best = f32::new(-3.4028235e38); // f32::MIN
    let mut index = 0u32;
    let mut bad = 0f32;
    for t in range_stepped(unit, vocab, comptime!(UNITS)) {
        let v = f32::cast_from(logits[t]);
        if v.is_nan() || v.is_inf() {
            bad = 1.0f32;
        }
        // Strictly greater: each invocation keeps its first largest.
        if v > best || t == unit {
            best = v;
            index = t as u32;
        }
    }
    let mut values = Shared::<[f32]>::new_slice(comptime!(UNITS));
    let mut indices = Shared::<[u32]>::new_slice(comptime!(UNITS));
    let mut flags = Shared::<[f32]>::new_slice(comptime!(UNITS));
    values[unit] = best;
    indices[unit] = index;
    flags[unit] = bad;
    sync_cube();
    #[unroll]
    for step in 0..8u32 {
        let stride = comptime!(UNITS >> (step + 1));
        if unit < stride {
            let (v, i) = (values[unit + stride], indices[unit + stride]);
            if v > values[unit] || (v == values[unit] && i < indices[unit]) {
                values[unit] = v;
                indices[unit] = i;
            }
            flags[unit] = max(flags[unit], flags[unit + stride]);
        }
        sync_cube();
    }
    if unit == 0 {
        out[0] = f32::cast_from(indices[0]);
        out[1] = flags[0];
    }
}

fn pick_kernel(logits: burn_cubecl::tensor::CubeTensor) -> burn_cubecl::tensor::CubeTensor {
    let out = empty_device_dtype(logits.client.clone(), logits.device.clone(), Shape::new([2]), burn::tensor::DType::F32);
    let dtype = dtype_to_storage_type(logits.dtype);
    // SAFETY: one workgroup reads `logits` below its length and writes the two outputs.
    unsafe {
        greedy_pick_kernel::launch_unchecked(
            &out.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            into_contiguous(logits).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype,
        )
    }
    out
}

/// The greedy choice from `logits` `[1, vocab]`: `[2]` f32, the index of the first largest
/// logit and 0 when all are finite (not 0 when one is not), in one kernel on a GPU.
pub fn greedy_pick(logits: burn::tensor::Tensor<2>) -> burn::tensor::Tensor<1> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as PickOps>::greedy_pick(logits.into_dispatch()))
}

/// `softmax(q·kᵀ/√d + bias)·v` for one query position: `q` `[b, h, 1, d]`, `keys` and
/// `values` `[b, kv, capacity, d]`, `bias` `[b, capacity]` in f32 (0 where the query looks,
/// `f32::MIN` where it may not) -> `[b, h, 1, d]`.
pub fn decode_attention(
    q: burn::tensor::Tensor<4>,
    keys: burn::tensor::Tensor<4>,
    values: burn::tensor::Tensor<4>,
    bias: burn::tensor::Tensor<2>,
) -> burn::tensor::Tensor<4> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as DecodeOps>::decode_attention(
        q.into_dispatch(),
        keys.into_dispatch(),
        values.into_dispatch(),
        bias.into_dispatch(),
    ))
}
