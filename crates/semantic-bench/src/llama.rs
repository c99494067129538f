//! The same measurements against llama.cpp's `llama-server`, where they
//! apply: throughput with `-np N` for N agents, inter-token latency during a
//! prefill, slot save/restore (`--slot-save-path`, `POST /slots/0?action=`)
//! as its cache save/load, and RSS with N filled slots.
//!
//! llama.cpp restores a slot by an explicit call, not inside the request, so
//! its "warm from disk" TTFT is the restore round trip plus the request's TTFT.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::batching;
use crate::client::{ChatCall, ChatTiming, Client};
use crate::context::{Ctx, Plan, Target};
use crate::error::BenchError;
use crate::memory::{MemoryOutcome, Snapshot};
use crate::model::Prompt;
use crate::results::Record;
use crate::resume::{drop_page_cache, ResumeOutcome};
use crate::server::{LlamaLaunch, ServerProcess};
use crate::stats::ms;

pub const NAME: &str = "llama-server";

/// How to start llama-server for each scenario.
#[derive(Clone, Debug)]
pub struct Llama {
    pub bin: PathBuf,
    pub model: PathBuf,
    pub threads: usize,
    pub work_dir: PathBuf,
}

impl Llama {
    pub fn launch(&self, slots: usize, ctx_per_slot: usize, slot_dir: Option<&Path>) -> LlamaLaunch {
        LlamaLaunch {
            bin: self.bin.clone(),
            model: self.model.clone(),
            slots,
            ctx: slots * ctx_per_slot,
            threads: self.threads,
            slot_save_path: slot_dir.map(Path::to_owned),
            log: self.work_dir.join(format!("llama-np{slots}.log")),
        }
    }

    fn target(server: &ServerProcess) -> Target {
        Target { name: NAME.into(), client: server.client(), has_agents_api: false }
    }

    /// Throughput at every agent count, a server with `-np N` each.
    pub fn batching(&self, ctx: &mut Ctx) -> Result<Vec<Record>, BenchError> {
        let longest = ctx.plan.batch_prompts.iter().copied().max().unwrap_or(128);
        let per_slot = longest + ctx.plan.batch_gen + 64;
        let mut out = Vec::new();
        for n in ctx.plan.agents.clone() {
            let server = self.launch(n, per_slot, None).start()?;
            let target = Self::target(&server);
            batching::warm_up(ctx, &target)?;
            for p in ctx.plan.batch_prompts.clone() {
                out.push(batching::throughput(ctx, &target, n, p)?);
            }
        }
        batching::add_speedups(&mut out, NAME);
        Ok(out)
    }

    /// Inter-token latency of one slot while the other prefills (`-np 2`).
    pub fn itl(&self, ctx: &mut Ctx) -> Result<Record, BenchError> {
        let server = self.launch(2, ctx.plan.itl_prefill + ctx.plan.itl_decode_tokens + 128, None).start()?;
        let target = Self::target(&server);
        batching::warm_up(ctx, &target)?;
        batching::itl_record(ctx, &target)
    }

    /// Cold, hot, restored and restarted TTFT, and save/restore timings of
    /// slot 0 at every cache size.
    pub fn resume(&self, ctx: &mut Ctx) -> Result<ResumeOutcome, BenchError> {
        let slot_dir = self.work_dir.join("llama-slots");
        std::fs::create_dir_all(&slot_dir).map_err(|e| BenchError::io("creating", &slot_dir, e))?;
        let per_slot = ctx.plan.cache_sizes.iter().copied().max().unwrap_or(2048) + ctx.plan.resume_gen + 64;
        let launch = self.launch(1, per_slot, Some(&slot_dir));
        let mut run = SlotRun { ctx, out: ResumeOutcome::new(NAME), can_drop: true };
        let mut kept: Vec<(usize, Prompt)> = Vec::new();
        {
            let server = launch.start()?;
            let client = server.client();
            for size in run.ctx.plan.cache_sizes.clone() {
                kept.push((size, run.size_pass(&client, size)?));
            }
        }
        for _ in 0..run.ctx.plan.restarts {
            let server = launch.start()?;
            for (size, prompt) in &kept {
                run.restore_and_resume(&server.client(), *size, prompt, Phase::Restart)?;
            }
        }
        Ok(run.out)
    }

    /// RSS with 1, 5 and 10 filled slots of `memory_tokens`, over the RSS of
    /// a one-slot server of the same per-slot context.
    pub fn memory(&self, ctx: &mut Ctx) -> Result<MemoryOutcome, BenchError> {
        let per_slot = ctx.plan.memory_tokens + 64;
        let base = self.launch(1, per_slot, None).start()?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        let rss_base = base.rss_bytes().unwrap_or(0);
        drop(base);
        let max = ctx.plan.memory_agents.iter().copied().max().unwrap_or(1);
        let server = self.launch(max, per_slot, None).start()?;
        let mut out = MemoryOutcome {
            server: NAME.into(),
            rss_ready: server.rss_bytes().unwrap_or(0),
            rss_base,
            ..Default::default()
        };
        out.notes.push(format!(
            "llama-server allocates the KV of all {max} slots (-np {max}) at start; growth is over a 1-slot server"
        ));
        for i in 1..=max {
            let p = ctx.prompt(ctx.plan.memory_tokens)?;
            chat(&server.client(), &p, 16, i - 1)?;
            if ctx.plan.memory_agents.contains(&i) {
                let rss = server.rss_bytes().unwrap_or(0);
                ctx.progress.step(&format!("llama-server, {i} slots filled: RSS {:.0} MiB", rss as f64 / 1048576.0));
                out.rows.push(Snapshot { agents: i, rss, ..Snapshot::default() });
            }
        }
        Ok(out)
    }
}

fn chat(client: &Client, p: &Prompt, gen: usize, slot: usize) -> Result<ChatTiming, BenchError> {
    let call = ChatCall {
        session: None,
        system: p.system.clone(),
        user: p.user.clone(),
        max_tokens: gen,
        ignore_eos: true,
        slot: Some(slot),
        default_sampling: false,
    };
    Ok(client.chat(&call)?)
}

/// `POST /slots/0?action=...`: the response and its client round trip (ms).
fn slot_action(client: &Client, action: &str, file: Option<&str>) -> Result<(Value, f64), BenchError> {
    let body = file.map_or(json!({}), |f| json!({ "filename": f }));
    let t = Instant::now();
    let v = client.post_json(&format!("/slots/0?action={action}"), &body)?;
    Ok((v, ms(t.elapsed())))
}

fn timing(v: &Value, key: &str) -> Result<f64, BenchError> {
    v["timings"][key]
        .as_f64()
        .ok_or_else(|| BenchError::Unexpected(format!("llama-server slot response lacks timings.{key}: {v}")))
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Disk,
    Dropped,
    Restart,
}

struct SlotRun<'x, 'a> {
    ctx: &'x mut Ctx<'a>,
    out: ResumeOutcome,
    can_drop: bool,
}

fn file_name(size: usize) -> String {
    format!("slot-{size}.bin")
}

impl SlotRun<'_, '_> {
    /// Cold runs, hot runs, save/restore runs at one size; returns the
    /// prompt whose slot file stays on disk.
    fn size_pass(&mut self, client: &Client, size: usize) -> Result<Prompt, BenchError> {
        let label = Plan::size_label(size);
        let gen = self.ctx.plan.resume_gen;
        let mut prompt = None;
        for rep in 0..self.ctx.plan.cold_reps {
            slot_action(client, "erase", None)?;
            let p = self.ctx.prompt(size)?;
            let t = chat(client, &p, gen, 0)?;
            self.out.cold_ttft_ms.entry(size).or_default().push(ms(t.ttft));
            self.out.at("f16", size).prompt_tokens = t.prompt_tokens;
            self.ctx.progress.step(&format!(
                "llama-server cold prefill {label}, rep {}: TTFT {:.0} ms",
                rep + 1,
                ms(t.ttft)
            ));
            prompt = Some(p);
        }
        let prompt = prompt.ok_or_else(|| BenchError::Unexpected("no cold repetitions planned".into()))?;
        for _ in 0..self.ctx.plan.hot_reps {
            let t = chat(client, &prompt, gen, 0)?;
            self.out.at("f16", size).ttft_ram_ms.push(ms(t.ttft));
            self.ctx.progress.step(&format!("llama-server warm (slot cache) {label}: TTFT {:.1} ms", ms(t.ttft)));
        }
        for _ in 0..self.ctx.plan.disk_reps {
            self.restore_and_resume(client, size, &prompt, Phase::Disk)?;
        }
        for _ in 0..self.ctx.plan.dropped_cache_reps {
            if self.can_drop {
                self.restore_and_resume(client, size, &prompt, Phase::Dropped)?;
            }
        }
        Ok(prompt)
    }

    /// Save (except after a restart), erase, restore, then the same prompt.
    fn restore_and_resume(
        &mut self,
        client: &Client,
        size: usize,
        prompt: &Prompt,
        phase: Phase,
    ) -> Result<(), BenchError> {
        let file = file_name(size);
        if phase != Phase::Restart {
            let (v, _) = slot_action(client, "save", Some(&file))?;
            let at = self.out.at("f16", size);
            at.save_ms.push(timing(&v, "save_ms")?);
            at.file_bytes.push(v["n_written"].as_f64().unwrap_or(f64::NAN));
            slot_action(client, "erase", None)?;
        }
        if phase == Phase::Dropped && !drop_page_cache() {
            self.can_drop = false;
            return Ok(());
        }
        let (v, round_trip) = slot_action(client, "restore", Some(&file))?;
        let restore = timing(&v, "restore_ms")?;
        let t = chat(client, prompt, self.ctx.plan.resume_gen, 0)?;
        let ttft = round_trip + ms(t.ttft);
        let at = self.out.at("f16", size);
        match phase {
            Phase::Disk => {
                at.load_ms.push(restore);
                at.ttft_disk_ms.push(ttft);
                if t.decode_tok_s() > 0.0 {
                    at.decode_tok_s.push(t.decode_tok_s());
                }
            }
            Phase::Dropped => {
                at.load_ms_dropped.push(restore);
                at.ttft_dropped_ms.push(ttft);
            }
            Phase::Restart => {
                at.load_ms_restart.push(restore);
                at.ttft_restart_ms.push(ttft);
            }
        }
        let label = Plan::size_label(size);
        self.ctx.progress.step(&format!("llama-server restore {label}: {restore:.1} ms, restore + TTFT {ttft:.1} ms"));
        Ok(())
    }
}

/// Steps of [`Llama::resume`].
pub fn resume_steps(plan: &Plan) -> u64 {
    (plan.cache_sizes.len()
        * (plan.cold_reps + plan.hot_reps + plan.disk_reps + plan.dropped_cache_reps + plan.restarts)) as u64
}
