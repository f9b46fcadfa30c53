//! `lora bench quant`: what a packed 4-bit base costs and saves against f16, measured on
//! one device in one run.
//!
//! * Memory: the device memory of a stack of Llama-style projection weights held packed
//!   against the same weights in f16.
//! * Throughput: `x·Wᵀ` as the model computes it for a packed `W` (`QuantWeight::matmul_t`)
//!   against a dense f16 `x·Wᵀ` of the same shape, at a
//!   prefill/training size (batch×seq rows) and at batch-1 decode.

use anyhow::{Context, Result};
use burn::tensor::{DType, Device, Distribution, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora_quant::QuantWeight;
use lora_quant::affine::{self, AffineSpec};

use super::time;
use crate::device::{DeviceArg, select};
use lora_kernels::tensor::float_dtype;
use lora_model::checkpoint::random_normal;

/// Flags of `lora bench quant`.
#[derive(Debug, Args)]
pub struct BenchQuantArgs {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
    /// Hidden size of the projections (4096: Llama-3.1-8B).
    #[arg(long, default_value_t = 4096)]
    pub hidden: usize,
    /// MLP width (14336: Llama-3.1-8B).
    #[arg(long, default_value_t = 14336)]
    pub intermediate: usize,
    /// Transformer blocks whose projections are held for the memory figure.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Rows of x for the throughput figures (batch × seq; 1 is decoding), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2048, 512, 1])]
    pub rows: Vec<usize>,
    /// Bits of the affine quantization.
    #[arg(long, default_value_t = 4)]
    pub bits: usize,
    /// Group size of the affine quantization.
    #[arg(long, default_value_t = 64)]
    pub group_size: usize,
    /// Timed repetitions of each matmul (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
}

pub fn run(args: BenchQuantArgs) -> Result<()> {
    let device = select(args.device)?;
    let spec = AffineSpec::new(args.bits, args.group_size)?;
    let dtype = if device.supports_dtype(DType::F16) { DType::F16 } else { DType::F32 };
    let (h, i) = (args.hidden, args.intermediate);
    println!("device: {device:?}, dense dtype {dtype:?}, affine {} bits group {}", spec.bits, spec.group_size);

    // Llama block projections: q, k, v (GQA with hidden/4), o, gate, up, down; [out, in].
    let kv = h / 4;
    let shapes = [[h, h], [kv, h], [kv, h], [h, h], [i, h], [i, h], [h, i]];
    let params: usize = shapes.iter().map(|[o, n]| o * n).sum::<usize>() * args.layers;

    let bar = ProgressBar::new((shapes.len() * args.layers) as u64);
    bar.set_style(ProgressStyle::with_template("Quantizing {bar:30} {pos}/{len}").expect("valid template"));
    let base = memory(&device)?;
    let mut packed = Vec::new();
    for _ in 0..args.layers {
        for [o, n] in shapes {
            let w = random_normal(o * n, &format!("weight {}", packed.len()), 0.02);
            let q = affine::quantize(&w, n, spec)?;
            packed.push(QuantWeight::from_affine(&q, o, n, spec, &device, dtype));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    device.sync().context("device sync")?;
    let quant_bytes = memory(&device)?.saturating_sub(base);
    let quant_held: u64 = packed.iter().map(held_bytes).sum();
    let probe = packed.pop().context("no weights")?;
    drop(packed);
    device.memory_cleanup();

    let base = memory(&device)?;
    let mut dense = Vec::new();
    for _ in 0..args.layers {
        for [o, n] in shapes {
            dense.push(Tensor::<2>::random([o, n], Distribution::Normal(0.0, 0.02), (&device, dtype)));
        }
    }
    device.sync().context("device sync")?;
    let dense_bytes = memory(&device)?.saturating_sub(base);
    let dense_held: u64 = dense.iter().map(|t| (t.shape().num_elements() * t.dtype().size()) as u64).sum();
    drop(dense);
    device.memory_cleanup();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "memory held by the tensors, {} blocks ({:.0} M weights): {}-bit {:.3} GiB, f16 {:.3} GiB, ratio {:.3}",
        args.layers,
        params as f64 / 1e6,
        spec.bits,
        gib(quant_held),
        gib(dense_held),
        quant_held as f64 / dense_held.max(1) as f64
    );
    let source = if lora_model::device::is_cpu(&device) { "process resident memory" } else { "device memory pool" };
    println!(
        "memory measured ({source}): {}-bit {:.3} GiB, f16 {:.3} GiB, ratio {:.3}",
        spec.bits,
        gib(quant_bytes),
        gib(dense_bytes),
        quant_bytes as f64 / dense_bytes.max(1) as f64
    );

    // Throughput on the largest projection, [intermediate, hidden] (gate/up).
    let [o, n] = [i, h];
    let w = random_normal(o * n, "gate", 0.02);
    let q = QuantWeight::from_affine(&affine::quantize(&w, n, spec)?, o, n, spec, &device, dtype);
    let nf4 = QuantWeight::from_nf4(&lora_quant::nf4::quantize(&w, n, false)?, o, n, &device, dtype);
    let wd = Tensor::<2>::from_data(burn::tensor::TensorData::new(w, [o, n]), (&device, DType::F32)).cast(float_dtype(dtype));
    drop(probe);
    for &rows in &args.rows {
        let x = Tensor::<2>::random([rows, n], Distribution::Normal(0.0, 1.0), (&device, dtype));
        let t_dense = time(&device, args.iters, || x.clone().matmul(wd.clone().transpose()))?;
        let t_quant = time(&device, args.iters, || q.matmul_t(x.clone()))?;
        let t_nf4 = time(&device, args.iters, || nf4.matmul_t(x.clone()))?;
        let tflops = |t: f64| 2.0 * rows as f64 * o as f64 * n as f64 / t / 1e12;
        println!(
            "matmul [{rows}x{n}]·[{n}x{o}]: {dtype:?} {:.3} ms ({:.1} TFLOP/s); {}-bit affine {:.3} ms ({:.1} TFLOP/s), {:.2}x dense; nf4 {:.3} ms ({:.1} TFLOP/s), {:.2}x dense",
            t_dense * 1e3,
            tflops(t_dense),
            spec.bits,
            t_quant * 1e3,
            tflops(t_quant),
            t_dense / t_quant,
            t_nf4 * 1e3,
            tflops(t_nf4),
            t_dense / t_nf4
        );
    }
    Ok(())
}

/// Bytes of the tensors a packed weight holds.
fn held_bytes(w: &QuantWeight) -> u64 {
    let bytes = |shape: burn::tensor::Shape, dtype: DType| (shape.num_elements() * dtype.size()) as u64;
    match w {
        QuantWeight::Affine(a) => {
            bytes(a.packed.shape(), a.packed.dtype()) + bytes(a.scales.shape(), a.scales.dtype()) + bytes(a.biases.shape(), a.biases.dtype())
        }
        QuantWeight::Nf4(n) => {
            bytes(n.packed.shape(), n.packed.dtype())
                + bytes(n.absmax.shape(), n.absmax.dtype())
                + n.absmax_f32.as_ref().map_or(0, |t| bytes(t.shape(), t.dtype()))
                + n.dq_scales.as_ref().map_or(0, |t| bytes(t.shape(), t.dtype()))
        }
    }
}

/// Bytes in use: the device pool's, or the process's resident memory for the CPU backend.
fn memory(device: &Device) -> Result<u64> {
    if lora_model::device::is_cpu(device) {
        let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .context("no VmRSS in /proc/self/status")?;
        return Ok(kb * 1024);
    }
    Ok(device.memory_pool_usage().map_or(0, |u| u.bytes_in_use))
}
