//! `lora bench attention`: the model's causal attention at a geometry's shape, forward and
//! forward with backward, timed on one device.
//!
//! Queries `[b, heads, seq, head_dim]`, keys and values `[b, kv_heads, seq, head_dim]` (as
//! the model's blocks hand them over), no padding, through [`lora_kernels::attention`]: on a
//! GPU the flash kernels where they apply (`LORA_FLASH` picks), else the chunked composition.
//! FLOP/s count the two products of the causal half of the scores (`4·b·h·s²·d/2` forward,
//! 2.5× that for forward and backward, as flash-attention's benchmarks count).
//! `bench/peer_peft.py attention` times torch's `scaled_dot_product_attention` at the same
//! shapes.

use anyhow::Result;
use burn::tensor::{DType, Distribution, Tensor};
use clap::Args;
use lora_kernels::attention::{Masking, attention};
use serde_json::json;

use super::{GeometryArgs, time, write_json};
use crate::device::{DTypeArg, DeviceArg, compute_dtype, select};

/// Flags of `lora bench attention`.
#[derive(Debug, Args)]
pub struct BenchAttentionArgs {
    #[command(flatten)]
    pub shape: GeometryArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Positions per row, comma-separated for several.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub seq: Vec<usize>,
    /// Timed repetitions (after a first call and half a second of warm-up).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Compute dtype [default: bf16 where the device has it, else f16; f32 on the CPU].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: BenchAttentionArgs) -> Result<()> {
    let g = args.shape.geometry()?;
    let device = select(args.device)?;
    let dtype = compute_dtype(&device, args.dtype, Some("bfloat16"))?;
    let fd = lora_kernels::tensor::float_dtype(dtype);
    let (b, h, kv, d) = (args.batch_size, g.heads, g.kv_heads, g.hidden / g.heads);
    let masking = Masking { window: None, chunk: 0 };
    anyhow::ensure!(b > 0 && args.seq.iter().all(|&s| s > 0), "--batch-size and --seq must be positive");
    let random = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), (&device, DType::F32)).cast(fd);
    let mut rows = Vec::new();
    for &s in &args.seq {
        let (q, k, v) = (random([b, h, s, d]), random([b, kv, s, d]), random([b, kv, s, d]));
        let keys = Tensor::<2>::ones([b, s], (&device, DType::F32));
        let forward = time(&device, args.iters, || attention(q.clone(), k.clone(), v.clone(), keys.clone(), masking))?;
        let tracked = |t: &Tensor<4>| t.clone().autodiff().require_grad();
        let (gq, gk, gv, gkeys) = (tracked(&q), tracked(&k), tracked(&v), keys.clone().autodiff());
        let both = time(&device, args.iters, || {
            let out = attention(gq.clone(), gk.clone(), gv.clone(), gkeys.clone(), masking);
            let grads = out.sum().backward();
            gq.grad(&grads).expect("q is tracked")
        })?;
        let flops = 4.0 * (b * h * s * s * d) as f64 / 2.0;
        let (tf, tb) = (flops / forward / 1e12, 2.5 * flops / both / 1e12);
        println!(
            "attention {b}x{h}/{kv}x{s}x{d} {dtype:?}: forward {:.3} ms ({tf:.1} TFLOP/s), forward and backward {:.3} ms ({tb:.1} TFLOP/s)",
            forward * 1e3,
            both * 1e3
        );
        rows.push(json!({"batch": b, "heads": h, "kv_heads": kv, "seq": s, "head_dim": d, "forward_s": forward, "forward_tflops": tf,
            "forward_backward_s": both, "forward_backward_tflops": tb}));
    }
    if let Some(path) = &args.json {
        write_json(path, &json!({"side": "lora", "dtype": format!("{dtype:?}"), "device": format!("{device:?}"), "rows": rows}))?;
    }
    Ok(())
}
