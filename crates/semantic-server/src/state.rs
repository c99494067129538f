//! Shared state of the routes: settings, the loaded model (once it is), and
//! the metrics handle. The model loads while the server already answers
//! `/health/live`; until then model routes answer 503.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use semantic_core::RequestId;
use semantic_engine::{EngineConfig, EngineError, EngineHandle};
use semantic_model::{ChatMessage, ChatTemplate, LlamaModel, Tokenizer};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Settings of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Required on `/v1/*` when set (`Authorization: Bearer` or `x-api-key`).
    pub api_key: Option<String>,
    /// Required for agent mutations when set; also accepted as an API key.
    pub admin_key: Option<String>,
    /// Request bodies over this many bytes get 413.
    pub body_limit: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long a request body may take to arrive once its headers have:
    /// a client that announces a body and stops sending it would otherwise
    /// hold its connection forever (400 when it runs out).
    pub body_deadline: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            admin_key: None,
            body_limit: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
            body_deadline: Duration::from_secs(30),
        }
    }
}

/// The loaded model: the engine that runs it and what the HTTP side needs to
/// turn requests into token ids.
pub struct Runtime {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub stop_ids: Vec<u32>,
    pub model_name: String,
    pub context_length: usize,
    /// The most tokens one sequence can hold: the context, or less when the
    /// KV pool is smaller. The default `max_tokens` fills up to it.
    pub sequence_limit: usize,
    /// Agent caches also live on disk (the warm tier).
    pub persistent: bool,
}

impl Runtime {
    /// Starts the engine thread on `model` (scanning the cache directory
    /// first when `cfg` has a disk tier).
    pub fn start(
        model: LlamaModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        model_name: String,
        cfg: EngineConfig,
    ) -> Result<Runtime, EngineError> {
        let stop_ids = template.stop_token_ids(&tokenizer);
        let context_length = model.config().context_length;
        let persistent = cfg.persist.is_some();
        let layout = model.kv_layout(cfg.block_size);
        let pool_tokens = cfg.kv_pool_bytes / layout.block_bytes().max(1) * cfg.block_size;
        let sequence_limit = context_length.min(pool_tokens);
        let engine = EngineHandle::try_spawn(model, tokenizer.clone(), model_name.clone(), cfg)?;
        Ok(Runtime { engine, tokenizer, template, stop_ids, model_name, context_length, sequence_limit, persistent })
    }

    /// Renders the chat template, then `reply_start` (the opening the reply
    /// is forced to have, usually empty), and tokenizes (CPU work: call off
    /// the reactor).
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        reply_start: &str,
    ) -> Result<Vec<u32>, ApiError> {
        let mut text = self
            .template
            .render(messages, true, tools)
            .map_err(|e| ApiError::invalid("messages", format!("chat template: {e}")))?;
        text.push_str(reply_start);
        self.encode(&text)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer.encode(text).map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))
    }

    /// Whether the model's template renders `tools` itself.
    pub fn template_knows_tools(&self) -> bool {
        self.template.source().contains("tools")
    }
}

struct Shared {
    config: ServerConfig,
    runtime: OnceLock<Arc<Runtime>>,
    shutting_down: AtomicBool,
    next_request: AtomicU64,
    metrics: Metrics,
}

/// Cheap to clone; every route gets one.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(config: ServerConfig) -> AppState {
        AppState(Arc::new(Shared {
            config,
            runtime: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            metrics: Metrics::install(),
        }))
    }

    /// A state whose model is loaded.
    pub fn with_runtime(config: ServerConfig, runtime: Runtime) -> AppState {
        let s = AppState::new(config);
        s.set_runtime(runtime);
        s
    }

    /// Marks the model loaded; later calls are ignored.
    pub fn set_runtime(&self, runtime: Runtime) {
        if self.0.runtime.set(Arc::new(runtime)).is_err() {
            tracing::warn!("runtime already set; ignoring the second one");
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The loaded model, or 503 while it loads / after shutdown began.
    pub fn runtime(&self) -> Result<Arc<Runtime>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        self.0.runtime.get().cloned().ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))
    }

    /// The runtime even during shutdown (to stop the engine).
    pub fn loaded_runtime(&self) -> Option<Arc<Runtime>> {
        self.0.runtime.get().cloned()
    }

    pub fn begin_shutdown(&self) {
        self.0.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.0.shutting_down.load(Ordering::SeqCst)
    }

    pub fn next_request_id(&self) -> RequestId {
        RequestId(self.0.next_request.fetch_add(1, Ordering::Relaxed))
    }
}
