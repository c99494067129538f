//! The warm tier's index: which agents have a cache file on disk, rebuilt at
//! start-up from headers alone.
//!
//! [`WarmIndex::scan`] of `<cache-dir>/<fingerprint>/`:
//! - `*.tmp.<pid>.<n>` of another process: an orphan of a crash, removed
//!   (temps of this process belong to a live writer and are left alone);
//! - `<agent>.safetensors` whose header validates and names this model: an
//!   entry (last use = mtime, i.e. the last save);
//! - one whose header is corrupt, foreign or of another version: moved to
//!   `quarantine/`;
//! - anything else (other names, sub-directories): left alone, reported.
//!
//! Cost: one open, one fstat and one read of at most 16 KiB per file; the
//! data section is never read (the loader verifies the checksum).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use semantic_core::AgentId;

use crate::format::{temp_file_pid, CACHE_SUFFIX};
use crate::{quarantine, read_header, CacheError, CacheHeader, KvCodec, ModelFingerprint, SaveStats};

/// One agent's cache file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmEntry {
    pub agent: AgentId,
    pub path: PathBuf,
    pub codec: KvCodec,
    pub n_tokens: usize,
    /// File size.
    pub bytes: u64,
    pub last_use: SystemTime,
}

impl From<&CacheHeader> for WarmEntry {
    fn from(h: &CacheHeader) -> Self {
        Self {
            agent: h.agent.clone(),
            path: h.path.clone(),
            codec: h.codec,
            n_tokens: h.n_tokens,
            bytes: h.bytes,
            last_use: h.mtime,
        }
    }
}

impl From<&SaveStats> for WarmEntry {
    fn from(s: &SaveStats) -> Self {
        Self {
            agent: s.agent.clone(),
            path: s.path.clone(),
            codec: s.codec,
            n_tokens: s.n_tokens,
            bytes: s.bytes,
            last_use: SystemTime::now(),
        }
    }
}

/// A file the scan moved to `quarantine/`.
#[derive(Clone, Debug)]
pub struct Quarantined {
    pub from: PathBuf,
    /// `None` if the move itself failed (the reason then says why).
    pub to: Option<PathBuf>,
    pub reason: String,
}

/// What a scan did besides finding entries.
#[derive(Clone, Debug, Default)]
pub struct ScanReport {
    pub files_seen: usize,
    pub removed_temps: Vec<PathBuf>,
    pub quarantined: Vec<Quarantined>,
    /// Names the store did not write, and files that could not be read
    /// (I/O errors are not the file's fault: left in place).
    pub skipped: Vec<(PathBuf, String)>,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct WarmIndex {
    fingerprint: ModelFingerprint,
    entries: HashMap<AgentId, WarmEntry>,
}

impl WarmIndex {
    pub fn new(fingerprint: ModelFingerprint) -> Self {
        Self { fingerprint, entries: HashMap::new() }
    }

    /// Header-only scan of `<dir>/<fingerprint>/` (see the module docs). A
    /// missing directory is an empty index.
    pub fn scan(dir: &Path, fingerprint: &ModelFingerprint) -> Result<(Self, ScanReport), CacheError> {
        let start = Instant::now();
        let sub = dir.join(fingerprint.as_str());
        let mut index = Self::new(*fingerprint);
        let mut report = ScanReport::default();
        let listing = match fs::read_dir(&sub) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((index, report)),
            Err(e) => return Err(CacheError::io("read dir", &sub, e)),
        };
        for entry in listing {
            let entry = entry.map_err(|e| CacheError::io("read dir", &sub, e))?;
            let path = entry.path();
            report.files_seen += 1;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                report.skipped.push((path, "name is not UTF-8".into()));
                continue;
            };
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                report.skipped.push((path, "directory".into()));
            } else if let Some(pid) = temp_file_pid(&name) {
                if pid == std::process::id() {
                    report.skipped.push((path, "temp file of a live writer".into()));
                } else {
                    match fs::remove_file(&path) {
                        Ok(()) => report.removed_temps.push(path),
                        Err(e) => report.skipped.push((path, format!("remove orphan: {e}"))),
                    }
                }
            } else if name.strip_suffix(CACHE_SUFFIX).is_some_and(|stem| AgentId::new(stem).is_ok()) {
                index.scan_file(path, &mut report);
            } else {
                report.skipped.push((path, "not a cache file name".into()));
            }
        }
        report.duration = start.elapsed();
        Ok((index, report))
    }

    fn scan_file(&mut self, path: PathBuf, report: &mut ScanReport) {
        let checked = read_header(&path).and_then(|h| {
            if h.fingerprint == self.fingerprint {
                Ok(h)
            } else {
                Err(CacheError::ForeignModel {
                    path: path.clone(),
                    expected: self.fingerprint,
                    found: h.fingerprint.to_string(),
                })
            }
        });
        match checked {
            Ok(h) => {
                self.entries.insert(h.agent.clone(), WarmEntry::from(&h));
            }
            Err(e) if e.should_quarantine() => {
                let (to, reason) = match quarantine(&path) {
                    Ok(to) => (Some(to), e.to_string()),
                    Err(q) => (None, format!("{e}; {q}")),
                };
                report.quarantined.push(Quarantined { from: path, to, reason });
            }
            Err(e) => report.skipped.push((path, e.to_string())),
        }
    }

    pub fn fingerprint(&self) -> &ModelFingerprint {
        &self.fingerprint
    }

    pub fn get(&self, agent: &AgentId) -> Option<&WarmEntry> {
        self.entries.get(agent)
    }

    /// Records a save (replaces the agent's previous entry).
    pub fn insert(&mut self, entry: WarmEntry) -> Option<WarmEntry> {
        self.entries.insert(entry.agent.clone(), entry)
    }

    pub fn remove(&mut self, agent: &AgentId) -> Option<WarmEntry> {
        self.entries.remove(agent)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the file sizes (what `--disk-budget-mb` bounds).
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.bytes).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = &WarmEntry> {
        self.entries.values()
    }

    /// Entries from least to most recently used (ties by agent id), the
    /// order in which a disk budget evicts.
    pub fn lru_order(&self) -> Vec<&WarmEntry> {
        let mut v: Vec<_> = self.entries.values().collect();
        v.sort_by(|a, b| a.last_use.cmp(&b.last_use).then_with(|| a.agent.cmp(&b.agent)));
        v
    }
}
