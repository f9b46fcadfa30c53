//! `lora train`'s settings: a TOML file (`--config`), overridden by flags, resolved with
//! mlx-lm's defaults and checked before any weight is loaded.
//!
//! Every flag has a TOML key of the same name in snake case; the adapter's shape lives in a
//! `[lora_parameters]` table and the schedule in `[lr_schedule]`, as in mlx-lm's YAML files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lora_adapters::{AdapterFormat, AdapterSpec, FineTuneType, Init, Scale};
use lora_trainer::{OptimizerConfig, OptimizerKind, ScheduleKind};
use serde::{Deserialize, Serialize};

use crate::device::{DTypeArg, DeviceArg};
use crate::quantize::{QuantArgs, QuantMode};

/// The adapter's shape and scale: mlx-lm's `lora_parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraParameters {
    /// Rank `r`. Default 8.
    pub rank: usize,
    /// mlx-lm's raw scale on `B·A`. Default 20. Ignored when `alpha` is set.
    pub scale: f64,
    /// PEFT's `lora_alpha`: the scale becomes alpha/r (alpha/√r with `use_rslora`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// rsLoRA's alpha/√r. Default false.
    pub use_rslora: bool,
    /// Dropout on the adapter's input while training, in [0, 1). Default 0.
    pub dropout: f64,
    /// The projections to adapt (`self_attn.q_proj` or PEFT's `q_proj`). Default: every
    /// linear projection of attention and the MLP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// `A`'s initialization: kaiming (PEFT's and mlx-lm's default) or gaussian.
    pub init: Init,
}

impl Default for LoraParameters {
    fn default() -> Self {
        Self { rank: 8, scale: 20.0, alpha: None, use_rslora: false, dropout: 0.0, keys: None, init: Init::Kaiming }
    }
}

/// The learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrSchedule {
    /// constant, cosine or linear (mlx-lm's `cosine_decay` and `linear_schedule` are
    /// accepted too). Default constant.
    pub name: ScheduleName,
    /// Optimizer steps of linear warmup from 0. Default 0.
    pub warmup: usize,
    /// Where cosine and linear end. Default 0.
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self { name: ScheduleName::Constant, warmup: 0, min_lr: 0.0 }
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

/// Every setting of a run, as saved beside the adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The base model directory (Hugging Face or MLX quantized).
    pub model: Option<PathBuf>,
    /// The dataset directory: train.jsonl, valid.jsonl, test.jsonl.
    pub data: Option<PathBuf>,
    /// Train. Default: true, unless only `test` is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
    /// Report the test loss and perplexity after training (or of the adapter alone).
    pub test: bool,
    /// lora or dora.
    pub fine_tune_type: FineTuneType,
    /// adam (mlx-lm's default), adamw or sgd.
    pub optimizer: OptimizerKind,
    /// Weight decay. Default 0.01 for adamw (PyTorch's and MLX's), else 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Adam's β₁, β₂. Default [0.9, 0.999].
    pub betas: [f64; 2],
    /// Adam's ε. Default 1e-8.
    pub eps: f64,
    /// SGD momentum. Default 0.
    pub momentum: f64,
    /// LoRA+: `B`'s learning rate over `A`'s (PEFT's `loraplus_lr_ratio`). Default 1 (off).
    pub lora_plus_ratio: f64,
    /// Seed of the adapter init, the batch order and dropout. Default 0.
    pub seed: u64,
    /// Blocks adapted, counted back from the last; -1 for all. Default 16.
    pub num_layers: i64,
    /// Sequences per batch. Default 4.
    pub batch_size: usize,
    /// Training iterations. Default 1000 (unless `epochs` is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<usize>,
    /// Training length in passes over the data, instead of `iters`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Validation batches per evaluation; -1 for all. Default 25.
    pub val_batches: i64,
    /// Peak learning rate. Default 1e-5.
    pub learning_rate: f64,
    /// Iterations between report lines. Default 10.
    pub steps_per_report: usize,
    /// Iterations between validations. Default 200.
    pub steps_per_eval: usize,
    /// Start from this adapter (a weights file beside its adapter_config.json, or a directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_adapter_file: Option<PathBuf>,
    /// Where the adapter, checkpoints, metrics and plots go. Default `adapters`.
    pub adapter_path: PathBuf,
    /// peft (default) or mlx.
    pub adapter_format: AdapterFormat,
    /// Iterations between checkpoints. Default 100.
    pub save_every: usize,
    /// Keep the adapter of the lowest validation loss in `best/` inside the adapter path.
    /// Default false.
    pub keep_best: bool,
    /// Stop after this many evaluations without improvement. Default: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop_patience: Option<usize>,
    /// How much lower a validation loss must be to count as an improvement. Default 0.
    pub early_stop_min_delta: f64,
    /// Test batches; -1 for all. Default 500.
    pub test_batches: i64,
    /// Longer sequences are truncated. Default 2048.
    pub max_seq_length: usize,
    /// Recompute activations in backward instead of keeping them. Default false.
    pub grad_checkpoint: bool,
    /// Batches per optimizer step. Default 1.
    pub grad_accumulation_steps: usize,
    /// Clip the gradients' global norm to this. Default: no clipping (as mlx-lm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Train only on completions and assistant turns. Default false.
    pub mask_prompt: bool,
    /// Pack several rows into each sequence of `max_seq_length` tokens, each attending only to
    /// itself. Default false.
    pub pack: bool,
    /// Bucket by length and shuffle (true), or keep file order (false). Default true.
    pub shuffle: bool,
    /// Count and skip bad rows instead of stopping. Default false.
    pub skip_bad_rows: bool,
    /// The key of plain text rows. Default `text`.
    pub text_feature: String,
    /// The prompt key. Default `prompt`.
    pub prompt_feature: String,
    /// The completion key. Default `completion`.
    pub completion_feature: String,
    /// The message list key. Default `messages`.
    pub chat_feature: String,
    /// auto, cpu, wgpu or cuda. Default auto.
    pub device: DeviceArg,
    /// Compute dtype f32, f16 or bf16 (the adapter stays f32). Default: f32 on the CPU,
    /// the checkpoint's half type on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DTypeArg>,
    /// Quantize the frozen base at load: affine or nf4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantMode>,
    /// Affine bits. Default 4.
    pub q_bits: usize,
    /// Affine group size. Default 64.
    pub q_group_size: usize,
    /// NF4 double quantization. Default false.
    pub double_quant: bool,
    /// Quantize embeddings and lm_head too. Default: true for affine, false for nf4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_embeddings: Option<bool>,
    /// The adapter.
    pub lora_parameters: LoraParameters,
    /// The schedule.
    pub lr_schedule: LrSchedule,
}

impl Default for TrainConfig {
    /// mlx-lm's defaults.
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            train: None,
            test: false,
            fine_tune_type: FineTuneType::Lora,
            optimizer: OptimizerKind::Adam,
            weight_decay: None,
            betas: [0.9, 0.999],
            eps: 1e-8,
            momentum: 0.0,
            lora_plus_ratio: 1.0,
            seed: 0,
            num_layers: 16,
            batch_size: 4,
            iters: None,
            epochs: None,
            val_batches: 25,
            learning_rate: 1e-5,
            steps_per_report: 10,
            steps_per_eval: 200,
            resume_adapter_file: None,
            adapter_path: PathBuf::from("adapters"),
            adapter_format: AdapterFormat::Peft,
            save_every: 100,
            keep_best: false,
            early_stop_patience: None,
            early_stop_min_delta: 0.0,
            test_batches: 500,
            max_seq_length: 2048,
            grad_checkpoint: false,
            grad_accumulation_steps: 1,
            max_grad_norm: None,
            mask_prompt: false,
            pack: false,
            shuffle: true,
            skip_bad_rows: false,
            text_feature: "text".into(),
            prompt_feature: "prompt".into(),
            completion_feature: "completion".into(),
            chat_feature: "messages".into(),
            device: DeviceArg::Auto,
            dtype: None,
            quantize: None,
            q_bits: 4,
            q_group_size: 64,
            double_quant: false,
            q_embeddings: None,
            lora_parameters: LoraParameters::default(),
            lr_schedule: LrSchedule::default(),
        }
    }
}

/// The flags of `lora train`. Each one left out keeps the config file's value, or the default.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct TrainFlags {
    /// A TOML experiment file; flags override its keys.
    #[arg(long, short = 'c', value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue the interrupted run whose adapter directory is DIR, exactly where its last
    /// checkpoint left it. Its saved config is the starting point; flags override it.
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// The base model directory.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// The dataset directory (train.jsonl, valid.jsonl, test.jsonl).
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Train [default: true unless only --test is given].
    ///
    /// Given bare it means true; `--train false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
    /// Report test loss and perplexity.
    ///
    /// Given bare it means true; `--test false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<bool>,
    /// lora or dora.
    #[arg(long, value_name = "TYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fine_tune_type: Option<String>,
    /// adam, adamw or sgd [default: adam].
    #[arg(long, value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    /// Weight decay [default: 0.01 for adamw, else 0].
    #[arg(long, value_name = "X")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// SGD momentum [default: 0].
    #[arg(long, value_name = "X")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// LoRA+: the adapters' B matrices (and DoRA magnitudes) learn at R times the learning
    /// rate, as PEFT's create_loraplus_optimizer [default: 1, plain LoRA].
    #[arg(long, value_name = "R", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_plus_ratio: Option<f64>,
    /// Seed [default: 0].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Blocks to adapt, counted back from the last; -1 for all [default: 16].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<i64>,
    /// Sequences per batch [default: 4].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Training iterations [default: 1000].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<usize>,
    /// Train for this many passes over the data instead of --iters.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Validation batches; -1 for all [default: 25].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_batches: Option<i64>,
    /// Peak learning rate [default: 1e-5].
    #[arg(long, value_name = "LR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Iterations between reports [default: 10].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_report: Option<usize>,
    /// Iterations between validations [default: 200].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_per_eval: Option<usize>,
    /// Start from this adapter: PEFT or mlx-lm, a weights file or a directory.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_adapter_file: Option<PathBuf>,
    /// Output directory [default: adapters].
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_path: Option<PathBuf>,
    /// peft or mlx [default: peft].
    #[arg(long, value_name = "FORMAT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_format: Option<String>,
    /// Iterations between checkpoints [default: 100].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// Keep the adapter of the lowest validation loss so far in best/ inside the adapter path,
    /// with its step and loss in best/best.json. Given bare it means true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<bool>,
    /// Stop after N evaluations in a row without improvement; the run stays resumable
    /// [default: never].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop_patience: Option<usize>,
    /// A validation loss must be lower than the best by more than X to count as an
    /// improvement [default: 0].
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop_min_delta: Option<f64>,
    /// Test batches; -1 for all [default: 500].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_batches: Option<i64>,
    /// Truncate longer sequences [default: 2048].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_seq_length: Option<usize>,
    /// Recompute activations in backward to save memory.
    ///
    /// Given bare it means true; `--grad-checkpoint false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_checkpoint: Option<bool>,
    /// Batches per optimizer step [default: 1].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accumulation_steps: Option<usize>,
    /// Clip the gradients' global norm [default: none].
    #[arg(long, value_name = "X")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Train only on completions and assistant turns.
    ///
    /// Given bare it means true; `--mask-prompt false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_prompt: Option<bool>,
    /// Pack several rows into each sequence of --max-seq-length tokens (best-fit decreasing),
    /// each attending only to itself with its positions from 0: its loss is what it is
    /// unpacked, without the padding of batches of unequal rows [default: false].
    ///
    /// Given bare it means true.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<bool>,
    /// Bucket batches by length and shuffle them [default: true].
    ///
    /// Given bare it means true; `--shuffle false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shuffle: Option<bool>,
    /// Count and skip bad rows instead of stopping.
    ///
    /// Given bare it means true; `--skip-bad-rows false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_bad_rows: Option<bool>,
    /// Key of text rows [default: text].
    #[arg(long, value_name = "KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_feature: Option<String>,
    /// Key of prompts [default: prompt].
    #[arg(long, value_name = "KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_feature: Option<String>,
    /// Key of completions [default: completion].
    #[arg(long, value_name = "KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_feature: Option<String>,
    /// Key of message lists [default: messages].
    #[arg(long, value_name = "KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_feature: Option<String>,
    /// auto, cpu, wgpu or cuda [default: auto].
    #[arg(long, value_enum, value_name = "D")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceArg>,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, value_enum, value_name = "DTYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DTypeArg>,
    /// Quantize the base at load: affine or nf4.
    #[arg(long, value_enum, value_name = "MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantMode>,
    /// Affine bits [default: 4].
    #[arg(long, value_name = "BITS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_bits: Option<usize>,
    /// Affine group size [default: 64].
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_group_size: Option<usize>,
    /// NF4 double quantization.
    ///
    /// Given bare it means true; `--double-quant false` turns off what a config file turned on.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
    /// Quantize embeddings and lm_head [default: true for affine, false for nf4].
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_embeddings: Option<bool>,
    /// LoRA rank [lora_parameters.rank; default: 8].
    #[arg(long, value_name = "R")]
    #[serde(skip)]
    pub rank: Option<usize>,
    /// mlx-lm's scale on B·A [lora_parameters.scale; default: 20].
    #[arg(long, value_name = "S")]
    #[serde(skip)]
    pub scale: Option<f64>,
    /// PEFT's lora_alpha; the scale becomes alpha/r [lora_parameters.alpha].
    #[arg(long, value_name = "A")]
    #[serde(skip)]
    pub alpha: Option<f64>,
    /// Adapter dropout [lora_parameters.dropout; default: 0].
    #[arg(long, value_name = "P")]
    #[serde(skip)]
    pub dropout: Option<f64>,
    /// Projections to adapt, comma-separated [lora_parameters.keys; default: all].
    #[arg(long, value_name = "K,..", value_delimiter = ',')]
    #[serde(skip)]
    pub keys: Option<Vec<String>>,
    /// Schedule: constant, cosine or linear [lr_schedule.name; default: constant].
    #[arg(long, value_enum, value_name = "NAME")]
    #[serde(skip)]
    pub lr_schedule: Option<ScheduleName>,
    /// Warmup optimizer steps [lr_schedule.warmup; default: 0].
    #[arg(long, value_name = "N")]
    #[serde(skip)]
    pub warmup: Option<usize>,
    /// Where the schedule decays to [lr_schedule.min_lr; default: 0].
    #[arg(long, value_name = "LR")]
    #[serde(skip)]
    pub min_lr: Option<f64>,
    /// Write into an --adapter-path that already holds files (they may be replaced); inputs
    /// (the model, the data, --resume-adapter-file) are still never written over.
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
}

impl TrainFlags {
    /// The flags given, as a TOML table shaped like the config file.
    fn table(&self) -> Result<toml::Table> {
        let mut table = toml::Table::try_from(self).context("flags")?;
        let mut nested = |name: &str, entries: Vec<(&str, Option<toml::Value>)>| {
            let sub: toml::Table = entries.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect();
            if !sub.is_empty() {
                table.insert(name.into(), toml::Value::Table(sub));
            }
        };
        let f = |x: Option<f64>| x.map(toml::Value::Float);
        let i = |x: Option<usize>| x.map(|v| toml::Value::Integer(v as i64));
        nested(
            "lora_parameters",
            vec![
                ("rank", i(self.rank)),
                ("scale", f(self.scale)),
                ("alpha", f(self.alpha)),
                ("dropout", f(self.dropout)),
                ("keys", self.keys.clone().map(|k| toml::Value::Array(k.into_iter().map(toml::Value::String).collect()))),
            ],
        );
        nested(
            "lr_schedule",
            vec![
                ("name", self.lr_schedule.map(|n| toml::Value::String(format!("{n:?}").to_lowercase()))),
                ("warmup", i(self.warmup)),
                ("min_lr", f(self.min_lr)),
            ],
        );
        Ok(table)
    }
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

/// Reads a config file, checking every key and value (errors name the key and line).
fn read_file(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str::<TrainConfig>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(toml::from_str(&text).expect("parsed above"))
}

/// The config file (or a resumed run's saved config), then the flags over it.
pub fn resolve(flags: &TrainFlags) -> Result<TrainConfig> {
    let mut table = match (&flags.resume, &flags.config) {
        (Some(dir), _) => {
            let saved = dir.join(SAVED_CONFIG);
            if !saved.is_file() {
                bail!("--resume {}: no {SAVED_CONFIG} there; is it the adapter path of a lora train run?", dir.display());
            }
            let mut t = read_file(&saved)?;
            if let Some(file) = &flags.config {
                merge(&mut t, read_file(file)?);
            }
            t.insert("adapter_path".into(), toml::Value::String(dir.to_string_lossy().into_owned()));
            t
        }
        (None, Some(file)) => read_file(file)?,
        (None, None) => toml::Table::new(),
    };
    // A length given on the command line replaces the file's, in either unit.
    if flags.epochs.is_some() && flags.iters.is_none() {
        table.remove("iters");
    }
    if flags.iters.is_some() && flags.epochs.is_none() {
        table.remove("epochs");
    }
    merge(&mut table, flags.table()?);
    let config: TrainConfig = table.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("flags: {}", e.message()))?;
    config.check()?;
    Ok(config)
}

/// The resolved config's file name in the adapter directory.
pub const SAVED_CONFIG: &str = "train_config.toml";

impl TrainConfig {
    /// Ranges, naming the key.
    fn check(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow::anyhow!("{key}: {msg}"));
        if self.model.is_none() {
            return bad("model", "is required (--model DIR or `model = \"DIR\"` in the config)".into());
        }
        if self.data.is_none() && (self.training() || self.test) {
            return bad("data", "is required (--data DIR holding train.jsonl, valid.jsonl, test.jsonl)".into());
        }
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
                if let Ok(c) = resolve(&TrainFlags { config: Some(path), ..Default::default() }) {
                    let _ = (c.adapter_spec().validate(), c.optimizer_config(), c.to_toml());
                }
            }
        }
    }

    #[test]
    fn flags_override_the_file_and_defaults_are_mlx_lms() {
        let (_d, path) = write("model = \"m\"\ndata = \"d\"\nbatch_size = 2\nlearning_rate = 1e-4\n[lora_parameters]\nrank = 4\ndropout = 0.1\n");
        let flags = TrainFlags { config: Some(path), learning_rate: Some(3e-4), rank: Some(16), ..Default::default() };
        let c = resolve(&flags).unwrap();
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
        let err = format!("{:#}", resolve(&TrainFlags { config: Some(path), ..Default::default() }).unwrap_err());
        assert!(err.contains("lerning_rate") && err.contains("x.toml"), "{err}");
        let (_d, path) = write("model = \"m\"\n[lora_parameters]\nrnak = 4\n");
        let err = format!("{:#}", resolve(&TrainFlags { config: Some(path), ..Default::default() }).unwrap_err());
        assert!(err.contains("rnak"), "{err}");
        let (_d, path) = write("model = \"m\"\nbatch_size = \"four\"\n");
        let err = format!("{:#}", resolve(&TrainFlags { config: Some(path), ..Default::default() }).unwrap_err());
        assert!(err.contains("batch_size"), "{err}");
        let (_d, path) = write("model = \"m\"\ndata = \"d\"\n[lora_parameters]\nrank = 0\n");
        let err = format!("{:#}", resolve(&TrainFlags { config: Some(path), ..Default::default() }).unwrap_err());
        assert!(err.contains("lora_parameters.rank"), "{err}");
        let flags = TrainFlags { model: Some("m".into()), data: Some("d".into()), iters: Some(5), epochs: Some(1), ..Default::default() };
        assert!(resolve(&flags).unwrap_err().to_string().contains("epochs"));
    }

    #[test]
    fn every_shipped_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let c = resolve(&TrainFlags { config: Some(path.clone()), ..Default::default() }).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(c.training(), "{}", path.display());
            n += 1;
        }
        assert!(n >= 3);
    }

    #[test]
    fn the_saved_config_reads_back_the_same() {
        let flags =
            TrainFlags { model: Some("m".into()), data: Some("d".into()), alpha: Some(16.0), lr_schedule: Some(ScheduleName::Cosine), ..Default::default() };
        let c = resolve(&flags).unwrap();
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.adapter_spec().scale, Scale::Alpha { alpha: 16.0, rslora: false });
    }
}
