//! `lora bench matmul`: the model's matrix products at given shapes, timed on one device.
//!
//! For each `MxKxN` (x `[M, K]`, a projection weight `W` `[N, K]`, as the model stores it):
//! the forward product `x·Wᵀ` and the input gradient `dy·W` (`dy` `[M, N]`), through burn's
//! matmul and through the model's own frozen-weight products (`lora_kernels`: on a device with
//! workgroup-scope cooperative matrices, the tensor-core kernel, once per `--tiles` choice,
//! checked against burn's result), and for 4-bit affine and NF4 weights as the model
//! multiplies them (`QuantWeight::matmul_t`; the input gradient dequantizes as the packed
//! backward does).
//! `bench/peer_peft.py matmul` times torch's products at the same shapes.

use anyhow::Result;
use burn::tensor::{DType, Distribution, Tensor};
use clap::Args;
use lora_kernels::matmul::Cm2Config;
use lora_quant::QuantWeight;
use lora_quant::affine::{self, AffineSpec};
use serde_json::json;

use super::{median, report_tuned, time, time_samples, write_json};
use crate::device::{DTypeArg, DeviceArg, compute_dtype, select};

/// Flags of `lora bench matmul`.
#[derive(Debug, Args)]
pub struct BenchMatmulArgs {
    /// Shapes `MxKxN`, comma-separated [default: Llama-3.1-8B's MLP and attention projections at
    /// 2048 and 512 rows].
    #[arg(long, value_delimiter = ',', default_value = "2048x4096x14336,512x4096x14336,2048x14336x4096,512x14336x4096,2048x4096x4096,2048x4096x1024")]
    pub shapes: Vec<String>,
    /// Also the 4-bit bases (affine group 64, NF4).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub quantized: bool,
    /// Configurations of the tensor-core kernel to time, comma-separated: the output tile
    /// `BMxBNxBK`, then `+e` for the exact-shape kernel (sizes compiled in, loads unclamped) on
    /// sizes that are multiples of the tile (the model's default), `+eU` to unroll its K loop `U`
    /// steps, `+p` to load each K step before multiplying the last, `@W` for `W` invocations per
    /// workgroup; `gG` after `+e` or `+eU` walks the output tiles in strips `G` tiles tall.
    /// `auto` is autotune's choice among the kernel's candidates, as the model runs it.
    #[arg(long, value_delimiter = ',', default_value = "auto,128x256x32+e")]
    pub tiles: Vec<String>,
    /// Timed repetitions of each product (after a first call and half a second of warm-up, so
    /// that the GPU's clocks have risen).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Dense dtype [default: bf16 where the device has it, else f16].
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: BenchMatmulArgs) -> Result<()> {
    let device = select(args.device)?;
    let dtype = compute_dtype(&device, args.dtype, Some("bfloat16"))?;
    let fd = lora_kernels::tensor::float_dtype(dtype);
    let mut rows = Vec::new();
    for spec in &args.shapes {
        let dims: Vec<usize> = spec.split('x').map(str::parse).collect::<Result<_, _>>().map_err(|_| anyhow::anyhow!("--shapes {spec}: expected MxKxN"))?;
        let [m, k, n] = dims[..] else { anyhow::bail!("--shapes {spec}: expected MxKxN") };
        let tf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e12;
        let random = |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), (&device, DType::F32)).cast(fd);
        let (x, dy) = (random([m, k]), random([m, n]));
        let w = random([n, k]) * 0.02;
        let fwd = time(&device, args.iters, || x.clone().matmul(w.clone().transpose()))?;
        let bwd = time(&device, args.iters, || dy.clone().matmul(w.clone()))?;
        let mut row =
            json!({"m": m, "k": k, "n": n, "burn_forward_s": fwd, "burn_forward_tflops": tf(fwd), "burn_input_grad_s": bwd, "burn_input_grad_tflops": tf(bwd)});
        let mut line = format!("[{m}x{k}]·[{k}x{n}] {dtype:?}: burn x·Wᵀ {:.1}, dy·W {:.1} TFLOP/s", tf(fwd), tf(bwd));
        // The check runs on fresh operands of a shape no timed product had, one that is not a
        // multiple of any tile (so a kernel that wrote nothing, or wrote past the edges, is
        // caught), against f32 products.
        let (cm, ck, cn) = (m + 40, k + 8, n + 24);
        let (cx, cdy, cw) = (random([cm, ck]), random([cm, cn]), random([cn, ck]) * 0.02);
        let f32_of = |t: &Tensor<2>| t.clone().cast(burn::tensor::FloatDType::F32);
        let reference = (f32_of(&cx).matmul(f32_of(&cw).transpose()), f32_of(&cdy).matmul(f32_of(&cw)));
        let burn_err =
            rel_err(cx.clone().matmul(cw.clone().transpose()), reference.0.clone()).max(rel_err(cdy.clone().matmul(cw.clone()), reference.1.clone()));
        row["burn_rel_err"] = json!(burn_err);
        line += &format!(" (rel. err. {burn_err:.1e})");
        for t in &args.tiles {
            // `auto`: autotune's choice among the kernel's candidates, as the model runs it.
            let config = if t == "auto" {
                None
            } else {
                Some(Cm2Config::parse(t).ok_or_else(|| {
                    anyhow::anyhow!("--tiles {t}: expected auto, or BMxBNxBK, optionally +e, +eU (either then optionally gG), or +p, then optionally @W")
                })?)
            };
            lora_kernels::matmul::set_config(config);
            let mut fs = time_samples(&device, args.iters, || lora_kernels::frozen_linear(x.clone(), w.clone()))?;
            let mut bs = time_samples(&device, args.iters, || lora_kernels::matmul_frozen(dy.clone(), w.clone()))?;
            let (f, b) = (median(&mut fs), median(&mut bs));
            let mut ef = rel_err(lora_kernels::frozen_linear(cx.clone(), cw.clone()), reference.0.clone());
            let mut eb = rel_err(lora_kernels::matmul_frozen(cdy.clone(), cw.clone()), reference.1.clone());
            if config.is_none_or(|c| c.exact) {
                // The exact-shape kernel runs only on sizes that are multiples of its tile: checked
                // on the timed operands, against f32 products of them.
                ef = ef.max(rel_err(lora_kernels::frozen_linear(x.clone(), w.clone()), f32_of(&x).matmul(f32_of(&w).transpose())));
                eb = eb.max(rel_err(lora_kernels::matmul_frozen(dy.clone(), w.clone()), f32_of(&dy).matmul(f32_of(&w))));
            }
            row[format!("ours_{t}_forward_tflops")] = json!(tf(f));
            row[format!("ours_{t}_input_grad_tflops")] = json!(tf(b));
            row[format!("ours_{t}_forward_best_tflops")] = json!(tf(fs[0]));
            row[format!("ours_{t}_input_grad_best_tflops")] = json!(tf(bs[0]));
            row[format!("ours_{t}_rel_err")] = json!(ef.max(eb));
            // Median, then the range over the repetitions (slowest to fastest).
            line += &format!(
                "; ours {t} x·Wᵀ {:.1} ({:.1}–{:.1}), dy·W {:.1} ({:.1}–{:.1}) TFLOP/s (rel. err. {:.1e})",
                tf(f),
                tf(fs[fs.len() - 1]),
                tf(fs[0]),
                tf(b),
                tf(bs[bs.len() - 1]),
                tf(bs[0]),
                ef.max(eb)
            );
        }
        lora_kernels::matmul::set_config(None);
        if args.quantized {
            let host: Vec<f32> =
                w.clone().cast(burn::tensor::FloatDType::F32).into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let spec64 = AffineSpec::new(4, 64)?;
            let aff = QuantWeight::from_affine(&affine::quantize(&host, k, spec64)?, n, k, spec64, &device, dtype);
            let nf4 = QuantWeight::from_nf4(&lora_quant::nf4::quantize(&host, k, false)?, n, k, &device, dtype);
            drop(host);
            for (name, q) in [("affine4", &aff), ("nf4", &nf4)] {
                let f = time(&device, args.iters, || q.matmul_t(x.clone()))?;
                let b = time(&device, args.iters, || dy.clone().matmul(q.dequantize()))?;
                row[format!("{name}_forward_s")] = json!(f);
                row[format!("{name}_forward_tflops")] = json!(tf(f));
                row[format!("{name}_input_grad_s")] = json!(b);
                row[format!("{name}_input_grad_tflops")] = json!(tf(b));
                line += &format!("; {name} x·Wᵀ {:.1}, dy·W {:.1} TFLOP/s", tf(f), tf(b));
            }
        }
        println!("{line}");
        rows.push(row);
    }
    println!(
        "tensor-core kernel (workgroup-scope cooperative matrices): {}",
        if lora_kernels::matmul::used() { "used" } else { "not available here: burn's matmul" }
    );
    let tuned = report_tuned();
    if let Some(path) = &args.json {
        write_json(path, &json!({"side": "lora", "dtype": format!("{dtype:?}"), "device": format!("{device:?}"), "rows": rows, "tuned": tuned}))?;
    }
    Ok(())
}

/// ‖a − b‖ / ‖b‖, in f32.
fn rel_err(a: Tensor<2>, b: Tensor<2>) -> f64 {
    let a = a.cast(burn::tensor::FloatDType::F32);
    let b = b.cast(burn::tensor::FloatDType::F32);
    let diff = (a - b.clone()).square().sum().into_scalar::<f64>().sqrt();
    diff / b.square().sum().into_scalar::<f64>().sqrt().max(1e-30)
}
