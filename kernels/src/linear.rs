//! `x·Wᵀ` with a frozen `W`, as one operation whose backward computes only the input gradient
//! `dy·W` and keeps `W` itself (never a copy or a transposed copy) for it.
//!
//! On the CubeCL backend both products use [`crate::matmul::matmul_cm2`] where the device and
//! dtype allow it, and burn's matmul otherwise; flex uses burn's matmul. A forward product of
//! at most [`crate::matvec::MATVEC_ROWS`] rows (decoding) is a matrix-vector kernel.

use burn::backend::Scalar;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use burn_flex::FlexTensor;

use crate::cpu::{f32s, flex_f32};
use crate::matmul::{matmul_cm2, supported};
use crate::matvec::{MATVEC_ROWS, dense_matvec_t, matvec3_t, swiglu_matvec_t, takes_norm};
use crate::norm::NormOps;

/// Products with a constant right-hand side.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait LinearOps: Backend {
    /// `x` `[m, k]` · `Wᵀ` (`w` `[n, k]`) -> `[m, n]`; `w` gets no gradient.
    #[fusion(dtype = x, shape = Shape::new([x[0], w[0]]))]
    fn frozen_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `a` `[m, k]` · `b` `[k, n]` -> `[m, n]`; `b` gets no gradient.
    #[fusion(dtype = a, shape = Shape::new([a[0], b[1]]))]
    fn frozen_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }

    /// `residual + x·Wᵀ`: `x` `[m, k]`, frozen `w` `[n, k]`, `residual` `[m, n]` -> `[m, n]`.
    #[fusion(dtype = x, shape = Shape::new([x[0], w[0]]))]
    fn frozen_linear_add_t(x: FloatTensor<Self>, w: FloatTensor<Self>, residual: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_linear_add::<Self>(x, w, residual)
    }

    /// `[x·wqᵀ, x·wkᵀ, x·wvᵀ]`: `x` `[m, k]`, frozen `wq`, `wk`, `wv` `[n·, k]` ->
    /// `[m, nq + nk + nv]` (attention's three input projections).
    #[fusion(dtype = x, shape = Shape::new([x[0], wq[0] + wk[0] + wv[0]]))]
    fn frozen_linear3_t(x: FloatTensor<Self>, wq: FloatTensor<Self>, wk: FloatTensor<Self>, wv: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_linear3::<Self>(x, wq, wk, wv)
    }

    /// [`LinearOps::frozen_linear3_t`] of the RMSNorm of `x` by `norm` `[k]` (in `x`'s dtype) and
    /// `eps`, as [`crate::norm::rms_norm`] computes it.
    #[fusion(dtype = x, shape = Shape::new([x[0], wq[0] + wk[0] + wv[0]]))]
    fn frozen_norm_linear3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        wq: FloatTensor<Self>,
        wk: FloatTensor<Self>,
        wv: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_linear3::<Self>(crate::norm::composed::<Self>(x, norm, eps), wq, wk, wv)
    }

    /// [`LinearOps::frozen_swiglu_t`] of the RMSNorm of `x` by `norm` `[k]` (in `x`'s dtype) and
    /// `eps`, as [`crate::norm::rms_norm`] computes it.
    #[fusion(dtype = x, shape = Shape::new([x[0], gate[0]]))]
    fn frozen_norm_swiglu_t(x: FloatTensor<Self>, norm: FloatTensor<Self>, eps: f32, gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_swiglu::<Self>(crate::norm::composed::<Self>(x, norm, eps), gate, up)
    }

    /// The SwiGLU block's activation: `silu(x·gateᵀ) · (x·upᵀ)` for `x` `[m, k]` and frozen
    /// `gate`, `up` `[n, k]` -> `[m, n]`. Under autodiff, the tracked composition.
    #[fusion(dtype = x, shape = Shape::new([x[0], gate[0]]))]
    fn frozen_swiglu_t(x: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_swiglu::<Self>(x, gate, up)
    }

    /// SwiGLU's activation `silu(gate)·up` for equally shaped `gate` and `up`. Under autodiff one
    /// operation whose backward keeps only the two inputs ([`LinearOps::swiglu_backward`]).
    #[fusion(default)]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_swiglu_activation::<Self>(gate, up)
    }

    /// The gradients `(dgate, dup)` of [`LinearOps::swiglu`] for the output's gradient `grad`:
    /// `dup = grad·silu(gate)`, `dgate = grad·up·σ(gate)·(1 + gate·(1 − σ(gate)))`.
    #[fusion(default)]
    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_swiglu_backward::<Self>(gate, up, grad)
    }
}

/// [`LinearOps::swiglu`] as tensor operations.
fn composed_swiglu_activation<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(B::float_mul(gate.clone(), B::sigmoid(gate)), up)
}

/// [`LinearOps::swiglu_backward`] as tensor operations.
fn composed_swiglu_backward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>, grad: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(gate.clone());
    let dup = B::float_mul(grad.clone(), B::float_mul(gate.clone(), s.clone()));
    let one = Scalar::from(1.0f32);
    let slope = B::float_add_scalar(B::float_mul(gate, B::float_add_scalar(B::float_neg(s.clone()), one)), one);
    let dgate = B::float_mul(B::float_mul(B::float_mul(grad, up), s), slope);
    (dgate, dup)
}

/// [`LinearOps::frozen_linear_add_t`] as a sum after the product (every backend's fallback).
fn composed_linear_add<B: LinearOps>(x: FloatTensor<B>, w: FloatTensor<B>, residual: FloatTensor<B>) -> FloatTensor<B> {
    B::float_add(residual, B::frozen_linear_t(x, w))
}

/// [`LinearOps::frozen_linear3_t`] as three products and a concatenation.
fn composed_linear3<B: LinearOps>(x: FloatTensor<B>, wq: FloatTensor<B>, wk: FloatTensor<B>, wv: FloatTensor<B>) -> FloatTensor<B> {
    let q = B::frozen_linear_t(x.clone(), wq);
    let k = B::frozen_linear_t(x.clone(), wk);
    let v = B::frozen_linear_t(x, wv);
    B::float_cat(vec![q, k, v], 1)
}

/// [`LinearOps::frozen_swiglu_t`] as two products and the activation.
fn composed_swiglu<B: LinearOps>(x: FloatTensor<B>, gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let u = B::frozen_linear_t(x.clone(), up);
    let g = B::frozen_linear_t(x, gate);
    B::swiglu(g, u)
}

/// On the CPU, f32 SwiGLU runs as [`crate::cpu`]'s kernels (every core, a vectorized
/// exponential); other dtypes take the composition.
impl LinearOps for Flex {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !cpu_elementwise(&[&gate, &up]) {
            return composed_swiglu_activation::<Self>(gate, up);
        }
        let shape = gate.shape();
        let [gate, up] = [gate, up].map(|t| t.to_contiguous());
        let out = crate::cpu::swiglu(f32s(&gate), f32s(&up));
        flex_f32(out, shape)
    }

    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !cpu_elementwise(&[&gate, &up, &grad]) {
            return composed_swiglu_backward::<Self>(gate, up, grad);
        }
        let shape = gate.shape();
        let [gate, up, grad] = [gate, up, grad].map(|t| t.to_contiguous());
        let (dgate, dup) = crate::cpu::swiglu_backward(f32s(&gate), f32s(&up), f32s(&grad));
        (flex_f32(dgate, shape.clone()), flex_f32(dup, shape))
    }
}

/// Whether the CPU's element-wise kernels take these tensors: f32, one shape.
fn cpu_elementwise(ts: &[&FlexTensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.shape() == ts[0].shape())
}

impl LinearOps for burn_cubecl::CubeBackend {
    fn frozen_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // Decoding: a few rows read the weight once, bound by memory.
        if x.dtype == w.dtype && x.shape()[0] <= MATVEC_ROWS && x.shape()[1] == w.shape()[1] {
            return dense_matvec_t(x, w, None);
        }
        if x.dtype == w.dtype && supported(&x, x.dtype) && fills_the_device(x.shape()[0], w.shape()[0]) {
            return matmul_cm2(x, w, true);
        }
        Self::float_matmul(x, Self::float_transpose(w))
    }

    fn frozen_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        if a.dtype == b.dtype && supported(&a, a.dtype) && fills_the_device(a.shape()[0], b.shape()[1]) {
            return matmul_cm2(a, b, false);
        }
        Self::float_matmul(a, b)
    }

    fn frozen_linear_add_t(x: FloatTensor<Self>, w: FloatTensor<Self>, residual: FloatTensor<Self>) -> FloatTensor<Self> {
        let same = x.dtype == w.dtype && x.dtype == residual.dtype && x.shape()[1] == w.shape()[1];
        if same && x.shape()[0] <= MATVEC_ROWS {
            return dense_matvec_t(x, w, Some(residual));
        }
        composed_linear_add::<Self>(x, w, residual)
    }

    fn frozen_linear3_t(x: FloatTensor<Self>, wq: FloatTensor<Self>, wk: FloatTensor<Self>, wv: FloatTensor<Self>) -> FloatTensor<Self> {
        let k = x.shape()[1];
        let same = [&wq, &wk, &wv].iter().all(|w| w.dtype == x.dtype && w.shape()[1] == k);
        if same && x.shape()[0] <= MATVEC_ROWS {
            return matvec3_t(x, wq, wk, wv, None);
        }
        composed_linear3::<Self>(x, wq, wk, wv)
    }

    fn frozen_norm_linear3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        wq: FloatTensor<Self>,
        wk: FloatTensor<Self>,
        wv: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let k = x.shape()[1];
        let same = [&wq, &wk, &wv].iter().all(|w| w.dtype == x.dtype && w.shape()[1] == k) && takes_norm(&x, &norm);
        if same && x.shape()[0] <= MATVEC_ROWS {
            return matvec3_t(x, wq, wk, wv, Some((norm, eps)));
        }
        Self::frozen_linear3_t(<Self as NormOps>::rms_norm(x, norm, eps), wq, wk, wv)
    }

    fn frozen_norm_swiglu_t(x: FloatTensor<Self>, norm: FloatTensor<Self>, eps: f32, gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let same = x.dtype == gate.dtype && x.dtype == up.dtype && gate.shape() == up.shape() && x.shape()[1] == gate.shape()[1] && takes_norm(&x, &norm);
        if same && x.shape()[0] <= MATVEC_ROWS {
            return swiglu_matvec_t(x, gate, up, Some((norm, eps)));
        }
        Self::frozen_swiglu_t(<Self as NormOps>::rms_norm(x, norm, eps), gate, up)
    }

    fn frozen_swiglu_t(x: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let same = x.dtype == gate.dtype && x.dtype == up.dtype && gate.shape() == up.shape() && x.shape()[1] == gate.shape()[1];
        if same && x.shape()[0] <= MATVEC_ROWS {
            return swiglu_matvec_t(x, gate, up, None);
        }
        composed_swiglu::<Self>(x, gate, up)
    }
}

/// Output tiles from which an `[m, n]` product takes the tensor-core kernel: one workgroup per
/// tile steps through all of K, so a short prompt's product (m of a few dozen rows, a handful
/// of tiles) would leave most of the GPU idle and is better served by burn's tuned matmul.
const MIN_TILES: usize = 32;

fn fills_the_device(m: usize, n: usize) -> bool {
    let (bm, bn, _) = crate::matmul::tile();
    m.div_ceil(bm) * n.div_ceil(bn) >= MIN_TILES
}

#[derive(Debug)]
struct LinearBackward;

impl<B: LinearOps> Backward<B, 1> for LinearBackward {
    /// The frozen `W` `[n, k]`.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let w = ops.state;
        // dx = dy · W
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::frozen_matmul(grad, w));
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: LinearOps> Backward<B, 1> for MatmulBackward {
    /// The frozen `b` `[k, n]`.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let b = ops.state;
        // da = dy · bᵀ
        unary::<B, _>(ops.parents, ops.node, grads, |grad| B::frozen_linear_t(grad, b));
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: LinearOps> Backward<B, 2> for SwigluBackward {
    /// `(gate, up)`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [gate_node, up_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (dgate, dup) = B::swiglu_backward(gate, up, grad);
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, dgate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, dup);
        }
    }
}

impl<B: Backend + LinearOps, C: CheckpointStrategy> LinearOps for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (gate, up) = (gate.into_primitive(), up.into_primitive());
                let out = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.into_primitive(), up.into_primitive())),
        }
    }

    fn frozen_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // Only `x` is a parent: `w` is frozen, so no weight-shaped gradient exists.
        let w = w.into_primitive();
        match LinearBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_linear_t(x.into_primitive(), w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_linear_t(x.into_primitive(), w)),
        }
    }

    fn frozen_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let b = b.into_primitive();
        match MatmulBackward.prepare::<C>([a.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_matmul(a.into_primitive(), b.clone());
                prep.finish(b, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(a.into_primitive(), b)),
        }
    }
}

/// `[x·wqᵀ, x·wkᵀ, x·wvᵀ]`: `x` `[m, k]`, frozen `wq`, `wk`, `wv` `[n·, k]` ->
/// `[m, nq + nk + nv]`, differentiable in `x` only; one kernel for a few rows on a GPU.
pub fn frozen_linear3(x: Tensor<2>, wq: Tensor<2>, wk: Tensor<2>, wv: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_linear3_t(x.into_dispatch(), wq.into_dispatch(), wk.into_dispatch(), wv.into_dispatch()))
}

/// [`frozen_linear3`] of `rms_norm(x, norm, eps)` (`norm` `[k]` in `x`'s dtype): on a GPU, one
/// kernel for a few rows, the norm computed in it.
pub fn frozen_norm_linear3(x: Tensor<2>, norm: Tensor<1>, eps: f32, wq: Tensor<2>, wk: Tensor<2>, wv: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_norm_linear3_t(
        x.into_dispatch(),
        norm.into_dispatch(),
        eps,
        wq.into_dispatch(),
        wk.into_dispatch(),
        wv.into_dispatch(),
    ))
}

/// [`frozen_swiglu`] of `rms_norm(x, norm, eps)` (`norm` `[k]` in `x`'s dtype): on a GPU, one
/// pass over both weights for a few rows, the norm computed in it.
pub fn frozen_norm_swiglu(x: Tensor<2>, norm: Tensor<1>, eps: f32, gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_norm_swiglu_t(x.into_dispatch(), norm.into_dispatch(), eps, gate.into_dispatch(), up.into_dispatch()))
}

/// `residual + x·Wᵀ`: `x` `[m, k]`, frozen `w` `[n, k]`, `residual` `[m, n]` -> `[m, n]`,
/// differentiable in `x` and `residual`; one kernel for a few rows of `x` on a GPU.
pub fn frozen_linear_add(x: Tensor<2>, w: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_linear_add_t(x.into_dispatch(), w.into_dispatch(), residual.into_dispatch()))
}

/// `silu(x·gateᵀ) · (x·upᵀ)`: `x` `[m, k]`, frozen `gate` and `up` `[n, k]` -> `[m, n]`,
/// differentiable in `x` only; one pass over both weights for a few rows of `x` on a GPU.
pub fn frozen_swiglu(x: Tensor<2>, gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_swiglu_t(x.into_dispatch(), gate.into_dispatch(), up.into_dispatch()))
}

/// SwiGLU's activation `silu(gate)·up` for equally shaped tensors, differentiable in both with a
/// backward of its own that keeps only the two (on the CPU, one vectorized pass on every core).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

/// `x` `[m, k]` · `Wᵀ` (`w` `[n, k]`) -> `[m, n]`, differentiable in `x` only: `w` must be
/// frozen (it gets no gradient even if it asks for one).
pub fn frozen_linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_linear_t(x.into_dispatch(), w.into_dispatch()))
}

/// `a` `[m, k]` · `b` `[k, n]` -> `[m, n]`, differentiable in `a` only.
pub fn matmul_frozen(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_matmul(a.into_dispatch(), b.into_dispatch()))
}
