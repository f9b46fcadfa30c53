//! `lora generate`: text generation, streamed to stdout.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use lora_data::{StreamDecoder, Tokenizer};
use lora_model::{Checkpoint, ModelConfig, Sampler, SamplingConfig};
use serde_json::json;

use crate::device::{DTypeArg, DeviceArg, PeakMemory, compute_dtype, select};
use crate::load::{apply_adapters, load_model};
use crate::quantize::QuantArgs;

/// Flags of `lora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory: a Hugging Face checkpoint (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The prompt. With a chat template it becomes the user message.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// Maximum number of tokens to generate.
    #[arg(long, short = 'm', default_value_t = 100, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temp: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 disables).
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 disables).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Penalty for tokens already in the prompt or the output (1 disables).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repetition_penalty: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// System message put before the prompt in the chat template.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Use the raw prompt, tokenized with the tokenizer's special tokens (its BOS), instead of the chat template.
    #[arg(long)]
    pub ignore_chat_template: bool,
    /// Backend: auto (GPU through wgpu, else CPU), cpu, wgpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto, value_name = "D")]
    pub device: DeviceArg,
    /// Compute dtype; default f32 on the CPU, bf16 or f16 on a GPU.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// An adapter to apply, unmerged: a PEFT or mlx-lm adapter directory (or its weights
    /// file). Repeat it to apply several at once.
    #[arg(long, value_name = "DIR")]
    pub adapter_path: Vec<PathBuf>,
    /// A weight per --adapter-path, comma-separated [default: 1 each].
    #[arg(long, value_name = "W,..", value_delimiter = ',')]
    pub adapter_scales: Vec<f64>,
    #[command(flatten)]
    pub quant: QuantArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.temp.is_finite() || args.temp < 0.0 {
        bail!("--temp must be a finite number >= 0 (got {})", args.temp);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", args.top_p);
    }
    if args.repetition_penalty.is_nan() || args.repetition_penalty <= 0.0 {
        bail!("--repetition-penalty must be > 0 (got {})", args.repetition_penalty);
    }
    let dir = &args.model;
    if !dir.is_dir() {
        bail!("--model {}: not a directory", dir.display());
    }
    let config = ModelConfig::from_dir(dir)?;
    let checkpoint = Checkpoint::open(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?.for_model(config.vocab_size)?;
    let prompt = match tokenizer.chat_template() {
        Some(_) if !args.ignore_chat_template => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(json!({"role": "system", "content": system}));
            }
            messages.push(json!({"role": "user", "content": args.prompt}));
            tokenizer.encode_chat(&json!(messages), None, true)?
        }
        _ => tokenizer.encode(&args.prompt, true)?,
    };
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let mut max_tokens = args.max_tokens;
    if let Some(limit) = config.max_positions {
        if prompt.len() >= limit {
            bail!(
                "the prompt is {} tokens; {} takes at most {limit} (config.json max_position_embeddings), answer included: shorten it",
                prompt.len(),
                dir.display()
            );
        }
        if prompt.len() + max_tokens > limit {
            max_tokens = limit - prompt.len();
            eprintln!(
                "[WARNING] the prompt ({} tokens) and --max-tokens {} exceed max_position_embeddings {limit}; generating at most {max_tokens}",
                prompt.len(),
                args.max_tokens
            );
        }
    }

    let device = select(args.device)?;
    let dtype = compute_dtype(&device, args.dtype, config.checkpoint_dtype.as_deref())?;

    let options = args.quant.load_options(&config)?;
    let mut model = load_model(&config, &checkpoint, &device, dtype, options)?;
    drop(checkpoint);
    apply_adapters(&mut model, &args.adapter_path, &args.adapter_scales)?;

    let mut sampler = Sampler::new(SamplingConfig {
        temperature: args.temp,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    });
    let mut peak = PeakMemory::new(&device);
    let mut stream = StreamDecoder::new(&tokenizer);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error: Option<anyhow::Error> = None;
    let stats = lora_model::generate(&model, &prompt, max_tokens, tokenizer.eos_ids(), &mut sampler, |id| {
        peak.sample();
        if write_error.is_some() {
            return;
        }
        let piece = stream.push(id).map_err(anyhow::Error::from);
        let written = piece.and_then(|p| {
            out.write_all(p.as_bytes())?;
            out.flush()?;
            Ok(())
        });
        if let Err(e) = written {
            write_error = Some(e);
        }
    });
    if let Some(e) = write_error {
        return Err(e.context("writing the completion"));
    }
    if stats.non_finite {
        bail!(
            "the model's logits are not finite after {} generated token(s): the weights of {} hold NaN or infinity, or the {dtype:?} compute overflowed (try --dtype f32)",
            stats.generated_tokens,
            dir.display()
        );
    }
    out.write_all(stream.finish()?.as_bytes())?;
    if out.is_terminal() {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    peak.sample();

    // A rate over nothing (--max-tokens 0 runs no step) is not printed as one.
    let rate = |n: usize, d: std::time::Duration| {
        if n == 0 || d.is_zero() { "-".to_string() } else { format!("{:.3}", n as f64 / d.as_secs_f64()) }
    };
    eprintln!("Prompt: {} tokens, {} tokens-per-sec", stats.prompt_tokens, rate(stats.prompt_tokens, stats.prompt_time));
    eprintln!("Generation: {} tokens, {} tokens-per-sec", stats.generated_tokens, rate(stats.generated_tokens, stats.generation_time));
    eprintln!("Peak memory: {:.3} GB", peak.peak()? as f64 / 1e9);
    Ok(())
}
