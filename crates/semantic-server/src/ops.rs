//! Operations: liveness, readiness and Prometheus metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::state::AppState;

/// 200 while the process serves HTTP.
pub async fn live() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// 200 when the model is loaded, the engine answers and the KV pool is not
/// exhausted; 503 with the reason otherwise.
pub async fn ready(State(state): State<AppState>) -> Response {
    let not_ready = |reason: String| {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "reason": reason}))).into_response()
    };
    let rt = match state.runtime() {
        Ok(rt) => rt,
        Err(e) => return not_ready(e.to_string()),
    };
    let stats = match rt.engine.stats().await {
        Ok(s) => s,
        Err(e) => return not_ready(e.to_string()),
    };
    // Exhausted: nothing free, nothing evictable, and requests waiting.
    if stats.free_blocks == 0 && stats.cached_agents == 0 && stats.waiting > 0 {
        return not_ready("the KV pool is exhausted".into());
    }
    Json(json!({
        "status": "ok",
        "model": rt.model_name,
        "running": stats.running,
        "waiting": stats.waiting,
        "free_blocks": stats.free_blocks,
        "pool_blocks": stats.pool_blocks,
        "saves_in_flight": stats.saves_in_flight,
    }))
    .into_response()
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (stats, agents) = match state.runtime() {
        Ok(rt) => {
            if let Ok(events) = rt.engine.take_io_events().await {
                crate::metrics::record_io(&events);
            }
            (rt.engine.stats().await.ok(), rt.engine.agents().await.ok())
        }
        Err(_) => (None, None),
    };
    let text = state.metrics().render(stats.as_ref(), agents.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
