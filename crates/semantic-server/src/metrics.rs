//! Prometheus metrics. Counters and histograms are recorded where things
//! happen (the `metrics` macros); engine gauges (pool blocks, queue lengths,
//! agents) are read from [`EngineStats`] at scrape time.
//!
//! The recorder is process-global: the first [`Metrics::install`] installs it
//! and later ones (several servers in one test process) share it.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use semantic_engine::{AgentInfo, EngineStats, Tier, Usage};

pub const REQUESTS: &str = "semantic_http_requests_total";
pub const REQUEST_SECONDS: &str = "semantic_http_request_duration_seconds";
pub const TTFT_SECONDS: &str = "semantic_time_to_first_token_seconds";
pub const INTER_TOKEN_SECONDS: &str = "semantic_inter_token_latency_seconds";
pub const E2E_SECONDS: &str = "semantic_e2e_request_latency_seconds";
pub const QUEUE_SECONDS: &str = "semantic_queue_time_seconds";
pub const PROMPT_TOKENS: &str = "semantic_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "semantic_generated_tokens_total";
pub const CACHED_TOKENS: &str = "semantic_cached_prompt_tokens_total";
pub const COMPUTED_TOKENS: &str = "semantic_computed_prompt_tokens_total";
pub const FINISHED: &str = "semantic_requests_finished_total";

const LATENCY_BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The scrape side of the global recorder.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn install() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .expect("latency buckets are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be sparse");
            }
            handle
        });
        Metrics { handle: handle.clone() }
    }

    /// The Prometheus text, after refreshing the engine gauges.
    pub fn render(&self, stats: Option<&EngineStats>, agents: Option<&[AgentInfo]>) -> String {
        if let Some(s) = stats {
            let used = s.pool_blocks.saturating_sub(s.free_blocks);
            gauge!("semantic_kv_pool_blocks", "state" => "used").set(used as f64);
            gauge!("semantic_kv_pool_blocks", "state" => "free").set(s.free_blocks as f64);
            gauge!("semantic_kv_block_bytes").set(s.block_bytes as f64);
            gauge!("semantic_requests_running").set(s.running as f64);
            gauge!("semantic_requests_waiting").set(s.waiting as f64);
            counter!("semantic_engine_steps_total").absolute(s.steps);
            counter!("semantic_kv_evictions_total").absolute(s.evictions);
            counter!("semantic_preemptions_total").absolute(s.preemptions);
            counter!("semantic_cache_save_errors_total").absolute(s.save_errors);
            gauge!("semantic_disk_bytes").set(s.disk_bytes as f64);
        }
        if let Some(a) = agents {
            for tier in [Tier::Hot, Tier::Warm] {
                let of_tier = a.iter().filter(|a| a.tier == tier);
                let label = crate::agents::tier_name(tier);
                gauge!("semantic_agents", "tier" => label).set(of_tier.clone().count() as f64);
                let bytes: usize = of_tier.map(|a| a.bytes).sum();
                gauge!("semantic_agent_cache_bytes", "tier" => label).set(bytes as f64);
            }
            let active = a.iter().filter(|a| a.active).count();
            gauge!("semantic_agents_active").set(active as f64);
            let pinned = a.iter().filter(|a| a.pinned).count();
            gauge!("semantic_agents_pinned").set(pinned as f64);
        }
        self.handle.run_upkeep();
        self.handle.render()
    }
}

pub fn record_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    let labels = [("route", route.to_string()), ("method", method.to_string()), ("status", status.to_string())];
    counter!(REQUESTS, &labels).increment(1);
    histogram!(REQUEST_SECONDS, "route" => route.to_string()).record(elapsed.as_secs_f64());
}

pub fn record_inter_token(gap: Duration) {
    histogram!(INTER_TOKEN_SECONDS).record(gap.as_secs_f64());
}

/// Token counts and latencies of a finished generation.
pub fn record_finished(api: &'static str, usage: &Usage, reason: &'static str) {
    histogram!(TTFT_SECONDS, "api" => api).record(usage.ttft.as_secs_f64());
    histogram!(E2E_SECONDS, "api" => api).record(usage.total_time.as_secs_f64());
    histogram!(QUEUE_SECONDS).record(usage.queue_time.as_secs_f64());
    counter!(PROMPT_TOKENS).increment(usage.prompt_tokens as u64);
    counter!(GENERATED_TOKENS).increment(usage.completion_tokens as u64);
    counter!(CACHED_TOKENS, "tier" => "hot").increment(usage.cached_hot_tokens as u64);
    counter!(CACHED_TOKENS, "tier" => "disk").increment(usage.cached_disk_tokens as u64);
    counter!(COMPUTED_TOKENS).increment(computed_prompt_tokens(usage) as u64);
    counter!(FINISHED, "api" => api, "reason" => reason).increment(1);
}

/// Prompt tokens prefilled by this request. The engine's `computed_tokens`
/// when it reports one, else every prompt token not read from a cache.
/// A request whose client left before its end.
pub fn record_cancelled(api: &'static str) {
    counter!(FINISHED, "api" => api, "reason" => "cancelled").increment(1);
}

pub fn computed_prompt_tokens(usage: &Usage) -> usize {
    if usage.computed_tokens > 0 {
        usage.computed_tokens
    } else {
        usage.prompt_tokens.saturating_sub(usage.cached_tokens())
    }
}

/// Histograms of agent-cache disk writes and loads (seconds and bytes).
pub fn record_io(events: &[semantic_engine::IoEvent]) {
    for e in events {
        let op = if e.save { "save" } else { "load" };
        histogram!("semantic_cache_io_seconds", "op" => op).record(e.duration.as_secs_f64());
        histogram!("semantic_cache_io_bytes", "op" => op).record(e.bytes as f64);
    }
}
