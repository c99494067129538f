//! `semantic bench engine`: model-level speed and memory on this machine,
//! with llama.cpp's `llama-bench` on the same GGUF in the same run when found.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use semantic_core::{LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{BlockTable, KvPool};
use semantic_model::LlamaModel;

/// What `semantic bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchKind {
    /// Model-level kernels in process (prefill, decode, batched decode, RSS),
    /// beside llama-bench.
    Engine,
    /// Aggregate throughput of 1, 3, 5, 8 agents and inter-token latency
    /// during a prefill, over HTTP.
    Batching,
    /// Cache save/load (server-side timings) and resume TTFT at 2K/4K/8K
    /// tokens for each KV codec, and each codec's greedy agreement and
    /// logit error against f16 (in process).
    Resume,
    /// RSS and KV per agent, block padding, theory, leak check.
    Memory,
    /// Model load, batching, resume, codec fidelity and memory into one report.
    All,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "engine")]
    pub what: BenchKind,
    /// Fewer and shorter runs (under 5 minutes for `all`).
    #[arg(long, env = "SEMANTIC_BENCHMARK_QUICK")]
    pub quick: bool,
    /// The results file.
    #[arg(long, env = "SEMANTIC_BENCHMARK_OUTPUT", default_value = "benchmark_results.json")]
    pub output: PathBuf,
    /// Where REPORT.md and its SVG charts go (default: beside --output).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Measure this OpenAI-compatible server instead of starting ours
    /// (throughput and TTFT cold/warm only).
    #[arg(long)]
    pub target: Option<String>,
    /// Also measure llama.cpp's llama-server (built by
    /// ../shared/peers/llama-server.sh) in the same run, where it applies.
    #[arg(long)]
    pub compare_llama: bool,
    #[arg(long, env = "SEMANTIC_BENCHMARK_MODEL")]
    pub model: Option<PathBuf>,
    /// llama-server binary (default: the one llama-server.sh builds).
    #[arg(long, env = "LLAMA_SERVER")]
    pub llama_server: Option<PathBuf>,
    /// llama-bench binary for `engine` (default: beside llama-server).
    #[arg(long, env = "LLAMA_BENCH")]
    pub llama_bench: Option<PathBuf>,
    /// A note for the report (repeatable): conditions of the run.
    #[arg(long = "note", value_name = "TEXT")]
    pub notes: Vec<String>,
    /// KV pool of the server under test, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub kv_pool_mb: usize,
}

pub fn run(home: &Path, a: BenchArgs) -> Result<()> {
    match a.what {
        BenchKind::Engine => run_engine(home, a),
        _ => crate::bench_http::run(home, a),
    }
}

fn run_engine(home: &Path, a: BenchArgs) -> Result<()> {
    let rss0 = rss_mib();
    let t = Instant::now();
    let m = crate::generate::load_model(home, a.model.as_deref(), None)?;
    let load_s = t.elapsed().as_secs_f64();
    let model = &m.model;
    let rss_loaded = rss_mib();
    let layout = model.kv_layout(16);
    let mut pool = KvPool::new(layout, layout.blocks_for(2304) * 8 + 8);
    println!(
        "model: {}  (load {:.2} s, weights {:.1} MiB, RSS after load {:.1} MiB, before {:.1})",
        m.path.display(),
        load_s,
        model.weight_bytes() as f64 / 1048576.0,
        rss_loaded,
        rss0
    );
    println!("threads: {}", model.threads());
    let reps = if a.quick { 1 } else { 3 };
    let mut rows: Vec<(String, f64)> = Vec::new();
    for n in [512, 2048] {
        let tps = best(reps, || prefill_tok_s(model, &mut pool, n));
        rows.push((format!("prefill {n} tokens (tok/s)"), tps));
    }
    for ctx in [100, 2000] {
        let tps = best(reps, || decode_tok_s(model, &mut pool, 1, ctx, if a.quick { 32 } else { 64 }));
        rows.push((format!("decode 1 seq at ~{ctx} ctx (tok/s)"), tps));
    }
    for b in [1, 3, 5, 8] {
        let tps = best(reps, || decode_tok_s(model, &mut pool, b, 128, if a.quick { 32 } else { 64 }));
        rows.push((format!("aggregate decode, {b} seqs at 128 ctx (tok/s)"), tps));
    }
    rows.push(("RSS after load (MiB)".into(), rss_loaded));
    rows.push(("RSS budget: weights + 100 MiB (MiB)".into(), model.weight_bytes() as f64 / 1048576.0 + 100.0));
    rows.push(("RSS now, pool touched (MiB)".into(), rss_mib()));
    println!("\n| metric | semantic |\n|---|---|");
    for (k, v) in &rows {
        println!("| {k} | {v:.1} |");
    }
    if let Some(bin) = a.llama_bench.or_else(default_llama_bench) {
        llama_bench(&bin, &m.path, a.quick)?;
    } else {
        println!("\n(llama-bench not found: build it with ../shared/peers/llama-server.sh or pass --llama-bench)");
    }
    Ok(())
}

fn best(reps: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..reps).map(|_| f()).fold(0.0, f64::max)
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 100 + (i * 7919 + salt * 104_729) % 40_000).collect()
}

fn prefill_tok_s(model: &LlamaModel, pool: &mut KvPool, n: usize) -> f64 {
    let mut table = BlockTable::default();
    assert!(pool.ensure_capacity(&mut table, n));
    let toks = tokens(n, 1);
    let t = Instant::now();
    for (i, c) in toks.chunks(512).enumerate() {
        let logits = if (i + 1) * 512 >= n { LogitsWanted::Last } else { LogitsWanted::None };
        let plan = StepPlan {
            seqs: vec![SeqStep {
                tokens: c.to_vec(),
                start_pos: i * 512,
                block_table: table.blocks().to_vec(),
                logits,
            }],
        };
        model.forward(&plan, pool).expect("forward");
    }
    let s = t.elapsed().as_secs_f64();
    pool.free_table(table).expect("free");
    n as f64 / s
}

/// `b` sequences prefilled to `ctx` tokens, then `steps` batched decode steps.
fn decode_tok_s(model: &LlamaModel, pool: &mut KvPool, b: usize, ctx: usize, steps: usize) -> f64 {
    let mut tables: Vec<BlockTable> = (0..b).map(|_| BlockTable::default()).collect();
    for (i, t) in tables.iter_mut().enumerate() {
        assert!(pool.ensure_capacity(t, ctx + steps));
        for (j, c) in tokens(ctx, i as u32).chunks(512).enumerate() {
            let plan = StepPlan {
                seqs: vec![SeqStep {
                    tokens: c.to_vec(),
                    start_pos: j * 512,
                    block_table: t.blocks().to_vec(),
                    logits: LogitsWanted::None,
                }],
            };
            model.forward(&plan, pool).expect("prefill");
        }
    }
    let t0 = Instant::now();
    for s in 0..steps {
        let plan = StepPlan {
            seqs: tables
                .iter()
                .enumerate()
                .map(|(i, t)| SeqStep {
                    tokens: vec![200 + (i + s) as u32],
                    start_pos: ctx + s,
                    block_table: t.blocks().to_vec(),
                    logits: LogitsWanted::Last,
                })
                .collect(),
        };
        model.forward(&plan, pool).expect("decode");
    }
    let secs = t0.elapsed().as_secs_f64();
    for t in tables {
        pool.free_table(t).expect("free");
    }
    (b * steps) as f64 / secs
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub(crate) fn default_llama_bench() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/semantic-peers/llama.cpp-0.3.36/build/bin/llama-bench");
    p.exists().then_some(p)
}

fn llama_bench(bin: &Path, model: &Path, quick: bool) -> Result<()> {
    println!("\nllama.cpp (llama-bench -t 2), same model, same run:");
    let reps = if quick { "1" } else { "3" };
    let out = std::process::Command::new(bin)
        .args(["-m"])
        .arg(model)
        .args(["-t", "2", "-p", "512,2048", "-n", "128", "-r", reps, "-o", "md"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    println!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
