//! Rotary position embeddings in one kernel: the projection's output `[b, s, heads, d]` in,
//! the rotated heads `[b, heads, s, d]` out.
//!
//! `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [-x₂, x₁]`; the tables come with the
//! first half of `sin` negated (`lora_model`'s `Rope::tables`), so the rotation reads
//! `x·cos + [x₂, x₁]·sin`. The tensor composition (a transposition, a flip of the halves and
//! the products) takes several launches per rotated tensor; this is one, one invocation per
//! output element, in f32. Its backward is the transposed rotation, `dx = dy·cos +
//! [dy₂·sin₂, dy₁·sin₁]` (each half takes the other half's sine), one more kernel back into
//! the `[b, s, heads, d]` layout; the tables are constants and get no gradient.
//!
//! When decoding, [`rotary_cached`] rotates the query and key heads of one product's output and
//! writes the keys and values into the cache's buffers in the same kernel, in place: one launch
//! where the rotation and two slice assignments took three.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
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

    /// The gradient of [`RopeOps::rotary`] with respect to `x` for the output gradient `dy`
    /// `[b, n, s, d]`: `[b, s, n, d]`.
    #[fusion(dtype = dy, shape = Shape::new([dy[0], dy[2], dy[1], dy[3]]))]
    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        composed_backward::<Self>(dy, cos, sin, rotated)
    }

    /// A decoding step's rotation and cache write in one operation: `x` `[b, s, heads + 2·kv,
    /// d]` (query, key and value heads, as one product gives them) and the tables as for
    /// [`RopeOps::rotary`]; `keys` and `values` `[b, kv, capacity, d]` with `past + s <=
    /// capacity`. Returns the rotated query heads `[b, heads, s, d]`, and `keys` and `values`
    /// with positions `past..past + s` set to the rotated key heads and the value heads (written
    /// in place where the buffers are not shared).
    #[fusion(meta = |x, _cos, _sin, keys, values, heads, _past| (query_spec(x, *heads), keys.clone(), values.clone()))]
    #[allow(clippy::type_complexity)]
    fn rotary_cached(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        heads: usize,
        past: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed_cached::<Self>(x, cos, sin, keys, values, heads, past)
    }
}

/// The rotated query heads' layout for [`RopeOps::rotary_cached`]: `[b, heads, s, d]`.
fn query_spec(x: &burn::backend::fusion::custom::TensorSpec, heads: usize) -> burn::backend::fusion::custom::TensorSpec {
    burn::backend::fusion::custom::TensorSpec::new(Shape::new([x.shape[0], heads, x.shape[1], x.shape[3]]), x.dtype)
}

/// [`RopeOps::rotary_cached`] as [`RopeOps::rotary`] and two slice assignments.
fn composed_cached<B: Backend + RopeOps>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    keys: FloatTensor<B>,
    values: FloatTensor<B>,
    heads: usize,
    past: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let [b, s, n, d] = x.shape().dims();
    let kv = (n - heads) / 2;
    let all = B::rotary(x, cos, sin, heads + kv); // [b, n, s, d]
    let part =
        |start: usize, count: usize| B::float_slice(all.clone(), &[Slice::from(0..b), Slice::from(start..start + count), Slice::from(0..s), Slice::from(0..d)]);
    let at = [Slice::from(0..b), Slice::from(0..kv), Slice::from(past..past + s), Slice::from(0..d)];
    let keys = B::float_slice_assign(keys, &at, part(heads, kv));
    let values = B::float_slice_assign(values, &at, part(heads + kv, kv));
    (part(0, heads), keys, values)
}

impl RopeOps for Flex {}

impl RopeOps for burn_cubecl::CubeBackend {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        let [b, s, _, d] = x.shape().dims();
        if !kernel_takes(&x, [b, s, d], &cos, &sin) {
            return composed::<Self>(x, cos, sin, rotated);
        }
        kernel(x, cos, sin, rotated)
    }

    fn rotary_backward(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        let [b, _, s, d] = dy.shape().dims();
        if !kernel_takes(&dy, [b, s, d], &cos, &sin) {
            return composed_backward::<Self>(dy, cos, sin, rotated);
        }
        backward_kernel(dy, cos, sin, rotated)
    }

    fn rotary_cached(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        heads: usize,
        past: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let [b, s, n, d] = x.shape().dims();
        let [kb, kv, capacity, kd] = keys.shape().dims();
        let fits = n > heads
            && n - heads == 2 * kv
            && kb == b
            && kd == d
            && past + s <= capacity
            && values.shape() == keys.shape()
            && keys.dtype == x.dtype
            && values.dtype == x.dtype;
        if !fits || !kernel_takes(&x, [b, s, d], &cos, &sin) {
            return composed_cached::<Self>(x, cos, sin, keys, values, heads, past);
        }
        cached_kernel(x, cos, sin, keys, values, heads, past)
    }
}

/// Whether the kernels take `t` (rows `b`, positions `s`, head size `d`) with the tables `cos`
/// and `sin`: an even head size, one dtype, and one table for every row (`[s, d]`) or one per
/// row (`[b·s, d]`).
fn kernel_takes(t: &CubeTensor, [b, s, d]: [usize; 3], cos: &CubeTensor, sin: &CubeTensor) -> bool {
    let rows = cos.shape()[0];
    d.is_multiple_of(2) && t.dtype == cos.dtype && t.dtype == sin.dtype && (rows == s || rows == b * s) && sin.shape() == cos.shape()
}

#[derive(Debug)]
struct RopeBackward;

impl<B: Backend + RopeOps> Backward<B, 1> for RopeBackward {
    /// The tables `(cos, sin)` and the rotated heads.
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (cos, sin, rotated) = ops.state;
        if let Some(node) = x_node {
            grads.register::<B>(node.id, B::rotary_backward(dy, cos, sin, rotated));
        }
    }
}

/// Under autodiff the forward's kernel and a backward of its own; only `x` is a parent (the
/// tables are constants).
impl<B: Backend + RopeOps, C: CheckpointStrategy> RopeOps for Autodiff<B, C> {
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, rotated: usize) -> FloatTensor<Self> {
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RopeBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rotary(x.into_primitive(), cos.clone(), sin.clone(), rotated);
                prep.finish((cos, sin, rotated), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(x.into_primitive(), cos, sin, rotated)),
        }
    }
}

/// `dx` `[b, s, n, d]` from `dy` `[b, n, s, d]`: `dy·cos + swap(dy·sin)` on heads `0..rotated`,
/// `dy` on the others. Since `swap(dy·sin) = swap(dy)·swap(sin)`, that is the forward rotation
/// of `dy` with the sine's halves exchanged.
fn composed_backward<B: Backend>(dy: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>, rotated: usize) -> FloatTensor<B> {
    let [rows, d] = sin.shape().dims();
    let halves = B::float_reshape(sin, Shape::new([rows, 2, d / 2]));
    let sin = B::float_reshape(B::float_flip(halves, &[1]), Shape::new([rows, d]));
    B::float_swap_dims(composed::<B>(B::float_swap_dims(dy, 1, 2), cos, sin, rotated), 1, 2)
}

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

#[cube(launch_unchecked)]
fn rotary_backward_kernel<F: Float>(dy: &Tensor<F>, cos: &Tensor<F>, sin: &Tensor<F>, dx: &mut Tensor<F>, rotated: usize, #[define(F)] _dtype: ElemType) {
    let pos = ABSOLUTE_POS;
    if pos >= dx.len() {
        terminate!();
    }
    // dx [b, s, n, d] from dy [b, n, s, d].
    let (n, d) = (dx.shape(2), dx.shape(3));
    let s = dx.shape(1);
    let j = pos % d;
    let head = (pos / d) % n;
    let t = (pos / (d * n)) % s;
    let row = pos / (d * n * s);
    let half = d / 2;
    let partner = if j < half { j + half } else { j - half };
    let base = ((row * n + head) * s + t) * d;
    let mut at = t * d;
    if cos.shape(0) != s {
        at = (row * s + t) * d;
    }
    if head < rotated {
        let value = f32::cast_from(dy[base + j]) * f32::cast_from(cos[at + j]) + f32::cast_from(dy[base + partner]) * f32::cast_from(sin[at + partner]);
        dx[pos] = F::cast_from(value);
    } else {
        dx[pos] = dy[base + j];
    }
}

fn backward_kernel(dy: CubeTensor, cos: CubeTensor, sin: CubeTensor, rotated: usize) -> CubeTensor {
    let [b, n, s, d] = dy.shape().dims();
    let dx = empty_device_dtype(dy.client.clone(), dy.device.clone(), Shape::new([b, s, n, d]), dy.dtype);
    let elements = b * n * s * d;
    let cube_dim = CubeDim::new(&dx.client, elements);
    let count = calculate_cube_count_elemwise(&dx.client, elements, cube_dim);
    let dtype = dtype_to_storage_type(dy.dtype);
    // SAFETY: the operands are contiguous, `dy` `[b, n, s, d]` and the tables `[s, d]` or
    // `[b·s, d]` (`rotary_backward` checked); every index is decomposed from an output position
    // below `dx.len()`.
    unsafe {
        rotary_backward_kernel::launch_unchecked(
            &dx.client,
            count,
            cube_dim,
            into_contiguous(dy).into_tensor_arg(),
            into_contiguous(cos).into_tensor_arg(),
            into_contiguous(sin).into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            rotated,
            dtype,
        )
    }
    dx
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

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rotary_cached_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    q: &mut Tensor<F>,
    keys: &mut Tensor<F>,
    values: &mut Tensor<F>,
    past: usize,
    #[define(F)] _dtype: ElemType,
) {
    let pos = ABSOLUTE_POS;
    if pos >= x.len() {
        terminate!();
    }
    // One invocation per element of x [b, s, n, d]: consecutive invocations read consecutive
    // elements.
    let (s, n, d) = (x.shape(1), x.shape(2), x.shape(3));
    let (heads, kv, capacity) = (q.shape(1), keys.shape(1), keys.shape(2));
    let j = pos % d;
    let head = (pos / d) % n;
    let t = (pos / (d * n)) % s;
    let row = pos / (d * n * s);
    let half = d / 2;
    let partner = if j < half { j + half } else { j - half };
    let mut at = t * d + j;
    if cos.shape(0) != s {
        at = (row * s + t) * d + j;
    }
    if head < heads + kv {
        let value = F::cast_from(f32::cast_from(x[pos]) * f32::cast_from(cos[at]) + f32::cast_from(x[pos - j + partner]) * f32::cast_from(sin[at]));
        if head < heads {
            q[((row * heads + head) * s + t) * d + j] = value;
        } else {
            keys[((row * kv + head - heads) * capacity + past + t) * d + j] = value;
        }
    } else {
        values[((row * kv + head - heads - kv) * capacity + past + t) * d + j] = x[pos];
    }
}

/// A buffer that may be written: `t` itself, contiguous, when nothing else holds it, else a copy.
fn writable(t: CubeTensor) -> CubeTensor {
    let t = into_contiguous(t);
    if t.can_mut() { t } else { t.copy() }
}

fn cached_kernel(
    x: CubeTensor,
    cos: CubeTensor,
    sin: CubeTensor,
    keys: CubeTensor,
    values: CubeTensor,
    heads: usize,
    past: usize,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let [b, s, n, d] = x.shape().dims();
    let q = empty_device_dtype(x.client.clone(), x.device.clone(), Shape::new([b, heads, s, d]), x.dtype);
    let (keys, values) = (writable(keys), writable(values));
    let elements = b * s * n * d;
    let cube_dim = CubeDim::new(&q.client, elements);
    let count = calculate_cube_count_elemwise(&q.client, elements, cube_dim);
    let dtype = dtype_to_storage_type(x.dtype);
    // SAFETY: the operands are contiguous, `x` `[b, s, heads + 2·kv, d]`, the tables `[s, d]` or
    // `[b·s, d]`, the buffers `[b, kv, capacity, d]` with `past + s <= capacity`
    // (`rotary_cached` checked); every index is decomposed from a position below `x.len()`.
    unsafe {
        rotary_cached_kernel::launch_unchecked(
            &q.client,
            count,
            cube_dim,
            into_contiguous(x).into_tensor_arg(),
            into_contiguous(cos).into_tensor_arg(),
            into_contiguous(sin).into_tensor_arg(),
            q.clone().into_tensor_arg(),
            keys.clone().into_tensor_arg(),
            values.clone().into_tensor_arg(),
            past,
            dtype,
        )
    }
    (q, keys, values)
}

/// Rotates `x` `[b, s, heads, d]` by the tables `cos` and signed `sin` `[s, d]`, or `[b·s, d]`
/// with a table per row (the first half of `sin` negated) -> `[b, heads, s, d]`; only heads `0..rotated` are rotated, the
/// others are copied (query and key heads ahead of value heads in one tensor). Differentiable
/// in `x`, with a backward of its own; the tables get no gradient.
pub fn rotary(x: burn::tensor::Tensor<4>, cos: burn::tensor::Tensor<2>, sin: burn::tensor::Tensor<2>, rotated: usize) -> burn::tensor::Tensor<4> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as RopeOps>::rotary(x.into_dispatch(), cos.into_dispatch(), sin.into_dispatch(), rotated))
}

/// [`RopeOps::rotary_cached`]: `x` `[b, s, heads + 2·kv, d]` (the query, key and value heads of
/// one product) and the tables `[s, d]` (or `[b·s, d]`), the cache's `keys` and `values` `[b, kv,
/// capacity, d]` -> the rotated query heads `[b, heads, s, d]`, and the buffers with positions
/// `past..past + s` holding the rotated key heads and the value heads; one kernel on a GPU,
/// writing the buffers in place when nothing else holds them.
pub fn rotary_cached(
    x: burn::tensor::Tensor<4>,
    cos: burn::tensor::Tensor<2>,
    sin: burn::tensor::Tensor<2>,
    keys: burn::tensor::Tensor<4>,
    values: burn::tensor::Tensor<4>,
    heads: usize,
    past: usize,
) -> (burn::tensor::Tensor<4>, burn::tensor::Tensor<4>, burn::tensor::Tensor<4>) {
    use burn::tensor::Tensor;
    let (q, keys, values) = <Dispatch as RopeOps>::rotary_cached(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        keys.into_dispatch(),
        values.into_dispatch(),
        heads,
        past,
    );
    (Tensor::from_dispatch(q), Tensor::from_dispatch(keys), Tensor::from_dispatch(values))
}
