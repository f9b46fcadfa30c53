//! `lora bench`: speed and memory, measured on one device in one run, to be set beside a peer
//! run on the same machine (`bench/peer_peft.py`).

pub mod attention;
pub mod generate;
pub mod matmul;
pub mod quant;
pub mod train;

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device, Tensor};
use clap::Args;
use lora_model::device::is_cpu;
use lora_model::{CausalLm, Checkpoint, Geometry, LoadOptions, ModelConfig};

use crate::device::{DTypeArg, DeviceArg, compute_dtype, select};
use crate::load::load_model;
use crate::quantize::QuantArgs;

/// A named model shape and overrides of its sizes.
#[derive(Debug, Args)]
pub struct GeometryArgs {
    /// The model shape: tiny, llama-1b, llama-3b, llama-8b, qwen2-0.5b, mistral-7b.
    #[arg(long, default_value = "llama-1b", value_name = "NAME")]
    pub geometry: String,
    /// Override the shape's hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override the shape's MLP width.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Override the shape's number of blocks.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the shape's query heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override the shape's key/value heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Override the shape's vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
}

impl GeometryArgs {
    /// The named shape with the overrides, checked.
    pub fn geometry(&self) -> Result<Geometry> {
        let mut g = Geometry::named(&self.geometry).with_context(|| format!("--geometry {}: unknown (known: {})", self.geometry, Geometry::names()))?;
        let over = |v: Option<usize>, d: usize| v.unwrap_or(d);
        g.hidden = over(self.hidden, g.hidden);
        g.intermediate = over(self.intermediate, g.intermediate);
        g.layers = over(self.layers, g.layers);
        g.heads = over(self.heads, g.heads);
        g.kv_heads = over(self.kv_heads, g.kv_heads);
        g.vocab = over(self.vocab, g.vocab);
        g.validate().map_err(|e| anyhow::anyhow!("--geometry {}: {e}", self.geometry))?;
        Ok(g)
    }
}

/// The random model a bench runs on: its shape, how it is loaded, and where.
#[derive(Debug, Args)]
pub struct RandomModelArgs {
    #[command(flatten)]
    pub shape: GeometryArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Compute dtype [default: bf16 where the device has it, else f16; f32 on the CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
}

/// [`RandomModelArgs`] resolved: the checked shape, its config, the device, the compute dtype
/// and the load options.
pub struct RandomModel {
    pub geometry: Geometry,
    pub config: ModelConfig,
    pub device: Device,
    pub dtype: DType,
    pub options: LoadOptions,
}

impl RandomModelArgs {
    pub fn resolve(&self) -> Result<RandomModel> {
        let geometry = self.shape.geometry()?;
        let config = geometry.config();
        let device = select(self.device)?;
        let dtype = compute_dtype(&device, self.dtype, config.checkpoint_dtype.as_deref())?;
        let options = self.quant.load_options(&config)?;
        Ok(RandomModel { geometry, config, device, dtype, options })
    }

    /// `", base NF4 double-quant"`-style words for the reports: empty for a float base.
    pub fn base_words(&self) -> String {
        self.quant.quantize.map_or(String::new(), |q| format!(", base {q:?}{}", if self.quant.double_quant { " double-quant" } else { "" }))
    }
}

impl RandomModel {
    /// The model with random weights built on `device` (the plain device, or its autodiff
    /// form), and the seconds building took, synchronized.
    pub fn build(&self, device: &Device) -> Result<(CausalLm, f64)> {
        let started = Instant::now();
        let model = load_model(&self.config, &Checkpoint::random(&self.config), device, self.dtype, self.options)?;
        self.device.sync().context("device sync")?;
        Ok((model, started.elapsed().as_secs_f64()))
    }
}

/// `n` token ids below `vocab` from a xorshift stream seeded with `seed` (never 0).
pub fn random_tokens(n: usize, vocab: usize, seed: &mut u64) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed % vocab as u64) as u32
        })
        .collect()
}

/// How long [`time_samples`] runs the timed call before timing it. A GPU's clocks follow its
/// load: on the H200 the SM clock idles at 345 MHz and reaches its 1980 MHz only after a second
/// or two of sustained work, and the pauses between one measurement and the next (operand
/// set-up, checks, host reads) let it fall again, so a product timed cold runs at a third of
/// its speed.
pub const WARM_S: f64 = 0.5;

/// Seconds per call of `f`, the median of `iters` after [`WARM_S`] of warm-up, synchronized.
pub fn time<const D: usize>(device: &Device, iters: usize, f: impl Fn() -> Tensor<D>) -> Result<f64> {
    Ok(median(&mut time_samples(device, iters, f)?))
}

/// Every timed repetition of [`time`]'s, in seconds, sorted. The first call (where kernels
/// are compiled and tuned) and the warm-up are not timed.
pub fn time_samples<const D: usize>(device: &Device, iters: usize, f: impl Fn() -> Tensor<D>) -> Result<Vec<f64>> {
    let _ = f();
    device.sync().context("device sync")?;
    if !is_cpu(device) {
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < WARM_S {
            for _ in 0..4 {
                drop(f());
            }
            device.sync().context("device sync")?;
        }
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let y = f();
        device.sync().context("device sync")?;
        samples.push(start.elapsed().as_secs_f64());
        drop(y);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// The median of `samples` (the upper one of an even count); 0 when empty.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Prints the configurations the tensor-core kernel's autotune settled on in this process, a
/// line per product, and returns them for a report's JSON.
pub fn report_tuned() -> serde_json::Value {
    let tuned = lora_kernels::matmul::tuned();
    for (product, config) in &tuned {
        println!("autotune: {product}: {config}");
    }
    tuned.iter().map(|(product, config)| serde_json::json!({"product": product, "config": config.to_string()})).collect()
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
