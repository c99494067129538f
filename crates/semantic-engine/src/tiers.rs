//! The warm tier: agent caches on disk, written behind by a persister thread
//! and loaded back at admission (also after a restart).
//!
//! ```text
//! request of A ends -> hot cache (pool) marked dirty -> copy job: the
//!   engine copies a few runs (K or V of one head of one layer) per loop
//!   turn into a KvSnapshot while a
//!   shared table keeps the blocks unchanged (writers copy-on-write)
//!   -> persister thread: temp file, fsync, rename, dir fsync -> warm index
//! admission of A, nothing hot -> load the file straight into pool blocks
//! ```
//!
//! Invariants:
//! - the engine step never waits on disk writes; copies are bounded per
//!   loop turn ([`COPY_BYTES_PER_TURN`]); only evicting a dirty cache under
//!   memory pressure copies it whole at once;
//! - a file that fails to load (truncated, corrupt, other model, other
//!   version) is a miss: logged, moved to `quarantine/`, never used;
//! - the disk budget evicts least recently used files, never pinned ones.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use semantic_core::AgentId;
use semantic_kv::{BlockTable, KvPool};
use semantic_store::{
    load_agent_cache, quarantine, write_agent_cache_unless, CacheError, KvCodec, KvSnapshot, ModelFingerprint,
    SaveStats, WarmEntry, WarmIndex, WriteOptions,
};

/// Bytes of K/V copied into snapshots per engine loop turn, in whole runs
/// (1 MiB each at 8K tokens). With 8 MiB whole layers (12 MiB at 8K) a turn
/// took 5.4 ms, most of it first-touch page faults of the snapshot; 2 MiB
/// keeps a turn near 1 ms.
pub const COPY_BYTES_PER_TURN: usize = 2 << 20;

#[derive(Clone, Debug)]
pub struct PersistConfig {
    pub dir: PathBuf,
    pub fingerprint: ModelFingerprint,
    pub codec: KvCodec,
    pub disk_budget_bytes: u64,
    /// Files unused for longer are deleted (pinned agents excepted).
    pub ttl: Option<Duration>,
    /// Fault injection for tests: every save fails with ENOSPC after this
    /// many bytes (as a full disk would).
    pub fail_after_bytes: Option<u64>,
}

struct SaveJob {
    agent: AgentId,
    version: u64,
    tokens: Vec<u32>,
    snap: KvSnapshot,
    /// Longest engine-thread time spent copying this save in one loop turn.
    engine_max: Duration,
}

struct SaveDone {
    agent: AgentId,
    version: u64,
    engine_max: Duration,
    result: Result<SaveStats, CacheError>,
}

struct CopyJob {
    agent: AgentId,
    version: u64,
    tokens: Vec<u32>,
    table: BlockTable,
    snap: KvSnapshot,
    /// Next run (K or V of one head of one layer) to copy.
    next_run: usize,
    engine_max: Duration,
}

/// One disk operation, for histograms (`/metrics`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IoEvent {
    pub save: bool,
    pub duration: Duration,
    pub bytes: u64,
}

/// Events kept until someone takes them (bounded).
const MAX_IO_EVENTS: usize = 4096;

/// Durations and sizes of the last load and save of an agent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IoTimes {
    pub last_save: Option<(Duration, u64)>,
    pub last_load: Option<(Duration, u64)>,
    /// The last save's longest slice of work on the engine thread in one
    /// loop turn (copying K/V out of the pool): how long it held the model
    /// step back at most.
    pub last_save_engine_max: Option<Duration>,
}

pub(crate) struct Tiers {
    cfg: PersistConfig,
    warm: WarmIndex,
    pinned: HashSet<AgentId>,
    /// Agent -> version of its hot cache that is not on disk yet.
    dirty: HashMap<AgentId, u64>,
    version: u64,
    copying: VecDeque<CopyJob>,
    jobs: Option<mpsc::Sender<SaveJob>>,
    done: mpsc::Receiver<SaveDone>,
    in_flight: usize,
    /// Agents whose file is being written: agent -> tokens.
    pending: HashMap<AgentId, usize>,
    /// Deleted while a write was in flight: the file goes when it lands.
    deleted: HashSet<AgentId>,
    /// Deleted agents -> the last version queued before the delete: the
    /// persister calls those saves off (before writing, and again before
    /// publishing), so a deleted agent's file does not land after the
    /// DELETE answered. Cleared when nothing is in flight.
    called_off: Arc<Mutex<HashMap<AgentId, u64>>>,
    /// `called_off` may hold entries.
    any_called_off: bool,
    persister: Option<JoinHandle<()>>,
    pub(crate) times: HashMap<AgentId, IoTimes>,
    pub(crate) save_errors: u64,
    pub(crate) io_events: Vec<IoEvent>,
    last_ttl_check: std::time::Instant,
}

impl Tiers {
    pub(crate) fn open(cfg: PersistConfig) -> Result<Self, CacheError> {
        let (warm, report) = WarmIndex::scan(&cfg.dir, &cfg.fingerprint)?;
        tracing::info!(
            files = report.files_seen,
            agents = warm.len(),
            removed_temps = report.removed_temps.len(),
            quarantined = report.quarantined.len(),
            ms = report.duration.as_millis() as u64,
            "warm index scanned"
        );
        let pinned = read_pins(&cfg);
        let (jobs, rx) = mpsc::channel::<SaveJob>();
        let (done_tx, done) = mpsc::channel();
        let (dir, fp, codec) = (cfg.dir.clone(), cfg.fingerprint, cfg.codec);
        let opts = WriteOptions { fail_after_bytes: cfg.fail_after_bytes };
        let called_off: Arc<Mutex<HashMap<AgentId, u64>>> = Arc::default();
        let off = Arc::clone(&called_off);
        let persister = std::thread::Builder::new()
            .name("semantic-persister".into())
            .spawn(move || {
                for job in rx {
                    let cancelled = || {
                        let off = off.lock().unwrap_or_else(|e| e.into_inner());
                        off.get(&job.agent).is_some_and(|&v| v >= job.version)
                    };
                    let result = write_agent_cache_unless(
                        &opts,
                        &dir,
                        &job.agent,
                        &fp,
                        codec,
                        &job.tokens,
                        &job.snap,
                        &cancelled,
                    );
                    let (agent, version, engine_max) = (job.agent, job.version, job.engine_max);
                    let _ = done_tx.send(SaveDone { agent, version, engine_max, result });
                }
            })
            .map_err(|e| CacheError::Invalid(format!("cannot start the persister thread: {e}")))?;
        Ok(Self {
            cfg,
            warm,
            pinned,
            dirty: HashMap::new(),
            version: 0,
            copying: VecDeque::new(),
            jobs: Some(jobs),
            done,
            in_flight: 0,
            pending: HashMap::new(),
            deleted: HashSet::new(),
            called_off,
            any_called_off: false,
            persister: Some(persister),
            times: HashMap::new(),
            save_errors: 0,
            io_events: Vec::new(),
            last_ttl_check: Instant::now() - Duration::from_secs(3600),
        })
    }

    pub(crate) fn is_dirty(&self, agent: &AgentId) -> bool {
        self.dirty.contains_key(agent)
    }

    pub(crate) fn is_pinned(&self, agent: &AgentId) -> bool {
        self.pinned.contains(agent)
    }

    pub(crate) fn warm_entries(&self) -> impl Iterator<Item = &WarmEntry> {
        self.warm.iter()
    }

    pub(crate) fn warm_bytes(&self) -> u64 {
        self.warm.total_bytes()
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.copying.is_empty() || self.in_flight > 0
    }

    /// Saves being copied out of the pool or written.
    pub(crate) fn saves_in_flight(&self) -> usize {
        self.copying.len() + self.in_flight
    }

    pub(crate) fn has_copy_work(&self) -> bool {
        !self.copying.is_empty()
    }

    /// A hot cache changed: schedule its write-behind. `table` must be a
    /// shared table over the cache's blocks ([`KvPool::share_table`]).
    pub(crate) fn save_later(&mut self, agent: AgentId, tokens: Vec<u32>, table: BlockTable, pool: &mut KvPool) {
        self.version += 1;
        self.dirty.insert(agent.clone(), self.version);
        // A newer version replaces a copy that has not finished.
        if let Some(i) = self.copying.iter().position(|j| j.agent == agent) {
            let old = self.copying.remove(i).expect("present");
            pool.free_table(old.table).expect("shared table");
        }
        let started = Instant::now();
        let snap = KvSnapshot::new(pool.layout().into(), tokens.len());
        let engine_max = started.elapsed();
        self.copying.push_back(CopyJob { agent, version: self.version, tokens, table, snap, next_run: 0, engine_max });
    }

    /// Copies the whole cache now and queues the write (eviction of a dirty
    /// cache under memory pressure).
    pub(crate) fn save_now(&mut self, agent: &AgentId, tokens: &[u32], table: &BlockTable, pool: &mut KvPool) {
        if let Some(i) = self.copying.iter().position(|j| &j.agent == agent) {
            let old = self.copying.remove(i).expect("present");
            pool.free_table(old.table).expect("shared table");
        }
        self.version += 1;
        self.dirty.insert(agent.clone(), self.version);
        let started = Instant::now();
        let snap = KvSnapshot::from_pool(pool, table.blocks(), tokens.len());
        let engine_max = started.elapsed();
        self.send(SaveJob { agent: agent.clone(), version: self.version, tokens: tokens.to_vec(), snap, engine_max });
    }

    fn send(&mut self, job: SaveJob) {
        let (agent, n) = (job.agent.clone(), job.tokens.len());
        if let Some(tx) = &self.jobs {
            if tx.send(job).is_ok() {
                self.in_flight += 1;
                self.pending.insert(agent, n);
            }
        }
    }

    /// Agents being written right now, with their token counts (they show
    /// as warm even before the file lands).
    pub(crate) fn pending(&self) -> impl Iterator<Item = (&AgentId, usize)> {
        self.pending.iter().map(|(a, n)| (a, *n))
    }

    /// One loop turn of background work: copy a bounded slice of the front
    /// snapshot, hand finished ones to the persister, collect results.
    pub(crate) fn pump(&mut self, pool: &mut KvPool) {
        let mut budget = COPY_BYTES_PER_TURN;
        while budget > 0 {
            let Some(job) = self.copying.front_mut() else { break };
            let started = Instant::now();
            while job.next_run < job.snap.n_runs() && budget > 0 {
                job.snap.copy_run_from_pool(pool, job.table.blocks(), job.next_run);
                job.next_run += 1;
                budget = budget.saturating_sub(job.snap.run_bytes().max(1));
            }
            job.engine_max = job.engine_max.max(started.elapsed());
            if job.next_run == job.snap.n_runs() {
                let job = self.copying.pop_front().expect("front");
                pool.free_table(job.table).expect("shared table");
                let (agent, version, tokens, snap, engine_max) =
                    (job.agent, job.version, job.tokens, job.snap, job.engine_max);
                self.send(SaveJob { agent, version, tokens, snap, engine_max });
            }
        }
        while let Ok(done) = self.done.try_recv() {
            self.in_flight -= 1;
            self.finish_save(done);
        }
        if self.in_flight == 0 && std::mem::take(&mut self.any_called_off) {
            // Nothing queued can be called off any more; later saves have
            // newer versions. (The flag keeps the lock off the engine's
            // every loop turn.)
            self.called_off.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        if self.ttl_check_every().is_some_and(|every| self.last_ttl_check.elapsed() >= every) {
            self.last_ttl_check = Instant::now();
            self.expire();
        }
    }

    /// How often files are checked against the TTL: a tenth of it, between
    /// 50 ms and 10 s; `None` without a TTL.
    pub(crate) fn ttl_check_every(&self) -> Option<Duration> {
        self.cfg.ttl.map(|ttl| (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(10)))
    }

    /// Whether a warm file waits for its TTL (the idle engine then wakes
    /// every [`Self::ttl_check_every`] to expire it).
    pub(crate) fn has_expiring_files(&self) -> bool {
        self.cfg.ttl.is_some() && self.warm.iter().any(|e| !self.pinned.contains(&e.agent))
    }

    /// Deletes files unused for longer than the TTL (never pinned ones).
    fn expire(&mut self) {
        let Some(ttl) = self.cfg.ttl else { return };
        let now = SystemTime::now();
        let old: Vec<AgentId> = self
            .warm
            .iter()
            .filter(|e| !self.pinned.contains(&e.agent))
            .filter(|e| now.duration_since(e.last_use).is_ok_and(|age| age > ttl))
            .map(|e| e.agent.clone())
            .collect();
        for a in old {
            tracing::info!(agent = %a, "cache file expired (ttl)");
            self.remove_file(&a);
        }
    }

    fn finish_save(&mut self, done: SaveDone) {
        if self.dirty.get(&done.agent).is_none_or(|v| *v == done.version) {
            self.pending.remove(&done.agent);
        }
        if self.deleted.remove(&done.agent) {
            if let Ok(stats) = &done.result {
                let _ = std::fs::remove_file(&stats.path);
            }
            return;
        }
        if let Err(CacheError::Cancelled(_)) = &done.result {
            return;
        }
        match done.result {
            Ok(stats) => {
                tracing::debug!(agent = %done.agent, tokens = stats.n_tokens, bytes = stats.bytes, ms = stats.duration.as_millis() as u64, "saved");
                let times = self.times.entry(done.agent.clone()).or_default();
                times.last_save = Some((stats.duration, stats.bytes));
                times.last_save_engine_max = Some(done.engine_max);
                self.record(IoEvent { save: true, duration: stats.duration, bytes: stats.bytes });
                self.warm.insert(WarmEntry::from(&stats));
                if self.dirty.get(&done.agent) == Some(&done.version) {
                    self.dirty.remove(&done.agent);
                }
                self.enforce_budget(&done.agent);
            }
            Err(e) => {
                self.save_errors += 1;
                tracing::error!(agent = %done.agent, error = %e, "saving the agent cache failed; it stays in RAM only");
            }
        }
    }

    /// Deletes least recently used files (never pinned ones, never `keep`)
    /// until the warm tier fits its budget.
    fn enforce_budget(&mut self, keep: &AgentId) {
        while self.warm.total_bytes() > self.cfg.disk_budget_bytes {
            let victim = self
                .warm
                .lru_order()
                .into_iter()
                .find(|e| &e.agent != keep && !self.pinned.contains(&e.agent))
                .map(|e| e.agent.clone());
            let Some(victim) = victim else { break };
            self.remove_file(&victim);
        }
    }

    /// Deletes the agent's file (also one still being written) and forgets
    /// any unsaved version. `pool` releases a copy in progress.
    pub(crate) fn forget(&mut self, agent: &AgentId, pool: &mut KvPool) -> bool {
        let mut found = false;
        if let Some(i) = self.copying.iter().position(|j| &j.agent == agent) {
            let job = self.copying.remove(i).expect("present");
            pool.free_table(job.table).expect("shared table");
            found = true;
        }
        self.dirty.remove(agent);
        if self.pending.remove(agent).is_some() {
            self.deleted.insert(agent.clone());
            self.called_off.lock().unwrap_or_else(|e| e.into_inner()).insert(agent.clone(), self.version);
            self.any_called_off = true;
            found = true;
        }
        self.remove_file(agent) || found
    }

    pub(crate) fn remove_file(&mut self, agent: &AgentId) -> bool {
        match self.warm.remove(agent) {
            Some(e) => {
                if let Err(err) = std::fs::remove_file(&e.path) {
                    tracing::warn!(path = %e.path.display(), error = %err, "removing a cache file");
                }
                true
            }
            None => false,
        }
    }

    /// Loads the agent's file into fresh blocks: `(tokens, table, bytes)`.
    /// Any bad file is quarantined and reported as a miss.
    pub(crate) fn load(&mut self, agent: &AgentId, pool: &mut KvPool) -> Option<(Vec<u32>, BlockTable)> {
        let entry = self.warm.get(agent)?.clone();
        let mut table = BlockTable::default();
        match load_agent_cache(&entry.path, &self.cfg.fingerprint, pool, &mut table) {
            Ok(loaded) => {
                tracing::debug!(agent = %agent, tokens = loaded.tokens.len(), ms = loaded.duration.as_millis() as u64, "loaded");
                self.times.entry(agent.clone()).or_default().last_load = Some((loaded.duration, entry.bytes));
                self.record(IoEvent { save: false, duration: loaded.duration, bytes: entry.bytes });
                let mut e = entry;
                e.last_use = SystemTime::now();
                self.warm.insert(e);
                Some((loaded.tokens, table))
            }
            Err(CacheError::PoolFull { .. }) => None,
            Err(e) => {
                tracing::warn!(agent = %agent, error = %e, "cache file unusable; serving cold");
                if e.should_quarantine() {
                    match quarantine(&entry.path) {
                        Ok(to) => tracing::warn!(to = %to.display(), "quarantined"),
                        Err(q) => tracing::error!(error = %q, "quarantine failed"),
                    }
                }
                self.warm.remove(agent);
                None
            }
        }
    }

    fn record(&mut self, e: IoEvent) {
        if self.io_events.len() == MAX_IO_EVENTS {
            self.io_events.remove(0);
        }
        self.io_events.push(e);
    }

    pub(crate) fn set_pinned(&mut self, agent: &AgentId, pinned: bool) {
        let changed = if pinned { self.pinned.insert(agent.clone()) } else { self.pinned.remove(agent) };
        if changed {
            write_pins(&self.cfg, &self.pinned);
        }
    }

    /// Writes everything dirty and waits for the persister (shutdown).
    pub(crate) fn flush(&mut self, pool: &mut KvPool, hot: &[(AgentId, Vec<u32>, &BlockTable)]) {
        for (agent, tokens, table) in hot {
            if self.is_dirty(agent) && !self.copying.iter().any(|j| &j.agent == agent) {
                self.save_now(agent, tokens, table, pool);
            }
        }
        while !self.copying.is_empty() {
            self.pump(pool);
        }
        self.jobs = None;
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(done) => {
                    self.in_flight -= 1;
                    self.finish_save(done);
                }
                Err(_) => break,
            }
        }
        if let Some(t) = self.persister.take() {
            let _ = t.join();
        }
    }
}

fn pins_path(cfg: &PersistConfig) -> PathBuf {
    cfg.dir.join(cfg.fingerprint.as_str()).join("pins.txt")
}

fn read_pins(cfg: &PersistConfig) -> HashSet<AgentId> {
    std::fs::read_to_string(pins_path(cfg))
        .map(|s| s.lines().filter_map(|l| AgentId::new(l.trim()).ok()).collect())
        .unwrap_or_default()
}

fn write_pins(cfg: &PersistConfig, pins: &HashSet<AgentId>) {
    let mut lines: Vec<&str> = pins.iter().map(AgentId::as_str).collect();
    lines.sort_unstable();
    let path = pins_path(cfg);
    let tmp = path.with_extension("tmp");
    let res = std::fs::create_dir_all(path.parent().expect("has a parent"))
        .and_then(|_| std::fs::write(&tmp, lines.join("\n")))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        tracing::error!(error = %e, "saving pins");
    }
}
