//! `lora bench`: speed and memory, measured on one device in one run, to be set beside a peer
//! run on the same machine (`bench/peer_peft.py`).

pub mod generate;
pub mod matmul;
pub mod quant;
pub mod train;

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};
use clap::Args;
use lora_model::Geometry;

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

/// Seconds per call of `f`, the median of `iters` after one warm-up, synchronized.
pub fn time<const D: usize>(device: &Device, iters: usize, f: impl Fn() -> Tensor<D>) -> Result<f64> {
    let _ = f();
    device.sync().context("device sync")?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let y = f();
        device.sync().context("device sync")?;
        samples.push(start.elapsed().as_secs_f64());
        drop(y);
    }
    Ok(median(&mut samples))
}

/// The median of `samples` (the upper one of an even count); 0 when empty.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
