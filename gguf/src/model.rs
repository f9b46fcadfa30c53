//! A fused model as one f16 GGUF file for llama.cpp, as its `convert_hf_to_gguf.py` writes
//! one: weight matrices in f16; norms, biases and 1-D tensors in f32; q/k rows reordered for
//! the `llama` architecture; Llama 3.1's rotary scaling as a `rope_freqs` tensor.

use std::path::{Path, PathBuf};

use lora_model::rope::llama3_divisor;
use lora_model::{ModelConfig, RopeScaling};

use lora_adapters::fuse::float_shape;
use lora_model::Checkpoint;

use crate::file::{Declared, Element, GgufFile, Meta, Written};
use crate::names::{GgufArch, rope_heads, rope_rows, tensor_name};
use crate::{GgufError, vocab};

/// GGUF's `general.file_type` for "mostly f16" (llama.cpp's `LLAMA_FTYPE_MOSTLY_F16`).
const FILE_TYPE_MOSTLY_F16: u32 = 1;
/// llama.cpp's tensor of Llama 3.1's rotary frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";
/// `general.quantization_version` as llama.cpp's converter writes it.
pub(crate) const QUANTIZATION_VERSION: u32 = 2;

/// An export in progress: [`ModelExport::add`] every tensor of the (fused, float) model in
/// the checkpoint's order, as `lora_adapters::fuse::fuse` hands them out, then
/// [`ModelExport::finish`]. The header is written first and the data streamed after it, so
/// the export takes the disk space of the file once.
pub struct ModelExport {
    arch: GgufArch,
    config: ModelConfig,
    file: GgufFile,
    source: PathBuf,
}

impl ModelExport {
    /// Starts writing `path` for the model in `model_dir` (its config.json, tokenizer files
    /// and `checkpoint`). Everything that can be checked before the weights is checked here:
    /// the architecture, the tokenizer, every tensor's name and shape.
    pub fn new(model_dir: &Path, config: &ModelConfig, checkpoint: &Checkpoint, path: &Path) -> Result<Self, GgufError> {
        let arch = GgufArch::of(config);
        let config_path = model_dir.join("config.json");
        let raw = crate::tokens::read_json(&config_path)?.ok_or_else(|| GgufError::invalid(&config_path, "no such file"))?;
        let name = model_dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into());
        let a = arch.name();
        let u = |v: usize| Meta::U32(v as u32);
        let mut metadata: Vec<(String, Meta)> = vec![
            ("general.architecture".into(), Meta::Str(a.into())),
            ("general.type".into(), Meta::Str("model".into())),
            ("general.name".into(), Meta::Str(name)),
            ("general.file_type".into(), Meta::U32(FILE_TYPE_MOSTLY_F16)),
            ("general.quantization_version".into(), Meta::U32(QUANTIZATION_VERSION)),
            (format!("{a}.block_count"), u(config.num_layers)),
            (format!("{a}.embedding_length"), u(config.hidden_size)),
            (format!("{a}.feed_forward_length"), u(config.intermediate_size)),
            (format!("{a}.attention.head_count"), u(config.num_heads)),
            (format!("{a}.attention.head_count_kv"), u(config.num_kv_heads)),
            (format!("{a}.attention.key_length"), u(config.head_dim)),
            (format!("{a}.attention.value_length"), u(config.head_dim)),
            (format!("{a}.attention.layer_norm_rms_epsilon"), Meta::F32(config.rms_norm_eps as f32)),
            (format!("{a}.rope.freq_base"), Meta::F32(config.rope_theta as f32)),
            (format!("{a}.rope.dimension_count"), u(config.head_dim)),
            (format!("{a}.vocab_size"), u(config.vocab_size)),
        ];
        // llama.cpp requires the training context; config.json spells it several ways.
        let context =
            ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"].iter().find_map(|k| raw[k].as_u64());
        let context = context.ok_or_else(|| GgufError::invalid(&config_path, "no max_position_embeddings: llama.cpp needs the model's context length"))?;
        metadata.push((format!("{a}.context_length"), Meta::U32(context as u32)));
        if let RopeScaling::Linear { factor } = config.rope_scaling {
            metadata.push((format!("{a}.rope.scaling.type"), Meta::Str("linear".into())));
            metadata.push((format!("{a}.rope.scaling.factor"), Meta::F32(factor as f32)));
        }
        if config.layer_windows.iter().any(Option::is_some) {
            return Err(GgufError::unsupported(
                &config_path,
                "sliding-window attention is not exported to GGUF (llama.cpp's llama, qwen2 and qwen3 attend to the whole context)",
            ));
        }
        metadata.extend(vocab::tokenizer_metadata(model_dir, &raw, config.vocab_size, arch == GgufArch::Llama)?);

        // Every tensor, in the order fuse hands them out, then what llama.cpp adds.
        let adapter_err = |e: lora_adapters::AdapterError| GgufError::invalid(checkpoint.dir(), e.to_string());
        let mut declared = Vec::new();
        for name in checkpoint.names() {
            let Some(shape) = float_shape(checkpoint, config, name).map_err(adapter_err)? else { continue };
            let Some(gguf_name) = tensor_name(name, &config_path)? else { continue };
            if let Some(heads) = rope_heads(arch, config, name)
                && shape.first() != Some(&(heads * config.head_dim))
            {
                return Err(GgufError::invalid(
                    checkpoint.dir(),
                    format!("{name} has shape {shape:?}; {heads} heads of {} need {} rows", config.head_dim, heads * config.head_dim),
                ));
            }
            let element = if shape.len() <= 1 || gguf_name.ends_with("_norm.weight") || !gguf_name.ends_with(".weight") { Element::F32 } else { Element::F16 };
            declared.push(Declared { name: gguf_name, shape, element });
        }
        if matches!(config.rope_scaling, RopeScaling::Llama3 { .. }) {
            declared.push(Declared { name: ROPE_FREQS.into(), shape: vec![config.head_dim / 2], element: Element::F32 });
        }
        Ok(Self { arch, config: config.clone(), file: GgufFile::create(path, &metadata, &declared)?, source: config_path })
    }

    /// Adds the Hugging Face tensor `name` of row-major `shape` (weights `[out, in]`), which
    /// must be the next of the checkpoint's tensors.
    pub fn add(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<(), GgufError> {
        let Some(gguf_name) = tensor_name(name, &self.source)? else { return Ok(()) };
        if self.file.expects() != Some(gguf_name.as_str()) {
            return Err(GgufError::invalid(&self.source, format!("{name} came when {} was expected", self.file.expects().unwrap_or("nothing more"))));
        }
        match rope_heads(self.arch, &self.config, name) {
            Some(heads) => self.file.add(&rope_rows(values, shape[0], heads)),
            None => self.file.add(values),
        }
    }

    /// Adds what llama.cpp needs beyond the checkpoint and writes the file under a
    /// temporary name, to be committed.
    pub fn finish(mut self) -> Result<Written, GgufError> {
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = self.config.rope_scaling {
            // One divisor per rotated pair, applied by llama.cpp to its own frequencies.
            let d = self.config.head_dim;
            let base = self.config.rope_theta as f32;
            let divisors: Vec<f32> = (0..d / 2)
                .map(|i| {
                    let freq = 1.0 / base.powf((2 * i) as f32 / d as f32);
                    llama3_divisor(freq as f64, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) as f32
                })
                .collect();
            self.file.add(&divisors)?;
        }
        self.file.finish()
    }
}
