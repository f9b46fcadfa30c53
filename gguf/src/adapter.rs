//! A LoRA adapter as a GGUF file for llama.cpp's `--lora`: `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, and per adapted weight `<name>.lora_a`
//! (`ne [in, r]`) and `<name>.lora_b` (`ne [r, out]`) under the base's GGUF tensor names.
//!
//! llama.cpp scales every pair by `alpha / r` with one alpha for the file. A per-layer
//! scale that differs from `alpha / r` (rsLoRA, PEFT's `alpha_pattern`, mlx-lm's raw scale
//! with ranks that differ) is folded into that layer's `B`, so every layer keeps its scale.

use std::path::Path;

use lora_adapters::AdapterWeights;
use lora_model::ModelConfig;

use crate::GgufError;
use crate::file::{Declared, Element, GgufFile, Meta};
use crate::model::QUANTIZATION_VERSION;
use crate::names::{GgufArch, rope_heads, rope_rows, tensor_name};

/// Writes `adapters` (read from `source`) for a base model of `config` to `path`.
pub fn export_adapter(config: &ModelConfig, adapters: &[AdapterWeights], source: &Path, path: &Path) -> Result<(), GgufError> {
    let arch = GgufArch::of(config);
    let first = adapters.first().ok_or_else(|| GgufError::invalid(source, "the adapter has no weights"))?;
    if let Some(a) = adapters.iter().find(|a| a.magnitude.is_some()) {
        return Err(GgufError::unsupported(
            source,
            format!("{} is a DoRA adapter; llama.cpp's --lora applies LoRA only (fuse it with `lora fuse --export-gguf` instead)", a.module),
        ));
    }
    // llama.cpp reads alpha 0 as "no scaling": alpha comes from a layer that scales.
    let alpha = adapters.iter().find(|a| a.scale != 0.0).map_or(first.rank as f64, |a| a.scale * a.rank as f64);
    let mut declared = Vec::new();
    let mut values = Vec::new();
    for a in adapters {
        if a.b.len() != a.outputs * a.rank || a.a.len() != a.rank * a.inputs {
            return Err(GgufError::invalid(
                source,
                format!("{}: A or B does not hold rank {} for {} inputs and {} outputs", a.module, a.rank, a.inputs, a.outputs),
            ));
        }
        let weight = format!("{}.weight", a.module);
        let name = tensor_name(&weight, source)?.ok_or_else(|| GgufError::unsupported(source, format!("{weight} has no GGUF tensor")))?;
        // llama.cpp applies alpha / rank; what this layer needs beyond that goes into B.
        let fold = (a.scale * a.rank as f64 / alpha) as f32;
        let b: Vec<f32> = if fold == 1.0 { a.b.clone() } else { a.b.iter().map(|v| v * fold).collect() };
        let b = match rope_heads(arch, config, &weight) {
            Some(heads) if a.outputs == heads * config.head_dim => rope_rows(&b, a.outputs, heads),
            Some(heads) => {
                return Err(GgufError::invalid(
                    source,
                    format!("{} has {} outputs; {heads} heads of {} need {}", a.module, a.outputs, config.head_dim, heads * config.head_dim),
                ));
            }
            None => b,
        };
        declared.push(Declared { name: format!("{name}.lora_a"), shape: vec![a.rank, a.inputs], element: Element::F32 });
        values.push(a.a.clone());
        declared.push(Declared { name: format!("{name}.lora_b"), shape: vec![a.outputs, a.rank], element: Element::F32 });
        values.push(b);
    }
    let name = source
        .parent()
        .and_then(|d| d.canonicalize().ok())
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "adapter".into());
    let metadata = vec![
        ("general.architecture".into(), Meta::Str(arch.name().into())),
        ("general.type".into(), Meta::Str("adapter".into())),
        ("general.name".into(), Meta::Str(name)),
        ("general.quantization_version".into(), Meta::U32(QUANTIZATION_VERSION)),
        ("adapter.type".into(), Meta::Str("lora".into())),
        ("adapter.lora.alpha".into(), Meta::F32(alpha as f32)),
    ];
    let mut file = GgufFile::create(path, &metadata, &declared)?;
    for v in &values {
        file.add(v)?;
    }
    file.finish()?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_rs_lib::format::metadata::MetadataValue;
    use gguf_rs_lib::reader::GGUFFileReader;

    fn weights(module: &str, scale: f64, rank: usize) -> AdapterWeights {
        AdapterWeights { module: module.into(), a: vec![0.5; rank * 64], b: vec![1.0; 32 * rank], magnitude: None, rank, inputs: 64, outputs: 32, scale }
    }

    #[test]
    fn a_layer_whose_scale_is_not_alpha_over_rank_has_it_folded_into_b() {
        let config = ModelConfig::from_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llama"))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        // alpha comes from the first layer: 2.0 · 4 = 8. The second needs 3.0 at rank 2,
        // where llama.cpp applies 8 / 2 = 4: its B is scaled by 3/4.
        let adapters = [weights("model.layers.0.self_attn.v_proj", 2.0, 4), weights("model.layers.1.self_attn.v_proj", 3.0, 2)];
        export_adapter(&config, &adapters, Path::new("adapters.safetensors"), &path).unwrap();
        let mut r = GGUFFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(r.metadata().get("adapter.lora.alpha"), Some(&MetadataValue::F32(8.0)));
        let b = |r: &mut GGUFFileReader<std::fs::File>, n: &str| -> Vec<f32> {
            r.load_tensor_data(n).unwrap().unwrap().as_slice().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        assert!(b(&mut r, "blk.0.attn_v.weight.lora_b").iter().all(|&v| v == 1.0));
        assert!(b(&mut r, "blk.1.attn_v.weight.lora_b").iter().all(|&v| v == 0.75));
    }
}
