//! `lora convert-adapter`: PEFT <-> mlx-lm adapter directories.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use lora_adapters::{AdapterFormat, format};

/// `--to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Hugging Face PEFT: adapter_config.json + adapter_model.safetensors.
    Peft,
    /// mlx-lm: adapter_config.json + adapters.safetensors.
    Mlx,
}

/// Flags of `lora convert-adapter`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The adapter to read: a PEFT or mlx-lm directory (or its weights file); the format is detected.
    #[arg(long, value_name = "DIR")]
    pub adapter_path: PathBuf,
    /// Where to write the converted adapter (a new or empty directory).
    #[arg(long, value_name = "DIR")]
    pub save_path: PathBuf,
    /// The format to write [default: the other one].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub to: Option<FormatArg>,
    /// Write into a save path that is not empty (its adapter files are replaced).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let file = format::load(&args.adapter_path)?;
    let to = match args.to {
        Some(FormatArg::Peft) => AdapterFormat::Peft,
        Some(FormatArg::Mlx) => AdapterFormat::Mlx,
        None if file.format == AdapterFormat::Peft => AdapterFormat::Mlx,
        None => AdapterFormat::Peft,
    };
    let out = &args.save_path;
    crate::fuse::check_save_path(out, &[file.dir()], args.force)?;
    // The base model's name as the source config gives it (PEFT's key, or mlx-lm's `model`).
    let config: serde_json::Value = std::fs::read_to_string(file.dir().join(format::CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let base = ["base_model_name_or_path", "model"].iter().find_map(|k| config[k].as_str()).unwrap_or_default().to_string();
    format::save(out, to, &file.spec, &file.weights, &base, None)?;
    eprintln!("Wrote the {:?} adapter {} as {to:?} to {}", file.format, file.path.display(), out.display());
    Ok(())
}
