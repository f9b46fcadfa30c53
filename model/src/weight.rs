//! The weight of a projection, dense or packed in 4 bits, and how it is loaded from a
//! checkpoint (quantized at load when asked).

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor};
use lora_quant::QuantWeight;
use lora_quant::affine::AffineSpec;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::ModelError;

/// What to do with the float weights of a checkpoint as they are loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantizeAtLoad {
    /// MLX affine quantization.
    Affine(AffineSpec),
    /// QLoRA NF4, block 64.
    Nf4 {
        /// Store the absmax values in 8 bits too.
        double_quant: bool,
    },
}

impl QuantizeAtLoad {
    fn group_size(&self) -> usize {
        match self {
            Self::Affine(spec) => spec.group_size,
            Self::Nf4 { .. } => lora_quant::nf4::BLOCK,
        }
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadOptions {
    /// Quantize every linear projection of the transformer blocks at load. Ignored for a
    /// checkpoint that is already quantized.
    pub quantize: Option<QuantizeAtLoad>,
    /// Also quantize the embedding and an untied `lm_head` (MLX does).
    pub quantize_embeddings: bool,
}

/// What happened while loading, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum LoadEvent<'a> {
    /// A module (the embedding, a block, the head) is loaded.
    Loaded(&'a str),
    /// A projection was left in float because its input size is not a multiple of the
    /// group size.
    KeptFloat {
        /// The module path.
        name: &'a str,
        /// Its input size.
        cols: usize,
        /// The group size it does not divide.
        group_size: usize,
    },
}

/// The weight of a projection: dense, or packed and quantized.
// A model holds a few hundred of these; the size difference between variants is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Weight {
    /// `[out, in]` in the compute dtype.
    Dense(Param<Tensor<2>>),
    /// Packed on the device, dequantized when used.
    Quant(QuantWeight),
}

impl Weight {
    /// The dense `[out, in]` weight (dequantized for a quantized one).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Self::Dense(w) => w.val(),
            Self::Quant(q) => q.dequantize(),
        }
    }

    /// The frozen weight `[out, in]`, dense or dequantized (a transient copy in the compute
    /// dtype); `None` for a dense weight that trains.
    pub fn frozen_dense(&self) -> Option<Tensor<2>> {
        match self {
            Self::Dense(w) if w.is_require_grad() => None,
            Self::Dense(w) => Some(w.val()),
            Self::Quant(q) => Some(q.dequantize()),
        }
    }

    /// `x·Wᵀ`: `x` `[m, in]` -> `[m, out]`, a quantized weight one layer at a time.
    pub fn matmul_t(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            // A frozen weight: one operation whose backward computes only dx = dy·W.
            Self::Dense(w) if !w.is_require_grad() => lora_kernels::frozen_linear(x, w.val()),
            Self::Dense(w) => x.matmul(w.val().transpose()),
            Self::Quant(q) => q.matmul_t(x),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(w) => w.dims(),
            Self::Quant(q) => q.dims(),
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quant(_))
    }

    /// Loads `{prefix}.weight` `[out, inp]`: packed when the checkpoint holds
    /// `{prefix}.scales` (MLX), else float, quantized if `quantize` asks for it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        prefix: &str,
        [out, inp]: [usize; 2],
        quantize: Option<QuantizeAtLoad>,
        device: &Device,
        dtype: DType,
        on_event: &mut dyn FnMut(LoadEvent),
    ) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        if ckpt.contains(&format!("{prefix}.scales")) {
            let spec = config.quantization.as_ref().map_or_else(AffineSpec::default, |q| q.spec(prefix));
            let quant_err = |source| ModelError::Quant { path: ckpt.dir().to_path_buf(), source };
            if !spec.fits(inp) {
                return Err(quant_err(lora_quant::QuantError::NotDivisible { cols: inp, group_size: spec.group_size }));
            }
            let (packed, shape) = ckpt.read_u32(&name)?;
            let expected = [out, inp * spec.bits / 32];
            if shape != expected {
                return Err(ModelError::ShapeMismatch { name, path: ckpt.meta(&format!("{prefix}.weight"))?.path, expected: expected.to_vec(), found: shape });
            }
            let groups = [out, inp / spec.group_size];
            let scales = ckpt.load(&format!("{prefix}.scales"), groups, device, dtype)?;
            let biases = ckpt.load(&format!("{prefix}.biases"), groups, device, dtype)?;
            let q = QuantWeight::from_packed(prefix, packed, [out, expected[1]], scales, biases, inp, spec, device).map_err(quant_err)?;
            return Ok(Self::Quant(q));
        }
        let Some(quantize) = quantize else {
            return Ok(Self::Dense(Param::from_tensor(ckpt.load(&name, [out, inp], device, dtype)?)));
        };
        let group_size = quantize.group_size();
        if !inp.is_multiple_of(group_size) {
            on_event(LoadEvent::KeptFloat { name: prefix, cols: inp, group_size });
            return Ok(Self::Dense(Param::from_tensor(ckpt.load(&name, [out, inp], device, dtype)?)));
        }
        let w = ckpt.read_f32(&name, &[out, inp])?;
        let quant_err = |source| ModelError::Quant { path: ckpt.dir().to_path_buf(), source };
        let q = match quantize {
            QuantizeAtLoad::Affine(spec) => {
                let mut q = lora_quant::affine::quantize(&w, inp, spec).map_err(quant_err)?;
                // MLX keeps scales and biases in the weight's own dtype.
                round_to_stored(&mut q.scales, config);
                round_to_stored(&mut q.biases, config);
                QuantWeight::from_affine(&q, out, inp, spec, device, dtype)
            }
            QuantizeAtLoad::Nf4 { double_quant } => {
                let q = lora_quant::nf4::quantize(&w, inp, double_quant).map_err(quant_err)?;
                QuantWeight::from_nf4(&q, out, inp, device, dtype)
            }
        };
        Ok(Self::Quant(q))
    }
}

/// Rounds f32 values to the checkpoint's half dtype, as MLX stores scales in it.
fn round_to_stored(v: &mut [f32], config: &ModelConfig) {
    match config.checkpoint_dtype.as_deref() {
        Some("bfloat16") => v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        Some("float16") => v.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}
