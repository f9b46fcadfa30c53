//! The CPU backend's products with a packed weight ([`crate::ops::PackedOps`] for flex): for a
//! few rows of `x` (decoding) straight from the packed words ([`affine::matmul_t`],
//! [`nf4::matmul_t`]), read at bits/8 bytes per weight and never dequantized whole; for more
//! rows (prefill, training) the dense weight built on all cores straight into `x`'s dtype,
//! then flex's matmul.

use burn::backend::ops::FloatTensorOps;
use burn::backend::{Flex, TensorMetadata};
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use lora_kernels::tensor::float_dtype;

use crate::affine::{self, AffineQuantized, AffineSpec};
use crate::nf4;

/// Rows of `x` up to which the CPU multiplies straight from the packed words.
pub const HOST_ROWS: usize = 16;

/// The values of `t` in f32, row-major.
fn f32s(t: FlexTensor) -> Vec<f32> {
    let t = if t.dtype() == DType::F32 { t } else { Flex::float_cast(t, burn::tensor::FloatDType::F32) };
    t.to_contiguous().as_slice::<f32>().expect("f32 values").to_vec()
}

/// The u32 words of a packed weight, row-major.
fn words(t: FlexTensor) -> Vec<u32> {
    t.to_contiguous().as_slice::<u32>().expect("u32 packed words").to_vec()
}

/// `values` `[shape]` computed in f32, as a tensor of `dtype`.
fn output(values: Vec<f32>, shape: [usize; 2], dtype: DType) -> FlexTensor {
    let t = FlexTensor::from_data(TensorData::new(values, shape));
    if dtype == DType::F32 { t } else { Flex::float_cast(t, float_dtype(dtype)) }
}

/// `x` `[m, k]` · `Wᵀ` for the affine weight of words `packed` `[n, k·bits/32]`, `scales`
/// and `biases` `[n, k/group_size]`.
pub(crate) fn affine_matmul_t(x: FlexTensor, packed: FlexTensor, scales: FlexTensor, biases: FlexTensor, bits: usize, group_size: usize) -> FlexTensor {
    let [m, cols] = x.shape().dims();
    let rows = packed.shape()[0];
    let dtype = x.dtype();
    let (scales, biases) = (f32s(scales), f32s(biases));
    if m > HOST_ROWS {
        let groups = cols / group_size;
        let fill = move |r: usize, codes: &[u8], out: &mut [f32]| {
            for (k, (o, q)) in out.chunks_exact_mut(group_size).zip(codes.chunks_exact(group_size)).enumerate() {
                let (s, b) = (scales[r * groups + k], biases[r * groups + k]);
                o.iter_mut().zip(q).for_each(|(o, &q)| *o = s * f32::from(q) + b);
            }
        };
        let w = dense(&words(packed), rows, cols, bits, dtype, &fill);
        return Flex::float_matmul(x, Flex::float_transpose(w));
    }
    let q = AffineQuantized { packed: words(packed), scales, biases };
    output(affine::matmul_t(&f32s(x), m, &q, cols, AffineSpec { bits, group_size }), [m, rows], dtype)
}

/// `x` `[m, k]` · `Wᵀ` for the NF4 weight of words `packed` `[n, k/8]` and the effective f32
/// `absmax` of each block `[n·k/64]`.
pub(crate) fn nf4_matmul_t(x: FlexTensor, packed: FlexTensor, absmax: FlexTensor) -> FlexTensor {
    let [m, cols] = x.shape().dims();
    let rows = packed.shape()[0];
    let dtype = x.dtype();
    let absmax = f32s(absmax);
    if m > HOST_ROWS {
        // Rows are whole blocks: `cols` is a multiple of the block size.
        let fill = move |r: usize, codes: &[u8], out: &mut [f32]| {
            let blocks = out.chunks_exact_mut(nf4::BLOCK).zip(codes.chunks_exact(nf4::BLOCK));
            for (k, (o, q)) in blocks.enumerate() {
                let a = absmax[r * cols / nf4::BLOCK + k];
                o.iter_mut().zip(q).for_each(|(o, &q)| *o = nf4::LEVELS[q as usize] * a);
            }
        };
        let w = dense(&words(packed), rows, cols, 4, dtype, &fill);
        return Flex::float_matmul(x, Flex::float_transpose(w));
    }
    output(nf4::matmul_t(&f32s(x), m, &words(packed), &absmax, cols), [m, rows], dtype)
}

/// One row of weights from its codes: `fill(row, codes, out)`.
type Fill<'a> = dyn Fn(usize, &[u8], &mut [f32]) + Sync + 'a;

/// One row of weights from the packed words: `row(r, codes scratch, out)`.
type Row<'a> = dyn Fn(usize, &mut Vec<u8>, &mut Vec<f32>) + Sync + 'a;

/// The dense weight `[rows, cols]` in `dtype` from its packed words, each row unpacked, filled
/// and converted on its own core.
fn dense(packed: &[u32], rows: usize, cols: usize, bits: usize, dtype: DType, fill: &Fill<'_>) -> FlexTensor {
    let wpr = crate::pack::words_per_row(cols, bits);
    let row = |r: usize, codes: &mut Vec<u8>, out: &mut Vec<f32>| {
        crate::pack::unpack_row(&packed[r * wpr..(r + 1) * wpr], bits, codes);
        fill(r, codes, out);
    };
    fn build<T: Copy + Default + Send + burn::tensor::Element>(rows: usize, cols: usize, row: &Row<'_>, convert: fn(f32) -> T) -> TensorData {
        use rayon::prelude::*;
        let mut v = vec![T::default(); rows * cols];
        v.par_chunks_mut(cols).enumerate().for_each_init(
            || (vec![0u8; cols], vec![0f32; cols]),
            |(codes, tmp), (r, out)| {
                row(r, codes, tmp);
                out.iter_mut().zip(tmp.iter()).for_each(|(o, &x)| *o = convert(x));
            },
        );
        TensorData::new(v, [rows, cols])
    }
    let data = match dtype {
        DType::F16 => build(rows, cols, &row, half::f16::from_f32),
        DType::BF16 => build(rows, cols, &row, half::bf16::from_f32),
        _ => build(rows, cols, &row, |x| x),
    };
    FlexTensor::from_data(data)
}
