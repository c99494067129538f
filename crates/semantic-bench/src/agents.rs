//! `semantic`'s own endpoints that the cache and memory benchmarks read:
//! the agents API (tier, sizes, and the server-side save/load timings of the
//! engine's persister) and the KV pool counters of `/health/ready` and
//! `/metrics`.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::client::{Client, ClientError};
use crate::error::BenchError;

/// `GET /v1/agents/{id}`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AgentState {
    pub id: String,
    /// `hot` (blocks in RAM) or `warm` (only on disk).
    pub tier: String,
    pub tokens: usize,
    /// Pool bytes when hot (whole blocks), file bytes when warm.
    pub bytes: u64,
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(default)]
    pub active: bool,
    #[serde(default)]
    pub dirty: bool,
    pub last_save_ms: Option<f64>,
    pub last_save_bytes: Option<u64>,
    pub last_load_ms: Option<f64>,
    pub last_load_bytes: Option<u64>,
    /// The last save's longest copy slice on the engine thread in one turn.
    #[serde(default)]
    pub last_save_engine_max_ms: Option<f64>,
}

impl AgentState {
    /// Written to disk and idle: the file matches the hot cache.
    pub fn persisted(&self) -> bool {
        !self.dirty && !self.active && self.disk_bytes > 0
    }
}

/// KV pool occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolState {
    pub pool_blocks: u64,
    pub free_blocks: u64,
}

impl PoolState {
    pub fn used_blocks(&self) -> u64 {
        self.pool_blocks.saturating_sub(self.free_blocks)
    }
}

pub struct AgentsApi<'a> {
    client: &'a Client,
}

const POLL: Duration = Duration::from_millis(10);

impl<'a> AgentsApi<'a> {
    pub fn new(client: &'a Client) -> Self {
        AgentsApi { client }
    }

    /// The agent, or `None` when it has no cache.
    pub fn agent(&self, id: &str) -> Result<Option<AgentState>, BenchError> {
        match self.client.get_json(&format!("/v1/agents/{id}")) {
            Ok(v) => {
                serde_json::from_value(v).map(Some).map_err(|e| BenchError::Unexpected(format!("agent {id}: {e}")))
            }
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn list(&self) -> Result<Vec<AgentState>, BenchError> {
        let v = self.client.get_json("/v1/agents")?;
        serde_json::from_value(v["data"].clone()).map_err(|e| BenchError::Unexpected(format!("agents list: {e}")))
    }

    /// Whether the server has the agents API at all (llama.cpp has not).
    pub fn available(&self) -> bool {
        self.client.get_json("/v1/agents").is_ok()
    }

    /// `DELETE /v1/agents/{id}` (from RAM and disk), or with `evict_only`
    /// from RAM only. Retries while the agent is still busy finishing.
    pub fn delete(&self, id: &str, evict_only: bool) -> Result<bool, BenchError> {
        let path = format!("/v1/agents/{id}?evict_only={evict_only}");
        let t0 = Instant::now();
        loop {
            match self.client.delete(&path) {
                Ok(_) => return Ok(true),
                Err(e) if e.status() == Some(404) => return Ok(false),
                Err(e) if e.status() == Some(409) && t0.elapsed() < Duration::from_secs(30) => std::thread::sleep(POLL),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls the agent until `done` holds; returns its last state.
    pub fn wait_for(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&AgentState) -> bool,
    ) -> Result<AgentState, BenchError> {
        let t0 = Instant::now();
        loop {
            if let Some(a) = self.agent(id)? {
                if done(&a) {
                    return Ok(a);
                }
            }
            if t0.elapsed() > timeout {
                return Err(BenchError::Timeout {
                    what: format!("agent {id} to be {what}"),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the write-behind has saved the agent's current cache.
    pub fn wait_persisted(&self, id: &str) -> Result<AgentState, BenchError> {
        self.wait_for(id, "saved to disk", Duration::from_secs(60), AgentState::persisted)
    }

    /// Drops the agent from RAM (its file stays) and waits until it is warm.
    pub fn evict(&self, id: &str) -> Result<AgentState, BenchError> {
        self.delete(id, true)?;
        // A dirty agent shows as warm before its file lands: wait for the file.
        self.wait_for(id, "warm", Duration::from_secs(60), |a| a.tier == "warm" && a.disk_bytes > 0 && !a.dirty)
    }

    /// Waits until no agent is dirty or active (the persister is idle), so
    /// the next measurement does not share the CPU with earlier writes.
    pub fn quiesce(&self) -> Result<(), BenchError> {
        let t0 = Instant::now();
        // A deleted agent's save still in flight is in no list, but its
        // file may be on disk until the engine sees the write end.
        let saving = || -> Result<bool, BenchError> {
            Ok(self.client.get_json("/health/ready")?["saves_in_flight"].as_u64().unwrap_or(0) > 0)
        };
        while self.list()?.iter().any(|a| a.dirty || a.active) || saving()? {
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(BenchError::Timeout { what: "the persister to go idle".into(), seconds: 120 });
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Deletes every agent whose id starts with `prefix`.
    pub fn delete_all(&self, prefix: &str) -> Result<usize, BenchError> {
        let ids: Vec<String> = self.list()?.into_iter().map(|a| a.id).filter(|id| id.starts_with(prefix)).collect();
        for id in &ids {
            self.delete(id, false)?;
        }
        Ok(ids.len())
    }

    pub fn pool(&self) -> Result<PoolState, BenchError> {
        let v = self.client.get_json("/health/ready")?;
        let n = |k: &str| v[k].as_u64().ok_or_else(|| BenchError::Unexpected(format!("/health/ready lacks `{k}`")));
        Ok(PoolState { pool_blocks: n("pool_blocks")?, free_blocks: n("free_blocks")? })
    }

    /// Bytes of one KV block (`semantic_kv_block_bytes` in /metrics).
    pub fn block_bytes(&self) -> Result<u64, BenchError> {
        let text = self.client.get_text("/metrics")?;
        prometheus_value(&text, "semantic_kv_block_bytes")
            .map(|v| v as u64)
            .ok_or_else(|| BenchError::Unexpected("/metrics lacks semantic_kv_block_bytes".into()))
    }
}

/// The value of an unlabelled sample in Prometheus text.
pub fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether an error means the agent is unknown (a 404).
pub fn is_not_found(e: &ClientError) -> bool {
    e.status() == Some(404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_agent_json_of_the_server() {
        let v = serde_json::json!({"active":false,"bytes":46448640,"dirty":false,"disk_bytes":46462096,"hits":1,
            "id":"s2","idle_seconds":2.0,"last_load_bytes":null,"last_load_ms":null,"last_save_bytes":46462096,
            "last_save_ms":28.18,"last_use":1795844512.68,"pinned":false,"tier":"hot","tokens":2016});
        let a: AgentState = serde_json::from_value(v).unwrap();
        assert!(a.persisted());
        assert_eq!((a.tokens, a.last_save_ms, a.last_load_ms), (2016, Some(28.18), None));
    }

    #[test]
    fn reads_prometheus_samples() {
        let text = "# HELP x\nsemantic_kv_block_bytes 368640\nsemantic_kv_block_bytes_total 1\n";
        assert_eq!(prometheus_value(text, "semantic_kv_block_bytes"), Some(368640.0));
        assert_eq!(prometheus_value(text, "missing"), None);
    }
}
