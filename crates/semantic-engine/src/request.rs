//! What crosses the engine boundary: requests in, token events out.

use std::time::Duration;

use semantic_core::{AgentId, FinishReason, RequestId, SamplingParams};

/// A validated request: token ids already templated and tokenized.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    pub id: RequestId,
    /// Requests of one agent run one at a time, in arrival order, and reuse
    /// the agent's KV cache. `None`: an anonymous request.
    pub agent: Option<AgentId>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Token ids that end generation (EOS, end-of-turn), not emitted.
    pub stop_ids: Vec<u32>,
    /// Token ids never sampled (logit -inf): the end-of-sequence ids when a
    /// client asks to ignore them, as llama.cpp's `ignore_eos` does, so the
    /// model goes on writing text rather than emitting empty EOS tokens.
    pub banned_ids: Vec<u32>,
    pub logprobs: bool,
}

/// Where the prompt's KV came from, and how long each phase took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV was reused from RAM (hot tier).
    pub cached_hot_tokens: usize,
    /// Prompt tokens whose KV was loaded from disk (warm tier).
    pub cached_disk_tokens: usize,
    /// Prompt tokens computed by prefill in this request.
    pub computed_tokens: usize,
    pub queue_time: Duration,
    /// Arrival to first token.
    pub ttft: Duration,
    /// Mean and largest gap between consecutive generated tokens.
    pub itl_mean: Duration,
    pub itl_max: Duration,
    pub total_time: Duration,
}

impl Usage {
    pub fn cached_tokens(&self) -> usize {
        self.cached_hot_tokens + self.cached_disk_tokens
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum TokenEvent {
    /// One generated token and the text it completes (may be empty while a
    /// multi-byte character or a possible stop string is held back).
    Token { id: u32, text: String, logprob: Option<f32> },
    /// The last event of a stream.
    Finished {
        reason: FinishReason,
        text_tail: String,
        usage: Usage,
        /// The stop string that matched (`reason == StopString`).
        stop: Option<String>,
        /// The last this many `Token` events carried no text of the reply
        /// (their text was in or after the stop string): not the reply's
        /// tokens, though generated (and counted in `usage`).
        hidden_tokens: usize,
    },
    /// The request failed inside the engine; the last event of a stream.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the server is overloaded: {waiting} requests are waiting; retry later")]
    Overloaded { waiting: usize },
    #[error(
        "prompt of {prompt} tokens plus at least one generated token does not fit the context of {context} tokens"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt needs {need} KV blocks but the pool only has {have}; raise --kv-pool-mb")]
    PoolTooSmall { need: usize, have: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("cache storage: {0}")]
    Storage(String),
    #[error("agent `{0}` has a request in progress")]
    AgentBusy(AgentId),
    /// The engine could not be built (its K/V pool not allocated).
    #[error("{0}")]
    Setup(String),
}
