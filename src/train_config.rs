//! `lora train`'s settings: a TOML file (`--config`), overridden by flags, resolved with
//! mlx-lm's defaults and checked before any weight is loaded.
//!
//! Every flag has a TOML key of the same name in snake case; the adapter's shape lives in a
//! `[lora_parameters]` table and the schedule in `[lr_schedule]`, as in mlx-lm's YAML files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use lora_adapters::{AdapterFormat, AdapterSpec, FineTuneType, Init, Scale};
use lora_data::{Batcher, DataKeys, Example, ReadOptions};
use lora_trainer::{DpoLoss, EarlyStop, Objective, OptimizerConfig, OptimizerKind, Schedule, ScheduleKind, Settings};
use serde::{Deserialize, Serialize};

use crate::device::{DTypeArg, DeviceArg};
use crate::quantize::{QuantArgs, QuantMode};
use crate::settings::settings;

settings! {
    /// The adapter's shape and scale: mlx-lm's `lora_parameters`.
    pub struct LoraParameters, layer LoraFlags {
        /// LoRA rank `r` [lora_parameters.rank].
        rank: usize = 8 => [value_name = "R"],
        /// mlx-lm's raw scale on `B·A`; ignored when `alpha` is given [lora_parameters.scale].
        scale: f64 = 20.0 => [value_name = "S"],
        /// PEFT's `lora_alpha`: the scale becomes alpha/r (alpha/√r with `use_rslora`)
        /// [lora_parameters.alpha].
        alpha: Option<f64> => [value_name = "A"],
        /// rsLoRA's alpha/√r.
        use_rslora: bool = false,
        /// Dropout on the adapter's input while training, in [0, 1) [lora_parameters.dropout].
        dropout: f64 = 0.0 => [value_name = "P"],
        /// The projections to adapt, comma-separated (`self_attn.q_proj` or PEFT's `q_proj`)
        /// [lora_parameters.keys; default: every linear projection of attention and the MLP].
        keys: Option<Vec<String>> => [value_name = "K,..", value_delimiter = ','],
        /// `A`'s initialization: kaiming (PEFT's and mlx-lm's default) or gaussian.
        init: Init = Init::Kaiming,
    }
}

settings! {
    /// The learning-rate schedule: mlx-lm's `lr_schedule`.
    pub struct LrSchedule, layer ScheduleFlags {
        /// The schedule: constant, cosine or linear (mlx-lm's `cosine_decay` and
        /// `linear_schedule` are accepted too) [lr_schedule.name].
        name: ScheduleName = ScheduleName::Constant => [long = "lr-schedule", value_enum, value_name = "NAME"],
        /// Optimizer steps of linear warmup from 0 [lr_schedule.warmup].
        warmup: usize = 0 => [value_name = "N"],
        /// Where cosine and linear decay end [lr_schedule.min_lr].
        min_lr: f64 = 0.0 => [value_name = "LR"],
    }
}

/// `lr_schedule.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    /// The peak rate throughout.
    Constant,
    /// Cosine decay to `min_lr`.
    #[serde(alias = "cosine_decay")]
    Cosine,
    /// Linear decay to `min_lr`.
    #[serde(alias = "linear_schedule")]
    Linear,
}

/// `objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveName {
    /// Supervised fine-tuning.
    Sft,
    /// Direct preference optimization.
    Dpo,
    /// Odds-ratio preference optimization.
    Orpo,
}

impl ObjectiveName {
    /// The name, as flags and TOML files spell it.
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveName::Sft => "sft",
            ObjectiveName::Dpo => "dpo",
            ObjectiveName::Orpo => "orpo",
        }
    }
}

/// `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossName {
    /// `−log σ(β·margin)`.
    Sigmoid,
    /// Identity preference optimization.
    Ipo,
}

/// Training iterations when neither `iters` nor `epochs` is given (mlx-lm's).
pub const DEFAULT_ITERS: usize = 1000;

settings! {
    /// Every setting of a run, as saved beside the adapter. The defaults are mlx-lm's.
    pub struct TrainConfig, layer TrainFlags {
        /// The base model directory (Hugging Face or MLX quantized).
        model: PathBuf => [value_name = "DIR"],
        /// The dataset directory (train.jsonl, valid.jsonl, test.jsonl).
        data: PathBuf => [value_name = "DIR"],
        /// Train [default: true unless only --test is given].
        train: Option<bool> => switch,
        /// Report the test loss (and for sft perplexity) after training (or of the adapter alone).
        test: bool = false => switch,
        /// What to optimize: sft (the completions' likelihood), or on rows of a prompt with a
        /// chosen and a rejected completion, dpo (against the base with the adapter switched
        /// off) or orpo (no reference).
        objective: ObjectiveName = ObjectiveName::Sft => [value_enum, value_name = "NAME"],
        /// DPO's β (how far from the base the policy may move) or ORPO's λ (the weight of its
        /// odds-ratio term), as TRL's `beta`.
        beta: f64 = 0.1 => [value_name = "X"],
        /// DPO's loss: sigmoid (the original) or ipo.
        loss_type: DpoLossName = DpoLossName::Sigmoid => [value_enum, value_name = "NAME"],
        /// lora or dora.
        fine_tune_type: FineTuneType = FineTuneType::Lora => [value_name = "TYPE", value_parser = from_str::<FineTuneType>],
        /// adam, adamw or sgd.
        optimizer: OptimizerKind = OptimizerKind::Adam => [value_name = "NAME", value_parser = from_str::<OptimizerKind>],
        /// Weight decay [default: 0.01 for adamw (PyTorch's and MLX's), else 0].
        weight_decay: Option<f64> => [value_name = "X"],
        /// Adam's β₁, β₂.
        betas: [f64; 2] = [0.9, 0.999],
        /// Adam's ε.
        eps: f64 = 1e-8,
        /// SGD momentum.
        momentum: f64 = 0.0 => [value_name = "X"],
        /// LoRA+: the adapters' B matrices (and DoRA magnitudes) learn at R times the learning
        /// rate, as PEFT's create_loraplus_optimizer (1 is plain LoRA).
        lora_plus_ratio: f64 = 1.0 => [value_name = "R", allow_negative_numbers = true],
        /// Seed of the adapter init, the batch order and dropout.
        seed: u64 = 0 => [value_name = "N"],
        /// Blocks to adapt, counted back from the last; -1 for all.
        num_layers: i64 = 16 => [value_name = "N", allow_negative_numbers = true],
        /// Sequences per batch.
        batch_size: usize = 4 => [value_name = "N"],
        /// Training iterations [default: 1000, unless --epochs is given].
        iters: Option<usize> => [value_name = "N"],
        /// Train for this many passes over the data instead of --iters.
        epochs: Option<usize> => [value_name = "N"],
        /// Validation batches per evaluation; -1 for all.
        val_batches: i64 = 25 => [value_name = "N", allow_negative_numbers = true],
        /// Peak learning rate.
        learning_rate: f64 = 1e-5 => [value_name = "LR"],
        /// Iterations between report lines.
        steps_per_report: usize = 10 => [value_name = "N"],
        /// Iterations between validations.
        steps_per_eval: usize = 200 => [value_name = "N"],
        /// Start from this adapter: PEFT or mlx-lm, a weights file beside its
        /// adapter_config.json, or a directory.
        resume_adapter_file: Option<PathBuf> => [value_name = "PATH"],
        /// Where the adapter, checkpoints, metrics and plots go.
        adapter_path: PathBuf = PathBuf::from("adapters") => [value_name = "DIR"],
        /// peft or mlx.
        adapter_format: AdapterFormat = AdapterFormat::Peft => [value_name = "FORMAT", value_parser = from_str::<AdapterFormat>],
        /// Iterations between checkpoints.
        save_every: usize = 100 => [value_name = "N"],
        /// Keep the adapter of the lowest validation loss so far in best/ inside the adapter
        /// path, with its step and loss in best/best.json.
        keep_best: bool = false => switch,
        /// Stop after N evaluations in a row without improvement; the run stays resumable
        /// [default: never].
        early_stop_patience: Option<usize> => [value_name = "N"],
        /// A validation loss must be lower than the best by more than X to count as an
        /// improvement.
        early_stop_min_delta: f64 = 0.0 => [value_name = "X", allow_negative_numbers = true],
        /// Test batches; -1 for all.
        test_batches: i64 = 500 => [value_name = "N", allow_negative_numbers = true],
        /// Longer sequences are truncated to this many tokens.
        max_seq_length: usize = 2048 => [value_name = "N"],
        /// Recompute activations in backward instead of keeping them, to save memory.
        grad_checkpoint: bool = false => switch,
        /// Batches per optimizer step.
        grad_accumulation_steps: usize = 1 => [value_name = "N"],
        /// Clip the gradients' global norm to this [default: no clipping, as mlx-lm].
        max_grad_norm: Option<f64> => [value_name = "X"],
        /// Train only on completions and assistant turns.
        mask_prompt: bool = false => switch,
        /// Pack several rows into each sequence of --max-seq-length tokens (best-fit decreasing),
        /// each attending only to itself with its positions from 0: its loss is what it is
        /// unpacked, without the padding of batches of unequal rows.
        pack: bool = false => switch,
        /// Bucket batches by length and shuffle them (true), or keep file order (false).
        shuffle: bool = true => switch,
        /// Count and skip bad rows instead of stopping.
        skip_bad_rows: bool = false => switch,
        /// Key of text rows.
        text_feature: String = "text".into() => [value_name = "KEY"],
        /// Key of prompts.
        prompt_feature: String = "prompt".into() => [value_name = "KEY"],
        /// Key of completions.
        completion_feature: String = "completion".into() => [value_name = "KEY"],
        /// Key of message lists.
        chat_feature: String = "messages".into() => [value_name = "KEY"],
        /// auto, cpu, wgpu or cuda.
        device: DeviceArg = DeviceArg::Auto => [value_enum, value_name = "D"],
        /// Compute dtype: f32, f16 or bf16 (the adapter stays f32) [default: f32 on the CPU,
        /// the checkpoint's half type on a GPU].
        dtype: Option<DTypeArg> => [value_enum, value_name = "DTYPE"],
        /// Quantize the frozen base at load: affine or nf4.
        quantize: Option<QuantMode> => [value_enum, value_name = "MODE"],
        /// Affine bits.
        q_bits: usize = 4 => [value_name = "BITS"],
        /// Affine group size.
        q_group_size: usize = 64 => [value_name = "N"],
        /// NF4 double quantization.
        double_quant: bool = false => switch,
        /// Quantize embeddings and lm_head too [default: true for affine, false for nf4].
        q_embeddings: Option<bool> => [value_name = "BOOL"],
        /// The adapter.
        lora_parameters: nested LoraParameters(LoraFlags),
        /// The schedule.
        lr_schedule: nested LrSchedule(ScheduleFlags),
    }
}

/// Parses a flag's value as its TOML string would be read: `--optimizer adamw` as
/// `optimizer = "adamw"`, with serde's error naming the accepted values.
fn from_str<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s)).map_err(|e| e.to_string())
}

/// `lora train --help` made from the declarations: each flag that has a default shows it as
/// `[default: X]` after its first paragraph (the help says it itself where the default depends
/// on other settings), and each switch says how it is given.
pub fn with_defaults(command: clap::Command) -> clap::Command {
    fn flatten(table: &toml::Table, out: &mut std::collections::HashMap<String, String>) {
        for (k, v) in table {
            match v {
                toml::Value::Table(t) => flatten(t, out),
                toml::Value::String(s) => drop(out.insert(k.clone(), s.clone())),
                v => drop(out.insert(k.clone(), v.to_string())),
            }
        }
    }
    let mut defaults = std::collections::HashMap::new();
    flatten(&toml::Table::try_from(TrainFlags::defaults()).expect("the defaults serialize"), &mut defaults);
    command.mut_args(|arg| {
        let default = defaults.get(arg.get_id().as_str()).map(|v| format!(" [default: {v}]")).unwrap_or_default();
        let switch = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        if default.is_empty() && !switch {
            return arg;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let long = arg.get_long_help().map_or_else(|| help.clone(), |h| h.to_string());
        let (first, rest) = long.split_once("\n\n").map_or((long.as_str(), None), |(f, r)| (f, Some(r)));
        let mut long = format!("{first}{default}");
        if let Some(rest) = rest {
            long = format!("{long}\n\n{rest}");
        }
        if switch {
            let flag = arg.get_long().unwrap_or_default();
            long = format!("{long}\n\nGiven bare it means true; `--{flag} false` turns off what a config file turned on.");
        }
        arg.help(format!("{help}{default}")).long_help(long)
    })
}

/// Merges `over` into `base`, table by table.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Reads a config file as a layer, checking every key and value (errors name the key and
/// line).
fn read_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str::<TrainFlags>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(toml::from_str(&text).expect("parsed above"))
}

/// The defaults, then the config file (`file`) or a resumed run's saved config (`resume`,
/// with `file` over it), then the flags.
pub fn resolve(file: Option<&Path>, resume: Option<&Path>, flags: &TrainFlags) -> Result<TrainConfig> {
    let mut table = toml::Table::try_from(TrainFlags::defaults()).context("defaults")?;
    if let Some(dir) = resume {
        let saved = dir.join(SAVED_CONFIG);
        if !saved.is_file() {
            bail!("--resume {}: no {SAVED_CONFIG} there; is it the adapter path of a lora train run?", dir.display());
        }
        merge(&mut table, read_file(&saved)?);
    }
    let resumed_objective = table.get("objective").cloned();
    if let Some(file) = file {
        merge(&mut table, read_file(file)?);
    }
    if let Some(dir) = resume {
        table.insert("adapter_path".into(), toml::Value::String(dir.to_string_lossy().into_owned()));
    }
    // A length given on the command line replaces the file's, in either unit.
    if flags.epochs.is_some() && flags.iters.is_none() {
        table.remove("iters");
    }
    if flags.iters.is_some() && flags.epochs.is_none() {
        table.remove("epochs");
    }
    merge(&mut table, toml::Table::try_from(flags).context("flags")?);
    let config: TrainConfig = table.try_into().map_err(|e: toml::de::Error| {
        let message = e.message();
        match message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
            Some(key) => anyhow::anyhow!("{key}: is required (--{} or `{key} = ...` in the config file)", key.replace('_', "-")),
            None => anyhow::anyhow!("flags: {message}"),
        }
    })?;
    config.check()?;
    // The resume file holds the state of one objective's run (its metrics, its batches of
    // rows or of pairs): another objective starts a new run from the adapter instead.
    if let (Some(dir), Some(saved)) = (resume, resumed_objective.as_ref().and_then(|v| v.as_str()))
        && saved != config.objective.name()
    {
        bail!(
            "--objective {}: the run in {} trained with objective {saved}, and a resumed run keeps it; to go on with {} from its adapter, start a new run with --resume-adapter-file {}",
            config.objective.name(),
            dir.display(),
            config.objective.name(),
            dir.display()
        );
    }
    Ok(config)
}

/// The resolved config's file name in the adapter directory.
pub const SAVED_CONFIG: &str = "train_config.toml";

impl TrainConfig {
    /// Ranges, naming the key.
    fn check(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow::anyhow!("{key}: {msg}"));
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.grad_accumulation_steps == 0 {
            return bad("grad_accumulation_steps", "must be at least 1".into());
        }
        if self.max_seq_length < 2 {
            return bad("max_seq_length", format!("must be at least 2, got {}", self.max_seq_length));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad("learning_rate", format!("must be a finite number >= 0, got {}", self.learning_rate));
        }
        if self.iters.is_some() && self.epochs.is_some() {
            return bad("epochs", "give either iters or epochs, not both".into());
        }
        if self.iters == Some(0) || self.epochs == Some(0) {
            return bad(if self.iters == Some(0) { "iters" } else { "epochs" }, "must be at least 1".into());
        }
        for (key, v) in [("val_batches", self.val_batches), ("test_batches", self.test_batches)] {
            if v == 0 || v < -1 {
                return bad(key, format!("must be positive or -1 (all), got {v}"));
            }
        }
        if let Some(n) = self.max_grad_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad("max_grad_norm", format!("must be > 0, got {n}"));
        }
        if self.weight_decay.is_some_and(|w| !(w.is_finite() && w >= 0.0)) {
            return bad("weight_decay", "must be >= 0".into());
        }
        if self.early_stop_patience == Some(0) {
            return bad("early_stop_patience", "must be at least 1".into());
        }
        if !(self.early_stop_min_delta.is_finite() && self.early_stop_min_delta >= 0.0) {
            return bad("early_stop_min_delta", format!("must be >= 0, got {}", self.early_stop_min_delta));
        }
        if !(self.lora_plus_ratio.is_finite() && self.lora_plus_ratio > 0.0) {
            return bad("lora_plus_ratio", format!("must be > 0 (1 is plain LoRA; LoRA+ uses 2 to 16), got {}", self.lora_plus_ratio));
        }
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", format!("must be > 0, got {}", self.beta));
        }
        if self.objective().is_preference() && self.pack {
            return bad("pack", "packs single rows, not pairs: leave it out with --objective dpo or orpo".into());
        }
        if self.steps_per_report == 0 || self.steps_per_eval == 0 {
            return bad(if self.steps_per_report == 0 { "steps_per_report" } else { "steps_per_eval" }, "must be at least 1".into());
        }
        self.adapter_spec().validate().map_err(|e| anyhow::anyhow!("lora_parameters.{e}"))?;
        Ok(())
    }

    /// Whether this run trains.
    pub fn training(&self) -> bool {
        self.train.unwrap_or(!self.test)
    }

    /// The adapter these settings describe.
    pub fn adapter_spec(&self) -> AdapterSpec {
        let p = &self.lora_parameters;
        AdapterSpec {
            fine_tune_type: self.fine_tune_type,
            num_layers: self.num_layers,
            keys: p.keys.clone(),
            rank: p.rank,
            scale: match p.alpha {
                Some(alpha) => Scale::Alpha { alpha, rslora: p.use_rslora },
                None => Scale::Raw(p.scale),
            },
            dropout: p.dropout,
            init: p.init,
        }
    }

    /// The optimizer's hyperparameters.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        let default_decay = if self.optimizer == OptimizerKind::Adamw { 0.01 } else { 0.0 };
        OptimizerConfig {
            kind: self.optimizer,
            weight_decay: self.weight_decay.unwrap_or(default_decay),
            betas: (self.betas[0], self.betas[1]),
            eps: self.eps,
            momentum: self.momentum,
            lora_plus_ratio: self.lora_plus_ratio,
        }
    }

    /// The schedule's shape.
    pub fn schedule_kind(&self) -> ScheduleKind {
        match self.lr_schedule.name {
            ScheduleName::Constant => ScheduleKind::Constant,
            ScheduleName::Cosine => ScheduleKind::Cosine,
            ScheduleName::Linear => ScheduleKind::Linear,
        }
    }

    /// How the data's rows are read.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            keys: DataKeys {
                text: self.text_feature.clone(),
                prompt: self.prompt_feature.clone(),
                completion: self.completion_feature.clone(),
                messages: self.chat_feature.clone(),
                ..Default::default()
            },
            mask_prompt: self.mask_prompt,
            skip_bad_rows: self.skip_bad_rows,
            // Generous for the sequences kept: 64 bytes per token, and at least the default.
            max_row_bytes: self.max_seq_length.saturating_mul(64).max(lora_data::DEFAULT_MAX_ROW_BYTES),
            preference: self.objective().is_preference(),
        }
    }

    /// The objective with its parameters.
    pub fn objective(&self) -> Objective {
        match self.objective {
            ObjectiveName::Sft => Objective::Sft,
            ObjectiveName::Dpo => Objective::Dpo {
                beta: self.beta,
                loss: match self.loss_type {
                    DpoLossName::Sigmoid => DpoLoss::Sigmoid,
                    DpoLossName::Ipo => DpoLoss::Ipo,
                },
            },
            ObjectiveName::Orpo => Objective::Orpo { beta: self.beta },
        }
    }

    /// The training batches of `train`'s rows, or of its pairs for a preference objective.
    pub fn batcher(&self, train: &[Example]) -> Result<Batcher> {
        let lengths: Vec<usize> =
            if self.objective().is_preference() { lora_data::pair_lengths(train) } else { train.iter().map(|e| e.tokens.len()).collect() };
        Batcher::new(&lengths, self.batch_size, self.shuffle, self.seed).with_context(|| format!("{}", self.data.join("train.jsonl").display()))
    }

    /// The run's length in iterations: `epochs` passes of `batcher`, or `iters`.
    pub fn iterations(&self, batcher: &Batcher) -> usize {
        match self.epochs {
            Some(e) => e * batcher.batches_per_epoch(),
            None => self.iters.unwrap_or(DEFAULT_ITERS),
        }
    }

    /// The trainer's settings for a run of `iters` iterations.
    pub fn settings(&self, iters: usize) -> Settings {
        Settings {
            iters,
            batch_size: self.batch_size,
            grad_accumulation_steps: self.grad_accumulation_steps,
            max_seq_length: self.max_seq_length,
            steps_per_report: self.steps_per_report,
            steps_per_eval: self.steps_per_eval,
            val_batches: usize::try_from(self.val_batches).ok(),
            save_every: self.save_every,
            seed: self.seed,
            max_grad_norm: self.max_grad_norm,
            recompute: self.grad_checkpoint,
            keep_best: self.keep_best,
            early_stop: self.early_stop_patience.map(|patience| EarlyStop { patience, min_delta: self.early_stop_min_delta }),
            pack: self.pack,
            objective: self.objective(),
            schedule: Schedule {
                kind: self.schedule_kind(),
                lr: self.learning_rate,
                warmup: self.lr_schedule.warmup,
                total: iters / self.grad_accumulation_steps,
                min_lr: self.lr_schedule.min_lr,
            },
        }
    }

    /// The quantization flags for the loader.
    pub fn quant_args(&self) -> QuantArgs {
        QuantArgs {
            quantize: self.quantize,
            q_bits: self.q_bits,
            q_group_size: self.q_group_size,
            double_quant: self.double_quant,
            q_embeddings: self.q_embeddings,
        }
    }

    /// The config as TOML, to save beside the adapter.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    mod fuzz {
        use super::*;
        use lora_testkit::{budget, edits, insert, mutate};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(budget(300))]

            /// Issue 14's fuzzing of TOML experiments: configs/quickstart.toml with bytes
            /// overwritten, inserted or cut off, resolved as `train --config` resolves it; an
            /// error or a config, never a panic.
            #[test]
            fn a_mutated_experiment_is_an_error_not_a_panic(
                edits in edits(0..6),
                insert in insert(b"[]=\"'\n.#0-9e+_ infnatrue", 10),
                cut in prop::option::of(any::<usize>()),
            ) {
                let text = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml")).unwrap();
                let bytes = mutate(&text, &edits, usize::MAX, Some(&insert), cut);
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("x.toml");
                std::fs::write(&path, &bytes).unwrap();
                if let Ok(c) = resolve(Some(&path), None, &TrainFlags::default()) {
                    let _ = (c.adapter_spec().validate(), c.optimizer_config(), c.to_toml());
                }
            }
        }
    }

    #[test]
    fn flags_override_the_file_and_defaults_are_mlx_lms() {
        let (_d, path) = write("model = \"m\"\ndata = \"d\"\nbatch_size = 2\nlearning_rate = 1e-4\n[lora_parameters]\nrank = 4\ndropout = 0.1\n");
        let lora = LoraFlags { rank: Some(16), ..Default::default() };
        let flags = TrainFlags { learning_rate: Some(3e-4), lora_parameters: lora, ..Default::default() };
        let c = resolve(Some(&path), None, &flags).unwrap();
        assert_eq!(c.batch_size, 2);
        assert_eq!(c.learning_rate, 3e-4);
        assert_eq!(c.lora_parameters.rank, 16);
        assert_eq!(c.lora_parameters.dropout, 0.1, "a flag on one key of a table keeps the others");
        assert_eq!((c.num_layers, c.steps_per_eval, c.save_every, c.max_seq_length), (16, 200, 100, 2048));
        assert!(c.training());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let (_d, path) = write("model = \"m\"\nlerning_rate = 1e-4\n");
        let err = format!("{:#}", resolve(Some(&path), None, &TrainFlags::default()).unwrap_err());
        assert!(err.contains("lerning_rate") && err.contains("x.toml"), "{err}");
        let (_d, path) = write("model = \"m\"\n[lora_parameters]\nrnak = 4\n");
        let err = format!("{:#}", resolve(Some(&path), None, &TrainFlags::default()).unwrap_err());
        assert!(err.contains("rnak"), "{err}");
        let (_d, path) = write("model = \"m\"\nbatch_size = \"four\"\n");
        let err = format!("{:#}", resolve(Some(&path), None, &TrainFlags::default()).unwrap_err());
        assert!(err.contains("batch_size"), "{err}");
        let (_d, path) = write("model = \"m\"\ndata = \"d\"\n[lora_parameters]\nrank = 0\n");
        let err = format!("{:#}", resolve(Some(&path), None, &TrainFlags::default()).unwrap_err());
        assert!(err.contains("lora_parameters.rank"), "{err}");
        let flags = TrainFlags { model: Some("m".into()), data: Some("d".into()), iters: Some(5), epochs: Some(1), ..Default::default() };
        assert!(resolve(None, None, &flags).unwrap_err().to_string().contains("epochs"));
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let c = resolve(Some(&path), None, &TrainFlags::default()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(c.training(), "{}", path.display());
            n += 1;
        }
        assert!(n >= 3);
    }

    #[test]
    fn the_saved_config_reads_back_the_same() {
        let flags = TrainFlags {
            model: Some("m".into()),
            data: Some("d".into()),
            lora_parameters: LoraFlags { alpha: Some(16.0), ..Default::default() },
            lr_schedule: ScheduleFlags { name: Some(ScheduleName::Cosine), ..Default::default() },
            ..Default::default()
        };
        let c = resolve(None, None, &flags).unwrap();
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.adapter_spec().scale, Scale::Alpha { alpha: 16.0, rslora: false });
    }

    #[test]
    fn a_resumed_run_keeps_its_objective() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SAVED_CONFIG), "model = \"m\"\ndata = \"d\"\nobjective = \"dpo\"\n").unwrap();
        let flags = |objective| TrainFlags { objective, ..Default::default() };
        assert_eq!(resolve(None, Some(dir.path()), &flags(None)).unwrap().objective, ObjectiveName::Dpo);
        assert_eq!(resolve(None, Some(dir.path()), &flags(Some(ObjectiveName::Dpo))).unwrap().objective, ObjectiveName::Dpo);
        let err = resolve(None, Some(dir.path()), &flags(Some(ObjectiveName::Orpo))).unwrap_err().to_string();
        assert!(err.starts_with("--objective orpo: ") && err.contains("objective dpo") && err.contains("--resume-adapter-file"), "{err}");
        // A run saved before the key existed trained SFT.
        std::fs::write(dir.path().join(SAVED_CONFIG), "model = \"m\"\ndata = \"d\"\n").unwrap();
        assert!(resolve(None, Some(dir.path()), &flags(Some(ObjectiveName::Dpo))).unwrap_err().to_string().contains("objective sft"));
    }
}
