//! The suite: one `semantic serve` shared by the scenarios (started on first
//! use, restarted fresh where a measurement needs a clean process or another
//! codec), llama-server beside it when asked, and the results of everything.
//!
//! A comparison that fails (llama-server missing or misbehaving) becomes a
//! note in the report; a failure of `semantic` itself is an error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::batching;
use crate::context::{Ctx, Plan, Progress, Target};
use crate::error::BenchError;
use crate::fidelity;
use crate::llama::{self, Llama};
use crate::memory::{self, MemoryOutcome};
use crate::meta;
use crate::model::ModelInfo;
use crate::report;
use crate::results::{Group, Record, Results};
use crate::resume::{self, ResumeOutcome};
use crate::server::{SemanticLaunch, SemanticRunner, ServerProcess};
use crate::verdict::verdicts;

#[derive(Clone, Debug)]
pub struct SuiteConfig {
    pub quick: bool,
    pub model: PathBuf,
    pub semantic_bin: PathBuf,
    /// llama-server to compare with; `None`: no comparison.
    pub llama_server: Option<PathBuf>,
    /// Measure this OpenAI-compatible server (HTTP-level scenarios only).
    pub target: Option<String>,
    /// `benchmark_results.json`.
    pub output: PathBuf,
    /// Where `REPORT.md` and the charts go.
    pub report_dir: PathBuf,
    /// Big enough for 10 agents x 2K tokens plus an 8K agent (23 KB/token).
    pub kv_pool_mb: usize,
    /// The repository whose commit the results name.
    pub repo: PathBuf,
}

/// KV pool of the leak check's server (MiB): five of its largest agents.
const LEAK_POOL_MB: usize = 64;

/// This workspace's root (where `target/` is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap_or_else(|_| PathBuf::from("."))
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "no" | "off"))
}

impl SuiteConfig {
    /// For the benchmark tests: `SEMANTIC_BENCHMARK_MODEL` (default: the
    /// default model), `SEMANTIC_BENCHMARK_OUTPUT` (default
    /// `target/benchmarks/benchmark_results.json`), `SEMANTIC_BENCHMARK_QUICK`,
    /// `SEMANTIC_BIN` (default `target/release/semantic`),
    /// `SEMANTIC_BENCHMARK_COMPARE_LLAMA` and `SEMANTIC_BENCHMARK_TARGET`.
    pub fn from_env() -> SuiteConfig {
        let root = workspace_root();
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        let target_dir = var("CARGO_TARGET_DIR").unwrap_or_else(|| root.join("target"));
        let model = var("SEMANTIC_BENCHMARK_MODEL").unwrap_or_else(|| {
            semantic_model::paths::semantic_home().join("models").join(semantic_model::paths::DEFAULT_MODEL_FILE)
        });
        let output =
            var("SEMANTIC_BENCHMARK_OUTPUT").unwrap_or_else(|| target_dir.join("benchmarks/benchmark_results.json"));
        SuiteConfig {
            quick: env_flag("SEMANTIC_BENCHMARK_QUICK"),
            model,
            semantic_bin: var("SEMANTIC_BIN").unwrap_or_else(|| target_dir.join("release/semantic")),
            llama_server: env_flag("SEMANTIC_BENCHMARK_COMPARE_LLAMA")
                .then(crate::server::default_llama_server)
                .flatten(),
            target: std::env::var("SEMANTIC_BENCHMARK_TARGET").ok().filter(|s| !s.is_empty()),
            report_dir: output.parent().map_or_else(|| PathBuf::from("."), Path::to_owned),
            output,
            kv_pool_mb: 1024,
            repo: root,
        }
    }
}

/// A scratch directory (server logs, cache dirs) removed on drop; those of
/// dead processes (a test binary never drops its suite) are swept at start.
struct WorkDir(PathBuf);

const WORK_PREFIX: &str = "semantic-bench-run-";

impl WorkDir {
    fn create() -> Result<WorkDir, BenchError> {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(WORK_PREFIX) {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("{WORK_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::io("creating", &dir, e))?;
        Ok(WorkDir(dir))
    }

    /// A new empty sub-directory.
    fn fresh(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        let _ = std::fs::remove_dir_all(&p);
        p
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Suite {
    pub cfg: SuiteConfig,
    pub plan: Plan,
    pub model: ModelInfo,
    pub results: Results,
    progress: Box<dyn Progress>,
    seeds: u64,
    runner: SemanticRunner,
    resume: Option<ResumeOutcome>,
    memory: Option<MemoryOutcome>,
    started: Instant,
    // Last: dropped after the servers that use it.
    work: WorkDir,
}

macro_rules! ctx {
    ($s:ident) => {
        Ctx { model: &$s.model, plan: &$s.plan, progress: $s.progress.as_mut(), seeds: &mut $s.seeds }
    };
}

impl Suite {
    pub fn new(cfg: SuiteConfig, progress: Box<dyn Progress>) -> Result<Suite, BenchError> {
        let model = ModelInfo::open(&cfg.model)?;
        if cfg.target.is_none() && !cfg.semantic_bin.exists() {
            let msg = format!(
                "{} is missing: build it with `cargo build --release -p semantic` or set SEMANTIC_BIN",
                cfg.semantic_bin.display()
            );
            return Err(BenchError::ServerStart { name: "semantic".into(), msg });
        }
        let mut metadata = meta::collect(&model, cfg.quick, &cfg.repo);
        metadata.llama_server = cfg.llama_server.as_deref().map(meta::llama_version);
        metadata.target = cfg.target.clone();
        let work = WorkDir::create()?;
        let launch = SemanticLaunch {
            bin: cfg.semantic_bin.clone(),
            model: cfg.model.clone(),
            cache_dir: work.fresh("cache"),
            kv_pool_mb: cfg.kv_pool_mb,
            disk_budget_mb: 10_240,
            kv_codec: "f16".into(),
            log: work.0.join("semantic.log"),
        };
        Ok(Suite {
            plan: Plan::new(cfg.quick),
            cfg,
            model,
            results: Results::new(metadata),
            progress,
            seeds: meta::unix_now() * 1000,
            runner: SemanticRunner::new(launch),
            resume: None,
            memory: None,
            started: Instant::now(),
            work,
        })
    }

    /// The shared `semantic` server, started on first use (codec f16).
    pub fn shared(&mut self) -> Result<&ServerProcess, BenchError> {
        if self.runner.server.is_none() || self.runner.launch.kv_codec != "f16" {
            self.runner.start("f16")?;
        }
        self.runner.running()
    }

    /// Restarts the shared server on an empty cache directory.
    fn fresh_shared(&mut self, name: &str) -> Result<&ServerProcess, BenchError> {
        self.runner.stop();
        self.runner.launch.cache_dir = self.work.fresh(name);
        self.shared()
    }

    /// The server the HTTP-level scenarios measure: `--target`, else ours.
    fn target(&mut self) -> Result<Target, BenchError> {
        match self.cfg.target.clone() {
            Some(url) => {
                let client = crate::client::Client::new(&url);
                let has_agents_api = crate::agents::AgentsApi::new(&client).available();
                Ok(Target { name: url, client, has_agents_api })
            }
            None => Ok(Target { name: "semantic".into(), client: self.shared()?.client(), has_agents_api: true }),
        }
    }

    fn llama(&self) -> Option<Llama> {
        let bin = self.cfg.llama_server.clone()?;
        let threads = self.results.metadata.cores;
        Some(Llama { bin, model: self.cfg.model.clone(), threads, work_dir: self.work.0.clone() })
    }

    fn note(&mut self, msg: String) {
        self.progress.note(&msg);
        if !self.results.metadata.notes.contains(&msg) {
            self.results.metadata.notes.push(msg);
        }
    }

    fn add(&mut self, records: impl IntoIterator<Item = Record>) {
        for r in records {
            self.results.upsert(r);
        }
    }

    /// Runs a llama-server part; a failure becomes a note.
    fn compare<T>(&mut self, what: &str, f: impl FnOnce(&mut Suite, &Llama) -> Result<T, BenchError>) -> Option<T> {
        let l = self.llama()?;
        match f(self, &l) {
            Ok(v) => Some(v),
            Err(e) => {
                self.note(format!("llama-server {what} failed: {e}"));
                None
            }
        }
    }

    /// Runs whole groups, in the order given.
    pub fn run(&mut self, groups: &[Group]) -> Result<(), BenchError> {
        for g in groups {
            match g {
                Group::ModelLoad => self.model_load().map(drop)?,
                Group::Batching => self.throughput_comparison().map(drop)?,
                Group::Cache => self.resume_outcome().map(drop)?,
                Group::CodecFidelity => self.codec_fidelity().map(drop)?,
                Group::Memory => {
                    self.memory_outcome()?;
                    self.leak_check()?;
                }
            }
        }
        Ok(())
    }

    /// Spawn-to-ready time and RSS at ready, from an empty cache directory.
    pub fn model_load(&mut self) -> Result<Vec<Record>, BenchError> {
        if self.cfg.target.is_some() {
            self.note("model load time: not measured for --target".into());
            return Ok(Vec::new());
        }
        let reps = self.plan.load_reps;
        self.progress.stage("model load", (reps * (1 + usize::from(self.llama().is_some()))) as u64);
        let mut launch = self.runner.launch.clone();
        let work = &self.work;
        let mut i = 0;
        let semantic = timed_starts(reps, self.progress.as_mut(), || {
            i += 1;
            launch.cache_dir = work.fresh(&format!("load-{i}"));
            launch.start()
        })?;
        let mut out = vec![semantic];
        out.extend(self.compare("model load", |s, l| {
            let rec = timed_starts(reps, s.progress.as_mut(), || l.launch(1, 4096, None).start())?;
            Ok(rec.note("-np 1 -c 4096"))
        }));
        self.add(out.clone());
        Ok(out)
    }

    /// One throughput configuration on our server (or the target).
    pub fn throughput(&mut self, agents: usize, prompt_tokens: usize) -> Result<Record, BenchError> {
        let target = self.target()?;
        self.progress.stage(&format!("throughput, {agents} agents"), self.plan.batch_reps as u64);
        let mut ctx = ctx!(self);
        batching::warm_up(&mut ctx, &target)?;
        let rec = batching::throughput(&mut ctx, &target, agents, prompt_tokens)?;
        self.add([rec.clone()]);
        self.refresh_speedups(&target.name);
        Ok(self.results.records.iter().find(|r| r.same_key(&rec)).cloned().unwrap_or(rec))
    }

    fn refresh_speedups(&mut self, server: &str) {
        batching::add_speedups(&mut self.results.records, server);
    }

    /// Every agent count at every prompt length plus the inter-token latency
    /// run, on our server (or the target) and on llama-server.
    pub fn throughput_comparison(&mut self) -> Result<Vec<Record>, BenchError> {
        let target = self.target()?;
        let per_server = (self.plan.agents.len() * self.plan.batch_prompts.len() + 1) * self.plan.batch_reps;
        let sampling = 2 * self.plan.batch_reps;
        self.progress.stage("batching", (per_server * (1 + usize::from(self.llama().is_some())) + sampling) as u64);
        let mut out = Vec::new();
        {
            let mut ctx = ctx!(self);
            batching::warm_up(&mut ctx, &target)?;
            let counts = self.plan.agents.clone();
            for p in self.plan.batch_prompts.clone() {
                out.extend(batching::throughput_sweep(&mut ctx, &target, &counts, p)?);
            }
            batching::add_speedups(&mut out, &target.name);
            out.push(batching::itl_record(&mut ctx, &target)?);
            out.push(batching::sampling_record(&mut ctx, &target)?);
        }
        out.extend(self.compare("batching", |s, l| l.batching(&mut ctx!(s))).unwrap_or_default());
        out.extend(self.compare("inter-token latency", |s, l| l.itl(&mut ctx!(s))));
        self.add(out.clone());
        Ok(out)
    }

    /// The cache benchmarks (all sizes and codecs), run once per suite.
    pub fn resume_outcome(&mut self) -> Result<Vec<Record>, BenchError> {
        if self.resume.is_none() {
            self.run_resume()?;
        }
        Ok(self.results.find(Group::Cache, "cache_save_time").cloned().collect())
    }

    fn run_resume(&mut self) -> Result<(), BenchError> {
        let llama_steps = if self.llama().is_some() { llama::resume_steps(&self.plan) } else { 0 };
        if let Some(url) = self.cfg.target.clone() {
            let target = self.target()?;
            self.progress.stage(
                &format!("TTFT cold/warm of {url}"),
                (self.plan.cache_sizes.len() * (self.plan.cold_reps + self.plan.hot_reps)) as u64,
            );
            let out = resume::http_ttft(&mut ctx!(self), &target)?;
            self.add(out.records());
            self.resume = Some(out);
            return Ok(());
        }
        self.progress.stage("cache save/load/resume", resume::semantic_steps(&self.plan) + llama_steps);
        self.runner.stop();
        self.runner.launch.cache_dir = self.work.fresh("resume-cache");
        let out = resume::semantic_resume(&mut ctx!(self), &mut self.runner)?;
        for n in out.notes.clone() {
            self.note(format!("semantic cache: {n}"));
        }
        self.add(out.records());
        self.resume = Some(out);
        if let Some(l) = self.compare("cache save/restore", |s, l| l.resume(&mut ctx!(s))) {
            for n in l.notes.clone() {
                self.note(format!("llama-server cache: {n}"));
            }
            self.add(l.records());
        }
        Ok(())
    }

    /// Greedy agreement and logit error of q8_0/q4_0 caches against f16,
    /// in process on the model (no server), through the cache files.
    pub fn codec_fidelity(&mut self) -> Result<Vec<Record>, BenchError> {
        if self.cfg.target.is_some() {
            self.note("codec fidelity: not measured for --target (it runs semantic's own model in process)".into());
            return Ok(Vec::new());
        }
        self.progress.stage("codec fidelity", self.plan.fidelity_prompts as u64);
        let dir = self.work.fresh("fidelity-cache");
        let out = fidelity::codec_fidelity(&mut ctx!(self), &dir)?;
        self.add(out.clone());
        Ok(out)
    }

    /// Memory with 1, 5, 10 agents, padding, ratios, theory; run once.
    pub fn memory_outcome(&mut self) -> Result<Vec<Record>, BenchError> {
        if self.cfg.target.is_some() {
            self.note("memory: not measured for --target (needs the agents API and the server's pid)".into());
            return Ok(Vec::new());
        }
        if self.memory.is_none() {
            let n = self.plan.memory_agents.len() as u64;
            self.progress.stage("memory", n + 1 + if self.llama().is_some() { n } else { 0 });
            self.fresh_shared("memory-cache")?;
            let server = self.runner.running()?;
            let out = memory::semantic_memory(&mut ctx!(self), server)?;
            self.add(out.records());
            self.memory = Some(out);
            if let Some(l) = self.compare("memory", |s, l| l.memory(&mut ctx!(s))) {
                self.add(l.per_agent_records());
            }
        }
        Ok(self
            .results
            .records
            .iter()
            .filter(|r| r.group == Group::Memory && r.name != "leak_check")
            .cloned()
            .collect())
    }

    /// The leak check on the shared server.
    /// The leak check, on a fresh server with a small KV pool: the free list
    /// hands out every block before it reuses one, so a big pool's RSS grows
    /// for many cycles as its pages are first touched; a small one is fully
    /// touched after a few cycles and RSS must then stay flat.
    pub fn leak_check(&mut self) -> Result<Record, BenchError> {
        if self.cfg.target.is_some() {
            return Err(BenchError::Unexpected("the leak check needs our own server, not --target".into()));
        }
        self.progress.stage("leak check", (self.plan.leak_cycles / 10) as u64);
        self.runner.stop();
        let mut launch = self.runner.launch.clone();
        launch.kv_pool_mb = LEAK_POOL_MB;
        launch.cache_dir = self.work.fresh("leak-cache");
        launch.log = self.work.0.join("semantic-leak.log");
        let server = launch.start()?;
        let rec = memory::leak_check(&mut ctx!(self), &server, &launch.cache_dir)?
            .param("kv_pool_mb", LEAK_POOL_MB)
            .note(format!("on a fresh server with --kv-pool-mb {LEAK_POOL_MB}, so the pool is fully touched early"));
        self.add([rec.clone()]);
        Ok(rec)
    }

    /// Stamps the end of the run and computes the verdicts.
    pub fn finish(&mut self) {
        let m = &mut self.results.metadata;
        m.load_average_end = meta::load_average();
        if let (Some(r), Some(ns)) = (&mut m.core_round_trip_ns, meta::core_round_trip_ns()) {
            r[1] = ns;
        }
        m.duration_s = self.started.elapsed().as_secs_f64();
        let busiest = [m.load_average_start, m.load_average_end].iter().flatten().map(|l| l[0]).fold(0.0, f64::max);
        if busiest > 0.5 {
            let note = format!(
                "load average up to {busiest:.2} on {} cores during the run: other processes (e.g. concurrent builds) shared the CPU, so timings are noisy",
                m.cores
            );
            if !m.notes.contains(&note) {
                m.notes.push(note);
            }
        }
        self.results.verdicts = verdicts(&self.results);
        self.progress.finish();
    }

    /// Writes the JSON (merged into an existing results file when `merge`)
    /// and the Markdown report with its charts; returns the report's path.
    pub fn publish(&mut self, merge: bool) -> Result<PathBuf, BenchError> {
        self.finish();
        let mut all = self.results.clone();
        if merge && self.cfg.output.exists() {
            if let Ok(mut old) = Results::load(&self.cfg.output) {
                old.merge(all);
                all = old;
                all.verdicts = verdicts(&all);
            }
        }
        all.save(&self.cfg.output)?;
        report::write(&all, &self.cfg.report_dir)
    }
}

/// Starts a server `reps` times: spawn-to-ready time and RSS at ready.
fn timed_starts(
    reps: usize,
    progress: &mut dyn Progress,
    mut start: impl FnMut() -> Result<ServerProcess, BenchError>,
) -> Result<Record, BenchError> {
    let (mut ready, mut rss, mut name) = (Vec::new(), Vec::new(), String::new());
    for _ in 0..reps {
        let server = start()?;
        std::thread::sleep(std::time::Duration::from_millis(200));
        ready.push(crate::stats::ms(server.startup));
        rss.push(server.rss_bytes().unwrap_or(0) as f64 / 1048576.0);
        progress.step(&format!("{} ready in {:.0} ms", server.name, crate::stats::ms(server.startup)));
        name.clone_from(&server.name);
    }
    Ok(Record::new(Group::ModelLoad, "model_load_time", &name).samples("ready_ms", "ms", &ready).samples(
        "rss_at_ready_mib",
        "MiB",
        &rss,
    ))
}
