//! `lora`: on-device LoRA/QLoRA fine-tuning of Llama-family models.

mod bench;
mod convert;
mod device;
mod fuse;
mod generate;
mod load;
mod plot;
mod quantize;
mod save_path;
mod serve;
mod settings;
mod train;
mod train_config;

use std::process::ExitCode;

/// mimalloc, told never to give freed memory back ([`keep_freed_memory`]): training frees and
/// allocates tensors of the same few sizes thousands of times a step, which the system
/// allocator hands back to the kernel and faults in again, zeroed (a fifth of a CPU step's
/// time; BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (v2 and v3 alike; the Rust bindings do
/// not name it): milliseconds before freed memory is returned to the OS, -1 for never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to "never": the process's footprint stays at its peak, which a
/// training step reaches again every step anyway.
fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe in mimalloc and takes any value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    /// Causal attention at a named shape, forward and backward: time and TFLOP/s.
    Attention(bench::attention::BenchAttentionArgs),
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORA_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::command().mut_subcommand("train", train_config::with_defaults);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
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
        Command::Bench(BenchCommand::Attention(args)) => bench::attention::run(args),
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

#[cfg(test)]
mod tests {
    /// The option number is mimalloc's purge delay: its default (1000 ms in mimalloc v3, which
    /// the crate builds) and its neighbour's (the NUMA node count, 0) read back as the header
    /// says.
    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reading options is thread-safe in mimalloc.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(get(super::MI_OPTION_PURGE_DELAY), 1000);
        assert_eq!(get(super::MI_OPTION_PURGE_DELAY + 1), 0);
    }
}
