//! Memory: RSS and KV bytes with 1, 5 and 10 agents, block padding, KV
//! cache size against the model's, measured against theoretical bytes per
//! token, and a leak check over create/use/delete cycles.
//!
//! Runs on a fresh server so RSS growth is the agents' alone: the KV pool is
//! reserved but only touched pages count, so growth = blocks written.
//! Snapshots are taken once the write-behind is idle (its copies of the KV
//! are transient).

use std::path::Path;

use crate::agents::{AgentState, AgentsApi};
use crate::client::Client;
use crate::context::Ctx;
use crate::error::BenchError;
use crate::results::{Group, Record};
use crate::resume::chat;
use crate::server::ServerProcess;

const MIB: f64 = 1048576.0;

/// The server with `agents` agents cached.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub agents: usize,
    pub rss: u64,
    /// Pool bytes of the agents (whole blocks).
    pub kv_bytes: u64,
    pub disk_bytes: u64,
    pub tokens: u64,
    pub used_blocks: u64,
}

#[derive(Clone, Debug, Default)]
pub struct MemoryOutcome {
    pub server: String,
    pub rss_ready: u64,
    /// After a warm-up request (scratch buffers allocated), no agent cached.
    pub rss_base: u64,
    pub rows: Vec<Snapshot>,
    /// (tokens, pool bytes) of agents with odd lengths.
    pub padding: Vec<(u64, u64)>,
    pub block_bytes: u64,
    /// The whole KV pool (`--kv-pool-mb`); 0 when unknown.
    pub pool_bytes: u64,
    pub theory_per_token: u64,
    pub model_file_bytes: u64,
    /// Attached to the first per-agent record.
    pub notes: Vec<String>,
}

fn snapshot(server: &ServerProcess, prefix: &str, agents: usize) -> Result<Snapshot, BenchError> {
    let client = server.client();
    let api = AgentsApi::new(&client);
    api.quiesce()?;
    let list: Vec<AgentState> = api.list()?.into_iter().filter(|a| a.id.starts_with(prefix)).collect();
    Ok(Snapshot {
        agents,
        rss: server.rss_bytes().unwrap_or(0),
        kv_bytes: list.iter().map(|a| a.bytes).sum(),
        disk_bytes: list.iter().map(|a| a.disk_bytes).sum(),
        tokens: list.iter().map(|a| a.tokens as u64).sum(),
        used_blocks: api.pool()?.used_blocks(),
    })
}

/// Creates agents one by one and snapshots after each count of the plan.
pub fn semantic_memory(ctx: &mut Ctx, server: &ServerProcess) -> Result<MemoryOutcome, BenchError> {
    let client = server.client();
    let api = AgentsApi::new(&client);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let block_bytes = api.block_bytes()?;
    let mut out = MemoryOutcome {
        server: "semantic".into(),
        rss_ready: server.rss_bytes().unwrap_or(0),
        block_bytes,
        pool_bytes: api.pool()?.pool_blocks * block_bytes,
        theory_per_token: ctx.model.shape.kv_bytes_per_token_f16(),
        model_file_bytes: ctx.model.file_bytes,
        ..MemoryOutcome::default()
    };
    let p = ctx.prompt(256)?;
    chat(&client, Some("memwarm"), &p, 8)?;
    api.quiesce()?;
    api.delete("memwarm", false)?;
    out.rss_base = snapshot(server, "mem-", 0)?.rss;
    let max = ctx.plan.memory_agents.iter().copied().max().unwrap_or(0);
    for i in 1..=max {
        let p = ctx.prompt(ctx.plan.memory_tokens)?;
        chat(&client, Some(&format!("mem-{i:02}")), &p, 16)?;
        if ctx.plan.memory_agents.contains(&i) {
            let s = snapshot(server, "mem-", i)?;
            ctx.progress.step(&format!(
                "{i} agents: RSS {:.0} MiB, KV {:.0} MiB",
                s.rss as f64 / MIB,
                s.kv_bytes as f64 / MIB
            ));
            out.rows.push(s);
        }
    }
    for &len in &ctx.plan.padding_lengths {
        let p = ctx.prompt(len)?;
        let id = format!("pad-{len}");
        chat(&client, Some(&id), &p, 1)?;
        if let Some(a) = api.agent(&id)? {
            out.padding.push((a.tokens as u64, a.bytes));
        }
    }
    ctx.progress.step("block padding");
    Ok(out)
}

impl MemoryOutcome {
    /// The pool's pages were resident before any agent (a pool touched at
    /// start-up): RSS growth then misses the KV, which the pool blocks count.
    pub fn pool_resident(&self) -> bool {
        self.pool_bytes > 0 && self.rss_ready >= self.pool_bytes
    }

    fn rss_per_agent(&self, s: &Snapshot) -> f64 {
        s.rss.saturating_sub(self.rss_base) as f64 / MIB / s.agents.max(1) as f64
    }

    /// RSS growth per agent, plus its pool blocks when the pool was resident.
    fn memory_per_agent(&self, s: &Snapshot) -> f64 {
        let kv = if self.pool_resident() { s.kv_bytes as f64 / MIB / s.agents.max(1) as f64 } else { 0.0 };
        self.rss_per_agent(s) + kv
    }

    pub fn per_agent_records(&self) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .rows
            .iter()
            .map(|s| {
                let r = Record::new(Group::Memory, "memory_per_agent", &self.server)
                    .param("agents", s.agents)
                    .value("rss_mib", "MiB", s.rss as f64 / MIB)
                    .value("rss_growth_mib", "MiB", s.rss.saturating_sub(self.rss_base) as f64 / MIB)
                    .value("rss_per_agent_mib", "MiB", self.rss_per_agent(s))
                    .value("memory_per_agent_mib", "MiB", self.memory_per_agent(s));
                if s.tokens == 0 {
                    // A server without the agents API: RSS only.
                    return r;
                }
                r.value("kv_mib", "MiB", s.kv_bytes as f64 / MIB)
                    .value("kv_per_agent_mib", "MiB", s.kv_bytes as f64 / MIB / s.agents.max(1) as f64)
                    .value("tokens", "tokens", s.tokens as f64)
                    .value("used_blocks", "blocks", s.used_blocks as f64)
            })
            .collect();
        if let Some(first) = v.first_mut() {
            for n in std::iter::once(self.resident_note()).chain(self.notes.iter().cloned()) {
                *first = first.clone().note(n);
            }
        }
        v
    }

    pub fn padding_record(&self) -> Record {
        let per_token = self.theory_per_token.max(1) as f64;
        let pct: Vec<f64> =
            self.padding.iter().map(|&(t, b)| (b as f64 / per_token / t.max(1) as f64 - 1.0) * 100.0).collect();
        let (tokens, bytes) = self.padding.iter().fold((0u64, 0u64), |(t, b), p| (t + p.0, b + p.1));
        let block_tokens = (self.block_bytes as f64 / per_token).round();
        Record::new(Group::Memory, "block_padding_overhead", &self.server)
            .param("block_tokens", block_tokens as u64)
            .samples("overhead_pct_per_agent", "%", &pct)
            .value("used_token_slots", "tokens", tokens as f64)
            .value("allocated_token_slots", "tokens", bytes as f64 / per_token)
            .value("overhead_pct_total", "%", (bytes as f64 / per_token / tokens.max(1) as f64 - 1.0) * 100.0)
            .note(format!("agents of {:?} tokens", self.padding.iter().map(|p| p.0).collect::<Vec<_>>()))
    }

    pub fn ratio_record(&self) -> Option<Record> {
        let last = self.rows.last()?;
        let kv_per_agent = last.kv_bytes as f64 / last.agents.max(1) as f64;
        let model = self.model_file_bytes as f64;
        let tokens_per_agent = last.tokens as f64 / last.agents.max(1) as f64;
        Some(
            Record::new(Group::Memory, "cache_vs_model_memory_ratio", &self.server)
                .param("tokens_per_agent", tokens_per_agent.round() as u64)
                .value("model_file_mib", "MiB", model / MIB)
                .value("rss_at_ready_mib", "MiB", self.rss_ready as f64 / MIB)
                .value("kv_per_agent_mib", "MiB", kv_per_agent / MIB)
                .value("kv_per_agent_over_model_x", "x", kv_per_agent / model)
                .value("kv_8k_tokens_over_model_x", "x", 8192.0 * self.theory_per_token as f64 / model)
                .value("kv_all_agents_over_model_x", "x", last.kv_bytes as f64 / model),
        )
    }

    /// Bytes per cached token: the pool's (blocks / tokens), RSS growth from
    /// the first to the last snapshot over the tokens added, the file's, and
    /// the measured total (RSS growth, plus the pool's when it was resident).
    pub fn theory_record(&self) -> Option<Record> {
        let (first, last) = (self.rows.first()?, self.rows.last()?);
        let theory = self.theory_per_token as f64;
        let pool = last.kv_bytes as f64 / last.tokens.max(1) as f64;
        let (dt, dr) = (last.tokens.saturating_sub(first.tokens), last.rss.saturating_sub(first.rss));
        let rss = if dt > 0 {
            dr as f64 / dt as f64
        } else {
            last.rss.saturating_sub(self.rss_base) as f64 / last.tokens.max(1) as f64
        };
        let disk = last.disk_bytes as f64 / last.tokens.max(1) as f64;
        let measured = if self.pool_resident() { pool + rss } else { rss };
        let pct = |v: f64| (v / theory - 1.0) * 100.0;
        Some(
            Record::new(Group::Memory, "actual_vs_theoretical_memory", &self.server)
                .param("agents", last.agents)
                .value("theory_bytes_per_token", "B", theory)
                .value("pool_bytes_per_token", "B", pool)
                .value("rss_bytes_per_token", "B", rss)
                .value("disk_bytes_per_token", "B", disk)
                .value("measured_bytes_per_token", "B", measured)
                .value("measured_overhead_pct", "%", pct(measured))
                .value("pool_overhead_pct", "%", pct(pool))
                .value("rss_overhead_pct", "%", pct(rss))
                .value("disk_overhead_pct", "%", pct(disk)),
        )
    }

    fn resident_note(&self) -> String {
        if !self.pool_resident() {
            return String::new();
        }
        format!(
            "the KV pool ({:.0} MiB) was resident at start (RSS at ready {:.0} MiB): memory per agent = its pool blocks + RSS growth",
            self.pool_bytes as f64 / MIB,
            self.rss_ready as f64 / MIB
        )
    }

    pub fn records(&self) -> Vec<Record> {
        let mut v = self.per_agent_records();
        if !self.padding.is_empty() {
            v.push(self.padding_record());
        }
        v.extend(self.ratio_record());
        v.extend(self.theory_record());
        v
    }
}

/// RSS growth from the middle sample to the last one (samples every 10 cycles).
pub fn second_half_growth(rss_mib: &[f64]) -> f64 {
    // Growth per sampling interval over the second half, less the largest
    // one: a leak grows in every interval, a one-time step (an allocator
    // raising a threshold) in one.
    let half = rss_mib.get(rss_mib.len() / 2..).unwrap_or(&[]);
    let steps: Vec<f64> = half.windows(2).map(|w| w[1] - w[0]).collect();
    let largest = steps.iter().copied().fold(0.0, f64::max);
    steps.iter().sum::<f64>() - largest
}

/// Agent cache files under a cache directory (not quarantined ones).
pub fn count_cache_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "quarantine") {
                count_cache_files(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "safetensors"))
            }
        })
        .sum()
}

/// 50 cycles of: new agent, a second request that reuses its cache, delete.
/// Then pool blocks, agents and cache files must be back where they were,
/// and RSS flat after the first cycles.
pub fn leak_check(ctx: &mut Ctx, server: &ServerProcess, cache_dir: &Path) -> Result<Record, BenchError> {
    let client: Client = server.client();
    let api = AgentsApi::new(&client);
    api.quiesce()?;
    let ids =
        |api: &AgentsApi| -> Result<Vec<String>, BenchError> { Ok(api.list()?.into_iter().map(|a| a.id).collect()) };
    let (blocks0, agents0, files0) = (api.pool()?.used_blocks(), ids(&api)?, count_cache_files(cache_dir));
    let rss0 = server.rss_bytes().unwrap_or(0);
    let mut rss = Vec::new();
    let cycles = ctx.plan.leak_cycles;
    for i in 0..cycles {
        let id = format!("leak-{}", ctx.seed());
        let p = ctx.prompt(ctx.plan.leak_tokens)?;
        chat(&client, Some(&id), &p, 8)?;
        chat(&client, Some(&id), &p, 8)?;
        api.delete(&id, false)?;
        if (i + 1) % 10 == 0 {
            rss.push(server.rss_bytes().unwrap_or(0) as f64 / MIB);
            ctx.progress.step(&format!("leak check: {} cycles, RSS {:.0} MiB", i + 1, rss.last().unwrap_or(&0.0)));
        }
    }
    api.quiesce()?;
    let (blocks1, agents1, files1) = (api.pool()?.used_blocks(), ids(&api)?, count_cache_files(cache_dir));
    let leftover: Vec<&String> = agents1.iter().filter(|a| !agents0.contains(a)).collect();
    let rss1 = server.rss_bytes().unwrap_or(0);
    let growth = second_half_growth(&rss);
    Ok(Record::new(Group::Memory, "leak_check", &server.name)
        .param("cycles", cycles)
        .param("prompt_tokens", ctx.plan.leak_tokens)
        .value("used_blocks_before", "blocks", blocks0 as f64)
        .value("used_blocks_after", "blocks", blocks1 as f64)
        .value("leaked_blocks", "blocks", blocks1.saturating_sub(blocks0) as f64)
        .value("leftover_agents", "count", leftover.len() as f64)
        .value("leftover_files", "count", files1.saturating_sub(files0) as f64)
        .value("rss_before_mib", "MiB", rss0 as f64 / MIB)
        .value("rss_after_mib", "MiB", rss1 as f64 / MIB)
        .value("rss_growth_mib", "MiB", growth)
        .value("rss_growth_total_mib", "MiB", rss1 as f64 / MIB - rss0 as f64 / MIB)
        .samples("rss_every_10_cycles_mib", "MiB", &rss)
        .note("rss_growth_mib: over the second half of the cycles, less its largest single step (a one-time step is the allocator settling; a leak grows in every interval)")
        .note(if leftover.is_empty() {
            String::new()
        } else {
            format!("leftover agents: {:?}", &leftover[..leftover.len().min(5)])
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> MemoryOutcome {
        let snap = |agents: usize, rss_mib: u64, tokens: u64| Snapshot {
            agents,
            rss: rss_mib << 20,
            kv_bytes: tokens.div_ceil(16) * 16 * 23_040,
            disk_bytes: tokens * 23_100,
            tokens,
            used_blocks: tokens.div_ceil(16),
        };
        MemoryOutcome {
            server: "semantic".into(),
            rss_ready: 120 << 20,
            rss_base: 150 << 20,
            rows: vec![snap(1, 200, 2000), snap(10, 650, 20000)],
            padding: vec![(50, 4 * 16 * 23_040), (100, 7 * 16 * 23_040)],
            block_bytes: 16 * 23_040,
            pool_bytes: 0,
            theory_per_token: 23_040,
            model_file_bytes: 98_362_432,
            notes: Vec::new(),
        }
    }

    #[test]
    fn per_agent_memory_is_growth_over_the_base() {
        let recs = outcome().per_agent_records();
        assert_eq!(recs[0].get("rss_per_agent_mib"), Some(50.0));
        assert_eq!(recs[1].get("rss_per_agent_mib"), Some(50.0));
        assert_eq!(recs[1].get("memory_per_agent_mib"), Some(50.0), "a lazily touched pool is in the RSS growth");
        let resident = MemoryOutcome { pool_bytes: 100 << 20, ..outcome() };
        assert!(resident.pool_resident());
        let recs = resident.per_agent_records();
        let kv = recs[1].get("kv_per_agent_mib").unwrap();
        assert!((recs[1].get("memory_per_agent_mib").unwrap() - (50.0 + kv)).abs() < 1e-9);
        assert!(!resident.records()[0].notes.is_empty());
        assert_eq!(recs[1].param_u64("agents"), Some(10));
    }

    #[test]
    fn padding_counts_whole_blocks() {
        let r = outcome().padding_record();
        assert_eq!(r.param_u64("block_tokens"), Some(16));
        assert_eq!(r.get("allocated_token_slots"), Some(176.0));
        assert!((r.get("overhead_pct_total").unwrap() - (176.0 / 150.0 - 1.0) * 100.0).abs() < 1e-9);
        let m = r.metric("overhead_pct_per_agent").unwrap();
        assert!((m.min - 12.0).abs() < 1e-9 && (m.max - 28.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn theory_uses_marginal_rss_per_token() {
        let r = outcome().theory_record().unwrap();
        let rss = r.get("rss_bytes_per_token").unwrap();
        assert!((rss - (450.0 * MIB) / 18000.0).abs() < 1e-6);
        assert_eq!(r.get("theory_bytes_per_token"), Some(23_040.0));
        assert!(r.get("pool_overhead_pct").unwrap() < 1.0);
        let ratio = outcome().ratio_record().unwrap();
        assert!((ratio.get("kv_8k_tokens_over_model_x").unwrap() - 8192.0 * 23_040.0 / 98_362_432.0).abs() < 1e-9);
    }

    #[test]
    fn leak_growth_ignores_an_early_step_but_not_a_slope() {
        assert_eq!(second_half_growth(&[1206.0, 1220.0, 1220.0, 1220.0, 1220.5]), 0.0);
        assert_eq!(second_half_growth(&[100.0, 110.0, 120.0, 130.0, 140.0]), 10.0);
        assert_eq!(second_half_growth(&[100.0, 110.0, 120.0, 130.0, 140.0, 150.0, 160.0]), 20.0);
        // One step in the second half, flat around it.
        assert_eq!(second_half_growth(&[236.1, 236.2, 236.2, 253.0, 253.0]), 0.0);
        assert_eq!(second_half_growth(&[]), 0.0);
    }

    #[test]
    fn counts_cache_files_but_not_quarantined_ones() {
        let dir = std::env::temp_dir().join(format!("semantic-bench-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("fp/quarantine")).unwrap();
        for f in ["fp/a.safetensors", "fp/b.safetensors", "fp/b.tmp", "fp/quarantine/c.safetensors"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        assert_eq!(count_cache_files(&dir), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
