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
use semantic_model::{LlamaModel, Sampler, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::request::{EngineError, EngineRequest, TokenEvent, Usage};
use crate::scheduler::{Blocks, Planned, Scheduler, SchedulerConfig, SeqId, SeqState};

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
    /// another agent prefills); 0 disables the cap.
    pub mixed_step_factor: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_pool_bytes: 512 << 20,
            scheduler: SchedulerConfig::default(),
            hash_salt: 0,
            mixed_step_factor: 2.5,
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
    pub last_step: StepStats,
}

/// One agent's cache as the agents API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentInfo {
    pub agent: AgentId,
    pub tokens: usize,
    pub bytes: usize,
    pub last_use: SystemTime,
    pub hits: u64,
    /// A request of this agent is running (its cache is in use).
    pub active: bool,
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
}

pub struct Engine {
    model: LlamaModel,
    tok: Tokenizer,
    pool: KvPool,
    sched: Scheduler,
    seqs: HashMap<SeqId, Seq>,
    caches: HashMap<CacheKey, Cached>,
    tick: u64,
    next_seq: SeqId,
    stats: EngineStats,
    salt: u64,
    pace: Pace,
}

/// Running estimates of step costs, to size prefill chunks next to decodes.
#[derive(Debug, Default)]
struct Pace {
    factor: f64,
    /// Decode-only step time (ms), EMA.
    decode_ms: Option<f64>,
    /// Prefill cost per token (ms), EMA.
    prefill_ms_per_token: Option<f64>,
}

impl Pace {
    fn observe(&mut self, st: &StepStats) {
        let ms = st.time.as_secs_f64() * 1e3;
        let ema = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.8 * o + 0.2 * new));
        if st.prefill_tokens == 0 && st.decode_tokens > 0 {
            self.decode_ms = ema(self.decode_ms, ms);
        } else if st.prefill_tokens >= 16 {
            let decode = if st.decode_tokens > 0 {
                self.decode_ms.unwrap_or(0.0)
            } else {
                0.0
            };
            let per = ((ms - decode) / st.prefill_tokens as f64).max(1e-3);
            self.prefill_ms_per_token = ema(self.prefill_ms_per_token, per);
        }
    }

    /// Prefill tokens allowed in a step that also decodes.
    fn prefill_cap(&self) -> usize {
        match (self.decode_ms, self.prefill_ms_per_token) {
            (Some(d), Some(p)) if self.factor > 1.0 => {
                (((self.factor - 1.0) * d / p) as usize).max(16)
            }
            _ => usize::MAX,
        }
    }
}

impl Engine {
    pub fn new(model: LlamaModel, tok: Tokenizer, cfg: &EngineConfig) -> Self {
        let pool = KvPool::with_budget(model.kv_layout(cfg.block_size), cfg.kv_pool_bytes);
        Self {
            model,
            tok,
            pool,
            sched: Scheduler::new(cfg.scheduler),
            seqs: HashMap::new(),
            caches: HashMap::new(),
            tick: 0,
            next_seq: 1,
            stats: EngineStats::default(),
            salt: cfg.hash_salt,
            pace: Pace {
                factor: cfg.mixed_step_factor,
                ..Pace::default()
            },
        }
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

    /// Validates and queues a request.
    pub fn submit(
        &mut self,
        req: EngineRequest,
        events: UnboundedSender<TokenEvent>,
    ) -> Result<(), EngineError> {
        let ctx = self.model.config().context_length;
        let n = req.prompt.len();
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if n + 1 > ctx {
            return Err(EngineError::PromptTooLong {
                prompt: n,
                context: ctx,
            });
        }
        let layout = self.pool.layout();
        let need = layout.blocks_for((n + req.params.max_tokens).min(ctx));
        let have = self.pool.blocks().n_blocks();
        if need > have {
            return Err(EngineError::PoolTooSmall { need, have });
        }
        let id = self.next_seq;
        let state = SeqState {
            id,
            agent: req.agent.clone(),
            n_tokens: n,
            n_computed: 0,
            decoding: false,
        };
        if !self.sched.add(state) {
            return Err(EngineError::Overloaded {
                waiting: self.sched.n_waiting(),
            });
        }
        self.next_seq += 1;
        let seq = Seq {
            tokens: req.prompt.clone(),
            table: BlockTable::default(),
            sampler: Sampler::new(req.params.clone()),
            text: TextStream::new(&self.tok, &req.params.stop),
            events,
            arrival: Instant::now(),
            admitted: false,
            n_generated: 0,
            usage: Usage {
                prompt_tokens: n,
                ..Usage::default()
            },
            hits: 0,
            hashes: Vec::new(),
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
            cached_agents: self
                .caches
                .keys()
                .filter(|k| matches!(k, CacheKey::Agent(_)))
                .count(),
            ..self.stats.clone()
        }
    }

    pub fn agents(&self) -> Vec<AgentInfo> {
        let bb = self.pool.layout().block_bytes();
        let mut out: Vec<AgentInfo> = self
            .caches
            .iter()
            .filter_map(|(k, c)| match k {
                CacheKey::Agent(a) => Some(AgentInfo {
                    agent: a.clone(),
                    tokens: c.tokens.len(),
                    bytes: c.table.len() * bb,
                    last_use: c.used_at,
                    hits: c.hits,
                    active: false,
                }),
                CacheKey::Preempted(_) => None,
            })
            .collect();
        for s in self.seqs.values().filter(|s| s.admitted) {
            if let Some(a) = &s.req.agent {
                out.push(AgentInfo {
                    agent: a.clone(),
                    tokens: s.tokens.len(),
                    bytes: s.table.len() * bb,
                    last_use: SystemTime::now(),
                    hits: s.hits,
                    active: true,
                });
            }
        }
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        out
    }

    /// Drops an idle agent's hot cache; false if it has none (or is active).
    pub fn delete_agent(&mut self, agent: &AgentId) -> bool {
        match self.caches.remove(&CacheKey::Agent(agent.clone())) {
            Some(c) => {
                self.pool
                    .free_table(c.table)
                    .expect("cache blocks are owned");
                true
            }
            None => false,
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
            };
            self.sched.schedule_with(&mut ctx, self.pace.prefill_cap())
        };
        self.stats.preemptions += schedule.preempted.len() as u64;
        if schedule.work.is_empty() {
            return false;
        }
        let mut plan = StepPlan::default();
        let mut sample = Vec::with_capacity(schedule.work.len());
        let mut step = StepStats {
            seqs: schedule.work.len(),
            ..StepStats::default()
        };
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
                logits: if last {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            });
            sample.push(last);
        }
        match self.model.forward(&plan, &mut self.pool) {
            Ok(logits) => self.after_forward(&schedule.work, &sample, logits),
            Err(e) => {
                tracing::error!("forward failed: {e}");
                for p in &schedule.work {
                    self.end(p.seq, None, Some(e.to_string()));
                }
            }
        }
        step.time = started.elapsed();
        self.pace.observe(&step);
        self.stats.steps += 1;
        self.stats.last_step = step;
        true
    }

    fn after_forward(&mut self, work: &[Planned], sample: &[bool], mut logits: Vec<f32>) {
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
                    s.usage.computed_tokens = s.tokens.len() - s.usage.cached_hot_tokens;
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
        let picked = s.sampler.sample(row, &s.tokens);
        if s.n_generated == 0 {
            s.usage.ttft = s.arrival.elapsed();
        }
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
        let logprob = s.req.logprobs.then_some(picked.logprob);
        // A send error means the client left; the next step cancels it.
        let _ = s.events.send(TokenEvent::Token {
            id: picked.token,
            text,
            logprob,
        });
        let reason = if stopped {
            Some(FinishReason::StopString)
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
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
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
        s.usage.total_time = s.arrival.elapsed();
        let event = match (reason, error) {
            (_, Some(e)) => TokenEvent::Error(e),
            (Some(r), None) => {
                let text_tail = if r == FinishReason::StopString {
                    String::new()
                } else {
                    s.text.finish()
                };
                TokenEvent::Finished {
                    reason: r,
                    text_tail,
                    usage: s.usage.clone(),
                }
            }
            (None, None) => TokenEvent::Error("ended without a reason".into()),
        };
        let _ = s.events.send(event);
        self.caches
            .remove(&CacheKey::Preempted(id))
            .map(|c| self.pool.free_table(c.table));
        match s.req.agent.clone() {
            Some(agent) if computed > 0 => {
                let mut table = std::mem::take(&mut s.table);
                self.pool
                    .truncate_table(&mut table, computed)
                    .expect("own blocks");
                self.tick += 1;
                let cached = Cached {
                    tokens: s.tokens[..computed].to_vec(),
                    table,
                    last_use: self.tick,
                    used_at: SystemTime::now(),
                    hits: s.hits,
                };
                if let Some(old) = self.caches.insert(CacheKey::Agent(agent), cached) {
                    self.pool.free_table(old.table).expect("own blocks");
                }
            }
            _ => self
                .pool
                .free_table(std::mem::take(&mut s.table))
                .expect("own blocks"),
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
}

impl Blocks for BlockCtx<'_> {
    fn grow(&mut self, seq: SeqId, n_tokens: usize) -> bool {
        let s = self.seqs.get_mut(&seq).expect("scheduled sequence");
        self.pool.ensure_capacity(&mut s.table, n_tokens)
    }

    fn evict_idle(&mut self) -> bool {
        let Some(key) = self
            .caches
            .iter()
            .min_by_key(|(_, c)| c.last_use)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        let c = self.caches.remove(&key).expect("present");
        tracing::debug!(?key, tokens = c.tokens.len(), "evicting idle cache");
        self.pool
            .free_table(c.table)
            .expect("cache blocks are owned");
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
        self.pool
            .truncate_table(&mut table, n_computed)
            .expect("own blocks");
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
            Some(a) if !self.caches.contains_key(&CacheKey::Preempted(seq)) => {
                CacheKey::Agent(a.clone())
            }
            _ => CacheKey::Preempted(seq),
        };
        let (mut table, mut computed, mut hits) = (std::mem::take(&mut s.table), 0, s.hits);
        if let Some(c) = self.caches.remove(&key) {
            // Verified token by token, never on a hash alone.
            let lcp = c
                .tokens
                .iter()
                .zip(&s.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            self.pool
                .free_table(std::mem::replace(&mut table, c.table))
                .expect("own blocks");
            self.pool
                .truncate_table(&mut table, lcp)
                .expect("own blocks");
            computed = lcp;
            hits = c.hits;
        }
        let shared = self.pool.match_prefix(&s.tokens, self.salt);
        if shared.len() * bs > computed {
            self.pool
                .free_table(std::mem::take(&mut table))
                .expect("own blocks");
            self.pool
                .attach_shared(&mut table, &shared)
                .expect("indexed blocks exist");
            computed = shared.len() * bs;
        }
        // At least the last prompt token is computed again (for its logits).
        computed = computed.min(s.tokens.len() - 1);
        if !self.pool.make_writable(&mut table, computed / bs) {
            computed -= computed % bs;
            self.pool
                .truncate_table(&mut table, computed)
                .expect("own blocks");
        }
        self.pool
            .truncate_table(&mut table, computed)
            .expect("own blocks");
        s.table = table;
        s.hashes.clear();
        for (i, chunk) in s.tokens[..computed].chunks_exact(bs).enumerate() {
            let parent = i.checked_sub(1).map(|j| s.hashes[j]);
            s.hashes.push(block_hash(parent, chunk, self.salt));
        }
        if !s.admitted {
            s.usage.cached_hot_tokens = computed;
            s.hits = hits + u64::from(computed > 0);
        }
        computed
    }
}
