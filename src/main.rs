//! `lora`: on-device LoRA/QLoRA fine-tuning of Llama-family models.

mod bench;
mod convert;
mod device;
mod fuse;
mod generate;
mod plot;
mod quantize;
mod serve;
mod train;
mod train_config;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// On-device LoRA/QLoRA fine-tuning for Llama, Mistral and Qwen models.
#[derive(Debug, Parser)]
#[command(name = "lora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a LoRA or DoRA adapter on a JSONL dataset.
    Train(Box<train::TrainArgs>),
    /// Generate text from a model, streaming the completion to stdout.
    Generate(generate::GenerateArgs),
    /// Merge an adapter into the model's weights and save the result.
    Fuse(fuse::FuseArgs),
    /// Convert an adapter between PEFT's and mlx-lm's formats, or to GGUF for llama.cpp.
    ConvertAdapter(convert::ConvertArgs),
    /// Serve a model and its adapters over OpenAI's HTTP API (chat and text completions).
    Serve(Box<serve::ServeArgs>),
    /// Measure speed and memory.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Packed quantized weights against f16: device memory and matmul throughput.
    Quant(bench::quant::BenchQuantArgs),
    /// Training steps of a random model of a named shape: tokens/s, peak memory, TFLOP/s.
    Train(Box<bench::train::BenchTrainArgs>),
    /// The model's matrix products at given shapes, dense and 4-bit: TFLOP/s.
    Matmul(bench::matmul::BenchMatmulArgs),
    /// Batch-1 generation on a random model of a named shape: prompt and decode tokens/s, memory.
    Generate(Box<bench::generate::BenchGenerateArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORA_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::ConvertAdapter(args) => convert::run(args),
        Command::Fuse(args) => fuse::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Bench(BenchCommand::Quant(args)) => bench::quant::run(args),
        Command::Bench(BenchCommand::Train(args)) => bench::train::run(*args),
        Command::Bench(BenchCommand::Matmul(args)) => bench::matmul::run(args),
        Command::Bench(BenchCommand::Generate(args)) => bench::generate::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once: the crates' errors already write
/// their source into their own message, which `{:#}` would repeat.
pub(crate) fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
