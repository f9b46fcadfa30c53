//! `lora train`: LoRA/DoRA on the last blocks of a dense or 4-bit base, with checkpoints,
//! exact resume, metrics and a loss plot in the adapter directory.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lora_adapters::io::{replace_dir, write_atomic};
use lora_adapters::{AdapterSpec, adapter_weights, add_adapters, format, set_adapters, trainable_count};
use lora_data::{Splits, Tokenizer, count_too_long, count_without_targets, load_dir, padding_fraction};
use lora_model::{CausalLm, Checkpoint, ModelConfig};
use lora_trainer::checkpoint::{self, STATE_FILE};
use lora_trainer::run::Quiet;
use lora_trainer::{Best, Observer, Optimizer, Outcome, Report, State, TrainError};
use serde_json::json;

use crate::device::{PeakMemory, compute_dtype, select};
use crate::load::load_model;
use crate::plot;
use crate::train_config::{SAVED_CONFIG, TrainConfig, TrainFlags, resolve};

/// Flags of `lora train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A TOML experiment file; flags override its keys.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the interrupted run whose adapter directory is DIR, exactly where its last
    /// checkpoint left it. Its saved config is the starting point; flags override it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub flags: TrainFlags,
    /// Write into an --adapter-path that already holds files (they may be replaced); inputs
    /// (the model, the data, --resume-adapter-file) are still never written over.
    #[arg(long)]
    pub force: bool,
}

/// Set by Ctrl-C: the loop saves a checkpoint and stops.
static STOP: AtomicBool = AtomicBool::new(false);

/// The metrics file's name in the adapter directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The directory in the adapter directory that `--keep-best` keeps the best adapter in.
pub const BEST_DIR: &str = "best";

pub fn run(args: TrainArgs) -> Result<()> {
    let mut config = resolve(args.config.as_deref(), args.resume.as_deref(), &args.flags)?;
    let resuming = args.resume.is_some();
    let model_dir = config.model.clone();
    let out = config.adapter_path.clone();
    let training = config.training();
    if training {
        check_adapter_path(&config, resuming, args.force)?;
        // Before the lock, which creates its file there: a refused directory is left as it is.
        if resuming {
            check_resumable(&out)?;
        }
    }

    let model_config = ModelConfig::from_dir(&model_dir)?;
    if let Some(limit) = model_config.max_positions
        && config.max_seq_length > limit
    {
        eprintln!(
            "[WARNING] --max-seq-length {} is beyond the model's max_position_embeddings {limit}; sequences are truncated to {limit} tokens.",
            config.max_seq_length
        );
        config.max_seq_length = limit;
    }
    let tokenizer = Tokenizer::from_dir(&model_dir)?.for_model(model_config.vocab_size)?;
    let data = load_data(&config, &tokenizer)?;
    let device = select(config.device)?;
    let dtype = compute_dtype(&device, config.dtype, model_config.checkpoint_dtype.as_deref())?;
    let train_device = device.clone().autodiff();
    let checkpoint = Checkpoint::open(&model_dir)?;
    let options = config.quant_args().load_options(&model_config)?;
    let mut model = load_model(&model_config, &checkpoint, if training { &train_device } else { &device }, dtype, options)?.no_grad();
    drop(checkpoint);

    if !training {
        return test_only(&config, &mut model, &data);
    }
    let spec = attach(&config, &mut model)?;
    let trainable = trainable_count(&model);
    let total = model.num_weights() + trainable;
    eprintln!("Trainable parameters: {:.3}% ({:.3}M/{:.3}M)", 100.0 * trainable as f64 / total as f64, trainable as f64 / 1e6, total as f64 / 1e6);

    let train = data.train.as_ref().map(|l| l.examples.as_slice()).with_context(|| format!("data {}: no train.jsonl", config.data.display()))?;
    let valid = data.valid.as_ref().map(|l| l.examples.as_slice());
    if valid.is_none_or(<[_]>::is_empty) {
        for (on, flag) in [(config.keep_best, "--keep-best"), (config.early_stop_patience.is_some(), "--early-stop-patience")] {
            if on {
                bail!("{flag} needs validation data: {} has no valid.jsonl rows", config.data.display());
            }
        }
    }
    let batcher = config.batcher(train)?;
    let iters = config.iterations(&batcher);
    let epochs = iters as f64 / batcher.batches_per_epoch() as f64;
    if config.objective().is_preference() {
        eprintln!(
            "Training {} on {} pairs: {} batches of {} pairs per epoch; {iters} iterations ({epochs:.2} epochs)",
            config.objective.name(),
            train.len() / 2,
            batcher.batches_per_epoch(),
            config.batch_size
        );
    } else {
        let padding = padding_fraction(train, &batcher, config.max_seq_length);
        eprintln!(
            "Training on {} examples: {} batches of {} per epoch, {:.1}% padding; {iters} iterations ({epochs:.2} epochs)",
            train.len(),
            batcher.batches_per_epoch(),
            config.batch_size,
            100.0 * padding
        );
    }
    let settings = config.settings(iters);

    let _lock = lock_adapter_path(&out)?;
    // Again under the lock: a run that started and finished meanwhile is not written over.
    check_adapter_path(&config, resuming, args.force)?;
    let mut state = if resuming {
        check_resumable(&out)?;
        let state = checkpoint::restore(&mut model, &out.join(STATE_FILE))?;
        if state.optimizer.config != config.optimizer_config() {
            eprintln!("Note: the optimizer settings differ from the resumed run's; continuing with the new ones.");
        }
        let mut state = state;
        state.optimizer.config = config.optimizer_config();
        if state.progress.iteration >= iters {
            bail!(
                "--resume {}: the run is at iteration {}, so --iters {iters} leaves nothing to do; give a larger --iters to train on",
                out.display(),
                state.progress.iteration
            );
        }
        eprintln!("Resuming {} at iteration {}", out.display(), state.progress.iteration);
        state
    } else {
        State::new(Optimizer::new(config.optimizer_config()))
    };
    write_atomic(&out.join(SAVED_CONFIG), config.to_toml().as_bytes())?;

    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    let mut observer = Files::open(&config, spec, &model_dir, &out, &device, iters, state.progress.iteration)?;
    let outcome = lora_trainer::train(&mut model, train, &batcher, valid, &settings, &mut state, &mut observer);
    observer.bar.finish_and_clear();
    match outcome {
        Err(TrainError::NonFinite { iteration, loss }) => {
            let last = observer.last_checkpoint.map_or("none was saved".to_string(), |i| format!("iteration {i}, in {}", out.display()));
            bail!(
                "the training loss is {loss} at iteration {iteration}; stopped. The last good checkpoint: {last}. Try a lower --learning-rate or --max-grad-norm."
            );
        }
        Err(e) => return Err(e.into()),
        Ok(Outcome::Stopped(i)) => {
            eprintln!("Interrupted at iteration {i}; checkpoint saved. Continue with: lora train --resume {}", out.display());
            std::process::exit(130);
        }
        Ok(Outcome::EarlyStopped { iteration, best }) => {
            let (patience, delta) = (config.early_stop_patience.unwrap_or(0), config.early_stop_min_delta);
            eprintln!(
                "Stopped early at iteration {iteration}: {patience} evaluations without the validation loss falling by more than {delta} (best {:.4} at iteration {}); checkpoint saved to {}. Continue with: lora train --resume {}",
                best.val_loss,
                best.iteration,
                out.display(),
                out.display()
            );
        }
        Ok(Outcome::Finished) => eprintln!("Saved final adapter to {}", out.display()),
    }
    if config.test {
        report_test(&config, &model, &data)?;
    }
    Ok(())
}

/// The lock file's name in the adapter directory, held for the whole run.
pub const LOCK_FILE: &str = ".lora-train.lock";

/// Refuses an adapter directory for a training run that would lose something: a path that
/// is, holds or lies inside the model or the data; one that holds the adapter to start from;
/// a file; a directory that holds anything, unless it is the run being resumed or `force` is
/// given (an earlier run of ours is pointed to `--resume`). Writes nothing.
fn check_adapter_path(config: &TrainConfig, resuming: bool, force: bool) -> Result<()> {
    let out = &config.adapter_path;
    for (flag, input) in [("--model", &config.model), ("--data", &config.data)] {
        if crate::save_path::overlaps(out, &[input]) {
            bail!("--adapter-path {} is, holds or lies inside {flag} {}; nothing is ever written into an input", out.display(), input.display());
        }
    }
    if let Some(start) = &config.resume_adapter_file
        && !resuming
        && crate::save_path::overlaps(start, &[out])
    {
        bail!(
            "--resume-adapter-file {} lies inside --adapter-path {}, which this run writes; copy it elsewhere or choose another --adapter-path",
            start.display(),
            out.display()
        );
    }
    if out.exists() && !out.is_dir() {
        bail!("--adapter-path {} is not a directory", out.display());
    }
    if !resuming && out.is_dir() {
        let held: Vec<String> = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK_FILE)
            .collect();
        if !held.is_empty() && !force {
            if out.join(STATE_FILE).exists() {
                bail!(
                    "--adapter-path {}: holds the checkpoints of an earlier run; continue it with --resume {0}, choose another --adapter-path, or pass --force to start over it (nothing there is overwritten otherwise)",
                    out.display()
                );
            }
            let mut shown = held.clone();
            shown.sort();
            shown.truncate(3);
            bail!(
                "--adapter-path {} is not empty (it holds {}{}); choose another, or pass --force to write into it (nothing there is overwritten otherwise)",
                out.display(),
                shown.join(", "),
                if held.len() > 3 { ", ..." } else { "" }
            );
        }
    }
    Ok(())
}

/// The error of a run refused because another holds the lock on `out`.
fn another_run(out: &Path) -> anyhow::Error {
    anyhow::anyhow!("--adapter-path {}: another lora train run is writing there (it holds {LOCK_FILE}); wait for it or choose another", out.display())
}

/// Refuses `--resume` of a directory without a checkpoint: the run stopped before its first
/// save. Writes nothing.
fn check_resumable(out: &Path) -> Result<()> {
    if !out.join(STATE_FILE).is_file() {
        // A run that is still writing there has not saved yet: that is what to say. The lock
        // file is only opened, never made, so a refused directory stays as it was.
        if let Ok(lock) = File::options().write(true).open(out.join(LOCK_FILE))
            && matches!(lock.try_lock(), Err(std::fs::TryLockError::WouldBlock))
        {
            return Err(another_run(out));
        }
        bail!(
            "--resume {}: no checkpoint there yet ({STATE_FILE} is missing): the run stopped before its first save (--save-every); start it again without --resume, with --force to write over what it left",
            out.display()
        );
    }
    Ok(())
}

/// Creates the adapter directory and takes an exclusive advisory lock on its [`LOCK_FILE`],
/// held until the returned file is dropped or the process dies: a second run on the same
/// directory is refused meanwhile.
fn lock_adapter_path(out: &Path) -> Result<File> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(LOCK_FILE);
    let lock = File::options().create(true).truncate(false).write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {
            remove_stale_temporaries(out);
            Ok(lock)
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(another_run(out)),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Removes the half-written `.NAME.tmp-PID` files a killed run left (atomic writes go through
/// them): under the directory's lock no other run of ours is writing one.
fn remove_stale_temporaries(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with('.')
            && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| {
                let pid = pid.strip_suffix(".png").unwrap_or(pid);
                !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
            });
        if stale && entry.path().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Tokenized splits, with the warnings mlx-lm prints.
fn load_data(config: &TrainConfig, tokenizer: &Tokenizer) -> Result<Splits> {
    let dir = &config.data;
    let mut splits = load_dir(dir, tokenizer, &config.read_options())?;
    for (name, split) in [("train", &splits.train), ("valid", &splits.valid), ("test", &splits.test)] {
        let Some(split) = split else { continue };
        if split.skipped > 0 {
            eprintln!("Skipped {} bad row(s) of {name}.jsonl", split.skipped);
        }
        let long = count_too_long(&split.examples, config.max_seq_length);
        if long > 0 {
            eprintln!("[WARNING] {long} sequence(s) of {name}.jsonl are longer than {} tokens and will be truncated.", config.max_seq_length);
        }
        let empty = count_without_targets(&split.examples, config.max_seq_length);
        if empty == split.examples.len() {
            bail!(
                "{}: every row's target is cut off by --max-seq-length {} (the prompt is at least that long); nothing would be trained or evaluated. Raise --max-seq-length{}",
                dir.join(format!("{name}.jsonl")).display(),
                config.max_seq_length,
                if config.mask_prompt { " or leave out --mask-prompt" } else { "" }
            );
        }
        if empty > 0 && !config.objective().is_preference() {
            eprintln!("[WARNING] {empty} row(s) of {name}.jsonl have no target left within --max-seq-length {}; they add nothing.", config.max_seq_length);
        }
    }
    if config.objective().is_preference() {
        drop_cut_pairs(config, &mut splits)?;
    }
    if config.pack {
        pack_train(config, &mut splits);
    }
    Ok(splits)
}

/// Preference rows one of whose completions `max_seq_length` cuts off entirely are left out,
/// with a warning: a completion without tokens has no log-probability to compare.
fn drop_cut_pairs(config: &TrainConfig, splits: &mut Splits) -> Result<()> {
    for (name, split) in [("train", &mut splits.train), ("valid", &mut splits.valid), ("test", &mut splits.test)] {
        let Some(split) = split else { continue };
        let before = split.examples.len() / 2;
        let kept: Vec<lora_data::Example> =
            split.examples.chunks(2).filter(|pair| pair.iter().all(|e| e.targets_within(config.max_seq_length) > 0)).flatten().cloned().collect();
        let dropped = before - kept.len() / 2;
        if kept.is_empty() {
            bail!(
                "{}: every pair has a completion cut off by --max-seq-length {}; nothing would be trained or evaluated. Raise --max-seq-length",
                config.data.join(format!("{name}.jsonl")).display(),
                config.max_seq_length
            );
        }
        if dropped > 0 {
            eprintln!("[WARNING] {dropped} pair(s) of {name}.jsonl have a completion cut off by --max-seq-length {} and are left out.", config.max_seq_length);
        }
        split.examples = kept;
    }
    Ok(())
}

/// `--pack`: the training rows packed into sequences of `max_seq_length` tokens, with a line
/// saying into how many, and the batches' padding before and after. (Evaluation packs the rows
/// of the batches it would evaluate, so that its loss is the unpacked one.)
fn pack_train(config: &TrainConfig, splits: &mut Splits) {
    let Some(train) = &mut splits.train else { return };
    let padding = |examples: &[lora_data::Example]| {
        let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
        lora_data::Batcher::new(&lengths, config.batch_size, config.shuffle, config.seed)
            .ok()
            .map_or_else(|| "-".to_string(), |b| format!("{:.1}%", 100.0 * padding_fraction(examples, &b, config.max_seq_length)))
    };
    let packed = lora_data::pack(&train.examples, config.max_seq_length);
    eprintln!(
        "Packed the {} rows of train.jsonl into {} sequences of at most {} tokens; batch padding {} unpacked, {} packed",
        train.examples.len(),
        packed.len(),
        config.max_seq_length,
        padding(&train.examples),
        padding(&packed)
    );
    // The batches are cut from the sequences sorted by length: those that do not fill the last
    // batch (the longest) are left out of every epoch, as rows are unpacked.
    let left_out = packed.len() % config.batch_size.max(1);
    if left_out > 0 && packed.len() > config.batch_size {
        let mut by_length: Vec<&lora_data::Example> = packed.iter().collect();
        by_length.sort_by_key(|e| e.tokens.len());
        let rows: usize = by_length[by_length.len() - left_out..].iter().map(|e| e.starts.len()).sum();
        eprintln!("[WARNING] {left_out} packed sequence(s) holding {rows} row(s) do not fill a batch of {} and are left out of every epoch", config.batch_size);
    }
    train.examples = packed;
}

/// Puts the adapters on the model: from `resume_adapter_file`, or freshly initialized.
fn attach(config: &TrainConfig, model: &mut CausalLm) -> Result<AdapterSpec> {
    let spec = config.adapter_spec();
    match &config.resume_adapter_file {
        Some(path) => {
            let file = format::load(path)?;
            set_adapters(model, &file.weights, spec.dropout, &file.path)?;
            eprintln!("Loaded the adapter {} ({:?} format, rank {})", file.path.display(), file.format, file.spec.rank);
            Ok(AdapterSpec { dropout: spec.dropout, ..file.spec })
        }
        None => {
            let blocks = model.model.layers.len();
            if spec.num_layers > blocks as i64 {
                eprintln!("[WARNING] --num-layers {} is more than the model's {blocks} blocks; all {blocks} are adapted.", spec.num_layers);
            }
            let n = add_adapters(model, &spec, config.seed)?;
            if n == 0 {
                bail!("lora_parameters.keys: no projection was adapted");
            }
            Ok(spec)
        }
    }
}

/// `--test` without training: the adapter in `adapter_path` if there is one, else the base.
fn test_only(config: &TrainConfig, model: &mut CausalLm, data: &Splits) -> Result<()> {
    let out = &config.adapter_path;
    let path = config.resume_adapter_file.clone().unwrap_or_else(|| out.clone());
    if path.join(format::CONFIG_FILE).is_file() || path.is_file() {
        let file = format::load(&path)?;
        set_adapters(model, &file.weights, 0.0, &file.path)?;
        eprintln!("Testing with the adapter {}", file.path.display());
    } else {
        eprintln!("No adapter in {}: testing the base model", path.display());
    }
    report_test(config, model, data)
}

fn report_test(config: &TrainConfig, model: &CausalLm, data: &Splits) -> Result<()> {
    let test = data.test.as_ref().with_context(|| format!("--test: no test.jsonl in {}", config.data.display()))?;
    let batches = usize::try_from(config.test_batches).ok();
    let objective = config.objective();
    let how = lora_trainer::Evaluation { batch_size: config.batch_size, batches, max_seq_length: config.max_seq_length, pack: config.pack, objective };
    let (loss, count) = lora_trainer::evaluate(model, &test.examples, &how, &mut Quiet)?;
    if objective.is_preference() {
        println!("Test loss {loss:.3} ({}).", config.objective.name());
        eprintln!("({count} pairs)");
    } else {
        println!("Test loss {loss:.3}, Test ppl {:.3}.", loss.exp());
        eprintln!("({count} target tokens)");
    }
    Ok(())
}

/// What the loop's events become: a progress bar, report lines, `metrics.jsonl`, `loss.png`
/// and checkpoints in the adapter directory.
struct Files {
    bar: ProgressBar,
    out: PathBuf,
    spec: AdapterSpec,
    format: lora_adapters::AdapterFormat,
    base_model: String,
    extra: serde_json::Map<String, serde_json::Value>,
    metrics: File,
    train_curve: Vec<(f64, f64)>,
    val_curve: Vec<(f64, f64)>,
    peak: PeakMemory,
    last_checkpoint: Option<usize>,
    eval_bar: Option<ProgressBar>,
    tokens: usize,
    started: std::time::Instant,
}

impl Files {
    fn open(config: &TrainConfig, spec: AdapterSpec, model: &Path, out: &Path, device: &burn::tensor::Device, iters: usize, done: usize) -> Result<Self> {
        // Metrics of iterations after the checkpoint resumed from are dropped: they are redone.
        let path = out.join(METRICS_FILE);
        let mut kept = String::new();
        let (mut train_curve, mut val_curve) = (Vec::new(), Vec::new());
        if done > 0 && path.is_file() {
            for line in std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                let step = v["step"].as_u64().unwrap_or(u64::MAX) as usize;
                let keep = if v.get("val_loss").is_some() { step < done } else { step <= done };
                if keep {
                    kept.push_str(line);
                    kept.push('\n');
                    if let Some(l) = v["train_loss"].as_f64() {
                        train_curve.push((step as f64, l));
                    }
                    if let Some(l) = v["val_loss"].as_f64() {
                        val_curve.push((step as f64, l));
                    }
                }
            }
        }
        write_atomic(&path, kept.as_bytes())?;
        let metrics = File::options().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        let bar = ProgressBar::new(iters as u64);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template"));
        bar.set_position(done as u64);
        bar.reset_eta();
        let extra = match serde_json::to_value(config).context("config as JSON")? {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serializes to an object"),
        };
        let last_checkpoint = (done > 0).then_some(done);
        Ok(Self {
            bar,
            out: out.to_path_buf(),
            spec,
            format: config.adapter_format,
            base_model: model.to_string_lossy().into_owned(),
            extra,
            metrics,
            train_curve,
            val_curve,
            peak: PeakMemory::new(device),
            last_checkpoint,
            eval_bar: None,
            tokens: 0,
            started: std::time::Instant::now(),
        })
    }

    fn log(&mut self, entry: serde_json::Value) {
        if let Err(e) = writeln!(self.metrics, "{entry}").and_then(|_| self.metrics.flush()) {
            say(&self.bar, format!("warning: writing {}: {e}", self.out.join(METRICS_FILE).display()));
        }
    }

    fn plot(&self) {
        if let Err(e) = plot::loss_curves(&self.out.join("loss.png"), &self.train_curve, &self.val_curve) {
            say(&self.bar, format!("warning: loss.png: {e:#}"));
        }
    }

    fn peak_gb(&self) -> f64 {
        self.peak.peak().unwrap_or(0) as f64 / 1e9
    }
}

impl Observer for Files {
    fn iteration(&mut self, iteration: usize, loss: f64, tokens: usize, lr: f64) {
        #[cfg(debug_assertions)]
        abort_for_tests(iteration);
        self.peak.sample();
        self.bar.set_position(iteration as u64);
        self.tokens += tokens;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.bar.per_sec();
        self.bar.set_message(format!("loss {loss:.3}, lr {lr:.2e}, {rate:.2} it/s, {:.0} tok/s", self.tokens as f64 / secs));
    }

    fn report(&mut self, r: &Report) {
        let peak = self.peak_gb();
        // The preference objectives' rewards, as TRL names them.
        let rewards: String = r.metrics.iter().filter(|(n, _)| n.starts_with("rewards/")).map(|(n, v)| format!(", {n} {v:.3}")).collect();
        say(
            &self.bar,
            format!(
                "Iter {}: Train loss {:.3}{rewards}, Learning Rate {:.3e}, It/sec {:.3}, Tokens/sec {:.3}, Trained Tokens {}, Peak mem {:.3} GB",
                r.iteration, r.train_loss, r.lr, r.iterations_per_s, r.tokens_per_s, r.trained_tokens, peak
            ),
        );
        let mut entry = json!({
            "step": r.iteration, "train_loss": r.train_loss, "lr": r.lr, "it_per_s": r.iterations_per_s,
            "tokens_per_s": r.tokens_per_s, "trained_tokens": r.trained_tokens, "peak_mem_gb": peak,
        });
        for (name, value) in &r.metrics {
            entry[name.as_str()] = json!(value);
        }
        self.log(entry);
        self.train_curve.push((r.iteration as f64, r.train_loss));
    }

    fn skipped(&mut self, iteration: usize, scale: f64) {
        say(&self.bar, format!("Iter {iteration}: f16 gradients overflowed; step skipped, loss scale now {scale}"));
        self.log(json!({ "step": iteration, "skipped_step": true, "loss_scale": scale }));
    }

    fn eval_start(&mut self, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(ProgressStyle::with_template("validating {bar:30} {pos}/{len}").expect("valid template"));
        self.eval_bar = Some(bar);
    }

    fn eval_batch(&mut self) {
        if let Some(b) = &self.eval_bar {
            b.inc(1);
        }
    }

    fn eval(&mut self, iteration: usize, val_loss: f64, seconds: f64) {
        if let Some(b) = self.eval_bar.take() {
            b.finish_and_clear();
        }
        self.peak.sample();
        let peak = self.peak_gb();
        say(&self.bar, format!("Iter {}: Val loss {val_loss:.3}, Val took {seconds:.3}s", iteration + 1));
        self.log(json!({ "step": iteration, "val_loss": val_loss, "val_time_s": seconds, "peak_mem_gb": peak }));
        self.val_curve.push((iteration as f64, val_loss));
        self.plot();
    }

    fn checkpoint(&mut self, model: &CausalLm, state: &State) -> Result<(), TrainError> {
        let it = state.progress.iteration;
        let weights = adapter_weights(model);
        let snapshot = self.out.join(format!("{it:07}_{}", self.format.weights_file()));
        write_atomic(&snapshot, &format::weights_bytes(&weights, self.format)?)?;
        format::save(&self.out, self.format, &self.spec, &weights, &self.base_model, Some(&self.extra))?;
        // Last: the resume file. Until it is renamed into place the previous one stands.
        write_atomic(&self.out.join(STATE_FILE), &checkpoint::to_bytes(model, state)?)?;
        self.last_checkpoint = Some(it);
        say(&self.bar, format!("Iter {it}: Saved adapter weights to {} and {}.", self.out.display(), snapshot.display()));
        self.plot();
        Ok(())
    }

    fn best(&mut self, model: &CausalLm, best: &Best) -> Result<(), TrainError> {
        // Written beside best/ and swapped in, so best/ is always one whole adapter.
        let (dir, new, old) = (self.out.join(BEST_DIR), self.out.join(".best.new"), self.out.join(".best.old"));
        let io = |what: &'static str, path: &Path, source: std::io::Error| TrainError::Io { what, path: path.to_path_buf(), source };
        for stale in [&new, &old] {
            if stale.exists() {
                std::fs::remove_dir_all(stale).map_err(|e| io("removing", stale, e))?;
            }
        }
        std::fs::create_dir(&new).map_err(|e| io("creating", &new, e))?;
        format::save(&new, self.format, &self.spec, &adapter_weights(model), &self.base_model, Some(&self.extra))?;
        let about = json!({"step": best.iteration, "val_loss": best.val_loss});
        write_atomic(&new.join("best.json"), format!("{about:#}\n").as_bytes())?;
        replace_dir(&new, &dir, &old)?;
        say(&self.bar, format!("Iter {}: Val loss {:.3} is the best so far; adapter kept in {}.", best.iteration, best.val_loss, dir.display()));
        self.log(json!({ "step": best.iteration, "best_val_loss": best.val_loss }));
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        STOP.load(Ordering::SeqCst)
    }
}

/// Prints a line above the progress bar (plainly when the bar is hidden, as in a pipe).
fn say(bar: &ProgressBar, line: String) {
    bar.suspend(|| eprintln!("{line}"));
}

/// For the resume tests: die as abruptly as `kill -9` would at iteration `LORA_TEST_ABORT_AT`.
/// Only in debug builds, which is what `cargo test` runs; a release build has no such hook.
#[cfg(debug_assertions)]
fn abort_for_tests(iteration: usize) {
    if std::env::var("LORA_TEST_ABORT_AT").ok().and_then(|v| v.parse::<usize>().ok()) == Some(iteration) {
        std::process::abort();
    }
}
