//! Causal self-attention that never holds the `[heads, T, T]` scores: the queries are taken in
//! chunks, and the backward pass recomputes each chunk's probabilities from the forward's
//! log-sum-exp instead of keeping them (the flash-attention recurrence, at the level of tensor
//! operations: each chunk's products run on the backend's matmul).
//!
//! Memory is `O(chunk × T)` per layer instead of `O(T²)`, in the forward and the backward: what
//! makes 16k-token sequences trainable. Grouped-query attention shares each key/value head
//! between its group of query heads without copying it. Masks are causal, optionally with a
//! sliding window, and optionally with key padding; a forbidden score is set to `f32::MIN`
//! before the softmax, as the model's reference path does. A query that may see no key (a
//! left-padding position) gets an average of the values up to its chunk's end, where the full
//! score matrix averages all of them: such positions never reach a loss.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Scalar, TensorMetadata, backend_extension, get_device_settings};
use burn::tensor::{DType, FloatDType, IntDType, Shape, Tensor};
use burn_flex::FlexTensor;

use crate::cpu::{self, f32s, flex_f32};
use crate::flash;
pub use crate::mask::key_visible;
use crate::tensor::{float_dtype, slice_dim};

/// Elements of one chunk's f32 score block (`batch × heads × chunk × T`): 64 M, 256 MiB.
const CHUNK_ELEMENTS: usize = 64 << 20;

/// How the attention is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masking {
    /// Keys at most this many positions behind the query (`q - k < window`); `None` for all.
    pub window: Option<usize>,
    /// Query positions per chunk; 0 picks one that keeps a chunk's scores near 256 MiB.
    pub chunk: usize,
}

/// Chunked attention as a backend operation, so that autodiff can give it its own backward.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait AttentionOps: Backend {
    /// `q` `[b, h, s, d]`, `k` and `v` `[b, kv, s, d]` (`kv` divides `h`; query head `i` uses
    /// key/value head `i / (h / kv)`), `keys` `[b, s]` in f32, 1 for a real key and 0 for
    /// padding, or each packed sequence's number ([`key_visible`]):
    /// `softmax(q·kᵀ/√d + mask)·v` `[b, h, s, d]`, causal, in the dtype of `q`.
    #[fusion(dtype = q, shape = q)]
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> FloatTensor<Self> {
        Self::attention_forward(q, k, v, keys, window, chunk).0
    }

    /// [`AttentionOps::chunked_attention`]'s output and the f32 log-sum-exp of every query's
    /// scores `[b, kv, h / kv, s, 1]`, which [`AttentionOps::attention_backward`] takes.
    #[fusion(meta = |q, k, _v, _keys, _window, _chunk| (q.clone(), lse_spec(q, k)))]
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        forward::<Self>(q, k, v, &keys, window, chunk)
    }

    /// `(dq, dk, dv)` for the output gradient `dout`, given the forward's inputs, output and
    /// log-sum-exp (the probabilities are recomputed from them).
    #[fusion(meta = |q, k, v, _keys, _out, _lse, _dout, _window, _chunk| (q.clone(), k.clone(), v.clone()))]
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        backward::<Self>(AttentionState { q, k, v, keys, out, lse, window, chunk }, dout)
    }
}

/// On the CPU, f32 attention runs as [`crate::cpu`]'s kernels: one task per (batch row,
/// key/value head) on every core, no chunk of scores ever leaving the cache. Other dtypes take
/// the composition.
impl AttentionOps for Flex {
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(dims) = cpu_dims(&q, &k, &v, &keys) else {
            return forward::<Self>(q, k, v, &keys, window, chunk);
        };
        let [q, k, v, keys] = [q, k, v, keys].map(|t| t.to_contiguous());
        let (out, lse) = cpu::attention_forward(f32s(&q), f32s(&k), f32s(&v), f32s(&keys), dims, window);
        let cpu::Dims { b, h, kv, s, d } = dims;
        (flex_f32(out, [b, h, s, d]), flex_f32(lse, [b, kv, h / kv, s, 1]))
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let all_f32 = [&out, &lse, &dout].iter().all(|t| t.dtype() == DType::F32);
        let Some(dims) = cpu_dims(&q, &k, &v, &keys).filter(|_| all_f32) else {
            return backward::<Self>(AttentionState { q, k, v, keys, out, lse, window, chunk }, dout);
        };
        let [q, k, v, keys, out, lse, dout] = [q, k, v, keys, out, lse, dout].map(|t| t.to_contiguous());
        let (dq, dk, dv) = cpu::attention_backward(f32s(&q), f32s(&k), f32s(&v), f32s(&keys), f32s(&out), f32s(&lse), f32s(&dout), dims, window);
        let cpu::Dims { b, h, kv, s, d } = dims;
        (flex_f32(dq, [b, h, s, d]), flex_f32(dk, [b, kv, s, d]), flex_f32(dv, [b, kv, s, d]))
    }
}

/// The sizes of an f32 attention call the CPU kernels take, or `None`.
fn cpu_dims(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, keys: &FlexTensor) -> Option<cpu::Dims> {
    let [b, h, s, d] = q.shape().dims();
    let kv = k.shape()[1];
    let all_f32 = [q, k, v, keys].iter().all(|t| t.dtype() == DType::F32);
    (all_f32 && kv > 0 && h % kv == 0 && k.shape().dims::<4>() == [b, kv, s, d] && v.shape() == k.shape() && keys.shape().dims::<2>() == [b, s])
        .then_some(cpu::Dims { b, h, kv, s, d })
}

/// The log-sum-exp's description under fusion: `[b, kv, h / kv, s, 1]` f32.
fn lse_spec(q: &burn::backend::fusion::custom::TensorSpec, k: &burn::backend::fusion::custom::TensorSpec) -> burn::backend::fusion::custom::TensorSpec {
    let (b, h, s, kv) = (q.shape[0], q.shape[1], q.shape[2], k.shape[1]);
    burn::backend::fusion::custom::TensorSpec::new(Shape::new([b, kv, h / kv.max(1), s, 1]), DType::F32)
}

/// On a GPU, [`crate::flash`]'s kernels where its mode and the shapes take them, the chunked
/// composition elsewhere.
impl AttentionOps for burn_cubecl::CubeBackend {
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match flash::path(&q, &k, &v, &keys, &[]) {
            Some(path) => flash::forward(q, k, v, keys, window, path),
            None => forward::<Self>(q, k, v, &keys, window, chunk),
        }
    }

    fn attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // One f32 log-sum-exp per query (`path` checked that `q` is `[b, h, s, d]`).
        let lse_fits = |q: &FloatTensor<Self>| lse.dtype == DType::F32 && lse.shape().num_elements() * q.shape()[3] == q.shape().num_elements();
        match flash::path(&q, &k, &v, &keys, &[&out, &dout]).filter(|_| lse_fits(&q)) {
            Some(path) => flash::backward(q, k, v, keys, out, lse, dout, window, path),
            None => backward::<Self>(AttentionState { q, k, v, keys, out, lse, window, chunk }, dout),
        }
    }
}

/// The query chunk size for `b` rows, `h` heads and `s` positions.
fn chunk_size(b: usize, h: usize, s: usize, asked: usize) -> usize {
    if asked > 0 {
        return asked.min(s).max(1);
    }
    (CHUNK_ELEMENTS / (b * h * s).max(1)).clamp(16, s.max(16)).min(s)
}

/// True where query `start + i` may not see key `j` (`i < c`, `j < end`), `[b, kv, rep·c, end]`.
#[allow(clippy::too_many_arguments)]
fn chunk_mask<B: Backend>(keys: &FloatTensor<B>, dims: [usize; 4], start: usize, c: usize, end: usize, window: usize) -> BoolTensor<B> {
    let [b, kv, rep, _] = dims;
    let device = keys.device();
    let bool_dtype = get_device_settings::<B>(&device).bool_dtype;
    let q = B::int_reshape(B::int_arange(start as i64..(start + c) as i64, &device, IntDType::I32), Shape::new([c, 1]));
    let k = B::int_reshape(B::int_arange(0..end as i64, &device, IntDType::I32), Shape::new([1, end]));
    let diff = B::int_sub(B::int_expand(q, Shape::new([c, end])), B::int_expand(k, Shape::new([c, end]))); // q - k
    let mut forbidden = B::int_lower_elem(diff.clone(), Scalar::from(0i32), bool_dtype);
    if window > 0 {
        forbidden = B::bool_or(forbidden, B::int_greater_equal_elem(diff, Scalar::from(window as i32), bool_dtype));
    }
    let forbidden = B::bool_expand(B::bool_reshape(forbidden, Shape::new([1, 1, 1, c, end])), Shape::new([b, kv, rep, c, end]));
    // [`key_visible`]: padding keys, and with packed rows the keys of another sequence.
    let key_flags = B::float_slice(keys.clone(), &slice_dim(2, 1, 0, end)); // [b, end]
    let padding = B::float_lower_elem(key_flags.clone(), Scalar::from(0.5f32), bool_dtype);
    let hidden = B::bool_expand(B::bool_reshape(padding, Shape::new([b, 1, end])), Shape::new([b, c, end]));
    let query_flags = B::float_slice(keys.clone(), &slice_dim(2, 1, start, start + c)); // [b, c]
    let other = B::float_not_equal(
        B::float_expand(B::float_reshape(key_flags, Shape::new([b, 1, end])), Shape::new([b, c, end])),
        B::float_expand(B::float_reshape(query_flags.clone(), Shape::new([b, c, 1])), Shape::new([b, c, end])),
        bool_dtype,
    );
    let real_query = B::float_greater_equal_elem(query_flags, Scalar::from(0.5f32), bool_dtype);
    let other = B::bool_and(other, B::bool_expand(B::bool_reshape(real_query, Shape::new([b, c, 1])), Shape::new([b, c, end])));
    let hidden = B::bool_or(hidden, other);
    let hidden = B::bool_expand(B::bool_reshape(hidden, Shape::new([b, 1, 1, c, end])), Shape::new([b, kv, rep, c, end]));
    B::bool_reshape(B::bool_or(forbidden, hidden), Shape::new([b, kv, rep * c, end]))
}

/// Queries `start..start + c` of `q` `[b, h, s, d]` as `[b, kv, rep·c, d]`.
fn query_chunk<B: Backend>(q: &FloatTensor<B>, kv: usize, start: usize, c: usize) -> FloatTensor<B> {
    let [b, h, s, d] = q.shape().dims();
    let rep = h / kv;
    let q = B::float_reshape(q.clone(), Shape::new([b, kv, rep, s, d]));
    let q = B::float_slice(q, &slice_dim(5, 3, start, start + c));
    B::float_reshape(q, Shape::new([b, kv, rep * c, d]))
}

/// The f32 scores `q_c·k[..end]ᵀ/√d` of one chunk, masked: `[b, kv, rep·c, end]`.
fn chunk_scores<B: Backend>(qc: FloatTensor<B>, k: &FloatTensor<B>, mask: BoolTensor<B>, end: usize, scale: f64) -> FloatTensor<B> {
    let kc = B::float_slice(k.clone(), &slice_dim(4, 2, 0, end)); // [b, kv, end, d]
    let s = B::float_matmul(qc, B::float_swap_dims(kc, 2, 3));
    let s = B::float_mul_scalar(B::float_cast(s, FloatDType::F32), Scalar::from(scale));
    B::float_mask_fill(s, mask, Scalar::from(f32::MIN))
}

/// The output `[b, h, s, d]` and the f32 log-sum-exp of every query's scores `[b, kv, rep·s, 1]`
/// (query-major within each group, as the chunks are laid out).
fn forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    keys: &FloatTensor<B>,
    window: usize,
    chunk: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let [b, h, s, d] = q.shape().dims();
    let kv = k.shape()[1];
    let rep = h / kv;
    let dtype = float_dtype(q.dtype());
    let scale = 1.0 / (d as f64).sqrt();
    let c = chunk_size(b, h, s, chunk);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..s).step_by(c) {
        let c = c.min(s - start);
        let end = start + c; // causal: later keys are never seen
        let mask = chunk_mask::<B>(keys, [b, kv, rep, s], start, c, end, window);
        let scores = chunk_scores::<B>(query_chunk::<B>(&q, kv, start, c), &k, mask, end, scale);
        let max = B::float_max_dim(scores.clone(), 3); // [b, kv, rep·c, 1]
        let e = B::float_exp(B::float_sub(scores, max.clone()));
        let sum = B::float_sum_dim(e.clone(), 3);
        let p = B::float_cast(B::float_div(e, sum.clone()), dtype);
        let vc = B::float_slice(v.clone(), &slice_dim(4, 2, 0, end));
        let o = B::float_matmul(p, vc); // [b, kv, rep·c, d]
        outs.push(B::float_reshape(o, Shape::new([b, kv, rep, c, d])));
        lses.push(B::float_reshape(B::float_add(max, B::float_log(sum)), Shape::new([b, kv, rep, c, 1])));
    }
    let out = B::float_reshape(B::float_cat(outs, 3), Shape::new([b, h, s, d]));
    let lse = B::float_cat(lses, 3); // [b, kv, rep, s, 1]
    (out, lse)
}

/// What the backward pass keeps: the inputs, the output and the log-sum-exp.
#[derive(Debug, Clone)]
struct AttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    keys: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    window: usize,
    chunk: usize,
}

/// `(dq, dk, dv)` for the output gradient `dout` `[b, h, s, d]`.
fn backward<B: Backend>(st: AttentionState<B>, dout: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let [b, h, s, d] = st.q.shape().dims();
    let kv = st.k.shape()[1];
    let rep = h / kv;
    let dtype = float_dtype(st.q.dtype());
    let scale = 1.0 / (d as f64).sqrt();
    let c = chunk_size(b, h, s, st.chunk);
    let device = st.q.device();
    let mut dk = B::float_zeros(Shape::new([b, kv, s, d]), &device, FloatDType::F32);
    let mut dv = B::float_zeros(Shape::new([b, kv, s, d]), &device, FloatDType::F32);
    let mut dqs = Vec::new();
    for start in (0..s).step_by(c) {
        let c = c.min(s - start);
        let end = start + c;
        let mask = chunk_mask::<B>(&st.keys, [b, kv, rep, s], start, c, end, st.window);
        let qc = query_chunk::<B>(&st.q, kv, start, c); // [b, kv, rep·c, d]
        let scores = chunk_scores::<B>(qc.clone(), &st.k, mask, end, scale);
        let lse = B::float_reshape(B::float_slice(st.lse.clone(), &slice_dim(5, 3, start, end)), Shape::new([b, kv, rep * c, 1]));
        let p = B::float_exp(B::float_sub(scores, lse)); // f32 [b, kv, rep·c, end]
        let doc = query_chunk::<B>(&dout, kv, start, c);
        let oc = query_chunk::<B>(&st.out, kv, start, c);
        let kc = B::float_slice(st.k.clone(), &slice_dim(4, 2, 0, end));
        let vc = B::float_slice(st.v.clone(), &slice_dim(4, 2, 0, end));
        // dv[..end] += pᵀ·do
        let p_half = B::float_cast(p.clone(), dtype);
        let dvc = B::float_cast(B::float_matmul(B::float_swap_dims(p_half, 2, 3), doc.clone()), FloatDType::F32);
        let range = slice_dim(4, 2, 0, end);
        dv = B::float_slice_assign(dv.clone(), &range, B::float_add(B::float_slice(dv, &range), dvc));
        // ds = p ∘ (do·vᵀ − rowsum(do ∘ o)) / √d
        let dp = B::float_cast(B::float_matmul(doc.clone(), B::float_swap_dims(vc, 2, 3)), FloatDType::F32);
        let delta = B::float_sum_dim(B::float_mul(B::float_cast(doc, FloatDType::F32), B::float_cast(oc, FloatDType::F32)), 3);
        let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, delta)), Scalar::from(scale));
        let ds = B::float_cast(ds, dtype);
        // dq = ds·k, dk[..end] += dsᵀ·q
        let dqc = B::float_matmul(ds.clone(), kc); // [b, kv, rep·c, d]
        dqs.push(B::float_reshape(dqc, Shape::new([b, kv, rep, c, d])));
        let dkc = B::float_cast(B::float_matmul(B::float_swap_dims(ds, 2, 3), qc), FloatDType::F32);
        dk = B::float_slice_assign(dk.clone(), &range, B::float_add(B::float_slice(dk, &range), dkc));
    }
    let dq = B::float_reshape(B::float_cat(dqs, 3), Shape::new([b, h, s, d]));
    (dq, B::float_cast(dk, dtype), B::float_cast(dv, dtype))
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + AttentionOps> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let AttentionState { q, k, v, keys, out, lse, window, chunk } = ops.state;
        let (dq, dk, dv) = B::attention_backward(q, k, v, keys, out, lse, dout, window, chunk);
        if let Some(node) = q_node {
            grads.register::<B>(node.id, dq);
        }
        if let Some(node) = k_node {
            grads.register::<B>(node.id, dk);
        }
        if let Some(node) = v_node {
            grads.register::<B>(node.id, dv);
        }
    }
}

impl<B: Backend + AttentionOps, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
    fn chunked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        window: usize,
        chunk: usize,
    ) -> FloatTensor<Self> {
        let keys = keys.into_primitive();
        match AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, lse) = B::attention_forward(q.clone(), k.clone(), v.clone(), keys.clone(), window, chunk);
                let state = AttentionState { q, k, v, keys, out: out.clone(), lse, window, chunk };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::chunked_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), keys, window, chunk)),
        }
    }
}

/// Causal attention over `q` `[b, h, s, d]`, `k`, `v` `[b, kv, s, d]`, with key padding `keys`
/// `[b, s]` (1 real, 0 padding; f32), in chunks of queries (see the module's documentation):
/// `[b, h, s, d]`. Differentiable in `q`, `k` and `v`.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, keys: Tensor<2>, masking: Masking) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as AttentionOps>::chunked_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        keys.into_dispatch(),
        masking.window.unwrap_or(0),
        masking.chunk,
    ))
}
