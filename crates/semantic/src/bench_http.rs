//! `semantic bench batching`: aggregate throughput over HTTP with 1, 3, 5 and
//! 8 concurrent agents, and inter-token latency while another agent
//! prefills a long prompt; the same runs against llama-server with
//! `--compare-llama` (its `-np N` for N agents), in the same session.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use semantic_bench::batching::{itl_under_prefill, run_batch, BatchRun};
use semantic_bench::client::Client;
use semantic_bench::server::{free_port, ServerProcess};

const AGENTS: [usize; 4] = [1, 3, 5, 8];

pub fn batching(home: &Path, target: &Option<String>, model: Option<&Path>, quick: bool, compare_llama: bool, llama_bench: Option<&Path>) -> Result<()> {
    let model_path = match model {
        Some(p) => p.to_owned(),
        None => crate::pull::ensure_default(home)?,
    };
    let (gen, prompts): (usize, &[usize]) = if quick { (64, &[128]) } else { (200, &[128, 1024]) };
    let ours = match target {
        Some(url) => Side { name: url.clone(), runs: measure(&Client::new(url), gen, prompts, None)? },
        None => {
            let port = free_port()?;
            let cache = std::env::temp_dir().join(format!("semantic-bench-{}", std::process::id()));
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.args(["serve", "--port", &port.to_string(), "--kv-pool-mb", "2048", "--model"]).arg(&model_path).arg("--cache-dir").arg(&cache);
            let server = ServerProcess::start(cmd, port, "/health/ready", Duration::from_secs(120)).context("starting `semantic serve`")?;
            let runs = measure(&Client::new(&server.url), gen, prompts, None)?;
            drop(server);
            let _ = std::fs::remove_dir_all(&cache);
            Side { name: "semantic".into(), runs }
        }
    };
    let mut sides = vec![ours];
    if compare_llama {
        let bin = llama_bench
            .map(|p| p.with_file_name("llama-server"))
            .or_else(|| crate::bench::default_llama_bench().map(|p| p.with_file_name("llama-server")))
            .context("llama-server not found: build it with ../shared/peers/llama-server.sh")?;
        sides.push(Side { name: "llama-server".into(), runs: measure_llama(&bin, &model_path, gen, prompts)? });
    }
    print_table(&sides);
    Ok(())
}

struct Side {
    name: String,
    runs: Vec<(BatchRun, Option<(Duration, Duration)>)>,
}

/// Every agent count at every prompt length, plus the ITL run.
fn measure(client: &Client, gen: usize, prompts: &[usize], np: Option<usize>) -> Result<Vec<(BatchRun, Option<(Duration, Duration)>)>> {
    // Warm-up: the first request pays one-time costs.
    run_batch(client, 1, 32, 8, 999_999)?;
    let mut out = Vec::new();
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    for &p in prompts {
        for &n in AGENTS.iter().filter(|&&n| np.is_none_or(|np| np == n)) {
            let r = run_batch(client, n, p, gen, nonce * 100 + (p + n) as u64)?;
            eprintln!("  {n} agents, {p}-token prompts: {:.1} tok/s", r.aggregate_tok_s);
            out.push((r, None));
        }
    }
    if np.is_none_or(|np| np == 1) {
        let itl = itl_under_prefill(client, 2048, gen, nonce)?;
        if let Some(last) = out.first_mut() {
            last.1 = Some(itl);
        }
    }
    Ok(out)
}

fn measure_llama(bin: &Path, model: &Path, gen: usize, prompts: &[usize]) -> Result<Vec<(BatchRun, Option<(Duration, Duration)>)>> {
    let mut out = Vec::new();
    for &n in &AGENTS {
        let port = free_port()?;
        let ctx = n * (prompts.iter().max().copied().unwrap_or(128) + gen + 256).max(2048 + gen + 256);
        let mut cmd = Command::new(bin);
        cmd.arg("-m").arg(model).args(["-t", "2", "-np", &n.to_string(), "-c", &ctx.to_string(), "--port", &port.to_string()]);
        let server = ServerProcess::start(cmd, port, "/health", Duration::from_secs(120)).context("starting llama-server")?;
        out.extend(measure(&Client::new(&server.url), gen, prompts, Some(n))?);
    }
    Ok(out)
}

fn print_table(sides: &[Side]) {
    println!("\n| server | agents | prompt tokens | aggregate tok/s | per-agent tok/s | speedup vs 1 | TTFT p50 ms | ITL p50 ms | ITL p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for side in sides {
        for (r, _) in &side.runs {
            let base = side.runs.iter().find(|(b, _)| b.agents == 1 && b.prompt_tokens.abs_diff(r.prompt_tokens) < 64).map(|(b, _)| b.aggregate_tok_s);
            let speedup = base.map(|b| r.aggregate_tok_s / b).unwrap_or(f64::NAN);
            println!(
                "| {} | {} | {} | {:.1} | {:.1} | {:.2}x | {:.0} | {:.1} | {:.1} |",
                side.name, r.agents, r.prompt_tokens, r.aggregate_tok_s, r.per_agent_tok_s, speedup,
                r.ttft_p50.as_secs_f64() * 1e3, r.itl_p50.as_secs_f64() * 1e3, r.itl_p99.as_secs_f64() * 1e3
            );
        }
        if let Some((_, Some((p50, p99)))) = side.runs.first() {
            println!(
                "| {} | ITL of 1 decoding agent while another prefills 2048 tokens: p50 {:.1} ms, p99 {:.1} ms ({:.1}x) |",
                side.name, p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3, p99.as_secs_f64() / p50.as_secs_f64().max(1e-9)
            );
        }
    }
}
