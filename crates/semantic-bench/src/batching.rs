//! Batching throughput: N agents generate at once against one model.
//!
//! Every agent has its own prompt (a per-run nonce keeps caches from helping)
//! and generates exactly `gen_tokens` tokens (`ignore_eos`). Aggregate
//! throughput = all generated tokens / wall time of the whole batch.

use std::time::{Duration, Instant};

use crate::client::{ChatCall, ChatTiming, Client, ClientError};
use crate::stats::{median, percentile};

#[derive(Clone, Debug)]
pub struct BatchRun {
    pub agents: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub wall: Duration,
    pub aggregate_tok_s: f64,
    pub per_agent_tok_s: f64,
    pub ttft_p50: Duration,
    pub itl_p50: Duration,
    pub itl_p99: Duration,
}

/// About `n` tokens of plain English words, distinct per `seed`.
pub fn filler(n: usize, seed: u64) -> String {
    const WORDS: [&str; 24] = [
        "river", "stone", "garden", "window", "paper", "light", "table", "music", "forest", "engine", "silver",
        "market", "winter", "orange", "planet", "bridge", "letter", "mirror", "castle", "animal", "circle", "doctor",
        "island", "pocket",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = format!("Note {seed}:");
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(' ');
        out.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
    }
    out
}

/// Runs `agents` concurrent requests once; `nonce` makes prompts unique.
pub fn run_batch(
    client: &Client,
    agents: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    nonce: u64,
) -> Result<BatchRun, ClientError> {
    let start = Instant::now();
    let results: Vec<Result<ChatTiming, ClientError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..agents)
            .map(|i| {
                let call = ChatCall {
                    session: Some(format!("bench-{nonce}-{i}")),
                    system: filler(prompt_tokens.saturating_sub(30), nonce * 1000 + i as u64),
                    user: "Continue the notes.".into(),
                    max_tokens: gen_tokens,
                    ignore_eos: true,
                };
                s.spawn(move || client.chat(&call))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("agent thread")).collect()
    });
    let wall = start.elapsed();
    let timings: Vec<ChatTiming> = results.into_iter().collect::<Result<_, _>>()?;
    let generated: usize = timings.iter().map(|t| t.completion_tokens.max(t.gaps.len() + 1)).sum();
    let per_agent: Vec<f64> =
        timings.iter().map(|t| t.completion_tokens.max(t.gaps.len() + 1) as f64 / t.total.as_secs_f64()).collect();
    let gaps: Vec<Duration> = timings.iter().flat_map(|t| t.gaps.iter().copied()).collect();
    Ok(BatchRun {
        agents,
        prompt_tokens: timings.iter().map(|t| t.prompt_tokens).max().unwrap_or(0),
        gen_tokens,
        wall,
        aggregate_tok_s: generated as f64 / wall.as_secs_f64(),
        per_agent_tok_s: median(&per_agent),
        ttft_p50: median_d(timings.iter().map(|t| t.ttft).collect()),
        itl_p50: median_d(gaps.clone()),
        itl_p99: percentile_d(gaps, 99.0),
    })
}

/// Inter-token latency of one decoding agent while another agent sends a
/// long prompt: (p50, p99) of the decoding agent's gaps.
pub fn itl_under_prefill(
    client: &Client,
    long_prompt: usize,
    gen_tokens: usize,
    nonce: u64,
) -> Result<(Duration, Duration), ClientError> {
    std::thread::scope(|s| {
        let decoder = s.spawn(|| {
            client.chat(&ChatCall {
                session: Some(format!("itl-{nonce}-a")),
                system: filler(100, nonce * 7),
                user: "Continue the notes.".into(),
                max_tokens: gen_tokens,
                ignore_eos: true,
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let prefill = client.chat(&ChatCall {
            session: Some(format!("itl-{nonce}-b")),
            system: filler(long_prompt, nonce * 7 + 1),
            user: "Summarize.".into(),
            max_tokens: 1,
            ignore_eos: true,
        });
        let t = decoder.join().expect("decoder thread")?;
        prefill?;
        Ok((median_d(t.gaps.clone()), percentile_d(t.gaps, 99.0)))
    })
}

fn median_d(v: Vec<Duration>) -> Duration {
    Duration::from_secs_f64(median(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()))
}

fn percentile_d(v: Vec<Duration>, p: f64) -> Duration {
    Duration::from_secs_f64(percentile(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(), p))
}
