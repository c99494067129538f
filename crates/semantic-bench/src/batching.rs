//! Batching throughput: N agents generate at once against one model.
//!
//! Every agent has its own prompt (a fresh seed keeps caches from helping)
//! and generates exactly `gen_tokens` tokens (`ignore_eos`). Aggregate
//! throughput = all generated tokens / wall time of the whole batch. Between
//! repetitions the server is let go idle (its write-behind of the agents'
//! caches finished) when it has the agents API, so one repetition's disk
//! writes do not land in the next one's timing.

use std::time::{Duration, Instant};

use crate::agents::AgentsApi;
use crate::client::{ChatCall, ChatTiming, Client};
use crate::context::{Ctx, Target};
use crate::error::BenchError;
use crate::model::Prompt;
use crate::results::{Group, Record};
use crate::stats::{median, median_duration, ms, percentile_duration};

#[derive(Clone, Debug)]
pub struct BatchRun {
    pub agents: usize,
    pub prompt_tokens: usize,
    pub wall: Duration,
    pub aggregate_tok_s: f64,
    pub per_agent_tok_s: f64,
    pub ttft_p50: Duration,
    pub itl_p50: Duration,
    pub itl_p99: Duration,
    pub generated: usize,
}

fn call(p: &Prompt, session: Option<String>, gen: usize) -> ChatCall {
    ChatCall {
        session,
        system: p.system.clone(),
        user: p.user.clone(),
        max_tokens: gen,
        ignore_eos: true,
        ..ChatCall::default()
    }
}

/// Runs one request per prompt, all at once.
pub fn run_batch(client: &Client, prompts: &[Prompt], gen: usize, sessions: &[String]) -> Result<BatchRun, BenchError> {
    run_batch_with(client, prompts, gen, sessions, false)
}

/// [`run_batch`], at the API's default sampling when `default_sampling`.
fn run_batch_with(
    client: &Client,
    prompts: &[Prompt],
    gen: usize,
    sessions: &[String],
    default_sampling: bool,
) -> Result<BatchRun, BenchError> {
    let calls: Vec<ChatCall> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| ChatCall { default_sampling, ..call(p, sessions.get(i).cloned(), gen) })
        .collect();
    let start = Instant::now();
    // One client thread for all agents (see `mux`).
    let results = client.chat_all(&calls);
    let wall = start.elapsed();
    let timings: Vec<ChatTiming> = results.into_iter().collect::<Result<_, _>>()?;
    let generated: usize = timings.iter().map(ChatTiming::generated).sum();
    let per_agent: Vec<f64> = timings.iter().map(|t| t.generated() as f64 / t.total.as_secs_f64()).collect();
    let gaps: Vec<Duration> = timings.iter().flat_map(|t| t.gaps.iter().copied()).collect();
    Ok(BatchRun {
        agents: prompts.len(),
        prompt_tokens: timings.iter().map(|t| t.prompt_tokens).max().unwrap_or(0),
        wall,
        aggregate_tok_s: generated as f64 / wall.as_secs_f64(),
        per_agent_tok_s: median(&per_agent),
        ttft_p50: median_duration(&timings.iter().map(|t| t.ttft).collect::<Vec<_>>()),
        itl_p50: median_duration(&gaps),
        itl_p99: percentile_duration(&gaps, 99.0),
        generated,
    })
}

/// Inter-token gaps of one decoding agent while another agent sends a long
/// prompt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ItlRun {
    /// Median gap while the decoder runs alone (before and after the prefill).
    pub p50_alone: Duration,
    /// Median and p99 of the gaps that overlap the prefill request (a server
    /// that prefills in one piece shows one long gap).
    pub p50_during: Duration,
    pub p99_during: Duration,
}

pub fn itl_under_prefill(
    client: &Client,
    short: &Prompt,
    long: &Prompt,
    gen: usize,
    sessions: [Option<String>; 2],
) -> Result<ItlRun, BenchError> {
    let [s0, s1] = sessions;
    std::thread::scope(|s| {
        let decoder = s.spawn(|| client.chat(&call(short, s0, gen)));
        std::thread::sleep(Duration::from_millis(300));
        let p0 = Instant::now();
        let prefill = client.chat(&call(long, s1, 1));
        let p1 = Instant::now();
        let t = decoder.join().expect("decoder thread")?;
        prefill?;
        let (during, alone) = split_gaps(&t, p0, p1);
        if during.is_empty() || alone.len() < 5 {
            let msg = format!(
                "{} tokens of the decoding agent fell inside the prefill, {} outside: decode longer",
                during.len(),
                alone.len()
            );
            return Err(BenchError::Unexpected(msg));
        }
        Ok(ItlRun {
            p50_alone: median_duration(&alone),
            p50_during: median_duration(&during),
            p99_during: percentile_duration(&during, 99.0),
        })
    })
}

/// Gaps of `t` that overlap `[from, to]`, and the others.
pub(crate) fn split_gaps(t: &ChatTiming, from: Instant, to: Instant) -> (Vec<Duration>, Vec<Duration>) {
    let at = t.token_instants();
    at.windows(2).map(|w| (w[1] >= from && w[0] <= to, w[1] - w[0])).fold(
        (Vec::new(), Vec::new()),
        |(mut a, mut b), (inside, g)| {
            if inside {
                a.push(g)
            } else {
                b.push(g)
            }
            (a, b)
        },
    )
}

/// Waits for the server's write-behind and frees the agents a run made.
fn settle(target: &Target, prefix: &str) -> Result<(), BenchError> {
    if target.has_agents_api {
        let api = AgentsApi::new(&target.client);
        api.quiesce()?;
        api.delete_all(prefix)?;
    }
    Ok(())
}

/// A warm-up request: the first one pays one-time costs (page faults,
/// thread pools).
pub fn warm_up(ctx: &mut Ctx, target: &Target) -> Result<(), BenchError> {
    let p = ctx.prompt(64)?;
    let prefix = format!("warmup-{}", ctx.seed());
    run_batch(&target.client, &[p], 16, &[format!("{prefix}-0")])?;
    settle(target, &prefix)
}

/// `agents` concurrent agents with prompts of `prompt_tokens`, repeated.
pub fn throughput(ctx: &mut Ctx, target: &Target, agents: usize, prompt_tokens: usize) -> Result<Record, BenchError> {
    let mut recs = throughput_sweep(ctx, target, &[agents], prompt_tokens)?;
    Ok(recs.remove(0))
}

/// Every agent count of `counts`, repetition by repetition (1, 3, 5, 8,
/// then again): the machine's speed drifts over minutes, and measuring
/// each count's repetitions back to back put that drift into the speedups
/// (the same build gave 5 agents 2.51x in one run and 2.15x in the next).
pub fn throughput_sweep(
    ctx: &mut Ctx,
    target: &Target,
    counts: &[usize],
    prompt_tokens: usize,
) -> Result<Vec<Record>, BenchError> {
    let gen = ctx.plan.batch_gen;
    let mut runs: Vec<Vec<BatchRun>> = vec![Vec::new(); counts.len()];
    for rep in 0..ctx.plan.batch_reps {
        for (i, &agents) in counts.iter().enumerate() {
            let prompts: Vec<Prompt> = (0..agents).map(|_| ctx.prompt(prompt_tokens)).collect::<Result<_, _>>()?;
            let prefix = format!("batch-{}", ctx.seed());
            let sessions: Vec<String> = (0..agents).map(|i| format!("{prefix}-{i}")).collect();
            let r = run_batch(&target.client, &prompts, gen, &sessions)?;
            ctx.progress.step(&format!(
                "{}: {agents} agents x {prompt_tokens} tokens, rep {}: {:.1} tok/s",
                target.name,
                rep + 1,
                r.aggregate_tok_s
            ));
            settle(target, &prefix)?;
            runs[i].push(r);
        }
    }
    Ok(counts.iter().zip(&runs).map(|(&n, r)| throughput_record(&target.name, n, prompt_tokens, gen, r)).collect())
}

fn throughput_record(server: &str, agents: usize, prompt_tokens: usize, gen: usize, runs: &[BatchRun]) -> Record {
    let f = |g: fn(&BatchRun) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    let mut rec = Record::new(Group::Batching, "throughput", server)
        .param("agents", agents)
        .param("prompt_tokens", prompt_tokens)
        .param("gen_tokens", gen)
        .samples("aggregate_tok_s", "tok/s", &f(|r| r.aggregate_tok_s))
        .samples("per_agent_tok_s", "tok/s", &f(|r| r.per_agent_tok_s))
        .samples("ttft_ms", "ms", &f(|r| ms(r.ttft_p50)))
        .samples("itl_p50_ms", "ms", &f(|r| ms(r.itl_p50)))
        .samples("itl_p99_ms", "ms", &f(|r| ms(r.itl_p99)))
        .samples("wall_s", "s", &f(|r| r.wall.as_secs_f64()));
    let short = runs.iter().filter(|r| r.generated < r.agents * gen).count();
    if short > 0 {
        rec = rec.note(format!("{short} repetition(s) generated fewer than {gen} tokens per agent (EOS not ignored?)"));
    }
    rec
}

/// Adds `speedup_vs_1_x` (aggregate over the 1-agent aggregate at the same
/// prompt length) to every throughput record of `server`.
pub fn add_speedups(records: &mut [Record], server: &str) {
    let base: Vec<(u64, f64)> = records
        .iter()
        .filter(|r| r.server == server && r.name == "throughput" && r.param_u64("agents") == Some(1))
        .filter_map(|r| Some((r.param_u64("prompt_tokens")?, r.get("aggregate_tok_s")?)))
        .collect();
    for r in records.iter_mut().filter(|r| r.server == server && r.name == "throughput") {
        let p = r.param_u64("prompt_tokens");
        if let (Some(&(_, b)), Some(agg)) = (base.iter().find(|(bp, _)| Some(*bp) == p), r.get("aggregate_tok_s")) {
            *r = r.clone().value("speedup_vs_1_x", "x", agg / b);
        }
    }
}

/// Agents of a sampling-cost run.
pub const SAMPLING_AGENTS: usize = 3;

/// Aggregate tok/s of [`SAMPLING_AGENTS`] agents at the API's default
/// sampling (no `temperature`: 1, over the whole vocabulary) against the
/// same agents greedy, repetition by repetition. What clients send by
/// default must not cost more than greedy decoding: sampling that sorted
/// the vocabulary per token once cost ~3 ms per token per agent, and 3
/// agents at the defaults ran at 232 tok/s (1181 once fixed).
pub fn sampling_record(ctx: &mut Ctx, target: &Target) -> Result<Record, BenchError> {
    let gen = ctx.plan.batch_gen;
    let (mut greedy, mut default) = (Vec::new(), Vec::new());
    for rep in 0..ctx.plan.batch_reps {
        for default_sampling in [false, true] {
            let prompts: Vec<Prompt> = (0..SAMPLING_AGENTS).map(|_| ctx.prompt(128)).collect::<Result<_, _>>()?;
            let prefix = format!("sampling-{}", ctx.seed());
            let sessions: Vec<String> = (0..SAMPLING_AGENTS).map(|i| format!("{prefix}-{i}")).collect();
            let r = run_batch_with(&target.client, &prompts, gen, &sessions, default_sampling)?;
            ctx.progress.step(&format!(
                "{}: {SAMPLING_AGENTS} agents, {} sampling, rep {}: {:.1} tok/s",
                target.name,
                if default_sampling { "default" } else { "greedy" },
                rep + 1,
                r.aggregate_tok_s
            ));
            settle(target, &prefix)?;
            if default_sampling { &mut default } else { &mut greedy }.push(r.aggregate_tok_s);
        }
    }
    let ratios: Vec<f64> = default.iter().zip(&greedy).map(|(d, g)| d / g).collect();
    Ok(Record::new(Group::Batching, "api_default_sampling", &target.name)
        .param("agents", SAMPLING_AGENTS)
        .param("prompt_tokens", 128)
        .param("gen_tokens", gen)
        .samples("greedy_tok_s", "tok/s", &greedy)
        .samples("default_tok_s", "tok/s", &default)
        .samples("default_over_greedy_x", "x", &ratios))
}

/// p50/p99 inter-token latency of one agent while another prefills
/// `plan.itl_prefill` tokens, against its median when alone; repeated.
pub fn itl_record(ctx: &mut Ctx, target: &Target) -> Result<Record, BenchError> {
    let mut runs = Vec::new();
    for rep in 0..ctx.plan.batch_reps {
        let short = ctx.prompt(128)?;
        let long = ctx.prompt(ctx.plan.itl_prefill)?;
        let prefix = format!("itl-{}", ctx.seed());
        let sessions = [Some(format!("{prefix}-a")), Some(format!("{prefix}-b"))];
        let r = itl_under_prefill(&target.client, &short, &long, ctx.plan.itl_decode_tokens, sessions)?;
        ctx.progress.step(&format!(
            "{}: ITL during a prefill, rep {}: p99 {:.1} ms",
            target.name,
            rep + 1,
            ms(r.p99_during)
        ));
        settle(target, &prefix)?;
        runs.push(r);
    }
    let f = |g: fn(&ItlRun) -> f64| runs.iter().map(g).collect::<Vec<f64>>();
    Ok(Record::new(Group::Batching, "itl_under_prefill", &target.name)
        .param("prefill_tokens", ctx.plan.itl_prefill)
        .samples("itl_p50_alone_ms", "ms", &f(|r| ms(r.p50_alone)))
        .samples("itl_p50_ms", "ms", &f(|r| ms(r.p50_during)))
        .samples("itl_p99_ms", "ms", &f(|r| ms(r.p99_during)))
        .samples("p99_over_p50_x", "x", &f(|r| ms(r.p99_during) / ms(r.p50_alone).max(1e-9))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gaps_during_the_prefill_count() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let t = ChatTiming {
            started: Some(start),
            ttft: ms(10),
            total: ms(100),
            gaps: vec![ms(10), ms(50), ms(10)],
            ..ChatTiming::default()
        };
        // tokens at 10, 20, 70, 80 ms; the prefill ran from 15 to 65 ms.
        assert_eq!(split_gaps(&t, start + ms(15), start + ms(65)), (vec![ms(10), ms(50)], vec![ms(10)]));
        // One long stall that spans the whole prefill still counts.
        assert_eq!(split_gaps(&t, start + ms(30), start + ms(60)), (vec![ms(50)], vec![ms(10), ms(10)]));
        assert_eq!(split_gaps(&ChatTiming::default(), start, start + ms(100)), (vec![], vec![]));
    }

    #[test]
    fn speedups_divide_by_the_one_agent_run_of_the_same_prompt() {
        let rec = |server: &str, agents: usize, prompt: usize, tps: f64| {
            Record::new(Group::Batching, "throughput", server)
                .param("agents", agents)
                .param("prompt_tokens", prompt)
                .value("aggregate_tok_s", "tok/s", tps)
        };
        let mut v =
            vec![rec("s", 1, 128, 100.0), rec("s", 3, 128, 250.0), rec("s", 3, 1024, 90.0), rec("o", 1, 128, 50.0)];
        add_speedups(&mut v, "s");
        assert_eq!(v[0].get("speedup_vs_1_x"), Some(1.0));
        assert_eq!(v[1].get("speedup_vs_1_x"), Some(2.5));
        assert_eq!(v[2].get("speedup_vs_1_x"), None);
        assert_eq!(v[3].get("speedup_vs_1_x"), None);
    }
}
