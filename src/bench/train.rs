//! `lora bench train`: the real trainer on a random model of a named shape.
//!
//! The model is built in Rust from [`lora_model::Geometry`] with random weights (no download, no Python),
//! adapters are attached as `lora train` attaches them, and `lora_trainer::train` runs
//! `--warmup` + `--steps` iterations on random token rows of `--seq` targets each. Printed:
//! tokens/s (median of the timed steps), time to the first step, peak device memory and the
//! effective TFLOP/s (matrix-product FLOPs of the frozen base and attention; the formula is
//! [`lora_model::Geometry::train_flops_per_token`], also used by `bench/peer_peft.py`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora_adapters::{AdapterSpec, FineTuneType, Init, Scale, add_adapters, trainable_count};
use lora_data::Example;
use lora_model::CausalLm;
use lora_trainer::{Objective, Observer, Optimizer, OptimizerConfig, OptimizerKind, Schedule, ScheduleKind, Settings, State, TrainError};
use serde_json::json;

use super::{RandomModelArgs, median, random_tokens, report_tuned, write_json};
use crate::device::PeakMemory;

/// Flags of `lora bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: RandomModelArgs,
    /// Rows per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Trained targets per row (each row is seq + 1 tokens).
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Untimed steps first (tuning and compilation happen in these).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// PEFT's lora_alpha (scale alpha/rank).
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Projections to adapt, comma-separated (q_proj, ..., down_proj); all seven by default.
    #[arg(long, value_delimiter = ',')]
    pub keys: Option<Vec<String>>,
    /// Adapt the last N blocks; -1 for all.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub num_layers: i64,
    /// Recompute each block in backward instead of keeping its activations.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Rows of random lengths from MIN to MAX tokens (a fixed draw), batched by length as
    /// `lora train` batches them, instead of rows of exactly --seq targets; tokens/s then
    /// counts trained (not padding) tokens. Unpacked, one untimed step per padded length the
    /// rows can take comes first (`shape warm-up` in the report), so that the timed steps meet
    /// no shape for the first time: what a long run sees once every length has been tuned.
    #[arg(long, value_name = "MIN-MAX")]
    pub row_lengths: Option<String>,
    /// Pack the rows into sequences of --seq + 1 tokens (`lora train --pack`).
    #[arg(long)]
    pub pack: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: BenchTrainArgs) -> Result<()> {
    if args.batch_size == 0 || args.seq == 0 || args.steps == 0 {
        bail!("--batch-size, --seq and --steps must be at least 1");
    }
    let bench = args.model.resolve()?;
    let (g, device, dtype) = (&bench.geometry, &bench.device, bench.dtype);
    let name = &args.model.shape.geometry;
    eprintln!(
        "bench train: {name} ({:.2} B parameters), {}x{} targets, {dtype:?}{}{}, LoRA r{} alpha {} on {}, device {device:?}",
        g.parameters() as f64 / 1e9,
        args.batch_size,
        args.seq,
        args.model.base_words(),
        if args.grad_checkpoint { ", grad checkpoint" } else { "" },
        args.rank,
        args.alpha,
        args.keys.as_ref().map_or("all projections".to_string(), |k| k.join(","))
    );

    let started = Instant::now();
    let (model, _) = bench.build(&device.clone().autodiff())?;
    let mut model = model.no_grad();
    let spec = AdapterSpec {
        fine_tune_type: FineTuneType::Lora,
        num_layers: args.num_layers,
        keys: args.keys.clone(),
        rank: args.rank,
        scale: Scale::Alpha { alpha: args.alpha, rslora: false },
        dropout: 0.0,
        init: Init::Kaiming,
    };
    if add_adapters(&mut model, &spec, 0)? == 0 {
        bail!("--keys: no projection was adapted");
    }
    device.sync().context("device sync")?;
    let load_s = started.elapsed().as_secs_f64();
    let trainable = trainable_count(&model);

    let iters = args.warmup + args.steps;
    let examples = match &args.row_lengths {
        None => random_rows(iters * args.batch_size, args.seq + 1, g.vocab),
        // Enough rows for every step even packed, the same draw either way.
        Some(range) => varied_rows(range, iters * args.batch_size * (args.seq + 1), g.vocab)?,
    };
    let examples = if args.pack { lora_data::pack(&examples, args.seq + 1) } else { examples };
    if examples.len() < iters * args.batch_size {
        bail!("{} rows for {iters} steps of {}: raise the rows' lengths or lower --steps", examples.len(), args.batch_size);
    }
    let settings = Settings {
        iters,
        batch_size: args.batch_size,
        grad_accumulation_steps: 1,
        max_seq_length: args.seq + 1,
        steps_per_report: usize::MAX,
        steps_per_eval: usize::MAX,
        val_batches: None,
        save_every: 0,
        seed: 0,
        max_grad_norm: None,
        recompute: args.grad_checkpoint,
        schedule: Schedule { kind: ScheduleKind::Constant, lr: 1e-4, warmup: 0, total: iters, min_lr: 0.0 },
        keep_best: false,
        early_stop: None,
        pack: args.pack,
        objective: Objective::Sft,
    };
    // Rows of one length (the default) in file order; rows of varied lengths bucketed.
    let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
    let batcher = lora_data::Batcher::new(&lengths, args.batch_size, args.row_lengths.is_some(), 0)?;
    let optimizer = OptimizerConfig { kind: OptimizerKind::Adamw, weight_decay: 0.01, ..Default::default() };
    let shape_warmup = match (&args.row_lengths, args.pack) {
        (Some(range), false) => Some(warm_every_length(&mut model, range, &args, &settings, optimizer, g.vocab, device)?),
        _ => None,
    };
    let mut state = State::new(Optimizer::new(optimizer));
    let mut timer = StepTimer::new(device, iters);
    lora_trainer::train(&mut model, &examples, &batcher, None, &settings, &mut state, &mut timer)?;
    timer.bar.finish_and_clear();

    let skip = args.warmup.min(timer.steps.len());
    let mut timed: Vec<f64> = timer.steps[skip..].to_vec();
    let (min, max) = (timed.iter().copied().fold(f64::INFINITY, f64::min), timed.iter().copied().fold(0.0, f64::max));
    let total_s: f64 = timed.iter().sum();
    let step = median(&mut timed);
    // Rows of one length: every step trains batch × seq targets. Varied rows: the steps differ,
    // so the trained targets over the timed steps' total time.
    let (tokens, tokens_per_s) = match args.row_lengths {
        None => (args.batch_size * args.seq, (args.batch_size * args.seq) as f64 / step),
        Some(_) => {
            let trained: usize = timer.tokens[skip..].iter().sum();
            (trained / timer.tokens.len().saturating_sub(skip).max(1), trained as f64 / total_s)
        }
    };
    let tflops = g.train_flops_per_token(args.seq) * tokens as f64 / step / 1e12;
    let peak = timer.peak.peak()? as f64 / (1u64 << 30) as f64;
    let first_step = timer.steps.first().copied().unwrap_or(0.0);
    if let Some((steps, seconds)) = shape_warmup {
        println!("shape warm-up: {steps} steps, one per padded length of rows {}, {seconds:.1} s", args.row_lengths.as_deref().unwrap_or_default());
    }
    println!(
        "lora {name} {}x{} {dtype:?}{}{}{}: {tokens_per_s:.0} tokens/s (step {:.1} ms, min {:.1}, max {:.1}), first step {first_step:.2} s after {load_s:.1} s of building, peak {peak:.2} GiB, {tflops:.1} TFLOP/s",
        args.batch_size,
        args.seq,
        args.model.quant.quantize.map_or(String::new(), |q| format!(" {q:?}")),
        if args.grad_checkpoint { " grad-checkpoint" } else { "" },
        args.row_lengths.as_ref().map_or(String::new(), |r| format!(" rows {r}{}", if args.pack { " packed" } else { "" })),
        step * 1e3,
        min * 1e3,
        max * 1e3,
    );
    let tuned = report_tuned();
    if let Some(path) = &args.json {
        let value = json!({
            "side": "lora",
            "geometry": name,
            "parameters": g.parameters(),
            "trainable": trainable,
            "dtype": format!("{dtype:?}"),
            "quantize": args.model.quant.quantize.map(|q| format!("{q:?}")),
            "double_quant": args.model.quant.double_quant,
            "batch_size": args.batch_size,
            "seq": args.seq,
            "grad_checkpoint": args.grad_checkpoint,
            "row_lengths": args.row_lengths,
            "pack": args.pack,
            "trained_tokens_per_step": tokens,
            "rank": args.rank,
            "tokens_per_s": tokens_per_s,
            "step_s_median": step,
            "step_s_min": min,
            "step_s_max": max,
            "load_s": load_s,
            "first_step_s": first_step,
            "shape_warmup_steps": shape_warmup.map(|w| w.0),
            "shape_warmup_s": shape_warmup.map(|w| w.1),
            "peak_gib": peak,
            "tflops": tflops,
            "losses": timer.losses,
            "steps_s": timer.steps,
            "steps_trained_tokens": timer.tokens,
            "device": format!("{device:?}"),
            "tuned": tuned,
        });
        write_json(path, &value)?;
    }
    Ok(())
}

/// One untimed step on `batch_size` rows of each length `MIN, MIN + m, MIN + 2m, ..., MAX` of
/// the range (`m` = [`lora_trainer::loss::GPU_POSITION_MULTIPLE`]): every padded length the
/// range's batches can take, so its kernels are compiled and tuned before the timed steps.
/// Returns the steps and their seconds.
fn warm_every_length(
    model: &mut CausalLm,
    range: &str,
    args: &BenchTrainArgs,
    settings: &Settings,
    optimizer: OptimizerConfig,
    vocab: usize,
    device: &burn::tensor::Device,
) -> Result<(usize, f64)> {
    let (lo, hi) = parse_range(range)?;
    let step = lora_trainer::loss::GPU_POSITION_MULTIPLE;
    let mut lengths: Vec<usize> = (lo..=hi).step_by(step).collect();
    if lengths.last() != Some(&hi) {
        lengths.push(hi);
    }
    // Rows in this order, batch_size at a time: each batch holds one length.
    let row_lengths: Vec<usize> = lengths.iter().flat_map(|&len| std::iter::repeat_n(len, args.batch_size)).collect();
    let mut seed = 0x5851_F42D_4C95_7F2Du64;
    let rows: Vec<Example> = row_lengths.iter().map(|&len| Example::new(random_tokens(len, vocab, &mut seed))).collect();
    let batcher = lora_data::Batcher::new(&row_lengths, args.batch_size, false, 0)?;
    let iters = lengths.len();
    let warm = Settings { iters, schedule: Schedule { total: iters, ..settings.schedule }, ..settings.clone() };
    let mut state = State::new(Optimizer::new(optimizer));
    let mut timer = StepTimer::new(device, iters);
    timer.bar.set_prefix("shape warm-up");
    lora_trainer::train(model, &rows, &batcher, None, &warm, &mut state, &mut timer)?;
    timer.bar.finish_and_clear();
    Ok((iters, timer.steps.iter().sum()))
}

/// `n` rows of `len` random token ids below `vocab`, every position a target.
fn random_rows(n: usize, len: usize, vocab: usize) -> Vec<Example> {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    (0..n).map(|_| Example::new(random_tokens(len, vocab, &mut seed))).collect()
}

/// Rows of random token ids below `vocab` and random lengths in `range` ("MIN-MAX"), a fixed
/// draw, until they hold `total` tokens.
fn varied_rows(range: &str, total: usize, vocab: usize) -> Result<Vec<Example>> {
    let (lo, hi) = parse_range(range)?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let (mut rows, mut held) = (Vec::new(), 0);
    while held < total {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = lo + (seed % (hi - lo + 1) as u64) as usize;
        rows.push(Example::new(random_tokens(len, vocab, &mut seed)));
        held += len;
    }
    Ok(rows)
}

/// `--row-lengths`' "MIN-MAX".
fn parse_range(range: &str) -> Result<(usize, usize)> {
    let parsed = range.split_once('-').and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)));
    let Some((lo, hi)) = parsed.filter(|&(lo, hi)| lo >= 2 && lo <= hi && hi <= 1 << 20) else {
        bail!("--row-lengths {range:?}: expected MIN-MAX with 2 <= MIN <= MAX <= 1048576, as 50-300");
    };
    Ok((lo, hi))
}

/// Times each iteration (the device synchronized at its end) and samples the memory.
struct StepTimer {
    device: burn::tensor::Device,
    last: Instant,
    steps: Vec<f64>,
    tokens: Vec<usize>,
    losses: Vec<f64>,
    peak: PeakMemory,
    bar: ProgressBar,
}

impl StepTimer {
    fn new(device: &burn::tensor::Device, iters: usize) -> Self {
        let bar = ProgressBar::new(iters as u64);
        bar.set_style(ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg}").expect("valid template"));
        bar.set_prefix("Training");
        Self { device: device.clone(), last: Instant::now(), steps: Vec::new(), tokens: Vec::new(), losses: Vec::new(), peak: PeakMemory::new(device), bar }
    }
}

impl Observer for StepTimer {
    fn iteration(&mut self, _iteration: usize, loss: f64, tokens: usize, _lr: f64) {
        let _ = self.device.sync();
        let now = Instant::now();
        self.steps.push((now - self.last).as_secs_f64());
        self.tokens.push(tokens);
        self.losses.push(loss);
        self.peak.sample();
        self.bar.set_message(format!("{:.0} ms", (now - self.last).as_secs_f64() * 1e3));
        self.bar.inc(1);
        self.last = Instant::now();
    }

    fn checkpoint(&mut self, _model: &CausalLm, _state: &State) -> Result<(), TrainError> {
        Ok(())
    }
}
