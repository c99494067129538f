//! Exact step plans for scripted queues.

use std::collections::HashMap;

use super::*;

/// Blocks of 4 tokens out of a fixed free count, with idle caches of given
/// sizes (evicted front first).
struct FakeBlocks {
    free: usize,
    held: HashMap<SeqId, usize>,
    idle: Vec<usize>,
    log: Vec<String>,
}

impl FakeBlocks {
    fn new(free: usize) -> Self {
        Self { free, held: HashMap::new(), idle: Vec::new(), log: Vec::new() }
    }
}

impl Blocks for FakeBlocks {
    fn grow(&mut self, seq: SeqId, n_tokens: usize) -> bool {
        let have = self.held.get(&seq).copied().unwrap_or(0);
        let need = n_tokens.div_ceil(4).saturating_sub(have);
        if need > self.free {
            return false;
        }
        self.free -= need;
        *self.held.entry(seq).or_default() += need;
        true
    }

    fn evict_idle(&mut self) -> bool {
        if self.idle.is_empty() {
            return false;
        }
        let b = self.idle.remove(0);
        self.free += b;
        self.log.push(format!("evict {b}"));
        true
    }

    fn preempt(&mut self, seq: SeqId, _n_computed: usize) -> usize {
        self.free += self.held.remove(&seq).unwrap_or(0);
        self.log.push(format!("preempt {seq}"));
        0
    }
}

fn seq(id: SeqId, agent: Option<&str>, prompt: usize) -> SeqState {
    SeqState {
        id,
        agent: agent.map(|a| AgentId::new(a).unwrap()),
        n_tokens: prompt,
        n_computed: 0,
        decoding: false,
        paced: false,
    }
}

fn cfg(step_tokens: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig { step_tokens, max_running, max_waiting: 8 }
}

fn p(seq: SeqId, n_new: usize) -> Planned {
    Planned { seq, n_new }
}

/// Applies a schedule as the engine would: computed, and a token sampled for
/// every sequence whose pending tokens are now all computed.
fn apply(s: &mut Scheduler, plan: &StepSchedule) {
    for w in &plan.work {
        s.on_computed(*w);
        if s.get(w.seq).unwrap().pending() == 0 {
            s.on_token(w.seq);
        }
    }
}

#[test]
fn budget_goes_to_decodes_first_then_chunked_prefill() {
    let mut s = Scheduler::new(cfg(8, 4));
    let mut b = FakeBlocks::new(100);
    assert!(s.add(seq(1, None, 3)));
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 3)]);
    apply(&mut s, &plan);
    // A long prompt joins at the next step and takes what the decode leaves.
    assert!(s.add(seq(2, None, 20)));
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 7)]);
    apply(&mut s, &plan);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 7)]);
    apply(&mut s, &plan);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 6)]);
    apply(&mut s, &plan);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 1)], "both decode now");
}

#[test]
fn max_running_and_queue_bound() {
    let mut s = Scheduler::new(SchedulerConfig { step_tokens: 100, max_running: 2, max_waiting: 2 });
    let mut b = FakeBlocks::new(100);
    assert!(s.add(seq(1, None, 2)));
    assert!(s.add(seq(2, None, 2)));
    assert!(!s.add(seq(3, None, 2)), "waiting queue full");
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 2), p(2, 2)]);
    assert!(s.add(seq(3, None, 2)));
    apply(&mut s, &plan);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 1)], "3 waits for a free slot");
    s.remove(1);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(2, 1), p(3, 2)]);
}

#[test]
fn one_request_per_agent_at_a_time_in_arrival_order() {
    let mut s = Scheduler::new(cfg(100, 8));
    let mut b = FakeBlocks::new(100);
    s.add(seq(1, Some("coder"), 4));
    s.add(seq(2, Some("coder"), 4));
    s.add(seq(3, Some("reviewer"), 4));
    s.add(seq(4, None, 4));
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 4), p(3, 4), p(4, 4)], "2 waits behind 1");
    apply(&mut s, &plan);
    s.remove(1);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(3, 1), p(4, 1), p(2, 4)]);
}

#[test]
fn out_of_blocks_evicts_idle_caches_then_preempts_the_newest() {
    let mut s = Scheduler::new(cfg(100, 8));
    let mut b = FakeBlocks::new(4);
    b.idle = vec![1, 1];
    s.add(seq(1, None, 8)); // 2 blocks
    s.add(seq(2, None, 8)); // 2 blocks
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 8), p(2, 8)]);
    apply(&mut s, &plan);
    // Each decode needs a third block: the idle caches go first ...
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 1)]);
    assert_eq!(b.log, vec!["evict 1", "evict 1"]);
    apply(&mut s, &plan);
    for _ in 0..3 {
        let plan = s.schedule(&mut b);
        apply(&mut s, &plan);
    }
    // ... then at 13 tokens seq 1 needs a 4th block: seq 2 (newest) is preempted.
    let plan = s.schedule(&mut b);
    assert_eq!(plan.preempted, vec![2]);
    assert_eq!(plan.work, vec![p(1, 1)]);
    assert_eq!(b.log.last().unwrap(), "preempt 2");
    let st = s.get(2).unwrap();
    assert_eq!((st.n_computed, st.decoding, st.n_tokens), (0, false, 13));
    assert_eq!(s.n_waiting(), 1);
    // When seq 1 finishes, seq 2 resumes by recomputing all 13 tokens.
    apply(&mut s, &plan);
    b.free += b.held.remove(&1).unwrap();
    s.remove(1);
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(2, 13)]);
}

#[test]
fn a_sequence_that_cannot_fit_alone_preempts_itself_and_waits() {
    let mut s = Scheduler::new(cfg(100, 8));
    let mut b = FakeBlocks::new(1);
    s.add(seq(1, None, 4));
    let plan = s.schedule(&mut b);
    assert_eq!(plan.work, vec![p(1, 4)]);
    apply(&mut s, &plan);
    let plan = s.schedule(&mut b);
    assert_eq!((plan.work.len(), plan.preempted.clone()), (0, vec![1]));
    assert!(!s.is_idle());
}

#[test]
fn prefill_is_capped_while_others_decode() {
    let mut s = Scheduler::new(cfg(128, 4));
    let mut b = FakeBlocks::new(100);
    s.add(seq(1, None, 3));
    let cap = |decodes: usize| 16 * decodes;
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 3)], "no decode yet: no cap");
    apply(&mut s, &plan);
    s.add(seq(2, None, 100));
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 16)]);
    apply(&mut s, &plan);
    for _ in 0..2 {
        let plan = s.schedule_with(&mut b, &cap);
        apply(&mut s, &plan);
    }
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 16)], "52 left, a short prompt's size, but paced to the end");
    apply(&mut s, &plan);
    s.remove(1);
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(2, 36)], "alone again: the whole budget");
}

#[test]
fn short_prompts_are_prefilled_whole_next_to_decodes() {
    let mut s = Scheduler::new(cfg(128, 8));
    let mut b = FakeBlocks::new(100);
    let cap = |_: usize| 4;
    for id in 1..=3 {
        s.add(seq(id, None, 40));
    }
    s.add(seq(4, None, 60));
    s.add(seq(5, None, 60));
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 40), p(2, 40), p(3, 40), p(4, 8)], "no decode yet: the budget");
    apply(&mut s, &plan);
    // 3 decodes, 2 prefills: capped, but both prompts are short (<= 64).
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 1), p(3, 1), p(4, 52), p(5, 60)]);
    apply(&mut s, &plan);
    // A long prompt next to the 5 decodes is held to the cap, and a short
    // one after it still goes whole.
    s.add(seq(6, None, 90));
    s.add(seq(7, None, 20));
    let plan = s.schedule_with(&mut b, &cap);
    let decodes: Vec<Planned> = (1..=5).map(|id| p(id, 1)).collect();
    assert_eq!(plan.work[..5], decodes[..]);
    assert_eq!(plan.work[5..], [p(6, 4), p(7, 20)]);
}

#[test]
fn prefill_is_not_capped_while_prefills_outnumber_decodes() {
    let mut s = Scheduler::new(cfg(64, 4));
    let mut b = FakeBlocks::new(100);
    let cap = |_: usize| 4;
    s.add(seq(1, None, 3));
    let plan = s.schedule_with(&mut b, &cap);
    apply(&mut s, &plan);
    s.add(seq(2, None, 100));
    s.add(seq(3, None, 100));
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 63)], "2 prefills, 1 decode: the whole budget");
    apply(&mut s, &plan);
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 37), p(3, 26)]);
    apply(&mut s, &plan);
    let plan = s.schedule_with(&mut b, &cap);
    assert_eq!(plan.work, vec![p(1, 1), p(2, 1), p(3, 4)], "1 prefill, 2 decodes: capped");
}
