//! The training loop, top to bottom: learning rate -> batch -> forward -> loss -> backward ->
//! (accumulate) -> clip -> optimizer step -> report -> evaluate -> checkpoint.
//!
//! Everything a run depends on is a function of the settings and the iteration number:
//! the batch of iteration `i` comes from the seed and `i`, dropout is seeded from the seed
//! and `i`. A [`State`] (the optimizer, any gradients accumulated so far and the
//! [`Progress`]) plus the adapter weights is therefore all a resumed run needs to continue
//! exactly where an interrupted one stopped.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{DType, Tensor};
use lora_data::{Batch, Batcher, Example, collate, pair_lengths, pair_rows};
use lora_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::loss::{batch_loss, loss_and_gradients};
use crate::optim::{Optimizer, clip_global_norm};
use crate::params::{Trainable, for_each_trainable};
use crate::preference::{self, Objective};
use crate::scale::{LossScale, Verdict, all_finite, unscale};
use crate::schedule::Schedule;

/// What the loop needs to know (the binary builds it from the resolved config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Iterations (micro-batches) in all, mlx-lm's `iters`.
    pub iters: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step.
    pub grad_accumulation_steps: usize,
    /// Longer sequences are truncated to this many tokens.
    pub max_seq_length: usize,
    /// A report every this many iterations (and at the last).
    pub steps_per_report: usize,
    /// Validation every this many iterations (and at the first and the last).
    pub steps_per_eval: usize,
    /// Validation batches per evaluation; `None` for all.
    pub val_batches: Option<usize>,
    /// A checkpoint every this many iterations (0: only at the end).
    pub save_every: usize,
    /// The seed of the batch order and of dropout.
    pub seed: u64,
    /// Clip the gradients' global L2 norm to this.
    pub max_grad_norm: Option<f64>,
    /// The learning rate of each optimizer step.
    pub schedule: Schedule,
    /// Recompute each block's activations in backward instead of keeping them
    /// (`--grad-checkpoint`; see [`loss_and_gradients`]).
    pub recompute: bool,
    /// Hand the observer the adapter of every new lowest validation loss ([`Observer::best`]).
    pub keep_best: bool,
    /// Stop when the validation loss stops improving.
    pub early_stop: Option<EarlyStop>,
    /// The training rows are packed (`lora_data::pack`); validation packs the rows of its
    /// batches too ([`Evaluation::pack`]).
    pub pack: bool,
    /// What is optimized; for a preference objective the rows are pairs, chosen then
    /// rejected, and the batcher cuts batches of pairs ([`lora_data::pair_lengths`]).
    pub objective: Objective,
}

/// When to stop early, as transformers' `EarlyStoppingCallback` decides: an evaluation whose
/// loss is below the best so far by more than `min_delta` resets the count; any other adds
/// one; at `patience` the run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStop {
    /// Evaluations without improvement before the run stops (at least 1).
    pub patience: usize,
    /// How much lower than the best a loss must be to count as an improvement.
    pub min_delta: f64,
}

/// The lowest validation loss of a run so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// The iterations done when it was measured.
    pub iteration: usize,
    /// The loss.
    pub val_loss: f64,
}

/// Counters of the iterations since the last report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Sum of the iterations' losses.
    pub loss_sum: f64,
    /// Iterations.
    pub iterations: usize,
    /// Target tokens trained.
    pub tokens: usize,
    /// Seconds spent in training steps.
    pub seconds: f64,
    /// Sums of the preference objectives' metrics ([`crate::Scored::metrics`]), by name.
    #[serde(default)]
    pub metrics: Vec<(String, f64)>,
}

/// Where a run stands, besides the weights and the optimizer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Iterations done.
    pub iteration: usize,
    /// Target tokens trained over the whole run, as of the last report.
    pub trained_tokens: usize,
    /// The iterations since the last report.
    pub window: Window,
    /// The learning rate of the last optimizer step.
    pub lr: f64,
    /// The loss scale of f16 training ([`crate::scale`]); `None` in f32 and bf16. Absent from
    /// the resume files of earlier versions, which then start from the initial scale.
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
    /// The lowest validation loss so far (absent from older resume files).
    #[serde(default)]
    pub best: Option<Best>,
    /// Evaluations since the last one that improved on the best by more than the early stop's
    /// `min_delta`.
    #[serde(default)]
    pub evals_without_improvement: usize,
    /// The iterations done at the last evaluation counted into `best` and the count above, so
    /// that a resumed run repeating that evaluation does not count it twice.
    #[serde(default)]
    pub last_eval: Option<usize>,
}

/// The mutable state of a run besides the model.
#[derive(Debug, Clone)]
pub struct State {
    /// The optimizer and its moments.
    pub optimizer: Optimizer,
    /// Gradients summed over the micro-batches of an unfinished accumulation, flattened, in
    /// [`for_each_trainable`] order.
    pub accumulated: Option<Vec<Tensor<1>>>,
    /// Counters.
    pub progress: Progress,
}

impl State {
    /// The state of a run that has not started.
    pub fn new(optimizer: Optimizer) -> Self {
        Self { optimizer, accumulated: None, progress: Progress::default() }
    }
}

/// One `steps_per_report` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The iteration reported at.
    pub iteration: usize,
    /// Mean loss over the iterations since the last report.
    pub train_loss: f64,
    /// The learning rate of the last optimizer step.
    pub lr: f64,
    /// Iterations per second of training steps.
    pub iterations_per_s: f64,
    /// Target tokens per second of training steps.
    pub tokens_per_s: f64,
    /// Target tokens trained so far.
    pub trained_tokens: usize,
    /// The preference objectives' metrics ([`crate::Scored::metrics`]), averaged over the iterations
    /// since the last report; empty for SFT.
    pub metrics: Vec<(String, f64)>,
}

/// What the binary does with the loop's events: progress, reports, checkpoints, Ctrl-C.
pub trait Observer {
    /// After every iteration.
    fn iteration(&mut self, _iteration: usize, _loss: f64, _tokens: usize, _lr: f64) {}
    /// Every `steps_per_report` iterations.
    fn report(&mut self, _report: &Report) {}
    /// The optimizer step ending at `iteration` was skipped: its f16 gradients overflowed, and
    /// the loss scale was halved to `scale`.
    fn skipped(&mut self, _iteration: usize, _scale: f64) {}
    /// Before evaluating: how many batches.
    fn eval_start(&mut self, _batches: usize) {}
    /// After each evaluation batch.
    fn eval_batch(&mut self) {}
    /// After each evaluation, at `iteration` (the iterations done before it).
    fn eval(&mut self, _iteration: usize, _val_loss: f64, _seconds: f64) {}
    /// Saves a checkpoint of the model's adapters and `state`.
    fn checkpoint(&mut self, model: &CausalLm, state: &State) -> Result<(), TrainError>;
    /// With [`Settings::keep_best`]: the model's adapters have the lowest validation loss so
    /// far, `best`.
    fn best(&mut self, _model: &CausalLm, _best: &Best) -> Result<(), TrainError> {
        Ok(())
    }
    /// Whether the user asked to stop (Ctrl-C): the loop saves a checkpoint and returns.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// All iterations done.
    Finished,
    /// Stopped at the user's request after this many iterations, checkpoint saved.
    Stopped(usize),
    /// Stopped by [`Settings::early_stop`] after this many iterations, checkpoint saved.
    EarlyStopped {
        /// Iterations done.
        iteration: usize,
        /// The lowest validation loss.
        best: Best,
    },
}

/// Trains `model`'s adapters on `train`, in the batches `batcher` cuts from it (made from
/// `train`'s lengths and `settings.batch_size`), for `settings.iters` iterations from where
/// `state` stands, evaluating on `valid`.
pub fn train(
    model: &mut CausalLm,
    train: &[Example],
    batcher: &Batcher,
    valid: Option<&[Example]>,
    settings: &Settings,
    state: &mut State,
    observer: &mut dyn Observer,
) -> Result<Outcome, TrainError> {
    let s = settings;
    let device = model.device();
    let accumulation = s.grad_accumulation_steps.max(1);
    model.set_training(true);
    let half = model.dtype() == DType::F16;
    if half && state.progress.loss_scale.is_none() {
        state.progress.loss_scale = Some(LossScale::default());
    }
    for it in state.progress.iteration + 1..=s.iters {
        if let Some(valid) = valid
            && (it == 1 || it % s.steps_per_eval.max(1) == 0 || it == s.iters)
        {
            let start = Instant::now();
            model.set_training(false);
            let how = Evaluation { batch_size: s.batch_size, batches: s.val_batches, max_seq_length: s.max_seq_length, pack: s.pack, objective: s.objective };
            let (val_loss, _) = evaluate(model, valid, &how, observer)?;
            model.set_training(true);
            observer.eval(it - 1, val_loss, start.elapsed().as_secs_f64());
            if track_best(model, s, &mut state.progress, it - 1, val_loss, observer)? {
                let best = state.progress.best.expect("set by the first evaluation");
                // Saved even where a checkpoint of this iteration exists: this one holds the
                // evaluation's count, so a resumed run does not count it again.
                observer.checkpoint(model, state)?;
                model.set_training(false);
                return Ok(Outcome::EarlyStopped { iteration: it - 1, best });
            }
        }

        let start = Instant::now();
        // Dropout masks depend on the seed, the iteration and the adapter only.
        let step_seed = s.seed ^ (it as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        device.seed(step_seed);
        model.seed_dropout(step_seed);
        trace(&device, "before the step");
        let scale = state.progress.loss_scale.map_or(1.0, |l| l.scale);
        let indices = batcher.indices(it - 1);
        let (value, tokens, mut flat, metrics) = if s.objective.is_preference() {
            let batch = collate(train, &pair_rows(indices), s.max_seq_length);
            let (scored, flat) = preference::loss_and_gradients(model, &batch, s.objective, s.recompute, scale);
            (scored.loss, scored.tokens, flat, scored.metrics)
        } else {
            let (value, tokens, flat) = loss_and_gradients(model, &collate(train, indices, s.max_seq_length), s.recompute, scale);
            (value, tokens, flat, Vec::new())
        };
        trace(&device, "after backward");
        if !value.is_finite() {
            return Err(if half { TrainError::Overflow { iteration: it, loss: value } } else { TrainError::NonFinite { iteration: it, loss: value } });
        }
        if scale != 1.0 {
            unscale(&mut flat, scale);
        }
        let summed = match state.accumulated.take() {
            Some(acc) => acc.into_iter().zip(flat).map(|(a, g)| a + g).collect(),
            None => flat,
        };
        if it % accumulation == 0 {
            let mut g: Vec<Tensor<1>> = if accumulation > 1 { summed.into_iter().map(|g| g / accumulation as f64).collect() } else { summed };
            let verdict = match state.progress.loss_scale.as_mut() {
                Some(l) => l.update(all_finite(&g)),
                None => Verdict::Step,
            };
            match verdict {
                Verdict::Step => {
                    if let Some(max) = s.max_grad_norm {
                        clip_global_norm(&mut g, max);
                    }
                    let lr = s.schedule.lr(state.optimizer.steps);
                    apply_step(model, &mut state.optimizer, g, lr);
                    state.progress.lr = lr;
                }
                Verdict::Skip => observer.skipped(it, state.progress.loss_scale.map_or(1.0, |l| l.scale)),
                Verdict::GiveUp => return Err(TrainError::Overflow { iteration: it, loss: value }),
            }
        } else {
            state.accumulated = Some(summed);
        }
        trace(&device, "after update");
        let p = &mut state.progress;
        p.iteration = it;
        p.window.loss_sum += value;
        p.window.iterations += 1;
        p.window.tokens += tokens;
        p.window.seconds += start.elapsed().as_secs_f64();
        // A non-finite metric (a reward of an infinite log-ratio) is left out: the window goes
        // into the resume file as JSON, which has no infinities.
        for (name, value) in metrics.into_iter().filter(|(_, v)| v.is_finite()) {
            match p.window.metrics.iter_mut().find(|(n, _)| n == name) {
                Some((_, sum)) => *sum += value,
                None => p.window.metrics.push((name.to_string(), value)),
            }
        }
        observer.iteration(it, value, tokens, p.lr);

        if it % s.steps_per_report.max(1) == 0 || it == s.iters {
            let w = std::mem::take(&mut p.window);
            p.trained_tokens += w.tokens;
            let secs = w.seconds.max(1e-9);
            observer.report(&Report {
                iteration: it,
                train_loss: w.loss_sum / w.iterations.max(1) as f64,
                lr: p.lr,
                iterations_per_s: w.iterations as f64 / secs,
                tokens_per_s: w.tokens as f64 / secs,
                trained_tokens: p.trained_tokens,
                metrics: w.metrics.iter().map(|(n, v)| (n.clone(), v / w.iterations.max(1) as f64)).collect(),
            });
        }
        if it == s.iters || (s.save_every > 0 && it % s.save_every == 0) {
            observer.checkpoint(model, state)?;
        }
        if observer.stop_requested() && it < s.iters {
            if s.save_every == 0 || it % s.save_every != 0 {
                observer.checkpoint(model, state)?;
            }
            model.set_training(false);
            return Ok(Outcome::Stopped(it));
        }
    }
    model.set_training(false);
    Ok(Outcome::Finished)
}

/// Counts the evaluation of the model after `done` iterations (loss `val_loss`) into the best
/// loss and the early stop's count, handing a new best to the observer; true when the run
/// should stop early. An evaluation already counted (a resumed run repeats the one at its
/// checkpoint) changes nothing.
fn track_best(model: &CausalLm, s: &Settings, p: &mut Progress, done: usize, val_loss: f64, observer: &mut dyn Observer) -> Result<bool, TrainError> {
    if p.last_eval == Some(done) {
        return Ok(false);
    }
    p.last_eval = Some(done);
    let previous = p.best;
    if previous.is_none_or(|b| val_loss < b.val_loss) {
        let best = Best { iteration: done, val_loss };
        p.best = Some(best);
        if s.keep_best {
            observer.best(model, &best)?;
        }
    }
    let Some(stop) = s.early_stop else { return Ok(false) };
    if previous.is_none_or(|b| val_loss < b.val_loss - stop.min_delta) {
        p.evals_without_improvement = 0;
    } else {
        p.evals_without_improvement += 1;
    }
    Ok(p.evals_without_improvement >= stop.patience.max(1))
}

/// One optimizer step over every trainable tensor with the flattened gradients `grads`
/// ([`for_each_trainable`] order) at learning rate `lr`, and `lr` times the optimizer's
/// [`crate::OptimizerConfig::lora_plus_ratio`] for the tensors of LoRA+'s group.
pub fn apply_step(model: &mut CausalLm, optimizer: &mut Optimizer, grads: Vec<Tensor<1>>, lr: f64) {
    optimizer.begin_step();
    let plus = lr * optimizer.config.lora_plus_ratio;
    let mut grads = grads.into_iter().enumerate();
    for_each_trainable(model, |t| {
        let (i, g) = grads.next().expect("one gradient per trainable tensor");
        let lr = if t.in_lora_plus_group() { plus } else { lr };
        match t {
            Trainable::A(p) | Trainable::B(p) => {
                let [r, c] = p.val().dims();
                optimizer.update(i, p, g.reshape([r, c]), lr)
            }
            Trainable::Magnitude(p) => optimizer.update(i, p, g, lr),
        }
    });
}

/// How [`evaluate`] batches a split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Rows per batch.
    pub batch_size: usize,
    /// Batches evaluated; all when `None`.
    pub batches: Option<usize>,
    /// Rows are cut to this many tokens.
    pub max_seq_length: usize,
    /// Pack the rows those batches hold into sequences of `max_seq_length` tokens, evaluated
    /// `batch_size` sequences at a time: the same rows, so the same loss.
    pub pack: bool,
    /// What the loss is; for a preference objective the examples are pairs, evaluated
    /// `batch_size` pairs at a time.
    pub objective: Objective,
}

/// The token-averaged loss over the first `batches` batches of `examples`, sorted by length as
/// mlx-lm's evaluation does (the remainder that does not fill a batch left out):
/// `Σ NLL / Σ target tokens`, and the token count.
pub fn evaluate(model: &CausalLm, examples: &[Example], how: &Evaluation, observer: &mut dyn Observer) -> Result<(f64, usize), TrainError> {
    if how.objective.is_preference() {
        return evaluate_pairs(model, examples, how, observer);
    }
    let lengths: Vec<usize> = examples.iter().map(|e| e.tokens.len()).collect();
    let batcher = Batcher::by_length(&lengths, how.batch_size)?;
    let n = how.batches.map_or(batcher.batches_per_epoch(), |b| b.min(batcher.batches_per_epoch()));
    let batches: Vec<Batch> = if how.pack {
        let rows: Vec<Example> = (0..n).flat_map(|b| batcher.indices(b)).map(|&i| examples[i].clone()).collect();
        let packed = lora_data::pack(&rows, how.max_seq_length);
        let order: Vec<usize> = (0..packed.len()).collect();
        order.chunks(how.batch_size).map(|indices| collate(&packed, indices, how.max_seq_length)).collect()
    } else {
        (0..n).map(|b| collate(examples, batcher.indices(b), how.max_seq_length)).collect()
    };
    observer.eval_start(batches.len());
    // Parameters that do not ask for gradients: no graph is kept.
    let model = &model.clone().no_grad();
    let (mut sum, mut tokens) = (0f64, 0usize);
    for batch in &batches {
        let (loss, t) = batch_loss(model, batch);
        sum += loss.detach().into_scalar::<f64>() * t as f64;
        tokens += t;
        observer.eval_batch();
    }
    Ok((sum / tokens.max(1) as f64, tokens))
}

/// [`evaluate`] for a preference objective: the mean over the first `batches` batches of pairs
/// (sorted by length) of each batch's loss, as TRL averages its evaluation batches, and the
/// number of pairs.
fn evaluate_pairs(model: &CausalLm, examples: &[Example], how: &Evaluation, observer: &mut dyn Observer) -> Result<(f64, usize), TrainError> {
    let batcher = Batcher::by_length(&pair_lengths(examples), how.batch_size)?;
    let n = how.batches.map_or(batcher.batches_per_epoch(), |b| b.min(batcher.batches_per_epoch()));
    observer.eval_start(n);
    let model = &model.clone().no_grad();
    let mut sum = 0.0;
    for b in 0..n {
        let batch = collate(examples, &pair_rows(batcher.indices(b)), how.max_seq_length);
        sum += preference::batch_scores(model, &batch, how.objective).loss;
        observer.eval_batch();
    }
    Ok((sum / n.max(1) as f64, n * how.batch_size))
}

/// An observer that shows nothing and saves nothing (evaluation, tests).
pub struct Quiet;

impl Observer for Quiet {
    fn checkpoint(&mut self, _model: &CausalLm, _state: &State) -> Result<(), TrainError> {
        Ok(())
    }
}

/// With `LORA_MEM_TRACE` set: the device memory in use at `stage`, on stderr.
fn trace(device: &burn::tensor::Device, stage: &str) {
    if std::env::var_os("LORA_MEM_TRACE").is_some()
        && let Some(u) = device.memory_pool_usage()
    {
        eprintln!("memory {stage}: {:.3} GB in use, {:.3} GB reserved", u.bytes_in_use as f64 / 1e9, u.bytes_reserved as f64 / 1e9);
    }
}
