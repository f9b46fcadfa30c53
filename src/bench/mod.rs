//! `lora bench`: speed and memory, measured on one device in one run, to be set beside a peer
//! run on the same machine (`bench/peer_peft.py`).

pub mod matmul;
pub mod quant;
pub mod train;

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};

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
