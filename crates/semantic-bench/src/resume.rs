//! Cache save, load and resume for 2K, 4K and 8K-token agents and each KV
//! codec, with the server's own timings of the disk write and read.
//!
//! ```text
//! f16 server:  per size: cold prefill (unique prompts, repeated; the last
//!              agent is the subject) -> same prompt again (hot, RAM)
//!              -> at the largest size: another agent decodes while the
//!                 subject's cache is written behind (engine stall)
//!              -> [evict to disk -> same prompt (load)] x disk_reps
//!              -> [evict -> drop page cache -> same prompt] where allowed
//!              restart (same cache dir) -> same prompt (warm after restart)
//! q8_0, q4_0:  restart with the codec -> one request per subject (rewrites
//!              its file in the codec) -> evict/load reps -> restart
//! ```
//! Every save sample is the persister's `last_save_ms` after the agent's
//! write-behind finished; every load sample is `last_load_ms` after a request
//! that had to read the file. TTFT is measured by the client (localhost).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::agents::{AgentState, AgentsApi};
use crate::batching::split_gaps;
use crate::client::{ChatCall, ChatTiming, Client};
use crate::context::{Ctx, Plan};
use crate::error::BenchError;
use crate::model::Prompt;
use crate::results::{Group, Record};
use crate::server::SemanticRunner;
use crate::stats::{median, median_duration, ms};

/// Tokens the agent decoding beside a save generates (outlasts an 8K save).
const STALL_DECODE_TOKENS: usize = 600;

/// Samples of one (codec, size).
#[derive(Clone, Debug, Default)]
pub struct CacheSamples {
    pub prompt_tokens: usize,
    pub save_ms: Vec<f64>,
    pub file_bytes: Vec<f64>,
    pub load_ms: Vec<f64>,
    pub load_ms_dropped: Vec<f64>,
    pub load_ms_restart: Vec<f64>,
    pub ttft_ram_ms: Vec<f64>,
    pub ttft_disk_ms: Vec<f64>,
    pub ttft_dropped_ms: Vec<f64>,
    pub ttft_restart_ms: Vec<f64>,
    pub decode_tok_s: Vec<f64>,
    /// Another agent's inter-token gaps: median when alone, longest while
    /// this cache is written behind.
    pub stall_p50_alone_ms: Vec<f64>,
    pub stall_max_during_save_ms: Vec<f64>,
    /// The server's longest engine-thread slice of that save (one turn).
    pub save_engine_max_ms: Vec<f64>,
}

/// Everything the cache benchmarks measured on one server.
#[derive(Clone, Debug, Default)]
pub struct ResumeOutcome {
    pub server: String,
    pub cold_ttft_ms: BTreeMap<usize, Vec<f64>>,
    pub samples: BTreeMap<(String, usize), CacheSamples>,
    pub notes: Vec<String>,
}

impl ResumeOutcome {
    pub fn new(server: &str) -> ResumeOutcome {
        ResumeOutcome { server: server.to_owned(), ..ResumeOutcome::default() }
    }

    pub fn at(&mut self, codec: &str, size: usize) -> &mut CacheSamples {
        self.samples.entry((codec.to_owned(), size)).or_default()
    }

    fn record(&self, name: &str, codec: &str, size: usize, s: &CacheSamples) -> Record {
        let mut r = Record::new(Group::Cache, name, &self.server)
            .param("codec", codec)
            .param("tokens", size)
            .param("size", Plan::size_label(size));
        if s.prompt_tokens > 0 {
            r = r.param("prompt_tokens", s.prompt_tokens);
        }
        r
    }

    pub fn save_records(&self) -> Vec<Record> {
        let mib = |v: &[f64]| v.iter().map(|b| b / 1048576.0).collect::<Vec<_>>();
        self.each(|(codec, size), s| {
            let rate: Vec<f64> = s.save_ms.iter().zip(&s.file_bytes).map(|(t, b)| b / 1048576.0 / (t / 1e3)).collect();
            self.record("cache_save_time", codec, *size, s)
                .samples("save_ms", "ms", &s.save_ms)
                .samples("file_mib", "MiB", &mib(&s.file_bytes))
                .samples("save_mib_s", "MiB/s", &rate)
        })
    }

    pub fn load_records(&self) -> Vec<Record> {
        self.each(|(codec, size), s| {
            self.record("cache_load_time", codec, *size, s)
                .samples("load_ms", "ms", &s.load_ms)
                .samples("load_ms_dropped_caches", "ms", &s.load_ms_dropped)
                .samples("load_ms_after_restart", "ms", &s.load_ms_restart)
        })
    }

    pub fn resume_records(&self) -> Vec<Record> {
        self.each(|(codec, size), s| {
            self.record("resume_generation_speed", codec, *size, s)
                .samples("ttft_warm_ram_ms", "ms", &s.ttft_ram_ms)
                .samples("ttft_warm_disk_ms", "ms", &s.ttft_disk_ms)
                .samples("ttft_dropped_caches_ms", "ms", &s.ttft_dropped_ms)
                .samples("ttft_after_restart_ms", "ms", &s.ttft_restart_ms)
                .samples("decode_tok_s_after_resume", "tok/s", &s.decode_tok_s)
        })
    }

    pub fn cold_vs_resume_records(&self) -> Vec<Record> {
        self.each(|(codec, size), s| {
            let cold = self.cold_ttft_ms.get(size).cloned().unwrap_or_default();
            let ratio = |warm: &[f64]| {
                if cold.is_empty() || warm.is_empty() {
                    f64::NAN
                } else {
                    median(&cold) / median(warm).max(1e-6)
                }
            };
            self.record("cold_start_vs_cache_resume", codec, *size, s)
                .samples("ttft_cold_ms", "ms", &cold)
                .samples("ttft_warm_disk_ms", "ms", &s.ttft_disk_ms)
                .value("speedup_disk_x", "x", ratio(&s.ttft_disk_ms))
                .value("speedup_ram_x", "x", ratio(&s.ttft_ram_ms))
                .value("speedup_after_restart_x", "x", ratio(&s.ttft_restart_ms))
        })
    }

    /// How much the write-behind of a cache slows another agent's decoding.
    pub fn stall_records(&self) -> Vec<Record> {
        self.each(|(codec, size), s| {
            let stall: Vec<f64> =
                s.stall_max_during_save_ms.iter().zip(&s.stall_p50_alone_ms).map(|(max, p50)| max - p50).collect();
            self.record("cache_save_stall", codec, *size, s)
                .samples("itl_p50_alone_ms", "ms", &s.stall_p50_alone_ms)
                .samples("itl_max_during_save_ms", "ms", &s.stall_max_during_save_ms)
                .samples("stall_ms", "ms", &stall)
                .samples("engine_slice_max_ms", "ms", &s.save_engine_max_ms)
        })
    }

    pub fn records(&self) -> Vec<Record> {
        let mut v = self.save_records();
        v.extend(self.stall_records());
        v.extend(self.load_records());
        v.extend(self.resume_records());
        v.extend(self.cold_vs_resume_records());
        v
    }

    fn each(&self, f: impl Fn(&(String, usize), &CacheSamples) -> Record) -> Vec<Record> {
        self.samples.iter().map(|(k, s)| f(k, s)).filter(|r| !r.values.is_empty()).collect()
    }
}

/// Drops the kernel's page cache (root only); false where not allowed.
pub fn drop_page_cache() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

pub(crate) fn chat(client: &Client, id: Option<&str>, p: &Prompt, gen: usize) -> Result<ChatTiming, BenchError> {
    let call = ChatCall {
        session: id.map(str::to_owned),
        system: p.system.clone(),
        user: p.user.clone(),
        max_tokens: gen,
        ignore_eos: true,
        ..ChatCall::default()
    };
    Ok(client.chat(&call)?)
}

/// The agent whose cache the size's measurements reuse.
struct Subject {
    size: usize,
    id: String,
    prompt: Prompt,
    last_save: Option<f64>,
}

struct Run<'x, 'a> {
    ctx: &'x mut Ctx<'a>,
    out: ResumeOutcome,
    can_drop: bool,
}

impl Run<'_, '_> {
    /// One request of the subject: waits for its write-behind and records
    /// the save it caused. Returns the timing and the agent after the save.
    fn request(
        &mut self,
        client: &Client,
        codec: &str,
        s: &mut Subject,
    ) -> Result<(ChatTiming, AgentState), BenchError> {
        let api = AgentsApi::new(client);
        api.quiesce()?;
        let t = chat(client, Some(&s.id), &s.prompt, self.ctx.plan.resume_gen)?;
        if t.generated() < self.ctx.plan.resume_gen {
            let n = format!(
                "{codec} {}: some resumed requests stopped before {} tokens (EOS: `ignore_eos` not honoured?)",
                Plan::size_label(s.size),
                self.ctx.plan.resume_gen
            );
            if !self.out.notes.contains(&n) {
                self.out.notes.push(n);
            }
        }
        if t.cached_tokens + 16 < t.prompt_tokens {
            self.out.notes.push(format!(
                "{} {codec}: resume reused only {} of {} tokens",
                s.id, t.cached_tokens, t.prompt_tokens
            ));
        }
        let a = api.wait_persisted(&s.id)?;
        if a.last_save_ms.is_some() && a.last_save_ms != s.last_save {
            s.last_save = a.last_save_ms;
            let at = self.out.at(codec, s.size);
            at.save_ms.push(a.last_save_ms.unwrap_or_default());
            at.file_bytes.push(a.last_save_bytes.unwrap_or(a.disk_bytes) as f64);
        }
        Ok((t, a))
    }

    fn cold(&mut self, client: &Client, size: usize) -> Result<Subject, BenchError> {
        let api = AgentsApi::new(client);
        let mut subject = None;
        for rep in 0..self.ctx.plan.cold_reps {
            let prompt = self.ctx.prompt(size)?;
            let id = format!("resume-{}-{}", Plan::size_label(size), self.ctx.seed());
            api.quiesce()?;
            let t = chat(client, Some(&id), &prompt, self.ctx.plan.resume_gen)?;
            self.out.cold_ttft_ms.entry(size).or_default().push(ms(t.ttft));
            self.out.at("f16", size).prompt_tokens = t.prompt_tokens;
            self.ctx.progress.step(&format!(
                "cold prefill {}, rep {}: TTFT {:.0} ms",
                Plan::size_label(size),
                rep + 1,
                ms(t.ttft)
            ));
            if let Some(old) = subject.replace(Subject { size, id, prompt, last_save: None }) {
                api.delete(&old.id, false)?;
            }
        }
        subject.ok_or_else(|| BenchError::Unexpected("no cold repetitions planned".into()))
    }

    fn hot(&mut self, client: &Client, s: &mut Subject) -> Result<(), BenchError> {
        for _ in 0..self.ctx.plan.hot_reps {
            let (t, _) = self.request(client, "f16", s)?;
            self.out.at("f16", s.size).ttft_ram_ms.push(ms(t.ttft));
            self.ctx.progress.step(&format!("warm (RAM) {}: TTFT {:.1} ms", Plan::size_label(s.size), ms(t.ttft)));
        }
        Ok(())
    }

    /// Evict, then load through a request; `dropped` also empties the page cache first.
    fn disk(&mut self, client: &Client, codec: &str, s: &mut Subject, dropped: bool) -> Result<(), BenchError> {
        let reps = if dropped { self.ctx.plan.dropped_cache_reps } else { self.ctx.plan.disk_reps };
        for _ in 0..reps {
            AgentsApi::new(client).evict(&s.id)?;
            if dropped && !drop_page_cache() {
                self.can_drop = false;
                return Ok(());
            }
            let (t, a) = self.request(client, codec, s)?;
            let load = a.last_load_ms.unwrap_or(f64::NAN);
            let at = self.out.at(codec, s.size);
            if dropped {
                at.load_ms_dropped.push(load);
                at.ttft_dropped_ms.push(ms(t.ttft));
            } else {
                at.load_ms.push(load);
                at.ttft_disk_ms.push(ms(t.ttft));
                if t.decode_tok_s() > 0.0 {
                    at.decode_tok_s.push(t.decode_tok_s());
                }
            }
            let what = if dropped { "load after dropping the page cache" } else { "load" };
            self.ctx.progress.step(&format!(
                "{codec} {} {what}: {load:.1} ms, TTFT {:.1} ms",
                Plan::size_label(s.size),
                ms(t.ttft)
            ));
        }
        Ok(())
    }

    /// Restarts the server with `codec` and resumes every subject once.
    fn restart(
        &mut self,
        runner: &mut SemanticRunner,
        codec: &str,
        subjects: &mut [Subject],
    ) -> Result<(), BenchError> {
        for _ in 0..self.ctx.plan.restarts {
            let client = runner.start(codec)?.client();
            for s in subjects.iter_mut() {
                let (t, a) = self.request(&client, codec, s)?;
                let at = self.out.at(codec, s.size);
                at.ttft_restart_ms.push(ms(t.ttft));
                at.load_ms_restart.push(a.last_load_ms.unwrap_or(f64::NAN));
                self.ctx.progress.step(&format!(
                    "{codec} {} after restart: TTFT {:.1} ms",
                    Plan::size_label(s.size),
                    ms(t.ttft)
                ));
            }
        }
        Ok(())
    }

    /// Another agent decodes while `s` (just used, so dirty) is written
    /// behind: its longest gap during the write against its median.
    fn save_stall(&mut self, client: &Client, s: &mut Subject) -> Result<(), BenchError> {
        let api = AgentsApi::new(client);
        for _ in 0..self.ctx.plan.disk_reps {
            api.quiesce()?;
            let p = self.ctx.prompt(128)?;
            let id = format!("stall-{}", self.ctx.seed());
            let (t, saved, from, to) = std::thread::scope(|sc| -> Result<_, BenchError> {
                let decoder = sc.spawn(|| chat(client, Some(&id), &p, STALL_DECODE_TOKENS));
                std::thread::sleep(Duration::from_millis(500));
                chat(client, Some(&s.id), &s.prompt, 1)?;
                let from = Instant::now();
                let saved = api.wait_persisted(&s.id)?;
                let to = Instant::now();
                Ok((decoder.join().expect("decoder thread")?, saved, from, to))
            })?;
            let (during, alone) = split_gaps(&t, from, to);
            let (Some(max), false) = (during.iter().max(), alone.is_empty()) else {
                self.out.notes.push("save stall: the decoding agent ended before the save; decode longer".into());
                continue;
            };
            let at = self.out.at("f16", s.size);
            at.stall_p50_alone_ms.push(ms(median_duration(&alone)));
            at.stall_max_during_save_ms.push(ms(*max));
            at.save_engine_max_ms.extend(saved.last_save_engine_max_ms);
            self.ctx.progress.step(&format!(
                "{} save beside a decoding agent: longest gap {:.1} ms",
                Plan::size_label(s.size),
                ms(*max)
            ));
            api.delete(&id, false)?;
        }
        Ok(())
    }

    fn codec_pass(&mut self, client: &Client, codec: &str, subjects: &mut [Subject]) -> Result<(), BenchError> {
        let largest = subjects.iter().map(|s| s.size).max();
        for s in subjects.iter_mut() {
            if codec == "f16" {
                self.hot(client, s)?;
                if Some(s.size) == largest {
                    self.save_stall(client, s)?;
                }
            } else {
                // Loads the file of the previous codec and rewrites it in this one.
                self.request(client, codec, s)?;
                self.out.at(codec, s.size).prompt_tokens = s.prompt.tokens;
            }
            self.disk(client, codec, s, false)?;
            if self.can_drop {
                self.disk(client, codec, s, true)?;
            }
        }
        Ok(())
    }
}

/// Steps [`semantic_resume`] reports to the progress sink.
pub fn semantic_steps(plan: &Plan) -> u64 {
    let sizes = plan.cache_sizes.len();
    let per_codec = plan.disk_reps + plan.dropped_cache_reps + plan.restarts;
    (sizes * (plan.cold_reps + plan.hot_reps + plan.codecs.len() * per_codec) + plan.disk_reps) as u64
}

/// The whole cache benchmark against `semantic` (see the module docs). The
/// runner must point at an empty cache directory; it is left stopped.
pub fn semantic_resume(ctx: &mut Ctx, runner: &mut SemanticRunner) -> Result<ResumeOutcome, BenchError> {
    let mut run = Run { ctx, out: ResumeOutcome::new("semantic"), can_drop: true };
    let codecs = run.ctx.plan.codecs.clone();
    let first = codecs.first().copied().unwrap_or("f16");
    let client = runner.start(first)?.client();
    let mut subjects = Vec::new();
    for size in run.ctx.plan.cache_sizes.clone() {
        subjects.push(run.cold(&client, size)?);
    }
    for (i, codec) in codecs.iter().enumerate() {
        let client = if i == 0 { client.clone() } else { runner.start(codec)?.client() };
        run.codec_pass(&client, codec, &mut subjects)?;
        run.restart(runner, codec, &mut subjects)?;
    }
    runner.stop();
    if !run.can_drop {
        run.out.notes.push("dropping the page cache is not permitted here: no cold-disk load times".into());
    }
    Ok(run.out)
}

/// Cold and warm (same prompt again) TTFT at every cache size against any
/// OpenAI-compatible server (`--target`): what needs no agents API.
pub fn http_ttft(ctx: &mut Ctx, target: &crate::context::Target) -> Result<ResumeOutcome, BenchError> {
    let mut out = ResumeOutcome::new(&target.name);
    for size in ctx.plan.cache_sizes.clone() {
        let mut last = None;
        for _ in 0..ctx.plan.cold_reps {
            let (p, id) = (ctx.prompt(size)?, format!("ttft-{}", ctx.seed()));
            let t = chat(&target.client, Some(&id), &p, ctx.plan.resume_gen)?;
            out.cold_ttft_ms.entry(size).or_default().push(ms(t.ttft));
            out.at("f16", size).prompt_tokens = t.prompt_tokens;
            ctx.progress.step(&format!("{}: cold {}: TTFT {:.0} ms", target.name, Plan::size_label(size), ms(t.ttft)));
            last = Some((p, id));
        }
        let Some((p, id)) = last else { continue };
        for _ in 0..ctx.plan.hot_reps {
            let t = chat(&target.client, Some(&id), &p, ctx.plan.resume_gen)?;
            out.at("f16", size).ttft_ram_ms.push(ms(t.ttft));
            if t.decode_tok_s() > 0.0 {
                out.at("f16", size).decode_tok_s.push(t.decode_tok_s());
            }
            ctx.progress.step(&format!("{}: warm {}: TTFT {:.1} ms", target.name, Plan::size_label(size), ms(t.ttft)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_medians_speedups_and_units() {
        let mut o = ResumeOutcome::new("semantic");
        o.cold_ttft_ms.insert(2048, vec![2000.0, 2200.0]);
        let s = o.at("f16", 2048);
        s.prompt_tokens = 2048;
        s.save_ms = vec![20.0, 30.0, 25.0];
        s.file_bytes = vec![46_137_344.0; 3];
        s.load_ms = vec![8.0, 10.0];
        s.ttft_disk_ms = vec![20.0, 22.0];
        s.ttft_ram_ms = vec![10.0];
        let recs = o.records();
        assert_eq!(recs.len(), 4, "no stall record without stall samples");
        let save = &recs[0];
        assert_eq!(
            (save.name.as_str(), save.param_str("codec"), save.param_str("size")),
            ("cache_save_time", Some("f16"), Some("2K"))
        );
        assert_eq!(save.get("save_ms"), Some(25.0));
        assert_eq!(save.get("file_mib"), Some(44.0));
        let cmp = recs.iter().find(|r| r.name == "cold_start_vs_cache_resume").unwrap();
        assert_eq!(cmp.get("speedup_disk_x"), Some(100.0));
        assert_eq!(cmp.get("speedup_ram_x"), Some(210.0));
        assert_eq!(cmp.get("speedup_after_restart_x"), None);
        assert_eq!(cmp.metric("ttft_cold_ms").unwrap().unit, "ms");
    }

    #[test]
    fn step_count_matches_the_plan() {
        let p = Plan::new(true);
        assert_eq!(semantic_steps(&p), 2 * (1 + 2 + 3 * (2 + 1 + 1)) + 2);
    }
}
