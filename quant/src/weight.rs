//! Quantized weights held packed on a burn device.
//!
//! The packed codes live in u32 words (`bits/8` bytes per weight) beside their scales.
//! [`QuantWeight::dequantize`] rebuilds one layer's dense weight when it is used, so the
//! model is never whole in float, and [`QuantWeight::rows`] dequantizes only the rows an
//! embedding lookup needs. The products and dequantizations are the operations of
//! [`PackedOps`], which each backend (flex, wgpu, cuda) implements in its own way, keeping
//! the packed data on its device.

use burn::backend::Dispatch;
use burn::module::Module;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};

use crate::affine::{AffineQuantized, AffineSpec};
use crate::error::QuantError;
use crate::nf4::{self, DQ_BLOCK, Nf4Quantized};
use crate::ops::PackedOps;
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

    /// `x·Wᵀ`: `x` `[m, cols]` -> `[m, rows]`, as one operation of [`PackedOps`], whose
    /// backward keeps only the packed weight and computes only the input's gradient. Each
    /// backend picks its way there: CubeCL's kernels read the packed words for a few rows and
    /// dequantize once for more; the CPU multiplies from the packed words on the host
    /// ([`crate::host`]).
    pub fn matmul_t(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Affine(w) => Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul_t(
                x.into_dispatch(),
                w.packed.clone().into_dispatch(),
                w.scales.clone().into_dispatch(),
                w.biases.clone().into_dispatch(),
                w.bits,
                w.group_size,
            )),
            Self::Nf4(w) => Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_matmul_t(
                x.into_dispatch(),
                w.packed.clone().into_dispatch(),
                w.effective_absmax().into_dispatch(),
                w.levels.clone().into_dispatch(),
            )),
        }
    }

    /// The SwiGLU block's `silu(x·gateᵀ)·(x·upᵀ)` `[m, rows]` for `x` `[m, cols]` (or for its
    /// RMSNorm by `norm`'s weight `[cols]`, in `x`'s dtype, and epsilon), one kernel for a few
    /// rows on a GPU, the norm computed in it; `None` unless `gate` and `up` have one shape and
    /// one format (bits and group size, or NF4).
    pub fn swiglu_t(x: Tensor<2>, norm: Option<(Tensor<1>, f32)>, gate: &QuantWeight, up: &QuantWeight) -> Option<Tensor<2>> {
        if gate.dims() != up.dims() {
            return None;
        }
        let (norm, eps, normed) = norm_parts(&x, norm);
        match (gate, up) {
            (Self::Affine(g), Self::Affine(u)) if (g.bits, g.group_size) == (u.bits, u.group_size) => {
                Some(Tensor::from_dispatch(<Dispatch as PackedOps>::packed_swiglu_t(
                    x.into_dispatch(),
                    norm,
                    eps,
                    normed,
                    g.packed.clone().into_dispatch(),
                    g.scales.clone().into_dispatch(),
                    g.biases.clone().into_dispatch(),
                    u.packed.clone().into_dispatch(),
                    u.scales.clone().into_dispatch(),
                    u.biases.clone().into_dispatch(),
                    g.bits,
                    g.group_size,
                )))
            }
            (Self::Nf4(g), Self::Nf4(u)) => Some(Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_swiglu_t(
                x.into_dispatch(),
                norm,
                eps,
                normed,
                g.packed.clone().into_dispatch(),
                g.effective_absmax().into_dispatch(),
                u.packed.clone().into_dispatch(),
                u.effective_absmax().into_dispatch(),
                g.levels.clone().into_dispatch(),
            ))),
            _ => None,
        }
    }

    /// Attention's `[x·Qᵀ, x·Kᵀ, x·Vᵀ]` `[m, nq + nk + nv]` for `x` `[m, cols]` (or its RMSNorm
    /// by `norm`, as [`QuantWeight::swiglu_t`] takes it), one kernel for a few rows on a GPU;
    /// `None` unless the three have one width and one format.
    pub fn linear3_t(x: Tensor<2>, norm: Option<(Tensor<1>, f32)>, q: &QuantWeight, k: &QuantWeight, v: &QuantWeight) -> Option<Tensor<2>> {
        let cols = q.dims()[1];
        if k.dims()[1] != cols || v.dims()[1] != cols {
            return None;
        }
        let (norm, eps, normed) = norm_parts(&x, norm);
        let nf4_parts = |w: &Nf4Weight| (w.packed.clone().into_dispatch(), w.effective_absmax().into_dispatch());
        match (q, k, v) {
            (Self::Affine(a), Self::Affine(b), Self::Affine(c))
                if [(b.bits, b.group_size), (c.bits, c.group_size)].iter().all(|&f| f == (a.bits, a.group_size)) =>
            {
                Some(Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul3_t(
                    x.into_dispatch(),
                    norm,
                    eps,
                    normed,
                    a.packed.clone().into_dispatch(),
                    a.scales.clone().into_dispatch(),
                    a.biases.clone().into_dispatch(),
                    b.packed.clone().into_dispatch(),
                    b.scales.clone().into_dispatch(),
                    b.biases.clone().into_dispatch(),
                    c.packed.clone().into_dispatch(),
                    c.scales.clone().into_dispatch(),
                    c.biases.clone().into_dispatch(),
                    a.bits,
                    a.group_size,
                )))
            }
            (Self::Nf4(a), Self::Nf4(b), Self::Nf4(c)) => {
                let ((qp, qa), (kp, ka), (vp, va)) = (nf4_parts(a), nf4_parts(b), nf4_parts(c));
                Some(Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_matmul3_t(
                    x.into_dispatch(),
                    norm,
                    eps,
                    normed,
                    qp,
                    qa,
                    kp,
                    ka,
                    vp,
                    va,
                    a.levels.clone().into_dispatch(),
                )))
            }
            _ => None,
        }
    }

    /// `residual + x·Wᵀ`: `x` `[m, cols]`, `residual` `[m, rows]` -> `[m, rows]`, one kernel for
    /// a few rows on a GPU.
    pub fn matmul_t_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Affine(w) => Tensor::from_dispatch(<Dispatch as PackedOps>::packed_matmul_t_add(
                x.into_dispatch(),
                w.packed.clone().into_dispatch(),
                w.scales.clone().into_dispatch(),
                w.biases.clone().into_dispatch(),
                residual.into_dispatch(),
                w.bits,
                w.group_size,
            )),
            Self::Nf4(w) => Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_matmul_t_add(
                x.into_dispatch(),
                w.packed.clone().into_dispatch(),
                w.effective_absmax().into_dispatch(),
                w.levels.clone().into_dispatch(),
                residual.into_dispatch(),
            )),
        }
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
    /// The absmax values in f32, one per block of the weight, decoded from 8 bits under double
    /// quantization.
    fn effective_absmax(&self) -> Tensor<1> {
        let n = self.packed.dims()[0] * self.cols / nf4::BLOCK;
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
        Tensor::from_dispatch(<Dispatch as PackedOps>::nf4_dequantize(
            self.packed.clone().into_dispatch(),
            self.effective_absmax().into_dispatch(),
            self.levels.clone().into_dispatch(),
            float_dtype(self.dtype),
        ))
    }
}

/// The norm arguments of the fused products: the weight, epsilon and `true`, or, without a
/// norm, a view of `x`'s first row (zeros when it has none) standing in for the weight (never
/// read), 0 and `false`.
fn norm_parts(x: &Tensor<2>, norm: Option<(Tensor<1>, f32)>) -> (burn::backend::tensor::FloatTensor<Dispatch>, f32, bool) {
    match norm {
        Some((weight, eps)) => (weight.into_dispatch(), eps, true),
        // A row of `x` when it has one (a view, nothing copied), else zeros.
        None => {
            let [rows, cols] = x.dims();
            let stand_in = if rows > 0 { x.clone().narrow(0, 0, 1).reshape([cols]) } else { Tensor::zeros([cols], (&x.device(), x.dtype())) };
            (stand_in.into_dispatch(), 0.0, false)
        }
    }
}
