//! `lora bench generate`: the real decoding loop ([`lora_model::generate`]) at batch 1 on a
//! random model of a named shape.
//!
//! Greedy decoding of `--max-tokens` tokens after a random prompt of `--prompt-tokens`, with
//! no end-of-sequence token so every run decodes the same count; `--warmup` runs first (where
//! kernels are compiled and tuned), then `--runs` timed ones. Printed: prompt tokens/s (the
//! prefill and the first token), decode tokens/s (medians of the timed runs) and peak device
//! memory. `bench/peer_peft.py generate` is the transformers side.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use lora_model::{Sampler, SamplingConfig};
use serde_json::json;

use super::{RandomModelArgs, median, random_tokens, write_json};
use crate::device::PeakMemory;

/// Flags of `lora bench generate`.
#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    /// Tokens in the (random) prompt.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens decoded per run.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: BenchGenerateArgs) -> Result<()> {
    if args.prompt_tokens == 0 || args.max_tokens == 0 || args.runs == 0 {
        bail!("--prompt-tokens, --max-tokens and --runs must be at least 1");
    }
    let bench = args.model.resolve()?;
    let (g, device, dtype) = (&bench.geometry, &bench.device, bench.dtype);
    let name = &args.model.shape.geometry;
    eprintln!(
        "bench generate: {name} ({:.2} B parameters), prompt {} tokens, {} new, {dtype:?}{}, device {device:?}",
        g.parameters() as f64 / 1e9,
        args.prompt_tokens,
        args.max_tokens,
        args.model.base_words(),
    );
    let (model, load_s) = bench.build(device)?;
    let prompt = random_tokens(args.prompt_tokens, g.vocab, &mut 0x9E37_79B9_7F4A_7C15u64);
    let mut peak = PeakMemory::new(device);
    let (mut prompt_rates, mut decode_rates, mut first_run_s) = (Vec::new(), Vec::new(), 0.0);
    let mut output = Vec::new();
    for run in 0..args.warmup + args.runs {
        let mut sampler = Sampler::new(SamplingConfig::default());
        let mut ids = Vec::with_capacity(args.max_tokens);
        let start = Instant::now();
        let stats = lora_model::generate(&model, &prompt, args.max_tokens, &[], &mut sampler, |id| {
            ids.push(id);
            peak.sample();
        });
        if run == 0 {
            first_run_s = start.elapsed().as_secs_f64();
        }
        if stats.non_finite {
            bail!("the random model's logits are not finite in {dtype:?}");
        }
        if run >= args.warmup {
            prompt_rates.push(stats.prompt_tokens as f64 / stats.prompt_time.as_secs_f64());
            // The first generated token comes with the prompt's pass; the rest are decode steps.
            let steps = stats.generated_tokens.saturating_sub(1);
            decode_rates.push(steps as f64 / stats.generation_time.as_secs_f64());
        }
        output = ids;
    }
    let (prompt_rate, decode_rate) = (median(&mut prompt_rates), median(&mut decode_rates));
    let peak_gib = peak.peak()? as f64 / (1u64 << 30) as f64;
    println!(
        "lora generate {name} {dtype:?}{}: prompt {} tokens at {prompt_rate:.1} tokens/s, decode {:.1} tokens/s ({:.2} ms/token), first run {first_run_s:.2} s after {load_s:.1} s of building, peak {peak_gib:.2} GiB",
        args.model.quant.quantize.map_or(String::new(), |q| format!(" {q:?}")),
        args.prompt_tokens,
        decode_rate,
        1e3 / decode_rate,
    );
    if let Some(path) = &args.json {
        let value = json!({
            "side": "lora",
            "geometry": name,
            "parameters": g.parameters(),
            "dtype": format!("{dtype:?}"),
            "quantize": args.model.quant.quantize.map(|q| format!("{q:?}")),
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "prompt_tokens_per_s": prompt_rate,
            "decode_tokens_per_s": decode_rate,
            "decode_runs": decode_rates,
            "first_run_s": first_run_s,
            "load_s": load_s,
            "peak_gib": peak_gib,
            "output_head": output.iter().take(16).collect::<Vec<_>>(),
            "device": format!("{device:?}"),
        });
        write_json(path, &value)?;
    }
    Ok(())
}
