//! The start-up scan: orphans removed, bad headers quarantined, 10,000
//! files indexed from headers alone.

mod common;

use std::time::Instant;

use common::*;
use semantic_store::*;

#[test]
fn scan_indexes_good_files_removes_orphans_and_quarantines_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (index, report) = WarmIndex::scan(root, &fp()).unwrap();
    assert!(index.is_empty() && report.files_seen == 0, "missing dir = empty");

    let snap = KvSnapshot::new(KvDims::from(&small(4)), 10);
    let mut saved = Vec::new();
    for (name, n, codec) in [
        ("a", 10, KvCodec::F16),
        ("b", 3, KvCodec::Q8_0),
        ("c", 7, KvCodec::Q4_0),
        // A valid agent id that looks like a temp marker.
        ("x.tmp.5", 4, KvCodec::F16),
    ] {
        saved.push(write_agent_cache(root, &agent(name), &fp(), codec, &tokens(n, 1), &snap).unwrap());
    }
    let sub = root.join(fp().as_str());
    // A crash mid-save of another process, one of this process (live), junk.
    std::fs::write(sub.join("a.safetensors.tmp.4000000000.0"), b"partial").unwrap();
    std::fs::write(sub.join("x.tmp.5.safetensors.tmp.4000000001.3"), b"partial").unwrap();
    let own = format!("b.safetensors.tmp.{}.7", std::process::id());
    std::fs::write(sub.join(&own), b"in flight").unwrap();
    std::fs::write(sub.join("notes.txt"), b"hi").unwrap();
    std::fs::write(sub.join("bad name.safetensors"), b"x").unwrap();
    // Truncated, and a file of another model in this model's directory.
    let bytes = std::fs::read(&saved[0].path).unwrap();
    std::fs::write(sub.join("trunc.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let other = ModelFingerprint::new("00000000000000ff").unwrap();
    let foreign = write_agent_cache(root, &agent("alien"), &other, KvCodec::F16, &tokens(2, 1), &snap).unwrap();
    std::fs::rename(&foreign.path, sub.join("alien.safetensors")).unwrap();

    let (index, report) = WarmIndex::scan(root, &fp()).unwrap();
    assert_eq!(report.files_seen, 11);
    let mut agents: Vec<_> = index.iter().map(|e| (e.agent.to_string(), e.n_tokens, e.codec)).collect();
    agents.sort_by_key(|a| a.0.clone());
    assert_eq!(
        agents,
        [
            ("a".into(), 10, KvCodec::F16),
            ("b".into(), 3, KvCodec::Q8_0),
            ("c".into(), 7, KvCodec::Q4_0),
            ("x.tmp.5".into(), 4, KvCodec::F16)
        ]
    );
    let a = index.get(&agent("a")).unwrap();
    assert_eq!((a.bytes, &a.path), (saved[0].bytes, &saved[0].path));
    assert_eq!(index.total_bytes(), saved.iter().map(|s| s.bytes).sum::<u64>());
    let mut removed = report.removed_temps.clone();
    removed.sort();
    assert_eq!(removed, [sub.join("a.safetensors.tmp.4000000000.0"), sub.join("x.tmp.5.safetensors.tmp.4000000001.3")]);
    let mut q: Vec<_> =
        report.quarantined.iter().map(|q| q.from.file_name().unwrap().to_str().unwrap().to_owned()).collect();
    q.sort();
    assert_eq!(q, ["alien.safetensors", "trunc.safetensors"]);
    assert!(report.quarantined.iter().all(|q| q.to.as_ref().is_some_and(|p| p.exists())));
    assert!(report.quarantined.iter().any(|q| q.reason.contains("belongs to model 00000000000000ff")));
    assert_eq!(report.skipped.len(), 3, "{:?}", report.skipped);
    assert_eq!(
        ls(&sub),
        [
            "a.safetensors",
            "b.safetensors",
            own.as_str(),
            "bad name.safetensors",
            "c.safetensors",
            "notes.txt",
            "x.tmp.5.safetensors"
        ]
    );
    assert_eq!(ls(&root.join("quarantine").join(fp().as_str())).len(), 2);

    // LRU order follows the mtimes.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    std::fs::File::options().write(true).open(&saved[2].path).unwrap().set_modified(old).unwrap();
    let (index, _) = WarmIndex::scan(root, &fp()).unwrap();
    assert_eq!(index.lru_order()[0].agent.as_str(), "c");
    assert_eq!(index.get(&agent("c")).unwrap().last_use, old);
}

/// 10,000 cache files with the real SmolLM2 header (30 layers, 61 tensors)
/// and one token each. Prints the scan time (target < 2 s); asserts only
/// the result.
#[test]
fn scan_of_10k_files_times_the_header_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let l = smollm2(16);
    let snap = KvSnapshot::new(KvDims::from(&l), 1);
    // One real save, then copies with the agent id patched (same length):
    // 10,000 fsynced saves would time the disk, not the scan.
    let t = Instant::now();
    let first = write_agent_cache(root, &agent("agent-00000"), &fp(), KvCodec::F16, &[7], &snap).unwrap();
    let template = std::fs::read(&first.path).unwrap();
    let at = template.windows(11).position(|w| w == b"agent-00000").unwrap();
    let sub = root.join(fp().as_str());
    for i in 1..10_000 {
        let name = format!("agent-{i:05}");
        let mut bytes = template.clone();
        bytes[at..at + 11].copy_from_slice(name.as_bytes());
        std::fs::write(sub.join(format!("{name}.safetensors")), &bytes).unwrap();
    }
    let made = t.elapsed();
    for round in 0..2 {
        let t = Instant::now();
        let (index, report) = WarmIndex::scan(root, &fp()).unwrap();
        let took = t.elapsed();
        assert_eq!(index.len(), 10_000);
        assert!(report.quarantined.is_empty() && report.skipped.is_empty());
        eprintln!(
            "scan #{round} of 10,000 files ({} B each, header {} B): {:.0} ms (setup {:.0} ms)",
            template.len(),
            8 + u64::from_le_bytes(template[..8].try_into().unwrap()),
            took.as_secs_f64() * 1e3,
            made.as_secs_f64() * 1e3
        );
    }
}
