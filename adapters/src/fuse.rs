//! Merging adapters into a checkpoint's weights: every adapted projection becomes
//! `W + scale·B·A` (DoRA: each row rescaled to its magnitude, as PEFT merges it); every other
//! tensor is copied as it is stored.
//!
//! A float base gives float weights. A base in MLX's affine layout (packed `weight` with
//! `scales` and `biases`) is dequantized, merged and quantized again with its own bits and
//! group size, as `mlx_lm.fuse` does, or left in float with `dequantize`.

use burn::tensor::{DType, Device, Tensor, TensorData};
use lora_model::checkpoint::{decode_floats, encode_floats};
use lora_model::{Checkpoint, ModelConfig};
use lora_quant::affine::{self, AffineSpec};
use safetensors::Dtype;

use crate::AdapterError;
use crate::attach::AdapterWeights;

/// The float type of written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// 32-bit.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl FloatType {
    fn dtype(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
        }
    }

    /// The name config.json's `torch_dtype`/`dtype` uses.
    pub fn config_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// How to fuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FuseOptions {
    /// Write a quantized base's layers in float.
    pub dequantize: bool,
    /// The float type of every float tensor written; `None` keeps each tensor's own.
    pub dtype: Option<FloatType>,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    /// Its name in the checkpoint.
    pub name: String,
    /// Stored dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

fn parse_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "U32" => Dtype::U32,
        _ => return None,
    })
}

/// f32 values of a float tensor's bytes (its dtype checked by the caller).
fn floats(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    decode_floats(bytes, dtype).expect("a float dtype")
}

/// `w` `[out, in]` merged with `adapter`: `W + s·B·A`, then DoRA's rescaling.
pub fn merge(w: &[f32], adapter: &AdapterWeights) -> Vec<f32> {
    let device = Device::flex();
    let t = |v: &[f32], shape: [usize; 2]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), (&device, DType::F32));
    let (out, inp, r) = (adapter.outputs, adapter.inputs, adapter.rank);
    let merged = t(w, [out, inp]) + t(&adapter.b, [out, r]).matmul(t(&adapter.a, [r, inp])) * adapter.scale;
    let merged = match &adapter.magnitude {
        None => merged,
        Some(m) => {
            let norm = merged.clone().square().sum_dim(1).sqrt(); // [out, 1]
            let m = Tensor::<1>::from_data(TensorData::new(m.clone(), [out]), (&device, DType::F32)).reshape([out, 1]);
            merged * (m / norm)
        }
    };
    merged.into_data().try_into_vec::<f32>().expect("f32 data")
}

/// Whether `name` is a quantized weight's `scales` or `biases`, which travel with the weight.
pub fn is_quantization_companion(checkpoint: &Checkpoint, name: &str) -> bool {
    name.strip_suffix(".scales")
        .or_else(|| name.strip_suffix(".biases"))
        .is_some_and(|m| checkpoint.contains(&format!("{m}.weight")) && checkpoint.contains(&format!("{m}.scales")))
}

/// The shape the checkpoint tensor `name` has in float: a quantized weight's unpacked
/// `[rows, cols]`, any other tensor's stored shape; `None` for a quantized weight's scales
/// and biases ([`is_quantization_companion`]).
pub fn float_shape(checkpoint: &Checkpoint, config: &ModelConfig, name: &str) -> Result<Option<Vec<usize>>, AdapterError> {
    if is_quantization_companion(checkpoint, name) {
        return Ok(None);
    }
    let shape = checkpoint.shape(name).map_err(|e| AdapterError::invalid(checkpoint.dir(), e.to_string()))?;
    let module = name.strip_suffix(".weight").unwrap_or("");
    if module.is_empty() || !checkpoint.contains(&format!("{module}.scales")) {
        return Ok(Some(shape));
    }
    let spec = config.quantization.as_ref().map(|q| q.spec(module));
    match (spec, shape.as_slice()) {
        (Some(spec), &[rows, packed]) => Ok(Some(vec![rows, packed * 32 / spec.bits])),
        (None, _) => Err(AdapterError::invalid(checkpoint.dir(), format!("{name} has scales but config.json has no quantization section"))),
        (Some(_), _) => Err(AdapterError::invalid(checkpoint.dir(), format!("{name}: a quantized weight of shape {shape:?} is not two-dimensional"))),
    }
}

/// Checks that every adapter (read from `source`) fits `checkpoint`: a module the checkpoint
/// lacks, or a shape that does not fit, is an error naming the tensor and both shapes.
pub fn check_fits(checkpoint: &Checkpoint, config: &ModelConfig, adapters: &[AdapterWeights], source: &std::path::Path) -> Result<(), AdapterError> {
    for a in adapters {
        let name = format!("{}.weight", a.module);
        if !checkpoint.contains(&name) {
            return Err(AdapterError::UnknownModule { path: source.to_path_buf(), name: format!("{}.lora_A", a.module), module: a.module.clone() });
        }
        let shape = float_shape(checkpoint, config, &name)?.unwrap_or_default();
        let (out, inp) = (shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(0));
        if a.inputs != inp {
            return Err(AdapterError::ShapeMismatch {
                path: source.to_path_buf(),
                name: format!("{}.lora_A", a.module),
                expected: vec![a.rank, inp],
                found: vec![a.rank, a.inputs],
            });
        }
        if a.outputs != out {
            return Err(AdapterError::ShapeMismatch {
                path: source.to_path_buf(),
                name: format!("{}.lora_B", a.module),
                expected: vec![out, a.rank],
                found: vec![a.outputs, a.rank],
            });
        }
    }
    Ok(())
}

/// Fuses `adapters` into `checkpoint`, handing each output tensor to `emit` in name order,
/// and `progress` each tensor name as it is done. Returns whether the output is quantized.
///
/// Every adapter is checked first: a module the checkpoint lacks, or a shape that does not
/// fit, is an error naming the tensor and both shapes, before anything is emitted.
pub fn fuse(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    adapters: &[AdapterWeights],
    options: FuseOptions,
    source: &std::path::Path,
    mut emit: impl FnMut(OutTensor) -> Result<(), AdapterError>,
    mut progress: impl FnMut(&str),
) -> Result<bool, AdapterError> {
    check_fits(checkpoint, config, adapters, source)?;
    let model_err = |e: lora_model::ModelError| AdapterError::invalid(checkpoint.dir(), e.to_string());
    let spec_of = |module: &str| config.quantization.as_ref().map(|q| q.spec(module));

    let mut any_quantized = false;
    for name in checkpoint.names() {
        let module = name.strip_suffix(".weight").unwrap_or("");
        let is_quantized_weight = !module.is_empty() && checkpoint.contains(&format!("{module}.scales"));
        // Scales and biases travel with their weight.
        if is_quantization_companion(checkpoint, name) {
            continue;
        }
        let (bytes, meta) = checkpoint.raw(name).map_err(model_err)?;
        let stored = parse_dtype(&meta.dtype).ok_or_else(|| AdapterError::invalid(&meta.path, format!("{name}: dtype {} is not supported", meta.dtype)))?;
        let adapter = adapters.iter().find(|a| a.module == module && !module.is_empty());
        if is_quantized_weight {
            let spec: AffineSpec = spec_of(module).expect("checked with the adapters or below");
            let (scales_bytes, scales_meta) = checkpoint.raw(&format!("{module}.scales")).map_err(model_err)?;
            let (biases_bytes, _) = checkpoint.raw(&format!("{module}.biases")).map_err(model_err)?;
            let scales_dtype = parse_dtype(&scales_meta.dtype)
                .filter(|d| *d != Dtype::U32)
                .ok_or_else(|| AdapterError::invalid(&scales_meta.path, format!("{module}.scales: dtype {} is not f32, f16 or bf16", scales_meta.dtype)))?;
            let (rows, cols) = (meta.shape[0], meta.shape[1] * 32 / spec.bits);
            if adapter.is_none() && !options.dequantize {
                for (n, b, m) in [(name.to_string(), bytes, &meta), (format!("{module}.scales"), scales_bytes, &scales_meta)] {
                    emit(OutTensor { name: n, dtype: parse_dtype(&m.dtype).unwrap_or(Dtype::U32), shape: m.shape.clone(), data: b.to_vec() })?;
                }
                emit(OutTensor { name: format!("{module}.biases"), dtype: scales_dtype, shape: scales_meta.shape.clone(), data: biases_bytes.to_vec() })?;
                any_quantized = true;
                progress(name);
                continue;
            }
            let packed: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let w = affine::dequantize(&packed, &floats(scales_bytes, scales_dtype), &floats(biases_bytes, scales_dtype), cols, spec);
            let w = match adapter {
                Some(a) => merge(&w, a),
                None => w,
            };
            if options.dequantize {
                let dtype = options.dtype.map_or(scales_dtype, FloatType::dtype);
                emit(OutTensor { name: name.to_string(), dtype, shape: vec![rows, cols], data: encode_floats(&w, dtype) })?;
            } else {
                let q = affine::quantize(&w, cols, spec).map_err(|e| AdapterError::invalid(checkpoint.dir(), format!("{name}: {e}")))?;
                let words: Vec<u8> = q.packed.iter().flat_map(|x| x.to_le_bytes()).collect();
                emit(OutTensor { name: name.to_string(), dtype: Dtype::U32, shape: meta.shape.clone(), data: words })?;
                let groups = vec![rows, cols / spec.group_size];
                emit(OutTensor { name: format!("{module}.scales"), dtype: scales_dtype, shape: groups.clone(), data: encode_floats(&q.scales, scales_dtype) })?;
                emit(OutTensor { name: format!("{module}.biases"), dtype: scales_dtype, shape: groups, data: encode_floats(&q.biases, scales_dtype) })?;
                any_quantized = true;
            }
        } else if stored == Dtype::U32 {
            emit(OutTensor { name: name.to_string(), dtype: stored, shape: meta.shape.clone(), data: bytes.to_vec() })?;
        } else {
            let dtype = options.dtype.map_or(stored, FloatType::dtype);
            match adapter {
                Some(a) => {
                    let w = merge(&floats(bytes, stored), a);
                    emit(OutTensor { name: name.to_string(), dtype, shape: meta.shape.clone(), data: encode_floats(&w, dtype) })?;
                }
                None if dtype == stored => emit(OutTensor { name: name.to_string(), dtype, shape: meta.shape.clone(), data: bytes.to_vec() })?,
                None => emit(OutTensor { name: name.to_string(), dtype, shape: meta.shape.clone(), data: encode_floats(&floats(bytes, stored), dtype) })?,
            }
        }
        progress(name);
    }
    Ok(any_quantized)
}
