//! Loading a model and its adapters, for every command that runs one.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lora_model::{CausalLm, Checkpoint, LoadEvent, LoadOptions, ModelConfig};

/// Loads the weights with a progress bar, one module at a time, quantizing as asked.
pub fn load_model(
    config: &ModelConfig,
    checkpoint: &Checkpoint,
    device: &burn::tensor::Device,
    dtype: burn::tensor::DType,
    options: LoadOptions,
) -> Result<CausalLm> {
    let bar = ProgressBar::new(config.num_layers as u64 + 2);
    let verb = if options.quantize.is_some() && config.quantization.is_none() { "Quantizing" } else { "Loading" };
    bar.set_style(ProgressStyle::with_template(&format!("{verb} {{bar:30}} {{pos}}/{{len}} {{msg}}")).expect("valid template"));
    let mut kept_float = Vec::new();
    let mut group = 0;
    let model = CausalLm::load_with(config, checkpoint, device, dtype, options, |event| match event {
        LoadEvent::Loaded(name) => {
            bar.set_message(name.to_string());
            bar.inc(1);
        }
        LoadEvent::KeptFloat { name, group_size, .. } => {
            kept_float.push(name.to_string());
            group = group_size;
        }
        _ => {}
    })
    .with_context(|| format!("loading {}", checkpoint.dir().display()))?;
    bar.finish_and_clear();
    if !kept_float.is_empty() {
        eprintln!("Kept {} layer(s) in float: input size not a multiple of the group size {group}: {}", kept_float.len(), kept_float.join(", "));
    }
    Ok(model)
}

/// Puts the adapters at `paths`, weighted by `scales` (1 each when empty), on the model,
/// unmerged.
pub fn apply_adapters(model: &mut CausalLm, paths: &[PathBuf], scales: &[f64]) -> Result<()> {
    if paths.is_empty() {
        if !scales.is_empty() {
            bail!("--adapter-scales needs --adapter-path");
        }
        return Ok(());
    }
    if !scales.is_empty() && scales.len() != paths.len() {
        bail!("--adapter-scales has {} value(s) for {} --adapter-path", scales.len(), paths.len());
    }
    if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
        bail!("--adapter-scales: {s} is not a finite number");
    }
    let files = paths.iter().map(|p| lora_adapters::format::load(p)).collect::<Result<Vec<_>, _>>()?;
    let parts: Vec<_> = files.iter().enumerate().map(|(i, f)| (f.weights.as_slice(), scales.get(i).copied().unwrap_or(1.0), f.path.as_path())).collect();
    let combined = lora_adapters::combine(&parts)?;
    // Each adapter alone is checked against the model first, so an error names its file.
    for f in &files {
        lora_adapters::check_adapters(model, &f.weights, &f.path)?;
    }
    lora_adapters::set_adapters(model, &combined, 0.0, &files[0].path)?;
    Ok(())
}
