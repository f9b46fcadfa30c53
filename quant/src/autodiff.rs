//! `x·dequant(W)ᵀ` as one differentiable operation whose backward keeps only the packed
//! weight.
//!
//! Under burn's autodiff, a plain `x.matmul(w.transpose())` saves the dense `w` for the
//! backward pass: one dense weight per layer alive until backward. This operation saves the
//! packed words, scales and biases instead (the weight is frozen, so it gets no gradient)
//! and dequantizes again in backward to compute `dx = dy·W`. It is a burn backend
//! extension with a hand-written implementation for `Autodiff<B, C>`; the CPU (flex) and
//! CubeCL (wgpu, cuda) backends run it through its default body.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Flex, Scalar, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Shape, TensorData};

/// Backend operations on an affine-packed weight `W` `[n, k]`: words `[n, k·bits/32]`
/// (u32), scales and biases `[n, k/group_size]`.
#[backend_extension(Autodiff, Flex, Cube)]
pub trait PackedOps: Backend {
    /// `x` `[m, k]` · `Wᵀ` -> `[m, n]`.
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
}

impl PackedOps for Flex {}
impl PackedOps for burn_cubecl::CubeBackend {}

/// The saved state: the packed weight, never its dense form.
#[derive(Debug, Clone)]
struct PackedState<B: Backend> {
    packed: IntTensor<B>,
    scales: FloatTensor<B>,
    biases: FloatTensor<B>,
    bits: usize,
    group_size: usize,
}

#[derive(Debug)]
struct PackedMatmulBackward;

impl<B: Backend> Backward<B, 1> for PackedMatmulBackward {
    type State = PackedState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let s = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // dx = dy · W, W dequantized again from the packed words.
            let w = dequantize::<B>(s.packed, s.scales, s.biases, s.bits, s.group_size);
            B::float_matmul(grad, w)
        });
    }
}

impl<B: Backend + PackedOps, C: CheckpointStrategy> PackedOps for Autodiff<B, C> {
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
                let state = PackedState { packed: packed.clone(), scales: scales.clone(), biases: biases.clone(), bits, group_size };
                let y = B::packed_matmul_t(x.into_primitive(), packed, scales, biases, bits, group_size);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_matmul_t(x.into_primitive(), packed, scales, biases, bits, group_size)),
        }
    }
}

/// The dense `[n, k]` weight from its packed words, in the scales' dtype.
///
/// Every 32 codes fill `bits` words; code `e` of such a run starts at bit `e·bits` of word
/// `e·bits/32` and spills into the next word when it crosses a word boundary.
pub fn dequantize<B: Backend>(
    packed: IntTensor<B>,
    scales: FloatTensor<B>,
    biases: FloatTensor<B>,
    bits: usize,
    group_size: usize,
) -> FloatTensor<B> {
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
    let dtype = match scales.dtype() {
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    };
    let groups = cols / group_size;
    let q = B::float_reshape(B::int_into_float(codes, dtype), Shape::new([rows, groups, group_size]));
    let spread = |t: FloatTensor<B>| {
        B::float_expand(B::float_reshape(t, Shape::new([rows, groups, 1])), Shape::new([rows, groups, group_size]))
    };
    let w = B::float_add(B::float_mul(q, spread(scales)), spread(biases));
    B::float_reshape(w, Shape::new([rows, cols]))
}
