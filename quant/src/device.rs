//! Quantized weights held packed on a burn device.
//!
//! The packed codes live in u32 words (`bits/8` bytes per weight) beside their scales.
//! [`QuantWeight::dequantize`] rebuilds one layer's dense weight when it is used, so the
//! model is never whole in float, and [`QuantWeight::rows`] dequantizes only the rows an
//! embedding lookup needs. Everything is plain burn tensor operations, so it runs on every
//! backend (flex, wgpu, cuda) and keeps the packed data on each.

use burn::backend::Dispatch;
use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use crate::affine::{self, AffineQuantized, AffineSpec};
use crate::autodiff::PackedOps;

/// Rows of `x` up to which the CPU backend multiplies straight from packed words.
const HOST_ROWS: usize = 16;
use crate::error::QuantError;
use crate::nf4::{self, DQ_BLOCK, Nf4Quantized};
use lora_kernels::tensor::float_dtype;

/// A frozen weight `[rows, cols]` in one of the quantized formats.
// A model holds a few hundred of these; the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QuantWeight {
    /// MLX affine: `scale·q + bias` per group.
    Affine(AffineWeight),
    /// NF4: `level[q]·absmax` per block of 64.
    Nf4(Nf4Weight),
}

/// An affine-quantized weight on the device.
#[derive(Module, Debug)]
pub struct AffineWeight {
    /// `[rows, cols·bits/32]` u32 words, MLX's layout.
    pub packed: Tensor<2, Int>,
    /// `[rows, cols/group_size]`, in the compute dtype.
    pub scales: Tensor<2>,
    /// `[rows, cols/group_size]`, in the compute dtype.
    pub biases: Tensor<2>,
    /// Bits per weight.
    pub bits: usize,
    /// Inputs per scale.
    pub group_size: usize,
    /// Input size.
    pub cols: usize,
}

/// An NF4-quantized weight on the device.
#[derive(Module, Debug)]
pub struct Nf4Weight {
    /// `[rows, cols/8]` u32 words of 4-bit codes.
    pub packed: Tensor<2, Int>,
    /// `[rows·cols/64]` absmax values in f32 (without double quantization), or their 8-bit
    /// codes packed four to a word, `[padded/4]` (with it).
    pub absmax: Tensor<1, Int>,
    /// The exact absmax values, when not double-quantized: `[rows·cols/64]`, f32.
    pub absmax_f32: Option<Tensor<1>>,
    /// Second-level scales, `[padded/256]`, f32 (double quantization only).
    pub dq_scales: Option<Tensor<1>>,
    /// The mean absmax added back (double quantization only).
    pub dq_offset: f32,
    /// The 16 levels, `[16]`, f32.
    pub levels: Tensor<1>,
    /// Input size.
    pub cols: usize,
    /// Compute dtype of the dequantized weight.
    #[module(skip)]
    pub dtype: DType,
}

fn u32_tensor<const D: usize>(words: Vec<u32>, shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(words, shape), (device, DType::U32))
}

impl QuantWeight {
    /// An affine weight from a host quantization, scales and biases cast to `dtype`.
    pub fn from_affine(q: &AffineQuantized, rows: usize, cols: usize, spec: AffineSpec, device: &Device, dtype: DType) -> Self {
        let groups = cols / spec.group_size;
        let f = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, groups]), (device, DType::F32)).cast(float_dtype(dtype));
        Self::Affine(AffineWeight {
            packed: u32_tensor(q.packed.clone(), [rows, cols * spec.bits / 32], device),
            scales: f(&q.scales),
            biases: f(&q.biases),
            bits: spec.bits,
            group_size: spec.group_size,
            cols,
        })
    }

    /// An affine weight from packed words already read from a checkpoint, with scales and
    /// biases already on the device. `name` is used in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn from_packed(
        name: &str,
        packed: Vec<u32>,
        packed_shape: [usize; 2],
        scales: Tensor<2>,
        biases: Tensor<2>,
        cols: usize,
        spec: AffineSpec,
        device: &Device,
    ) -> Result<Self, QuantError> {
        let rows = packed_shape[0];
        let expected = [rows, cols * spec.bits / 32];
        if packed_shape != expected || !spec.fits(cols) {
            return Err(QuantError::ShapeMismatch { name: format!("{name}.weight"), expected: expected.to_vec(), found: packed_shape.to_vec() });
        }
        let groups = [rows, cols / spec.group_size];
        for (what, t) in [("scales", &scales), ("biases", &biases)] {
            if t.dims() != groups {
                return Err(QuantError::ShapeMismatch { name: format!("{name}.{what}"), expected: groups.to_vec(), found: t.dims().to_vec() });
            }
        }
        Ok(Self::Affine(AffineWeight { packed: u32_tensor(packed, packed_shape, device), scales, biases, bits: spec.bits, group_size: spec.group_size, cols }))
    }

    /// An NF4 weight from a host quantization; dequantizes to `dtype`.
    pub fn from_nf4(q: &Nf4Quantized, rows: usize, cols: usize, device: &Device, dtype: DType) -> Self {
        let n = rows * cols / nf4::BLOCK;
        let (absmax, absmax_f32, dq_scales, dq_offset) = match &q.double_quant {
            None => (u32_tensor(vec![0u32], [1], device), Some(Tensor::from_data(TensorData::new(q.absmax.clone(), [n]), (device, DType::F32))), None, 0.0),
            Some(dq) => {
                let words = crate::pack::pack(&dq.codes, DQ_BLOCK, 8);
                let len = words.len();
                let scales = Tensor::from_data(TensorData::new(dq.scales.clone(), [dq.scales.len()]), (device, DType::F32));
                (u32_tensor(words, [len], device), None, Some(scales), dq.offset)
            }
        };
        Self::Nf4(Nf4Weight {
            packed: u32_tensor(q.packed.clone(), [rows, cols / 8], device),
            absmax,
            absmax_f32,
            dq_scales,
            dq_offset,
            levels: Tensor::from_data(TensorData::new(nf4::LEVELS.to_vec(), [16]), (device, DType::F32)),
            cols,
            dtype,
        })
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Affine(w) => [w.packed.dims()[0], w.cols],
            Self::Nf4(w) => [w.packed.dims()[0], w.cols],
        }
    }

    /// Bits per weight of the codes.
    pub fn bits(&self) -> usize {
        match self {
            Self::Affine(w) => w.bits,
            Self::Nf4(_) => 4,
        }
    }

    /// The dense weight `[rows, cols]` in the compute dtype.
    pub fn dequantize(&self) -> Tensor<2> {
        match self {
            Self::Affine(w) => w.dequantize_rows(w.packed.clone(), w.scales.clone(), w.biases.clone()),
            Self::Nf4(w) => w.dequantize(),
        }
    }

    /// `x·Wᵀ`: `x` `[m, cols]` -> `[m, rows]`.
    ///
    /// On the CPU backend, for a few rows of `x` (decoding) outside autodiff, the weight
    /// is multiplied straight from its packed words ([`affine::matmul_t`],
    /// [`nf4::matmul_t`]): read at bits/8 bytes per element, never dequantized whole.
    /// Elsewhere the layer is dequantized and multiplied in one differentiable operation
    /// ([`crate::autodiff::PackedOps`]) whose backward keeps only the packed weight and
    /// computes only the input's gradient.
    pub fn matmul_t(&self, x: Tensor<2>) -> Tensor<2> {
        let [m, _] = x.dims();
        if x.is_require_grad() || x.device() != Device::flex() {
            return match self {
                // One operation whose backward keeps the packed weight, not its dense form.
                Self::Affine(w) => Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul_t(
                    x.into_dispatch(),
                    w.packed.clone().into_dispatch(),
                    w.scales.clone().into_dispatch(),
                    w.biases.clone().into_dispatch(),
                    w.bits,
                    w.group_size,
                )),
                Self::Nf4(w) => {
                    let [rows, cols] = self.dims();
                    Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_matmul_t(
                        x.into_dispatch(),
                        w.packed.clone().into_dispatch(),
                        w.effective_absmax(rows * cols / nf4::BLOCK).into_dispatch(),
                        w.levels.clone().into_dispatch(),
                    ))
                }
            };
        }
        let (device, dtype) = (x.device(), x.dtype());
        if m > HOST_ROWS {
            // Prefill on the CPU: dequantize on all cores straight into the compute dtype,
            // then the backend's dense matmul.
            return x.matmul(self.host_dense(dtype).transpose());
        }
        let floats = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
        let words = |t: Tensor<2, Int>| t.into_data().try_into_vec::<u32>().expect("u32 packed words");
        let [rows, cols] = self.dims();
        let y = match self {
            Self::Affine(w) => {
                let q = AffineQuantized { packed: words(w.packed.clone()), scales: floats(w.scales.clone()), biases: floats(w.biases.clone()) };
                affine::matmul_t(&floats(x), m, &q, cols, AffineSpec { bits: w.bits, group_size: w.group_size })
            }
            Self::Nf4(w) => {
                let absmax = w.effective_absmax(rows * cols / nf4::BLOCK).into_data().try_into_vec::<f32>().expect("f32 data");
                nf4::matmul_t(&floats(x), m, &words(w.packed.clone()), &absmax, cols)
            }
        };
        Tensor::<2>::from_data(TensorData::new(y, [m, rows]), (&device, DType::F32)).cast(float_dtype(dtype))
    }

    /// The dense weight built on the host, in parallel over rows, in `dtype`.
    fn host_dense(&self, dtype: DType) -> Tensor<2> {
        let [rows, cols] = self.dims();
        let device = match self {
            Self::Affine(w) => w.packed.device(),
            Self::Nf4(w) => w.packed.device(),
        };
        let floats = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
        let words = |t: Tensor<2, Int>| t.into_data().try_into_vec::<u32>().expect("u32 packed words");
        // One row of weights from its codes: `fill(row, codes, out)`.
        type Fill = Box<dyn Fn(usize, &[u8], &mut [f32]) + Sync>;
        let (packed, bits, fill): (Vec<u32>, usize, Fill) = match self {
            Self::Affine(w) => {
                let (scales, biases, g) = (floats(w.scales.clone()), floats(w.biases.clone()), w.group_size);
                let groups = cols / g;
                let fill = move |r: usize, codes: &[u8], out: &mut [f32]| {
                    for (k, (o, q)) in out.chunks_exact_mut(g).zip(codes.chunks_exact(g)).enumerate() {
                        let (s, b) = (scales[r * groups + k], biases[r * groups + k]);
                        o.iter_mut().zip(q).for_each(|(o, &q)| *o = s * f32::from(q) + b);
                    }
                };
                (words(w.packed.clone()), w.bits, Box::new(fill))
            }
            Self::Nf4(w) => {
                let absmax = w.effective_absmax(rows * cols / nf4::BLOCK).into_data().try_into_vec::<f32>().expect("f32 data");
                // Rows are whole blocks: `cols` is a multiple of the block size.
                let fill = move |r: usize, codes: &[u8], out: &mut [f32]| {
                    let blocks = out.chunks_exact_mut(nf4::BLOCK).zip(codes.chunks_exact(nf4::BLOCK));
                    for (k, (o, q)) in blocks.enumerate() {
                        let a = absmax[r * cols / nf4::BLOCK + k];
                        o.iter_mut().zip(q).for_each(|(o, &q)| *o = nf4::LEVELS[q as usize] * a);
                    }
                };
                (words(w.packed.clone()), 4, Box::new(fill))
            }
        };
        let wpr = crate::pack::words_per_row(cols, bits);
        let row = |r: usize, codes: &mut Vec<u8>, out: &mut Vec<f32>| {
            crate::pack::unpack_row(&packed[r * wpr..(r + 1) * wpr], bits, codes);
            fill(r, codes, out);
        };
        // Each row unpacked and converted to the storage type on its own core.
        type Row<'a> = dyn Fn(usize, &mut Vec<u8>, &mut Vec<f32>) + Sync + 'a;
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
        Tensor::from_data(data, (&device, dtype))
    }

    /// Dense rows `ids` `[n]` -> `[n, cols]`: an embedding lookup that dequantizes only
    /// the rows it reads.
    pub fn rows(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        match self {
            Self::Affine(w) => {
                w.dequantize_rows(w.packed.clone().select(0, ids.clone()), w.scales.clone().select(0, ids.clone()), w.biases.clone().select(0, ids))
            }
            Self::Nf4(w) => w.dequantize().select(0, ids),
        }
    }
}

impl AffineWeight {
    fn dequantize_rows(&self, packed: Tensor<2, Int>, scales: Tensor<2>, biases: Tensor<2>) -> Tensor<2> {
        Tensor::from_dispatch(<Dispatch as PackedOps>::packed_dequantize(
            packed.into_dispatch(),
            scales.into_dispatch(),
            biases.into_dispatch(),
            self.bits,
            self.group_size,
        ))
    }
}

impl Nf4Weight {
    /// The `n` absmax values in f32, decoded from 8 bits under double quantization.
    fn effective_absmax(&self, n: usize) -> Tensor<1> {
        match (&self.absmax_f32, &self.dq_scales) {
            (Some(a), _) => a.clone(),
            (None, Some(s)) => {
                let padded = self.absmax.dims()[0] * 4;
                let words = self.absmax.clone().reshape([1, padded / 4]).into_dispatch();
                let codes = Tensor::<2, Int>::from_dispatch(<Dispatch as PackedOps>::unpack_codes(words, 8)).reshape([padded / DQ_BLOCK, DQ_BLOCK]);
                let a = (codes.cast(FloatDType::F32) - 128.0) * s.clone().unsqueeze_dim::<2>(1) + self.dq_offset;
                a.reshape([padded]).slice(0..n)
            }
            (None, None) => Tensor::zeros([n], (&self.packed.device(), DType::F32)),
        }
    }

    fn dequantize(&self) -> Tensor<2> {
        let [rows, _] = self.packed.dims();
        Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_dequantize(
            self.packed.clone().into_dispatch(),
            self.effective_absmax(rows * self.cols / nf4::BLOCK).into_dispatch(),
            self.levels.clone().into_dispatch(),
            float_dtype(self.dtype),
        ))
    }
}
