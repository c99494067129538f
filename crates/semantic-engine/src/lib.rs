//! The engine: a single thread that owns the model, the KV pool, the
//! scheduler and every sequence, and an async [`EngineHandle`] in front of it.
//!
//! ```text
//! EngineHandle (Clone) --Command--> engine thread: loop { schedule; forward; sample; update }
//!          <--TokenEvent stream (per request)--
//! ```

mod engine;
mod handle;
pub mod request;
pub mod scheduler;
mod tiers;

pub use engine::{AgentInfo, Engine, EngineConfig, EngineStats, StepStats, Tier};
pub use handle::{EngineHandle, ModelInfo, TokenStream};
pub use request::{EngineError, EngineRequest, TokenEvent, Usage};
pub use scheduler::{SchedulerConfig, SeqId};
pub use semantic_store::{KvCodec, ModelFingerprint};
pub use tiers::{IoEvent, IoTimes, PersistConfig, COPY_BYTES_PER_TURN};
