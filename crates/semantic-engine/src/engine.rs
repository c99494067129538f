//! The engine loop: one thread owns the model, the KV pool, the scheduler and
//! every sequence. `loop { schedule; forward; sample; update }`.
//!
//! Agent caches (hot tier): when a request of agent A finishes, its computed
//! tokens and block table stay in `caches` under A. The next request of A
//! takes them at admission, keeps the longest common prefix (verified token
//! by token) and prefills only the rest. A preempted sequence's KV is kept
//! the same way under its own key, so it resumes without recomputing unless
//! the cache was evicted meanwhile. Idle caches are evicted LRU when the pool
//! runs short; a cache in use by a sequence is never in `caches`, so a
//! running agent is never evicted.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use semantic_core::{AgentId, FinishReason, LogitsWanted, SeqStep, StepPlan};
use semantic_kv::{block_hash, BlockHash, BlockTable, KvPool};
use semantic_model::generate::TextStream;
use semantic_model::json::JsonObject;
use semantic_model::{LlamaModel, Sampler, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::request::{EngineError, EngineRequest, TokenEvent, Usage};
use crate::scheduler::{Blocks, Planned, Scheduler, SchedulerConfig, SeqId, SeqState};
use crate::tiers::{IoTimes, PersistConfig, Tiers};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub kv_pool_bytes: usize,
    pub scheduler: SchedulerConfig,
    /// Mixed into every block hash (the model fingerprint), so cached blocks
    /// of one model never match another's.
    pub hash_salt: u64,
    /// A step that mixes decodes with a prefill chunk aims to take at most
    /// this many times a decode-only step (bounds inter-token latency while
    /// another agent prefills); 0 disables the cap. At 2.5 the p99
    /// inter-token latency during a 2K prefill measured 2.7x (up to 3.0x)
    /// the median alone, over HTTP; 2.0 leaves room under 3x.
    pub mixed_step_factor: f64,
    /// The warm tier on disk; `None` keeps caches in RAM only.
    pub persist: Option<PersistConfig>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_pool_bytes: 512 << 20,
            scheduler: SchedulerConfig::default(),
            hash_salt: 0,
            mixed_step_factor: 2.0,
            persist: None,
        }
    }
}

/// Counters of one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub seqs: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub time: Duration,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    pub running: usize,
    pub waiting: usize,
    pub pool_blocks: usize,
    pub free_blocks: usize,
    pub block_bytes: usize,
    pub cached_agents: usize,
    pub evictions: u64,
    pub preemptions: u64,
    /// Bytes of agent cache files on disk (warm tier).
    pub disk_bytes: u64,
    pub warm_agents: usize,
    pub save_errors: u64,
    /// Agent cache saves not finished (being copied out of the pool or
    /// written): 0 once the disk tier is idle.
    pub saves_in_flight: usize,
    pub last_step: StepStats,
}

/// Where an agent's cache lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Blocks in the pool (maybe also on disk).
    Hot,
    /// Only on disk.
    Warm,
}

/// One agent's cache as the agents API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInfo {
    pub agent: AgentId,
    pub tier: Tier,
    pub tokens: usize,
    /// Pool bytes when hot, file bytes when warm.
    pub bytes: usize,
    pub disk_bytes: u64,
    pub last_use: SystemTime,
    pub hits: u64,
    /// A request of this agent is running (its cache is in use).
    pub active: bool,
    pub pinned: bool,
    /// The hot cache is newer than its file.
    pub dirty: bool,
    pub io: IoTimes,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum CacheKey {
    Agent(AgentId),
    Preempted(SeqId),
}

struct Cached {
    tokens: Vec<u32>,
    table: BlockTable,
    last_use: u64,
    used_at: SystemTime,
    hits: u64,
}

struct Seq {
    req: EngineRequest,
    /// Prompt, then every generated token.
    tokens: Vec<u32>,
    table: BlockTable,
    sampler: Sampler,
    text: TextStream,
    events: UnboundedSender<TokenEvent>,
    arrival: Instant,
    admitted: bool,
    n_generated: usize,
    usage: Usage,
    hits: u64,
    /// Chained hashes of the full blocks computed so far.
    hashes: Vec<BlockHash>,
    last_token_at: Option<Instant>,
    itl_sum: Duration,
    /// The JSON object the reply is constrained to (`json_object`).
    json: Option<JsonObject>,
}

pub struct Engine {
    model: LlamaModel,
    tok: Tokenizer,
    /// Each token's text as bytes (`None`: a special token), built at the
    /// first JSON-constrained request.
    token_bytes: Option<Vec<Option<Vec<u8>>>>,
    pool: KvPool,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    caches: HashMap<CacheKey, Cached>,
    tick: u64,
    next_seq: SeqId,
    stats: EngineStats,
    salt: u64,
    pace: Pace,
    tiers: Option<Tiers>,
    /// The step's logits, kept from step to step (see `forward_into`).
    logits: Vec<f32>,
}

/// Running estimates of step costs, to size prefill chunks next to decodes:
/// a time budget (as in Sarathi-Serve), not a token count, because a
/// prefill token's cost grows with its position (at 2000 tokens of context
/// attention makes it several times dearer than at 0).
#[derive(Debug, Default)]
struct Pace {
    factor: f64,
    /// Recent decode-only step times (ms) by number of decodes. The
    /// estimate is their median: during a long prefill there are no
    /// decode-only steps to correct it, and an EMA that had just taken in
    /// one slow step (OS jitter: 3.6 ms for a 2.8 ms step) kept the mixed
    /// steps at 2.7x instead of 2x the decode step to the prefill's end.
    decode_ms: Vec<Recent>,
    /// Prefill cost per token (ms) in recent steps, EMA: it follows the
    /// context as a prefill advances.
    prefill_ms_per_token: Option<f64>,
}

/// The smallest prefill chunk next to decodes, so a prefill always advances.
const MIN_PREFILL_CHUNK: usize = 2;

/// The last few samples of a step time, for a median.
#[derive(Clone, Debug, Default)]
struct Recent {
    samples: [f64; 9],
    n: usize,
}

impl Recent {
    fn push(&mut self, ms: f64) {
        self.samples[self.n % self.samples.len()] = ms;
        self.n += 1;
    }

    fn median(&self) -> Option<f64> {
        let k = self.n.min(self.samples.len());
        if k == 0 {
            return None;
        }
        let mut v = self.samples;
        let v = &mut v[..k];
        v.sort_by(f64::total_cmp);
        Some(v[k / 2])
    }
}

impl Pace {
    /// Decode-only step time for `decodes` sequences, else for the nearest
    /// batch size measured.
    fn decode_ms(&self, decodes: usize) -> Option<f64> {
        let known = self.decode_ms.iter().enumerate().filter(|(_, r)| r.n > 0);
        known.min_by_key(|&(b, _)| b.abs_diff(decodes)).and_then(|(_, r)| r.median())
    }

    fn observe(&mut self, st: &StepStats) {
        let ms = st.time.as_secs_f64() * 1e3;
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.6 * o + 0.4 * new));
        if st.prefill_tokens == 0 {
            if st.decode_tokens > 0 {
                if self.decode_ms.len() <= st.decode_tokens {
                    self.decode_ms.resize(st.decode_tokens + 1, Recent::default());
                }
                self.decode_ms[st.decode_tokens].push(ms);
            }
            return;
        }
        let decode = match st.decode_tokens {
            0 => 0.0,
            d => match self.decode_ms(d) {
                Some(ms) => ms,
                None => return,
            },
        };
        let per = ((ms - decode) / st.prefill_tokens as f64).max(1e-3);
        self.prefill_ms_per_token = ema(self.prefill_ms_per_token, per);
    }

    /// Prefill tokens allowed in a step with `decodes` decodes, so that it
    /// takes about `factor` times a decode-only step; before the first
    /// estimates, a small chunk.
    fn prefill_cap(&self, decodes: usize) -> usize {
        if self.factor <= 1.0 {
            return usize::MAX;
        }
        match (self.decode_ms(decodes), self.prefill_ms_per_token) {
            (Some(d), Some(p)) => (((self.factor - 1.0) * d / p) as usize).max(MIN_PREFILL_CHUNK),
            _ => 16,
        }
    }
}

impl Engine {
    /// Builds the engine; with `persist`, scans the cache directory (removes
    /// orphaned temp files, quarantines unreadable ones).
    pub fn new(model: LlamaModel, tok: Tokenizer, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let pool = KvPool::try_with_budget(model.kv_layout(cfg.block_size), cfg.kv_pool_bytes)
            .map_err(|e| EngineError::Setup(format!("KV pool: {e}; lower --kv-pool-mb")))?;
        let tiers = match &cfg.persist {
            Some(p) => Some(Tiers::open(p.clone()).map_err(|e| EngineError::Storage(e.to_string()))?),
            None => None,
        };
        Ok(Self {
            model,
            tok,
            token_bytes: None,
            pool,
            sched: Scheduler::new(cfg.scheduler),
            seqs: HashMap::new(),
            caches: HashMap::new(),
            tick: 0,
            next_seq: 1,
            stats: EngineStats::default(),
            salt: cfg.hash_salt,
            pace: Pace { factor: cfg.mixed_step_factor, ..Pace::default() },
            tiers,
            logits: Vec::new(),
        })
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn has_work(&self) -> bool {
        !self.sched.is_idle()
    }

    /// Snapshot copies or saves in flight (the loop polls instead of sleeping).
    pub fn has_background_work(&self) -> bool {
        self.tiers.as_ref().is_some_and(Tiers::has_work)
    }

    /// How long an idle loop may sleep before [`Engine::pump`] has work:
    /// the next TTL check while unpinned files wait to expire.
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        let t = self.tiers.as_ref()?;
        if t.has_expiring_files() {
            t.ttl_check_every()
        } else {
            None
        }
    }

    /// Snapshot copies left: the loop keeps turning without waiting.
    pub fn has_copy_work(&self) -> bool {
        self.tiers.as_ref().is_some_and(Tiers::has_copy_work)
    }

    /// One turn of background work (write-behind of agent caches).
    pub fn pump(&mut self) {
        if let Some(t) = &mut self.tiers {
            t.pump(&mut self.pool);
        }
    }

    /// Disk saves and loads since the last call (for histograms).
    pub fn take_io_events(&mut self) -> Vec<crate::tiers::IoEvent> {
        self.tiers.as_mut().map(|t| std::mem::take(&mut t.io_events)).unwrap_or_default()
    }

    /// Writes every dirty agent cache and waits for the disk (shutdown).
    pub fn flush(&mut self) {
        let Some(t) = &mut self.tiers else { return };
        let hot: Vec<(AgentId, Vec<u32>, &BlockTable)> = self
            .caches
            .iter()
            .filter_map(|(k, c)| match k {
                CacheKey::Agent(a) => Some((a.clone(), c.tokens.clone(), &c.table)),
                CacheKey::Preempted(_) => None,
            })
            .collect();
        t.flush(&mut self.pool, &hot);
    }

    /// Validates and queues a request.
    pub fn submit(&mut self, req: EngineRequest, events: UnboundedSender<TokenEvent>) -> Result<(), EngineError> {
        let ctx = self.model.config().context_length;
        let n = req.prompt.len();
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if n + 1 > ctx {
            return Err(EngineError::PromptTooLong { prompt: n, context: ctx });
        }
        let layout = self.pool.layout();
        let need = layout.blocks_for((n + req.params.max_tokens).min(ctx));
        let have = self.pool.blocks().n_blocks();
        if need > have {
            return Err(EngineError::PoolTooSmall { need, have });
        }
        let id = self.next_seq;
        let state =
            SeqState { id, agent: req.agent.clone(), n_tokens: n, n_computed: 0, decoding: false, paced: false };
        if !self.sched.add(state) {
            return Err(EngineError::Overloaded { waiting: self.sched.n_waiting() });
        }
        self.next_seq += 1;
        if req.params.json_object && self.token_bytes.is_none() {
            let tok = &self.tok;
            let bytes = (0..tok.vocab_size() as u32)
                .map(|t| (!tok.is_special(t)).then(|| tok.token_bytes(t).map(<[u8]>::to_vec)).flatten())
                .collect();
            self.token_bytes = Some(bytes);
        }
        let seq = Seq {
            tokens: req.prompt.clone(),
            table: BlockTable::default(),
            sampler: Sampler::new(req.params.clone()),
            text: TextStream::new(&self.tok, &req.params.stop),
            events,
            arrival: Instant::now(),
            admitted: false,
            n_generated: 0,
            usage: Usage { prompt_tokens: n, ..Usage::default() },
            hits: 0,
            hashes: Vec::new(),
            last_token_at: None,
            itl_sum: Duration::ZERO,
            json: req.params.json_object.then(JsonObject::new),
            req,
        };
        self.seqs.insert(id, seq);
        Ok(())
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.sched.n_running(),
            waiting: self.sched.n_waiting(),
            pool_blocks: self.pool.blocks().n_blocks(),
            free_blocks: self.pool.n_free(),
            block_bytes: self.pool.layout().block_bytes(),
            cached_agents: self.caches.keys().filter(|k| matches!(k, CacheKey::Agent(_))).count(),
            disk_bytes: self.tiers.as_ref().map_or(0, Tiers::warm_bytes),
            warm_agents: self.tiers.as_ref().map_or(0, |t| t.warm_entries().count()),
            save_errors: self.tiers.as_ref().map_or(0, |t| t.save_errors),
            saves_in_flight: self.tiers.as_ref().map_or(0, Tiers::saves_in_flight),
            ..self.stats.clone()
        }
    }

    pub fn agents(&self) -> Vec<AgentInfo> {
        let bb = self.pool.layout().block_bytes();
        let info = |agent: &AgentId, tier, tokens, bytes, last_use, hits, active| {
            let t = self.tiers.as_ref();
            AgentInfo {
                agent: agent.clone(),
                tier,
                tokens,
                bytes,
                disk_bytes: t.and_then(|t| t.warm_entries().find(|e| &e.agent == agent)).map_or(0, |e| e.bytes),
                last_use,
                hits,
                active,
                pinned: t.is_some_and(|t| t.is_pinned(agent)),
                dirty: t.is_some_and(|t| t.is_dirty(agent)),
                io: t.and_then(|t| t.times.get(agent).copied()).unwrap_or_default(),
            }
        };
        let mut out: Vec<AgentInfo> = Vec::new();
        for (k, c) in &self.caches {
            if let CacheKey::Agent(a) = k {
                out.push(info(a, Tier::Hot, c.tokens.len(), c.table.len() * bb, c.used_at, c.hits, false));
            }
        }
        for s in self.seqs.values().filter(|s| s.admitted) {
            if let Some(a) = &s.req.agent {
                out.push(info(a, Tier::Hot, s.tokens.len(), s.table.len() * bb, SystemTime::now(), s.hits, true));
            }
        }
        if let Some(t) = &self.tiers {
            for e in t.warm_entries() {
                if !out.iter().any(|o| o.agent == e.agent) {
                    out.push(info(&e.agent, Tier::Warm, e.n_tokens, e.bytes as usize, e.last_use, 0, false));
                }
            }
            for (a, n) in t.pending() {
                if !out.iter().any(|o| &o.agent == a) {
                    out.push(info(a, Tier::Warm, n, 0, SystemTime::now(), 0, false));
                }
            }
        }
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        out
    }

    /// One agent, if it has a cache anywhere.
    pub fn agent(&self, agent: &AgentId) -> Option<AgentInfo> {
        self.agents().into_iter().find(|a| &a.agent == agent)
    }

    /// Drops the agent's hot cache (writing it first when dirty and
    /// `evict_only`), and unless `evict_only` also its file and pin.
    /// Returns false when the agent had nothing; an active agent is refused.
    pub fn delete_agent(&mut self, agent: &AgentId, evict_only: bool) -> Result<bool, EngineError> {
        if self.seqs.values().any(|s| s.req.agent.as_ref() == Some(agent)) {
            return Err(EngineError::AgentBusy(agent.clone()));
        }
        let mut found = false;
        if let Some(c) = self.caches.remove(&CacheKey::Agent(agent.clone())) {
            found = true;
            if let Some(t) = &mut self.tiers {
                if evict_only && t.is_dirty(agent) {
                    t.save_now(agent, &c.tokens, &c.table, &mut self.pool);
                }
            }
            self.pool.free_table(c.table).expect("cache blocks are owned");
        }
        if let Some(t) = &mut self.tiers {
            if !evict_only {
                found |= t.forget(agent, &mut self.pool);
                t.set_pinned(agent, false);
            }
        }
        Ok(found)
    }

    /// Pins (never evicted from disk) or unpins an agent; false when the
    /// agent has no cache (and, to unpin, no pin either) or there is no
    /// disk tier.
    pub fn set_pinned(&mut self, agent: &AgentId, pinned: bool) -> bool {
        let known = self.agent(agent).is_some();
        match &mut self.tiers {
            Some(t) if known || (!pinned && t.is_pinned(agent)) => {
                t.set_pinned(agent, pinned);
                true
            }
            _ => false,
        }
    }

    /// Runs one step; false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        self.cancel_disconnected();
        let started = Instant::now();
        let schedule = {
            let mut ctx = BlockCtx {
                pool: &mut self.pool,
                seqs: &mut self.seqs,
                caches: &mut self.caches,
                tick: &mut self.tick,
                stats: &mut self.stats,
                salt: self.salt,
                tiers: self.tiers.as_mut(),
            };
            self.sched.schedule_with(&mut ctx, &|decodes| self.pace.prefill_cap(decodes))
        };
        self.stats.preemptions += schedule.preempted.len() as u64;
        if schedule.work.is_empty() {
            return false;
        }
        let mut plan = StepPlan::default();
        let mut sample = Vec::with_capacity(schedule.work.len());
        let mut step = StepStats { seqs: schedule.work.len(), ..StepStats::default() };
        for p in &schedule.work {
            let st = self.sched.get(p.seq).expect("scheduled sequence");
            let s = &self.seqs[&p.seq];
            let start = st.n_computed;
            let last = start + p.n_new == st.n_tokens;
            if st.decoding {
                step.decode_tokens += p.n_new;
            } else {
                step.prefill_tokens += p.n_new;
            }
            plan.seqs.push(SeqStep {
                tokens: s.tokens[start..start + p.n_new].to_vec(),
                start_pos: start,
                block_table: s.table.blocks().to_vec(),
                logits: if last { LogitsWanted::Last } else { LogitsWanted::None },
            });
            sample.push(last);
        }
        let fwd_start = Instant::now();
        let mut logits = std::mem::take(&mut self.logits);
        let fwd = self.model.forward_into(&plan, &mut self.pool, &mut logits);
        let fwd_ms = fwd_start.elapsed().as_secs_f64() * 1e3;
        let plan_ms = (fwd_start - started).as_secs_f64() * 1e3;
        let after_start = Instant::now();
        match fwd {
            Ok(()) => self.after_forward(&schedule.work, &sample, &mut logits),
            Err(e) => {
                tracing::error!("forward failed: {e}");
                for p in &schedule.work {
                    self.end(p.seq, None, Some(e.to_string()));
                }
            }
        }
        self.logits = logits;
        let after_ms = after_start.elapsed().as_secs_f64() * 1e3;
        step.time = started.elapsed();
        tracing::trace!(
            decodes = step.decode_tokens,
            prefill = step.prefill_tokens,
            ms = step.time.as_secs_f64() * 1e3,
            fwd_ms,
            plan_ms,
            after_ms,
            cap = self.pace.prefill_cap(step.decode_tokens.max(1)),
            decode_ms = self.pace.decode_ms(step.decode_tokens.max(1)).unwrap_or(0.0),
            prefill_ms_per_token = self.pace.prefill_ms_per_token.unwrap_or(0.0),
            "step"
        );
        self.pace.observe(&step);
        self.stats.steps += 1;
        self.stats.last_step = step;
        true
    }

    fn after_forward(&mut self, work: &[Planned], sample: &[bool], logits: &mut [f32]) {
        let vocab = self.model.config().vocab_size;
        let mut rows = logits.chunks_exact_mut(vocab);
        let bs = self.pool.layout().block_size;
        for (p, &wants) in work.iter().zip(sample) {
            self.sched.on_computed(*p);
            let computed = self.sched.get(p.seq).map_or(0, |st| st.n_computed);
            if let Some(s) = self.seqs.get_mut(&p.seq) {
                if !s.admitted {
                    s.admitted = true;
                    s.usage.queue_time = s.arrival.elapsed();
                    s.usage.computed_tokens = s.tokens.len() - s.usage.cached_tokens();
                }
                // Newly full blocks become shareable.
                while s.hashes.len() < computed / bs {
                    let i = s.hashes.len();
                    let chunk = &s.tokens[i * bs..(i + 1) * bs];
                    let h = block_hash(s.hashes.last().copied(), chunk, self.salt);
                    self.pool.register_block(s.table.blocks()[i], h, chunk);
                    s.hashes.push(h);
                }
            }
            if wants {
                let row = rows.next().expect("one logit row per sampled sequence");
                self.on_logits(p.seq, row);
            }
        }
    }

    fn on_logits(&mut self, id: SeqId, row: &mut [f32]) {
        let ctx = self.model.config().context_length;
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        for &t in &s.req.banned_ids {
            if let Some(l) = row.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        // A token's text, for JSON mode (`None`: special or unknown).
        let text_of = |t: u32| self.token_bytes.as_deref()?.get(t as usize)?.as_deref();
        let picked = match &s.json {
            None => s.sampler.sample(row, &s.tokens),
            Some(j) => s.sampler.sample_where(row, &s.tokens, |t| text_of(t).is_some_and(|b| j.accepts(b))),
        };
        if let Some(j) = &mut s.json {
            // Refused only when no token at all continues the object.
            if !text_of(picked.token).is_some_and(|b| j.feed_all(b)) {
                return self.end(id, None, Some("no token continues the JSON object".into()));
            }
        }
        let now = Instant::now();
        match s.last_token_at {
            None => s.usage.ttft = now - s.arrival,
            Some(prev) => {
                let gap = now - prev;
                s.itl_sum += gap;
                s.usage.itl_max = s.usage.itl_max.max(gap);
            }
        }
        s.last_token_at = Some(now);
        if s.req.stop_ids.contains(&picked.token) {
            return self.end(id, Some(FinishReason::Stop), None);
        }
        s.tokens.push(picked.token);
        s.n_generated += 1;
        self.sched.on_token(id);
        let (text, stopped) = match s.text.push(picked.token) {
            Ok(t) => t,
            Err(e) => return self.end(id, None, Some(e.to_string())),
        };
        // Greedy sampling skips the softmax; compute it only when asked (and
        // not for a token wholly past the stop string).
        let shown = !stopped || s.text.hidden_tail() == 0;
        let logprob = (s.req.logprobs && shown).then(|| {
            if s.req.params.is_greedy() {
                semantic_model::sampling::log_prob(row, picked.token)
            } else {
                picked.logprob
            }
        });
        // A send error means the client left; the next step cancels it.
        let _ = s.events.send(TokenEvent::Token { id: picked.token, text, logprob });
        let json_done = s.json.as_ref().is_some_and(JsonObject::is_done);
        let reason = if stopped {
            Some(FinishReason::StopString)
        } else if json_done {
            Some(FinishReason::Stop)
        } else if s.n_generated >= s.req.params.max_tokens {
            Some(FinishReason::Length)
        } else if s.tokens.len() >= ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        if reason.is_some() {
            self.end(id, reason, None);
        }
    }

    fn cancel_disconnected(&mut self) {
        let gone: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.events.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.end(id, Some(FinishReason::Cancelled), None);
        }
    }

    /// Ends a sequence: sends the last event, keeps its KV as the agent's
    /// cache (or frees it).
    fn end(&mut self, id: SeqId, reason: Option<FinishReason>, error: Option<String>) {
        let st = self.sched.remove(id);
        let Some(mut s) = self.seqs.remove(&id) else {
            return;
        };
        let computed = st.map(|st| st.n_computed).unwrap_or(0);
        s.usage.completion_tokens = s.n_generated;
        s.usage.itl_mean = s.itl_sum / (s.n_generated.max(2) as u32 - 1);
        s.usage.total_time = s.arrival.elapsed();
        let event = match (reason, error) {
            (_, Some(e)) => TokenEvent::Error(e),
            (Some(r), None) => {
                let text_tail = if r == FinishReason::StopString { String::new() } else { s.text.finish() };
                TokenEvent::Finished {
                    reason: r,
                    text_tail,
                    usage: s.usage.clone(),
                    stop: s.text.matched_stop().map(str::to_owned),
                    hidden_tokens: s.text.hidden_tail(),
                }
            }
            (None, None) => TokenEvent::Error("ended without a reason".into()),
        };
        let _ = s.events.send(event);
        self.caches.remove(&CacheKey::Preempted(id)).map(|c| self.pool.free_table(c.table));
        match s.req.agent.clone() {
            Some(agent) if computed > 0 => {
                let mut table = std::mem::take(&mut s.table);
                self.pool.truncate_table(&mut table, computed).expect("own blocks");
                self.tick += 1;
                let cached = Cached {
                    tokens: s.tokens[..computed].to_vec(),
                    table,
                    last_use: self.tick,
                    used_at: SystemTime::now(),
                    hits: s.hits,
                };
                if let Some(t) = &mut self.tiers {
                    let shared = self.pool.share_table(&cached.table);
                    t.save_later(agent.clone(), cached.tokens.clone(), shared, &mut self.pool);
                }
                if let Some(old) = self.caches.insert(CacheKey::Agent(agent), cached) {
                    self.pool.free_table(old.table).expect("own blocks");
                }
            }
            _ => self.pool.free_table(std::mem::take(&mut s.table)).expect("own blocks"),
        }
    }
}

/// The scheduler's view of blocks: sequence tables, idle caches, the pool.
struct BlockCtx<'a> {
    pool: &'a mut KvPool,
    seqs: &'a mut HashMap<SeqId, Seq>,
    caches: &'a mut HashMap<CacheKey, Cached>,
    tick: &'a mut u64,
    stats: &'a mut EngineStats,
    salt: u64,
    tiers: Option<&'a mut Tiers>,
}

impl Blocks for BlockCtx<'_> {
    fn grow(&mut self, seq: SeqId, n_tokens: usize) -> bool {
        let s = self.seqs.get_mut(&seq).expect("scheduled sequence");
        self.pool.ensure_capacity(&mut s.table, n_tokens)
    }

    fn evict_idle(&mut self) -> bool {
        let Some(key) = self.caches.iter().min_by_key(|(_, c)| c.last_use).map(|(k, _)| k.clone()) else {
            return false;
        };
        let c = self.caches.remove(&key).expect("present");
        tracing::debug!(?key, tokens = c.tokens.len(), "evicting idle cache");
        if let (CacheKey::Agent(a), Some(t)) = (&key, self.tiers.as_deref_mut()) {
            if t.is_dirty(a) {
                t.save_now(a, &c.tokens, &c.table, self.pool);
            }
        }
        self.pool.free_table(c.table).expect("cache blocks are owned");
        self.stats.evictions += 1;
        true
    }

    fn preempt(&mut self, seq: SeqId, n_computed: usize) -> usize {
        let s = self.seqs.get_mut(&seq).expect("running sequence");
        let mut table = std::mem::take(&mut s.table);
        let key = match &s.req.agent {
            Some(a) => CacheKey::Agent(a.clone()),
            None => CacheKey::Preempted(seq),
        };
        if n_computed == 0 {
            self.pool.free_table(table).expect("own blocks");
            return 0;
        }
        self.pool.truncate_table(&mut table, n_computed).expect("own blocks");
        *self.tick += 1;
        let hits = s.hits;
        let c = Cached {
            tokens: s.tokens[..n_computed].to_vec(),
            table,
            last_use: *self.tick,
            used_at: SystemTime::now(),
            hits,
        };
        if let Some(old) = self.caches.insert(key, c) {
            self.pool.free_table(old.table).expect("own blocks");
        }
        0
    }

    /// Attaches the longest verified prefix from the agent's (or the
    /// sequence's preempted) cache or, if longer, from the shared block
    /// index; then makes the block at the write frontier private.
    fn admit(&mut self, seq: SeqId) -> usize {
        let bs = self.pool.layout().block_size;
        let s = self.seqs.get_mut(&seq).expect("queued sequence");
        let key = match &s.req.agent {
            Some(a) if !self.caches.contains_key(&CacheKey::Preempted(seq)) => CacheKey::Agent(a.clone()),
            _ => CacheKey::Preempted(seq),
        };
        let (mut table, mut computed, mut hits) = (std::mem::take(&mut s.table), 0, s.hits);
        let mut from_disk = false;
        if let Some(c) = self.caches.remove(&key) {
            // Verified token by token, never on a hash alone.
            let lcp = c.tokens.iter().zip(&s.tokens).take_while(|(a, b)| a == b).count();
            self.pool.free_table(std::mem::replace(&mut table, c.table)).expect("own blocks");
            self.pool.truncate_table(&mut table, lcp).expect("own blocks");
            computed = lcp;
            hits = c.hits;
        } else if let (CacheKey::Agent(a), Some(t)) = (&key, self.tiers.as_deref_mut()) {
            // Nothing hot: the warm tier (also after a restart).
            if let Some((tokens, loaded)) = t.load(a, self.pool) {
                let lcp = tokens.iter().zip(&s.tokens).take_while(|(a, b)| a == b).count();
                self.pool.free_table(std::mem::replace(&mut table, loaded)).expect("own blocks");
                self.pool.truncate_table(&mut table, lcp).expect("own blocks");
                computed = lcp;
                from_disk = true;
            }
        }
        let shared = self.pool.match_prefix(&s.tokens, self.salt);
        if shared.len() * bs > computed {
            self.pool.free_table(std::mem::take(&mut table)).expect("own blocks");
            self.pool.attach_shared(&mut table, &shared).expect("indexed blocks exist");
            computed = shared.len() * bs;
            from_disk = false;
        }
        // At least the last prompt token is computed again (for its logits).
        computed = computed.min(s.tokens.len() - 1);
        if !self.pool.make_writable(&mut table, computed / bs) {
            computed -= computed % bs;
            self.pool.truncate_table(&mut table, computed).expect("own blocks");
        }
        self.pool.truncate_table(&mut table, computed).expect("own blocks");
        s.table = table;
        s.hashes.clear();
        for (i, chunk) in s.tokens[..computed].chunks_exact(bs).enumerate() {
            let parent = i.checked_sub(1).map(|j| s.hashes[j]);
            let h = block_hash(parent, chunk, self.salt);
            // Blocks loaded from disk become shareable too (no-op if known).
            self.pool.register_block(s.table.blocks()[i], h, chunk);
            s.hashes.push(h);
        }
        if !s.admitted {
            if from_disk {
                s.usage.cached_disk_tokens = computed;
            } else {
                s.usage.cached_hot_tokens = computed;
            }
            s.hits = hits + u64::from(computed > 0);
        }
        computed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(prefill_tokens: usize, decode_tokens: usize, ms: u64) -> StepStats {
        StepStats { seqs: 0, prefill_tokens, decode_tokens, time: Duration::from_millis(ms) }
    }

    #[test]
    fn pace_sizes_prefill_chunks_by_time() {
        let mut pace = Pace { factor: 2.5, ..Pace::default() };
        assert_eq!(pace.prefill_cap(1), 16, "no estimate yet");
        pace.observe(&step(0, 1, 4));
        pace.observe(&step(0, 4, 8));
        pace.observe(&step(100, 0, 100));
        // 1.5 x 4 ms at 1 ms per prefill token; 1.5 x 8 ms with 4 decodes.
        assert_eq!((pace.prefill_cap(1), pace.prefill_cap(4), pace.prefill_cap(3)), (6, 12, 12));
        // Deep in a long prompt a token costs 4 ms: the chunk shrinks, never below the floor.
        for _ in 0..20 {
            pace.observe(&step(4, 1, 20));
        }
        assert_eq!(pace.prefill_cap(1), MIN_PREFILL_CHUNK);
        assert_eq!(Pace { factor: 0.0, ..Pace::default() }.prefill_cap(1), usize::MAX);
    }

    #[test]
    fn one_slow_decode_step_does_not_move_the_estimate() {
        let mut pace = Pace { factor: 2.0, ..Pace::default() };
        for ms in [3, 3, 3, 3, 3, 9] {
            pace.observe(&step(0, 1, ms));
        }
        assert_eq!(pace.decode_ms(1), Some(3.0));
        for _ in 0..5 {
            pace.observe(&step(0, 1, 5));
        }
        assert_eq!(pace.decode_ms(1), Some(5.0), "a lasting change is taken in");
    }
}
