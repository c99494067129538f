//! The step plan: what the scheduler asks the model to compute in one step.
//!
//! Plain data only (block ids and token ids, never tensors). For each sequence:
//! its new token ids, the position of the first of them, and its block table,
//! which must already cover `start_pos + tokens.len()` slots. The model writes
//! the new tokens' K/V into those slots and attends over slots `0..=pos`.
//!
//! ```text
//! block_table: [b7][b2][b9]          block_size = 4
//! slots:       0123 4567 89..
//! start_pos = 6, tokens = [t6, t7, t8]  -> writes slots 6,7 (b2) and 8 (b9)
//! ```

use crate::BlockId;

/// Which positions of a sequence need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None: a prefill chunk that does not end the prompt.
    None,
    /// Only the last new token (the one to sample from).
    Last,
    /// Every new token (tests, scoring).
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqStep {
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<BlockId>,
    pub logits: LogitsWanted,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub seqs: Vec<SeqStep>,
}

impl StepPlan {
    /// Total new tokens in the step (rows of every weight matmul).
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Number of logit rows the forward pass returns.
    pub fn n_logit_rows(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| match s.logits {
                LogitsWanted::None => 0,
                LogitsWanted::Last => usize::from(!s.tokens.is_empty()),
                LogitsWanted::All => s.tokens.len(),
            })
            .sum()
    }
}
