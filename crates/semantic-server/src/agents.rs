//! The agents API: list, inspect, delete or evict, pin and unpin agent caches.
//!
//! `tier` is `hot` (KV blocks in RAM, maybe also on disk) or `warm` (only on
//! disk). Evicting, pinning and unpinning need the disk tier (`--cache-dir`
//! with persistence on); without it they answer 501.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use semantic_core::AgentId;
use semantic_engine::{AgentInfo, Tier};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{bad_agent_id, ApiError, OpenAiError};
use crate::state::{AppState, Runtime};

pub fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Hot => "hot",
        Tier::Warm => "warm",
    }
}

fn agent_json(a: &AgentInfo) -> Value {
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let idle = SystemTime::now().duration_since(a.last_use).map_or(0.0, |d| d.as_secs_f64());
    json!({
        "id": a.agent.as_str(),
        "tier": tier_name(a.tier),
        "tokens": a.tokens,
        "bytes": a.bytes,
        "disk_bytes": a.disk_bytes,
        "last_use": unix(a.last_use),
        "idle_seconds": idle,
        "hits": a.hits,
        "pinned": a.pinned,
        "active": a.active,
        "dirty": a.dirty,
    })
}

fn io_json(io: Option<(Duration, u64)>) -> (Value, Value) {
    match io {
        Some((d, bytes)) => (json!(d.as_secs_f64() * 1e3), json!(bytes)),
        None => (Value::Null, Value::Null),
    }
}

fn parse_id(id: &str) -> Result<AgentId, ApiError> {
    AgentId::new(id).map_err(|e| bad_agent_id("id", e))
}

fn not_found(id: &AgentId) -> ApiError {
    ApiError::NotFound(format!("agent `{id}` has no cache"))
}

fn needs_disk_tier(rt: &Runtime, what: &str) -> Result<(), ApiError> {
    if rt.persistent {
        Ok(())
    } else {
        Err(ApiError::NotImplemented(format!("{what} needs the disk tier; this server keeps agent caches in RAM only")))
    }
}

pub async fn list(State(state): State<AppState>) -> Result<Response, OpenAiError> {
    let rt = state.runtime()?;
    let agents = rt.engine.agents().await?;
    let data: Vec<Value> = agents.iter().map(agent_json).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, OpenAiError> {
    let id = parse_id(&id)?;
    let rt = state.runtime()?;
    let a = rt.engine.agent(id.clone()).await?.ok_or_else(|| not_found(&id))?;
    let mut v = agent_json(&a);
    let (load_ms, load_bytes) = io_json(a.io.last_load);
    let (save_ms, save_bytes) = io_json(a.io.last_save);
    v["last_load_ms"] = load_ms;
    v["last_load_bytes"] = load_bytes;
    v["last_save_ms"] = save_ms;
    v["last_save_bytes"] = save_bytes;
    v["last_save_engine_max_ms"] = a.io.last_save_engine_max.map_or(Value::Null, |d| json!(d.as_secs_f64() * 1e3));
    Ok(Json(v).into_response())
}

#[derive(Deserialize, Debug, Default)]
pub struct DeleteQuery {
    evict_only: Option<bool>,
}

/// Deletes the agent's cache from RAM and disk, or with `?evict_only=true`
/// drops it from RAM only (writing the disk copy first when needed).
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Response, OpenAiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid("evict_only", e.body_text()))?;
    let id = parse_id(&id)?;
    let rt = state.runtime()?;
    let evict_only = q.evict_only.unwrap_or(false);
    if evict_only {
        needs_disk_tier(&rt, "`evict_only`")?;
    }
    if !rt.engine.delete_agent_with(id.clone(), evict_only).await? {
        return Err(not_found(&id).into());
    }
    tracing::info!(agent = %id, evict_only, "agent cache deleted");
    let key = if evict_only { "evicted" } else { "deleted" };
    Ok(Json(json!({"id": id.as_str(), key: true})).into_response())
}

async fn set_pinned(state: AppState, id: String, pinned: bool) -> Result<Response, OpenAiError> {
    let id = parse_id(&id)?;
    let rt = state.runtime()?;
    needs_disk_tier(&rt, "pinning")?;
    if !rt.engine.set_pinned(id.clone(), pinned).await? {
        return Err(not_found(&id).into());
    }
    tracing::info!(agent = %id, pinned, "agent pin changed");
    Ok(Json(json!({"id": id.as_str(), "pinned": pinned})).into_response())
}

pub async fn pin(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, OpenAiError> {
    set_pinned(state, id, true).await
}

pub async fn unpin(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, OpenAiError> {
    set_pinned(state, id, false).await
}
