//! `lora convert-adapter`: PEFT <-> mlx-lm adapter directories, and GGUF for llama.cpp.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use lora_adapters::fuse::check_fits;
use lora_adapters::{AdapterFormat, format};
use lora_model::{Checkpoint, ModelConfig};

/// `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Hugging Face PEFT: adapter_config.json + adapter_model.safetensors.
    Peft,
    /// mlx-lm: adapter_config.json + adapters.safetensors.
    Mlx,
    /// A GGUF LoRA adapter for llama.cpp's `--lora` (one file; needs `--model`).
    Gguf,
}

/// Flags of `lora convert-adapter`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The adapter to read: a PEFT or mlx-lm directory (or its weights file); the format is detected.
    #[arg(long, value_name = "DIR")]
    pub adapter_path: PathBuf,
    /// Where to write the converted adapter: a new or empty directory, or the .gguf file.
    #[arg(long, value_name = "PATH")]
    pub save_path: PathBuf,
    /// The format to write [default: the other one].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub to: Option<FormatArg>,
    /// The base model the adapter was trained on (for `--to gguf`: its architecture and
    /// GGUF tensor names).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Write into a save path that is not empty (its adapter files are replaced).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let file = format::load(&args.adapter_path)?;
    if args.to == Some(FormatArg::Gguf) {
        return to_gguf(&args, &file);
    }
    let to = match args.to {
        Some(FormatArg::Gguf) => unreachable!("handled above"),
        Some(FormatArg::Peft) => AdapterFormat::Peft,
        Some(FormatArg::Mlx) => AdapterFormat::Mlx,
        None if file.format == AdapterFormat::Peft => AdapterFormat::Mlx,
        None => AdapterFormat::Peft,
    };
    let out = &args.save_path;
    crate::save_path::check_save_path(out, &[file.dir()], args.force)?;
    // The base model's name as the source config gives it (PEFT's key, or mlx-lm's `model`).
    let config: serde_json::Value =
        std::fs::read_to_string(file.dir().join(format::CONFIG_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    let base = ["base_model_name_or_path", "model"].iter().find_map(|k| config[k].as_str()).unwrap_or_default().to_string();
    format::save(out, to, &file.spec, &file.weights, &base, None)?;
    eprintln!("Wrote the {:?} adapter {} as {to:?} to {}", file.format, file.path.display(), out.display());
    Ok(())
}

/// `--to gguf`: the adapter, checked against the base, as llama.cpp's LoRA GGUF.
fn to_gguf(args: &ConvertArgs, file: &lora_adapters::AdapterFile) -> Result<()> {
    let Some(model) = &args.model else {
        bail!("--to gguf needs --model DIR, the base model: a GGUF adapter names the base's architecture and tensors");
    };
    let out = &args.save_path;
    crate::save_path::check_save_file(out, &[file.dir(), model], args.force, "--save-path")?;
    let config = ModelConfig::from_dir(model)?;
    let checkpoint = Checkpoint::open(model)?;
    check_fits(&checkpoint, &config, &file.weights, &file.path)?;
    lora_gguf::export_adapter(&config, &file.weights, &file.path, out)?;
    eprintln!("Wrote the {:?} adapter {} as a llama.cpp GGUF LoRA to {}", file.format, file.path.display(), out.display());
    Ok(())
}
