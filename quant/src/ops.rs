//! The operations on a packed weight, for every backend in one place: `x·dequant(W)ᵀ` as one
//! differentiable operation whose backward keeps only the packed weight, and the
//! dequantizations.
//!
//! Under burn's autodiff, a plain `x.matmul(w.transpose())` saves the dense `w` for the
//! backward pass: one dense weight per layer alive until backward. This operation saves the
//! packed words, scales and biases instead (the weight is frozen, so it gets no gradient)
//! and dequantizes again in backward to compute `dx = dy·W`. It is a burn backend
//! extension with a hand-written implementation for `Autodiff<B, C>`. Each backend chooses
//! its way here: the CPU (flex) multiplies from the packed words on the host
//! ([`crate::host`]), CubeCL (wgpu, cuda) runs the fused kernels of [`crate::kernels`], and
//! the default bodies compose burn operations.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, IntDType, Shape, TensorData};

use crate::kernels;
use lora_kernels::linear::LinearOps;
use lora_kernels::norm::NormOps;
use lora_kernels::tensor::float_dtype;

/// Backend operations on an affine-packed weight `W` `[n, k]`: words `[n, k·bits/32]`
/// (u32), scales and biases `[n, k/group_size]`.
#[backend_extension(Autodiff, Flex, Cube, Fusion)]
pub trait PackedOps: Backend {
    /// Codes `[n, k]` from packed words `[n, k·bits/32]`.
    #[fusion(dtype = packed, shape = Shape::new([packed[0], packed[1] * 32 / *bits]))]
    fn unpack_codes(packed: IntTensor<Self>, bits: usize) -> IntTensor<Self> {
        unpack::<Self>(packed, bits)
    }

    /// The dense affine weight `[n, k]`, in the scales' dtype.
    #[fusion(dtype = scales, shape = Shape::new([packed[0], packed[1] * 32 / *bits]))]
    fn packed_dequantize(packed: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, bits: usize, group_size: usize) -> FloatTensor<Self> {
        dequantize::<Self>(packed, scales, biases, bits, group_size)
    }

    /// The dense NF4 weight `[n, k]` in `dtype`.
    #[fusion(dtype = DType::from(*dtype), shape = Shape::new([packed[0], packed[1] * 8]))]
    fn nf4_dequantize(packed: IntTensor<Self>, absmax: FloatTensor<Self>, levels: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        dequantize_nf4::<Self>(packed, absmax, levels, dtype)
    }

    /// `x` `[m, k]` · `Wᵀ` -> `[m, n]`.
    #[fusion(dtype = x, shape = Shape::new([x[0], packed[0]]))]
    fn packed_matmul_t(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        let w = dequantize::<Self>(packed, scales, biases, bits, group_size); // [n, k]
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `x` `[m, k]` · `Wᵀ` -> `[m, n]` for an NF4 weight: 4-bit codes `[n, k/8]`, the f32
    /// absmax of each block of 64 `[n·k/64]`, and the 16 levels `[16]`.
    #[fusion(dtype = x, shape = Shape::new([x[0], packed[0]]))]
    fn nf4_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, levels: FloatTensor<Self>) -> FloatTensor<Self> {
        let dtype = float_dtype(x.dtype());
        let w = dequantize_nf4::<Self>(packed, absmax, levels, dtype); // [n, k]
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `residual + x·Wᵀ` `[m, n]` for an affine weight (the output and down projections add
    /// the residual stream). Under autodiff the tracked product plus the sum.
    #[fusion(dtype = x, shape = Shape::new([x[0], packed[0]]))]
    #[allow(clippy::too_many_arguments)]
    fn packed_matmul_t_add(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        Self::float_add(residual, Self::packed_matmul_t(x, packed, scales, biases, bits, group_size))
    }

    /// The SwiGLU block's `silu(x·gateᵀ)·(x·upᵀ)` `[m, n]` for two affine weights of one shape
    /// and format, of `x`'s RMSNorm by `norm` `[k]` (in `x`'s dtype) and `eps` when `normed` (`norm` is not
    /// read otherwise).
    /// Under autodiff the tracked composition.
    #[fusion(dtype = x, shape = Shape::new([x[0], gate[0]]))]
    #[allow(clippy::too_many_arguments)]
    fn packed_swiglu_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        gate: IntTensor<Self>,
        gate_scales: FloatTensor<Self>,
        gate_biases: FloatTensor<Self>,
        up: IntTensor<Self>,
        up_scales: FloatTensor<Self>,
        up_biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        let x = norm_composed::<Self>(x, normed.then_some(norm), eps);
        let g = Self::packed_matmul_t(x.clone(), gate, gate_scales, gate_biases, bits, group_size);
        let u = Self::packed_matmul_t(x, up, up_scales, up_biases, bits, group_size);
        silu_times::<Self>(g, u)
    }

    /// [`PackedOps::packed_swiglu_t`] for two NF4 weights of one shape (one set of levels).
    #[fusion(dtype = x, shape = Shape::new([x[0], gate[0]]))]
    #[allow(clippy::too_many_arguments)]
    fn nf4_swiglu_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        gate: IntTensor<Self>,
        gate_absmax: FloatTensor<Self>,
        up: IntTensor<Self>,
        up_absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let x = norm_composed::<Self>(x, normed.then_some(norm), eps);
        let g = Self::nf4_matmul_t(x.clone(), gate, gate_absmax, levels.clone());
        let u = Self::nf4_matmul_t(x, up, up_absmax, levels);
        silu_times::<Self>(g, u)
    }

    /// Attention's three input projections `[x·Qᵀ, x·Kᵀ, x·Vᵀ]` `[m, nq + nk + nv]` for three
    /// affine weights of one format and width, of `x`'s RMSNorm by `norm` and `eps` when
    /// `normed` (as [`PackedOps::packed_swiglu_t`]).
    #[fusion(dtype = x, shape = Shape::new([x[0], q[0] + k[0] + v[0]]))]
    #[allow(clippy::too_many_arguments)]
    fn packed_matmul3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        q: IntTensor<Self>,
        q_scales: FloatTensor<Self>,
        q_biases: FloatTensor<Self>,
        k: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        k_biases: FloatTensor<Self>,
        v: IntTensor<Self>,
        v_scales: FloatTensor<Self>,
        v_biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        affine3::<Self>(
            norm_composed::<Self>(x, normed.then_some(norm), eps),
            (q, q_scales, q_biases),
            (k, k_scales, k_biases),
            (v, v_scales, v_biases),
            bits,
            group_size,
        )
    }

    /// [`PackedOps::packed_matmul3_t`] for three NF4 weights (one set of levels).
    #[fusion(dtype = x, shape = Shape::new([x[0], q[0] + k[0] + v[0]]))]
    #[allow(clippy::too_many_arguments)]
    fn nf4_matmul3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        q: IntTensor<Self>,
        q_absmax: FloatTensor<Self>,
        k: IntTensor<Self>,
        k_absmax: FloatTensor<Self>,
        v: IntTensor<Self>,
        v_absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        nf4_3::<Self>(norm_composed::<Self>(x, normed.then_some(norm), eps), [(q, q_absmax), (k, k_absmax), (v, v_absmax)], levels)
    }

    /// `residual + x·Wᵀ` `[m, n]` for an NF4 weight.
    #[fusion(dtype = x, shape = Shape::new([x[0], packed[0]]))]
    fn nf4_matmul_t_add(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(residual, Self::nf4_matmul_t(x, packed, absmax, levels))
    }
}

/// [`PackedOps::packed_matmul3_t`] as three products side by side: each weight's words,
/// scales and biases.
fn affine3<B: PackedOps>(
    x: FloatTensor<B>,
    q: (IntTensor<B>, FloatTensor<B>, FloatTensor<B>),
    k: (IntTensor<B>, FloatTensor<B>, FloatTensor<B>),
    v: (IntTensor<B>, FloatTensor<B>, FloatTensor<B>),
    bits: usize,
    group_size: usize,
) -> FloatTensor<B> {
    let outputs = [q, k, v].map(|(packed, scales, biases)| B::packed_matmul_t(x.clone(), packed, scales, biases, bits, group_size));
    B::float_cat(outputs.into(), 1)
}

/// [`PackedOps::nf4_matmul3_t`] as three products side by side: each weight's words and absmax.
fn nf4_3<B: PackedOps>(x: FloatTensor<B>, weights: [(IntTensor<B>, FloatTensor<B>); 3], levels: FloatTensor<B>) -> FloatTensor<B> {
    let outputs = weights.map(|(packed, absmax)| B::nf4_matmul_t(x.clone(), packed, absmax, levels.clone()));
    B::float_cat(outputs.into(), 1)
}

/// `x`, or its RMSNorm by `norm` and `eps` as tensor operations.
fn norm_composed<B: Backend>(x: FloatTensor<B>, norm: Option<FloatTensor<B>>, eps: f32) -> FloatTensor<B> {
    match norm {
        Some(weight) => lora_kernels::norm::composed::<B>(x, weight, eps),
        None => x,
    }
}

/// `x` and the norm a matrix-vector kernel computes itself: `norm` where the kernels take it (one
/// weight per column of `x`, in its dtype), else none, `x` then normalized by the norm's kernel.
fn kernel_norm(
    x: burn_cubecl::tensor::CubeTensor,
    norm: Option<FloatTensor<burn_cubecl::CubeBackend>>,
    eps: f32,
) -> (burn_cubecl::tensor::CubeTensor, lora_kernels::matvec::Norm) {
    match norm {
        None => (x, None),
        Some(w) if lora_kernels::matvec::takes_norm(&x, &w) => (x, Some((w, eps))),
        Some(w) => (<burn_cubecl::CubeBackend as NormOps>::rms_norm(x, w, eps), None),
    }
}

/// `x` with the norm [`kernel_norm`] left to a matrix-vector kernel applied by the norm's own
/// kernel instead (for products that take another path).
fn normed_by_kernel(x: burn_cubecl::tensor::CubeTensor, norm: lora_kernels::matvec::Norm) -> burn_cubecl::tensor::CubeTensor {
    match norm {
        Some((weight, eps)) => <burn_cubecl::CubeBackend as NormOps>::rms_norm(x, weight, eps),
        None => x,
    }
}

/// `silu(g)·u`, SwiGLU's activation, as tensor operations.
fn silu_times<B: Backend>(g: FloatTensor<B>, u: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(B::float_mul(g.clone(), B::sigmoid(g)), u)
}

/// The CPU: from the packed words on the host ([`crate::host`]).
impl PackedOps for Flex {
    fn packed_matmul_t(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        crate::host::affine_matmul_t(x, packed, scales, biases, bits, group_size)
    }

    fn nf4_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, _levels: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::host::nf4_matmul_t(x, packed, absmax)
    }
}

/// Rows of `x` up to which the CubeCL backend multiplies straight from the packed words.
pub const MATVEC_ROWS: usize = 8;

/// wgpu and cuda: fused CubeCL kernels ([`crate::kernels`]).
impl PackedOps for burn_cubecl::CubeBackend {
    fn packed_dequantize(packed: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, bits: usize, group_size: usize) -> FloatTensor<Self> {
        kernels::affine_dequantize(packed, scales, biases, bits, group_size)
    }

    fn nf4_dequantize(packed: IntTensor<Self>, absmax: FloatTensor<Self>, levels: FloatTensor<Self>, dtype: FloatDType) -> FloatTensor<Self> {
        kernels::nf4_dequantize(packed, absmax, levels, dtype.into())
    }

    fn packed_matmul_t(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        if x.shape()[0] <= MATVEC_ROWS && kernels::matvec_supports(bits) {
            return kernels::affine_matvec(x, packed, scales, biases, bits, group_size, None);
        }
        let w = kernels::affine_dequantize(packed, scales, biases, bits, group_size);
        <Self as LinearOps>::frozen_linear_t(x, w)
    }

    fn nf4_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, levels: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.shape()[0] <= MATVEC_ROWS {
            return kernels::nf4_matvec(x, packed, absmax, levels, None);
        }
        let w = kernels::nf4_dequantize(packed, absmax, levels, x.dtype);
        <Self as LinearOps>::frozen_linear_t(x, w)
    }

    fn packed_matmul_t_add(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        // A few rows (decoding): the residual added by the product's own kernel.
        if x.shape()[0] <= MATVEC_ROWS && kernels::matvec_supports(bits) && residual.dtype == x.dtype {
            return kernels::affine_matvec(x, packed, scales, biases, bits, group_size, Some(residual));
        }
        let w = kernels::affine_dequantize(packed, scales, biases, bits, group_size);
        <Self as LinearOps>::frozen_linear_add_t(x, w, residual)
    }

    fn packed_swiglu_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        gate: IntTensor<Self>,
        gate_scales: FloatTensor<Self>,
        gate_biases: FloatTensor<Self>,
        up: IntTensor<Self>,
        up_scales: FloatTensor<Self>,
        up_biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        // A few rows (decoding): the norm, both products and the activation in one launch.
        let (x, norm) = kernel_norm(x, normed.then_some(norm), eps);
        if x.shape()[0] <= MATVEC_ROWS && kernels::matvec_supports(bits) {
            return kernels::affine_swiglu(x, gate, gate_scales, gate_biases, up, up_scales, up_biases, bits, group_size, norm);
        }
        let x = normed_by_kernel(x, norm);
        let g = kernels::affine_dequantize(gate, gate_scales, gate_biases, bits, group_size);
        let u = kernels::affine_dequantize(up, up_scales, up_biases, bits, group_size);
        <Self as LinearOps>::frozen_swiglu_t(x, g, u)
    }

    fn nf4_swiglu_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        gate: IntTensor<Self>,
        gate_absmax: FloatTensor<Self>,
        up: IntTensor<Self>,
        up_absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x, norm) = kernel_norm(x, normed.then_some(norm), eps);
        if x.shape()[0] <= MATVEC_ROWS {
            return kernels::nf4_swiglu(x, gate, gate_absmax, up, up_absmax, levels, norm);
        }
        let x = normed_by_kernel(x, norm);
        let g = kernels::nf4_dequantize(gate, gate_absmax, levels.clone(), x.dtype);
        let u = kernels::nf4_dequantize(up, up_absmax, levels, x.dtype);
        <Self as LinearOps>::frozen_swiglu_t(x, g, u)
    }

    fn packed_matmul3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        q: IntTensor<Self>,
        q_scales: FloatTensor<Self>,
        q_biases: FloatTensor<Self>,
        k: IntTensor<Self>,
        k_scales: FloatTensor<Self>,
        k_biases: FloatTensor<Self>,
        v: IntTensor<Self>,
        v_scales: FloatTensor<Self>,
        v_biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        // A few rows (decoding): the norm and the three products in one launch.
        let (x, norm) = kernel_norm(x, normed.then_some(norm), eps);
        if x.shape()[0] <= MATVEC_ROWS && kernels::matvec_supports(bits) {
            return kernels::affine_matvec3(x, [q, q_scales, q_biases], [k, k_scales, k_biases], [v, v_scales, v_biases], bits, group_size, norm);
        }
        let x = normed_by_kernel(x, norm);
        affine3::<Self>(x, (q, q_scales, q_biases), (k, k_scales, k_biases), (v, v_scales, v_biases), bits, group_size)
    }

    fn nf4_matmul3_t(
        x: FloatTensor<Self>,
        norm: FloatTensor<Self>,
        eps: f32,
        normed: bool,
        q: IntTensor<Self>,
        q_absmax: FloatTensor<Self>,
        k: IntTensor<Self>,
        k_absmax: FloatTensor<Self>,
        v: IntTensor<Self>,
        v_absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x, norm) = kernel_norm(x, normed.then_some(norm), eps);
        if x.shape()[0] <= MATVEC_ROWS {
            return kernels::nf4_matvec3(x, [q, q_absmax], [k, k_absmax], [v, v_absmax], levels, norm);
        }
        let x = normed_by_kernel(x, norm);
        nf4_3::<Self>(x, [(q, q_absmax), (k, k_absmax), (v, v_absmax)], levels)
    }

    fn nf4_matmul_t_add(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        levels: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if x.shape()[0] <= MATVEC_ROWS && residual.dtype == x.dtype {
            return kernels::nf4_matvec(x, packed, absmax, levels, Some(residual));
        }
        let w = kernels::nf4_dequantize(packed, absmax, levels, x.dtype);
        <Self as LinearOps>::frozen_linear_add_t(x, w, residual)
    }
}

/// The saved state: the packed weight, never its dense form.
#[derive(Debug, Clone)]
enum PackedState<B: Backend> {
    Affine { packed: IntTensor<B>, scales: FloatTensor<B>, biases: FloatTensor<B>, bits: usize, group_size: usize },
    Nf4 { packed: IntTensor<B>, absmax: FloatTensor<B>, levels: FloatTensor<B>, dtype: FloatDType },
}

impl<B: PackedOps> PackedState<B> {
    fn dequantize(self) -> FloatTensor<B> {
        match self {
            Self::Affine { packed, scales, biases, bits, group_size } => B::packed_dequantize(packed, scales, biases, bits, group_size),
            Self::Nf4 { packed, absmax, levels, dtype } => B::nf4_dequantize(packed, absmax, levels, dtype),
        }
    }
}

#[derive(Debug)]
struct PackedMatmulBackward;

impl<B: PackedOps + LinearOps> Backward<B, 1> for PackedMatmulBackward {
    type State = PackedState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // dx = dy · W, W dequantized again from the packed words.
            B::frozen_matmul(grad, state.dequantize())
        });
    }
}

impl<B: Backend + PackedOps + LinearOps, C: CheckpointStrategy> PackedOps for Autodiff<B, C> {
    fn packed_matmul_t(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        bits: usize,
        group_size: usize,
    ) -> FloatTensor<Self> {
        // The weight is frozen: only `x` is a parent, so no weight-shaped gradient exists.
        let (scales, biases) = (scales.into_primitive(), biases.into_primitive());
        match PackedMatmulBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = PackedState::Affine { packed: packed.clone(), scales: scales.clone(), biases: biases.clone(), bits, group_size };
                let y = B::packed_matmul_t(x.into_primitive(), packed, scales, biases, bits, group_size);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_matmul_t(x.into_primitive(), packed, scales, biases, bits, group_size)),
        }
    }

    fn nf4_matmul_t(x: FloatTensor<Self>, packed: IntTensor<Self>, absmax: FloatTensor<Self>, levels: FloatTensor<Self>) -> FloatTensor<Self> {
        let dtype = float_dtype(x.dtype());
        let (absmax, levels) = (absmax.into_primitive(), levels.into_primitive());
        match PackedMatmulBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = PackedState::Nf4 { packed: packed.clone(), absmax: absmax.clone(), levels: levels.clone(), dtype };
                prep.finish(state, B::nf4_matmul_t(x.into_primitive(), packed, absmax, levels))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::nf4_matmul_t(x.into_primitive(), packed, absmax, levels)),
        }
    }
}

/// The dense `[n, k]` NF4 weight in `dtype`: `level[code]·absmax` per block of 64.
pub fn dequantize_nf4<B: Backend>(packed: IntTensor<B>, absmax: FloatTensor<B>, levels: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    let codes = unpack::<B>(packed, 4); // [n, k]
    let [rows, cols] = codes.shape().dims();
    let blocks = rows * cols / crate::nf4::BLOCK;
    let codes = B::int_cast(B::int_reshape(codes, Shape::new([rows * cols])), IntDType::I32);
    let values = B::float_reshape(B::float_select(levels, 0, codes), Shape::new([blocks, crate::nf4::BLOCK]));
    let absmax = B::float_expand(B::float_reshape(absmax, Shape::new([blocks, 1])), Shape::new([blocks, crate::nf4::BLOCK]));
    let w = B::float_reshape(B::float_mul(values, absmax), Shape::new([rows, cols]));
    B::float_cast(w, dtype)
}

/// The dense `[n, k]` weight from its packed words, in the scales' dtype.
pub fn dequantize<B: Backend>(packed: IntTensor<B>, scales: FloatTensor<B>, biases: FloatTensor<B>, bits: usize, group_size: usize) -> FloatTensor<B> {
    let codes = unpack::<B>(packed, bits);
    let [rows, cols] = codes.shape().dims();
    let dtype = float_dtype(scales.dtype());
    let groups = cols / group_size;
    let q = B::float_reshape(B::int_into_float(codes, dtype), Shape::new([rows, groups, group_size]));
    let spread = |t: FloatTensor<B>| B::float_expand(B::float_reshape(t, Shape::new([rows, groups, 1])), Shape::new([rows, groups, group_size]));
    let w = B::float_add(B::float_mul(q, spread(scales)), spread(biases));
    B::float_reshape(w, Shape::new([rows, cols]))
}

/// Codes `[n, k]` from packed words `[n, k·bits/32]`.
///
/// Every 32 codes fill `bits` words; code `e` of such a run starts at bit `e·bits` of word
/// `e·bits/32` and spills into the next word when it crosses a word boundary.
pub fn unpack<B: Backend>(packed: IntTensor<B>, bits: usize) -> IntTensor<B> {
    let device = packed.device();
    let [rows, words] = packed.shape().dims();
    let cols = words * 32 / bits;
    let runs = cols / 32;
    let words = B::int_reshape(packed, Shape::new([rows, runs, bits]));
    let (mut lo, mut lo_shift, mut hi, mut hi_shift, mut spill) = (vec![], vec![], vec![], vec![], vec![]);
    for e in 0..32 {
        let bit = e * bits;
        let (w, s) = (bit / 32, bit % 32);
        let crosses = s + bits > 32;
        lo.push(w as i32);
        lo_shift.push(s as u32);
        hi.push(if crosses { w as i32 + 1 } else { w as i32 });
        hi_shift.push(if crosses { (32 - s) as u32 } else { 0 });
        spill.push(u32::from(crosses));
    }
    let index = |v: Vec<i32>| B::int_from_data(TensorData::new(v, [32]), &device);
    let per_code = |v: Vec<u32>| {
        let t = B::int_from_data(TensorData::new(v, [1, 1, 32]), &device);
        B::int_expand(t, Shape::new([rows, runs, 32]))
    };
    let mut codes = B::bitwise_right_shift(B::int_select(words.clone(), 2, index(lo)), per_code(lo_shift));
    if !32usize.is_multiple_of(bits) {
        let high = B::int_mul(B::int_select(words, 2, index(hi)), per_code(spill));
        codes = B::bitwise_or(codes, B::bitwise_left_shift(high, per_code(hi_shift)));
    }
    let codes = B::bitwise_and_scalar(codes, Scalar::from((1u32 << bits) - 1));
    B::int_reshape(codes, Shape::new([rows, cols]))
}
