//! `lora fuse`: a model directory with the adapter merged into its weights.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora_adapters::fuse::{FloatType, FuseOptions, OutTensor, fuse};
use lora_adapters::io::replace_dir;
use lora_gguf::ModelExport;
use lora_gguf::file::Written;
use lora_model::checkpoint::decode_floats;
use lora_model::{Checkpoint, ModelConfig};
use safetensors::tensor::TensorView;

use crate::device::DTypeArg;
use crate::save_path::{check_save_file, check_save_path, overlaps};

/// Shards are cut at this many bytes, as transformers' `max_shard_size="5GB"`.
const MAX_SHARD: usize = 5_000_000_000;

/// Flags of `lora fuse`.
#[derive(Debug, Args)]
pub struct FuseArgs {
    /// The base model directory (float or MLX quantized).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The adapter: a PEFT or mlx-lm directory (or its weights file).
    #[arg(long, value_name = "DIR")]
    pub adapter_path: PathBuf,
    /// Where to write the fused model (a new or empty directory).
    #[arg(long, value_name = "DIR", default_value = "fused_model")]
    pub save_path: PathBuf,
    /// Write a quantized base's layers in float instead of quantizing them again.
    #[arg(long)]
    pub dequantize: bool,
    /// The float type of the written weights [default: each tensor's own].
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// Also write the fused model, in float, as one f16 GGUF file for llama.cpp.
    #[arg(long, value_name = "FILE")]
    pub export_gguf: Option<PathBuf>,
    /// Replace a save path (or GGUF file) that exists and is not empty.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: FuseArgs) -> Result<()> {
    let out = &args.save_path;
    let adapter = lora_adapters::format::load(&args.adapter_path)?;
    check_save_path(out, &[&args.model, adapter.dir()], args.force)?;
    let config = ModelConfig::from_dir(&args.model)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    // The GGUF export is checked (architecture, tokenizer) before anything is fused.
    let gguf = match &args.export_gguf {
        Some(path) => {
            check_save_file(path, &[&args.model, adapter.dir()], args.force, "--export-gguf")?;
            if overlaps(path, &[out]) {
                bail!("--export-gguf {} is inside --save-path {}, which is replaced as a whole; write it beside", path.display(), out.display());
            }
            Some((path, ModelExport::new(&args.model, &config, &checkpoint, path)?))
        }
        None => None,
    };
    let dtype = args.dtype.map(|d| match d {
        DTypeArg::F32 => FloatType::F32,
        DTypeArg::F16 => FloatType::F16,
        DTypeArg::Bf16 => FloatType::Bf16,
    });
    let options = FuseOptions { dequantize: args.dequantize, dtype };

    // Everything goes into a temporary sibling directory, renamed into place at the end.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "fused".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    // Both outputs are written to temporary names first; the directory is then moved into
    // place, and the GGUF after it.
    let mut result = write(&args, &config, &checkpoint, &adapter, options, &tmp).map(|()| None);
    if let (Ok(_), Some((path, export))) = (&result, gguf) {
        result = write_gguf(&checkpoint, &config, &adapter, export).map(|w| Some((path, w))).with_context(|| format!("writing {}", path.display()));
    }
    let gguf = match result {
        Ok(gguf) => gguf,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = replace_dir(&tmp, out, &parent.join(format!(".{name}.old-{}", std::process::id()))) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.into());
    }
    if let Some((path, written)) = gguf {
        written.commit()?;
        eprintln!("Wrote the fused model as f16 GGUF to {}", path.display());
    }
    eprintln!("Fused {} into {} and saved it to {}", adapter.path.display(), args.model.display(), out.display());
    Ok(())
}

/// Runs [`fuse`] behind a progress bar labelled `label`, handing each output tensor to
/// `emit`; the first error `emit` returns ends the work and is returned. Returns whether
/// the output is quantized.
fn fuse_with_bar(
    label: &str,
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    adapter: &lora_adapters::AdapterFile,
    options: FuseOptions,
    mut emit: impl FnMut(OutTensor) -> Result<()>,
) -> Result<bool> {
    let bar = ProgressBar::new(checkpoint.names().len() as u64);
    bar.set_style(ProgressStyle::with_template(&format!("{label:<6} {{bar:30}} {{pos}}/{{len}} {{msg}}")).expect("valid template"));
    let mut failure: Option<anyhow::Error> = None;
    let quantized = fuse(
        checkpoint,
        config,
        &adapter.weights,
        options,
        &adapter.path,
        |t| {
            if failure.is_none() {
                failure = emit(t).err();
            }
            Ok(())
        },
        |name| {
            bar.set_message(name.to_string());
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    match failure {
        Some(e) => Err(e),
        None => Ok(quantized),
    }
}

/// The fused model in float, streamed into a GGUF export, written but not yet in place.
fn write_gguf(checkpoint: &Checkpoint, config: &ModelConfig, adapter: &lora_adapters::AdapterFile, mut export: ModelExport) -> Result<Written> {
    let options = FuseOptions { dequantize: true, dtype: Some(FloatType::F32) };
    fuse_with_bar("GGUF", checkpoint, config, adapter, options, |t| {
        let values = decode_floats(&t.data, t.dtype).ok_or_else(|| anyhow::anyhow!("{}: a {:?} tensor has no float GGUF form", t.name, t.dtype))?;
        Ok(export.add(&t.name, &t.shape, &values)?)
    })?;
    Ok(export.finish()?)
}

fn write(args: &FuseArgs, config: &ModelConfig, checkpoint: &Checkpoint, adapter: &lora_adapters::AdapterFile, options: FuseOptions, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut pending: Vec<OutTensor> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut total = 0usize;
    let flush = |pending: &mut Vec<OutTensor>, shards: &mut Vec<Vec<String>>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let path = dir.join(format!("shard-{}.safetensors", shards.len()));
        let views: Vec<(String, TensorView)> = pending
            .iter()
            .map(|t| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let metadata = Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(views, metadata, &path).with_context(|| format!("writing {}", path.display()))?;
        shards.push(pending.iter().map(|t| t.name.clone()).collect());
        pending.clear();
        Ok(())
    };
    let quantized = fuse_with_bar("Fusing", checkpoint, config, adapter, options, |t| {
        if pending_bytes + t.data.len() > MAX_SHARD && !pending.is_empty() {
            flush(&mut pending, &mut shards)?;
            pending_bytes = 0;
        }
        pending_bytes += t.data.len();
        total += t.data.len();
        pending.push(t);
        Ok(())
    })?;
    flush(&mut pending, &mut shards)?;

    // One shard is model.safetensors; several get transformers' names and an index.
    let n = shards.len();
    if n == 1 {
        std::fs::rename(dir.join("shard-0.safetensors"), dir.join("model.safetensors"))?;
    } else {
        let mut map = serde_json::Map::new();
        for (i, names) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            std::fs::rename(dir.join(format!("shard-{i}.safetensors")), dir.join(&file))?;
            for t in names {
                map.insert(t.clone(), serde_json::Value::String(file.clone()));
            }
        }
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }

    // config.json: no quantization section once dequantized; the new dtype when one was asked.
    let config_path = args.model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?)?;
    if let Some(obj) = json.as_object_mut() {
        if !quantized {
            obj.remove("quantization");
            obj.remove("quantization_config");
        }
        if let Some(d) = options.dtype {
            for key in ["torch_dtype", "dtype"] {
                if obj.contains_key(key) || key == "torch_dtype" {
                    obj.insert(key.into(), serde_json::Value::String(d.config_name().into()));
                }
            }
        }
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json)?)?;
    // safetensors writes its files private (0600); they get the mode of any file made here.
    let mode = std::fs::metadata(dir.join("config.json"))?.permissions();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::set_permissions(&path, mode.clone()).with_context(|| format!("setting the mode of {}", path.display()))?;
        }
    }
    copy_known_files(&args.model, dir)
}

/// The files of a model directory that a fused model needs besides its weights and
/// `config.json`: the tokenizer in each of its forms, chat templates, the generation config.
const KNOWN_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// Copies [`KNOWN_FILES`] of `model` into `dir`, and nothing else (a user's other files, a
/// secret, stay where they are). A file that is a symbolic link to somewhere outside `model`
/// is skipped with a warning, unless `model` is a Hugging Face cache snapshot
/// (`…/snapshots/<revision>`) and the link points into that cache's `blobs/`, as all of its
/// files do.
fn copy_known_files(model: &Path, dir: &Path) -> Result<()> {
    let root = std::fs::canonicalize(model).with_context(|| format!("reading {}", model.display()))?;
    let blobs = match (root.parent(), root.parent().and_then(Path::parent)) {
        (Some(snapshots), Some(repo)) if snapshots.file_name().is_some_and(|n| n == "snapshots") => Some(repo.join("blobs")),
        _ => None,
    };
    for name in KNOWN_FILES {
        let path = model.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.file_type().is_symlink() {
            let target = std::fs::canonicalize(&path).with_context(|| format!("following the link {}", path.display()))?;
            if !target.starts_with(&root) && !blobs.as_ref().is_some_and(|b| target.starts_with(b)) {
                eprintln!("warning: not copying {}: it is a link to {}, outside the model directory", path.display(), target.display());
                continue;
            }
        }
        if path.is_file() {
            std::fs::copy(&path, dir.join(name)).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}
