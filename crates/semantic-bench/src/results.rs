//! `benchmark_results.json`: every measurement as a record (group, name,
//! server, parameters, values with units, median and spread) plus the run's
//! metadata and the verdicts.
//!
//! ```text
//! { "schema": "semantic-bench/1",
//!   "metadata": { model_path, model_fingerprint, cpu_model, cores, ram_bytes,
//!                 git_commit, timestamp, quick, ... },
//!   "records": [ { "group": "batching", "name": "throughput", "server": "semantic",
//!                  "params": {"agents": 3, "prompt_tokens": 128},
//!                  "values": [ {"name": "aggregate_tok_s", "unit": "tok/s",
//!                               "median": .., "min": .., "max": .., "n": 3,
//!                               "samples": [..]} ] } ],
//!   "verdicts": [ ... ] }
//! ```
//!
//! A record is identified by (group, name, server, params): adding one with
//! the same key replaces the old one, so per-file test runs accumulate into
//! one file.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::BenchError;
use crate::model::ModelShape;
use crate::stats::Summary;
use crate::verdict::Verdict;

pub const SCHEMA: &str = "semantic-bench/1";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    ModelLoad,
    Batching,
    Cache,
    CodecFidelity,
    Memory,
}

impl Group {
    pub fn title(self) -> &'static str {
        match self {
            Group::ModelLoad => "Model load",
            Group::Batching => "Batching performance",
            Group::Cache => "Cache save, load and resume",
            Group::CodecFidelity => "KV codec fidelity vs f16",
            Group::Memory => "Memory utilization",
        }
    }
}

/// One measured quantity: median and spread over `n` samples.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Record {
    pub group: Group,
    pub name: String,
    pub server: String,
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    pub values: Vec<Metric>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Record {
    pub fn new(group: Group, name: &str, server: &str) -> Record {
        Record {
            group,
            name: name.to_owned(),
            server: server.to_owned(),
            params: BTreeMap::new(),
            values: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn param(mut self, key: &str, v: impl Into<Value>) -> Record {
        self.params.insert(key.to_owned(), v.into());
        self
    }

    /// Adds a metric from its samples; nothing when there are none.
    pub fn samples(mut self, name: &str, unit: &str, samples: &[f64]) -> Record {
        if let Some(s) = Summary::of(samples) {
            let samples = samples.iter().copied().filter(|x| x.is_finite()).collect();
            let m = Metric {
                name: name.into(),
                unit: unit.into(),
                median: s.median,
                min: s.min,
                max: s.max,
                n: s.n,
                samples,
            };
            self.values.retain(|v| v.name != name);
            self.values.push(m);
        }
        self
    }

    /// Adds a single-valued metric (a count, a ratio of medians).
    pub fn value(self, name: &str, unit: &str, v: f64) -> Record {
        self.samples(name, unit, &[v])
    }

    /// Adds a note (an empty one is ignored).
    pub fn note(mut self, note: impl Into<String>) -> Record {
        let note = note.into();
        if !note.is_empty() {
            self.notes.push(note);
        }
        self
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.values.iter().find(|m| m.name == name)
    }

    /// Median of a metric.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metric(name).map(|m| m.median)
    }

    pub fn param_u64(&self, key: &str) -> Option<u64> {
        self.params.get(key).and_then(Value::as_u64)
    }

    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params.get(key).and_then(Value::as_str)
    }

    /// Same group, name, server and parameters.
    pub fn same_key(&self, other: &Record) -> bool {
        self.group == other.group
            && self.name == other.name
            && self.server == other.server
            && self.params == other.params
    }
}

/// What the run measured on, and when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Metadata {
    pub timestamp: String,
    pub unix_time: u64,
    pub quick: bool,
    pub model_path: String,
    pub model_fingerprint: String,
    pub model_file_bytes: u64,
    pub model_shape: ModelShape,
    pub kv_bytes_per_token_f16: u64,
    pub cpu_model: String,
    pub cores: usize,
    pub ram_bytes: u64,
    pub os: String,
    pub git_commit: String,
    pub semantic_version: String,
    #[serde(default)]
    pub llama_server: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub load_average_start: Option<[f64; 3]>,
    #[serde(default)]
    pub load_average_end: Option<[f64; 3]>,
    /// Two threads passing a cache line back and forth, ns per round trip,
    /// at the start and the end of the run (see [`crate::meta::core_round_trip_ns`]).
    #[serde(default)]
    pub core_round_trip_ns: Option<[f64; 2]>,
    #[serde(default)]
    pub duration_s: f64,
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Results {
    pub schema: String,
    pub metadata: Metadata,
    pub records: Vec<Record>,
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
}

impl Results {
    pub fn new(metadata: Metadata) -> Results {
        Results { schema: SCHEMA.into(), metadata, records: Vec::new(), verdicts: Vec::new() }
    }

    /// Adds `r`, replacing a record with the same key.
    pub fn upsert(&mut self, r: Record) {
        match self.records.iter_mut().find(|o| o.same_key(&r)) {
            Some(old) => *old = r,
            None => self.records.push(r),
        }
    }

    /// Records of `other` replace or join ours; its metadata (the newer
    /// run's) wins, keeping our notes.
    pub fn merge(&mut self, other: Results) {
        let mut notes = std::mem::take(&mut self.metadata.notes);
        for n in other.metadata.notes.iter() {
            if !notes.contains(n) {
                notes.push(n.clone());
            }
        }
        self.metadata = Metadata { notes, ..other.metadata };
        for r in other.records {
            self.upsert(r);
        }
    }

    pub fn find<'a>(&'a self, group: Group, name: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.group == group && r.name == name)
    }

    /// Servers that have records of `group`, in order of first appearance.
    pub fn servers(&self, group: Group) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.records.iter().filter(|r| r.group == group) {
            if !out.contains(&r.server) {
                out.push(r.server.clone());
            }
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("results serialize")
    }

    /// Writes atomically (temp file, rename).
    pub fn save(&self, path: &Path) -> Result<(), BenchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()).map_err(|e| BenchError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| BenchError::io("renaming", &tmp, e))
    }

    /// Reads and validates a results file.
    pub fn load(path: &Path) -> Result<Results, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("reading", path, e))?;
        let bad = |msg: String| BenchError::Results { path: path.to_owned(), msg };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        validate(&v).map_err(bad)?;
        serde_json::from_value(v).map_err(|e| bad(e.to_string()))
    }
}

/// Checks the shape of a results document: schema tag, required metadata
/// with their types, and for every record its key and well-formed values
/// (units named, `min <= median <= max`, `n >= 1`).
pub fn validate(v: &Value) -> Result<(), String> {
    if v["schema"] != SCHEMA {
        return Err(format!("`schema` must be {SCHEMA:?}"));
    }
    let meta = v.get("metadata").filter(|m| m.is_object()).ok_or("`metadata` missing")?;
    let strings = ["timestamp", "model_path", "model_fingerprint", "cpu_model", "git_commit", "os"];
    for k in strings {
        meta[k].as_str().ok_or_else(|| format!("`metadata.{k}` must be a string"))?;
    }
    for k in ["unix_time", "cores", "ram_bytes", "model_file_bytes", "kv_bytes_per_token_f16"] {
        meta[k].as_u64().ok_or_else(|| format!("`metadata.{k}` must be a number"))?;
    }
    meta["quick"].as_bool().ok_or("`metadata.quick` must be a boolean")?;
    let records = v["records"].as_array().ok_or("`records` must be an array")?;
    for (i, r) in records.iter().enumerate() {
        validate_record(r).map_err(|e| format!("records[{i}]: {e}"))?;
    }
    Ok(())
}

fn validate_record(r: &Value) -> Result<(), String> {
    for k in ["group", "name", "server"] {
        r[k].as_str().filter(|s| !s.is_empty()).ok_or_else(|| format!("`{k}` must be a non-empty string"))?;
    }
    if !r["params"].is_object() {
        return Err("`params` must be an object".into());
    }
    let values = r["values"].as_array().ok_or("`values` must be an array")?;
    for m in values {
        let name = m["name"].as_str().ok_or("a value lacks `name`")?;
        m["unit"].as_str().ok_or_else(|| format!("`{name}` lacks `unit`"))?;
        let num = |k: &str| m[k].as_f64().ok_or_else(|| format!("`{name}.{k}` must be a number"));
        let (lo, mid, hi) = (num("min")?, num("median")?, num("max")?);
        if !(lo <= mid && mid <= hi) {
            return Err(format!("`{name}`: min {lo} <= median {mid} <= max {hi} does not hold"));
        }
        if m["n"].as_u64().unwrap_or(0) == 0 {
            return Err(format!("`{name}.n` must be at least 1"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Results {
        let meta = Metadata {
            timestamp: "2025-01-01T00:00:00Z".into(),
            model_path: "/m.gguf".into(),
            model_fingerprint: "b179c9523d0e6a0f".into(),
            cpu_model: "cpu".into(),
            git_commit: "abc".into(),
            os: "linux".into(),
            cores: 2,
            ..Metadata::default()
        };
        let mut r = Results::new(meta);
        r.upsert(Record::new(Group::Batching, "throughput", "semantic").param("agents", 3).samples(
            "aggregate_tok_s",
            "tok/s",
            &[3.0, 1.0, 2.0],
        ));
        r
    }

    #[test]
    fn json_round_trips_and_validates() {
        let r = sample();
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        validate(&v).unwrap();
        let m = &v["records"][0]["values"][0];
        assert_eq!((m["median"].as_f64(), m["min"].as_f64(), m["max"].as_f64()), (Some(2.0), Some(1.0), Some(3.0)));
        assert_eq!(m["unit"], "tok/s");
        assert_eq!(v["records"][0]["group"], "batching");
        assert_eq!(v["records"][0]["params"]["agents"], 3);
        assert_eq!(serde_json::from_value::<Results>(v).unwrap(), r);
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let mut v: Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["records"][0]["values"][0]["min"] = 5.0.into();
        assert!(validate(&v).unwrap_err().contains("min 5"));
        let mut v: Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["metadata"].as_object_mut().unwrap().remove("model_fingerprint");
        assert!(validate(&v).unwrap_err().contains("model_fingerprint"));
        let mut v: Value = serde_json::from_str(&sample().to_json()).unwrap();
        v["schema"] = "other".into();
        assert!(validate(&v).is_err());
        v = serde_json::from_str(&sample().to_json()).unwrap();
        v["records"][0]["values"][0].as_object_mut().unwrap().remove("unit");
        assert!(validate(&v).unwrap_err().contains("unit"));
    }

    #[test]
    fn upsert_replaces_by_key_and_merge_keeps_both_runs() {
        let mut a = sample();
        a.upsert(Record::new(Group::Batching, "throughput", "semantic").param("agents", 3).value("x", "u", 1.0));
        assert_eq!(a.records.len(), 1);
        assert!(a.records[0].metric("aggregate_tok_s").is_none());
        let mut b = sample();
        b.metadata.notes.push("second".into());
        b.upsert(Record::new(Group::Memory, "leak_check", "semantic").value("leftover_agents", "count", 0.0));
        a.merge(b);
        assert_eq!(a.records.len(), 2);
        assert_eq!(a.metadata.notes, vec!["second".to_string()]);
        assert_eq!(a.find(Group::Memory, "leak_check").count(), 1);
        assert_eq!(a.servers(Group::Batching), vec!["semantic".to_string()]);
    }

    #[test]
    fn save_and_load_through_a_file() {
        let dir = std::env::temp_dir().join(format!("semantic-bench-results-{}", std::process::id()));
        let path = dir.join("r.json");
        sample().save(&path).unwrap();
        assert_eq!(Results::load(&path).unwrap(), sample());
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(Results::load(&path), Err(BenchError::Results { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_samples_add_no_metric() {
        let r = Record::new(Group::Cache, "x", "s").samples("m", "ms", &[]).samples("k", "ms", &[f64::NAN]);
        assert!(r.values.is_empty());
    }
}
