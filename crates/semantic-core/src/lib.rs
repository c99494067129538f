//! Plain data shared by every crate of `semantic`: ids, the step plan the
//! scheduler hands to the model, sampling parameters and their validation.
//!
//! Nothing here knows about tensors or HTTP.

mod ids;
mod plan;
mod sampling;

pub use ids::{AgentId, AgentIdError, BlockId, RequestId};
pub use plan::{LogitsWanted, SeqStep, StepPlan};
pub use sampling::{FinishReason, SamplingError, SamplingParams};
