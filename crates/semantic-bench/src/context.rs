//! What every scenario gets: the plan (sizes and repetitions, full or
//! quick), the model (to build prompts), a progress sink and a seed source
//! that makes every prompt of a run unique.

use crate::client::Client;
use crate::error::BenchError;
use crate::model::{ModelInfo, Prompt};

/// Sizes and repetitions of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub quick: bool,
    /// Concurrent agents of the throughput runs.
    pub agents: Vec<usize>,
    pub batch_prompts: Vec<usize>,
    pub batch_gen: usize,
    pub batch_reps: usize,
    /// Prompt of the agent that prefills while another decodes.
    pub itl_prefill: usize,
    /// Tokens the decoding agent generates: enough to outlast the prefill.
    pub itl_decode_tokens: usize,
    /// Cached context sizes of the cache benchmarks (prompt tokens; the
    /// largest leaves room for `resume_gen` in an 8K context).
    pub cache_sizes: Vec<usize>,
    pub codecs: Vec<&'static str>,
    pub cold_reps: usize,
    pub hot_reps: usize,
    pub disk_reps: usize,
    pub dropped_cache_reps: usize,
    pub restarts: usize,
    pub resume_gen: usize,
    pub memory_agents: Vec<usize>,
    pub memory_tokens: usize,
    /// Odd prompt lengths for the block padding measurement.
    pub padding_lengths: Vec<usize>,
    pub leak_cycles: usize,
    pub leak_tokens: usize,
    pub load_reps: usize,
    /// Prompts and greedy steps of the codec fidelity benchmark.
    pub fidelity_prompts: usize,
    pub fidelity_gen: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        let pick = |q: usize, full: usize| if quick { q } else { full };
        Plan {
            quick,
            agents: vec![1, 3, 5, 8],
            batch_prompts: if quick { vec![128] } else { vec![128, 1024] },
            batch_gen: pick(64, 200),
            batch_reps: pick(1, 3),
            itl_prefill: 2048,
            itl_decode_tokens: 1536,
            cache_sizes: if quick { vec![2048, 8128] } else { vec![2048, 4096, 8128] },
            codecs: vec!["f16", "q8_0", "q4_0"],
            cold_reps: pick(1, 3),
            hot_reps: pick(2, 5),
            disk_reps: pick(2, 5),
            dropped_cache_reps: pick(1, 2),
            restarts: pick(1, 2),
            resume_gen: 32,
            memory_agents: vec![1, 5, 10],
            memory_tokens: pick(1024, 2048),
            padding_lengths: vec![50, 100, 333, 777, 1000],
            leak_cycles: 50,
            leak_tokens: pick(200, 500),
            load_reps: pick(1, 3),
            fidelity_prompts: pick(2, 5),
            fidelity_gen: pick(16, 32),
        }
    }

    /// "2K", "4K", "8K": the label of a cache size.
    pub fn size_label(tokens: usize) -> String {
        format!("{}K", (tokens + 512) / 1024)
    }
}

/// Where progress goes: a progress bar in the CLI, stderr lines in tests.
pub trait Progress: Send {
    /// A new stage of about `steps` steps.
    fn stage(&mut self, name: &str, steps: u64);
    /// One step done.
    fn step(&mut self, msg: &str);
    /// A line worth keeping (a skipped part, a warning).
    fn note(&mut self, msg: &str);
    /// The run is over.
    fn finish(&mut self) {}
}

/// Progress as plain lines on stderr.
#[derive(Default)]
pub struct StderrProgress {
    stage: String,
    done: u64,
    total: u64,
}

impl Progress for StderrProgress {
    fn stage(&mut self, name: &str, steps: u64) {
        (self.stage, self.done, self.total) = (name.to_owned(), 0, steps);
        eprintln!("== {name}");
    }

    fn step(&mut self, msg: &str) {
        self.done += 1;
        eprintln!("  [{}/{}] {msg}", self.done, self.total.max(self.done));
    }

    fn note(&mut self, msg: &str) {
        eprintln!("  note ({}): {msg}", self.stage);
    }
}

/// A server the HTTP-level scenarios talk to.
pub struct Target {
    pub name: String,
    pub client: Client,
    /// `semantic`'s agents API is there (llama.cpp and others lack it).
    pub has_agents_api: bool,
}

pub struct Ctx<'a> {
    pub model: &'a ModelInfo,
    pub plan: &'a Plan,
    pub progress: &'a mut dyn Progress,
    pub seeds: &'a mut u64,
}

impl Ctx<'_> {
    /// A seed no other prompt of this run has.
    pub fn seed(&mut self) -> u64 {
        *self.seeds += 1;
        *self.seeds
    }

    /// A fresh prompt of `tokens` templated tokens.
    pub fn prompt(&mut self, tokens: usize) -> Result<Prompt, BenchError> {
        let seed = self.seed();
        self.model.prompt(tokens, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(Plan::size_label(2048), "2K");
        assert_eq!(Plan::size_label(4096), "4K");
        assert_eq!(Plan::size_label(8128), "8K");
    }

    #[test]
    fn quick_is_smaller_but_keeps_every_benchmark() {
        let (q, f) = (Plan::new(true), Plan::new(false));
        assert!(q.batch_reps <= f.batch_reps && q.cache_sizes.len() <= f.cache_sizes.len());
        assert_eq!(q.memory_agents, vec![1, 5, 10]);
        assert_eq!(q.leak_cycles, 50);
        assert!(f.cache_sizes.iter().all(|&s| s + f.resume_gen <= 8192));
    }
}
