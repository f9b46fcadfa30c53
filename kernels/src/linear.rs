//! `x·Wᵀ` with a frozen `W`, as one operation whose backward computes only the input gradient
//! `dy·W` and keeps `W` itself (never a copy or a transposed copy) for it.
//!
//! On the CubeCL backend both products use [`crate::matmul::matmul_cm2`] where the device and
//! dtype allow it, and burn's matmul otherwise; flex uses burn's matmul. A forward product of
//! at most [`crate::matvec::MATVEC_ROWS`] rows (decoding) is a matrix-vector kernel.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};

use crate::matmul::{matmul_cm2, supported};
use crate::matvec::{MATVEC_ROWS, dense_matvec_t};

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
}

impl LinearOps for Flex {}

impl LinearOps for burn_cubecl::CubeBackend {
    fn frozen_linear_t(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // Decoding: a few rows read the weight once, bound by memory.
        if x.dtype == w.dtype && x.shape()[0] <= MATVEC_ROWS && x.shape()[1] == w.shape()[1] {
            return dense_matvec_t(x, w);
        }
        if x.dtype == w.dtype && supported(&x, x.dtype) {
            return matmul_cm2(x, w, true);
        }
        Self::float_matmul(x, Self::float_transpose(w))
    }

    fn frozen_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        if a.dtype == b.dtype && supported(&a, a.dtype) {
            return matmul_cm2(a, b, false);
        }
        Self::float_matmul(a, b)
    }
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

impl<B: Backend + LinearOps, C: CheckpointStrategy> LinearOps for Autodiff<B, C> {
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

/// `x` `[m, k]` · `Wᵀ` (`w` `[n, k]`) -> `[m, n]`, differentiable in `x` only: `w` must be
/// frozen (it gets no gradient even if it asks for one).
pub fn frozen_linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_linear_t(x.into_dispatch(), w.into_dispatch()))
}

/// `a` `[m, k]` · `b` `[k, n]` -> `[m, n]`, differentiable in `a` only.
pub fn matmul_frozen(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::frozen_matmul(a.into_dispatch(), b.into_dispatch()))
}
