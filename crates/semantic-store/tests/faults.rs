//! Bad files and failing disks: every one is a typed error, a quarantined
//! file and an untouched pool; never a panic, never a partial file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use semantic_kv::{BlockTable, KvPool};
use semantic_store::*;

/// A small cache on disk and what it holds.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    path: PathBuf,
    bytes: Vec<u8>,
    tokens: Vec<u32>,
    rows: Vec<Vec<u16>>,
}

fn fixture(codec: KvCodec) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let n = 21;
    let (mut pool, table, skip) = filled_pool(small(4), n, 17, 1);
    let tokens = tokens(n, 4);
    let stats =
        write_agent_cache(&root, &agent("f"), &fp(), codec, &tokens, &PoolSource::new(&pool, table.blocks())).unwrap();
    // What a clean load gives (the original K/V only for f16).
    let (_, rows) = try_load(&stats.path).unwrap();
    if codec == KvCodec::F16 {
        assert!(rows == bits(&export(&pool, &table, n)));
    }
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
    let bytes = std::fs::read(&stats.path).unwrap();
    Fixture { _dir: dir, root, path: stats.path, bytes, tokens, rows }
}

/// Loads `path` into a fresh pool; on error checks that nothing leaked.
fn try_load(path: &Path) -> Result<(Vec<u32>, Vec<Vec<u16>>), CacheError> {
    let mut pool = KvPool::new(small(8), 8);
    let mut t = BlockTable::default();
    match load_agent_cache(path, &fp(), &mut pool, &mut t) {
        Ok(loaded) => {
            let n = loaded.tokens.len();
            let rows = bits(&export(&pool, &t, n));
            pool.free_table(t).unwrap();
            Ok((loaded.tokens, rows))
        }
        Err(e) => {
            assert!(t.is_empty(), "table not emptied after {e}");
            assert_eq!(pool.n_free(), 8, "blocks leaked after {e}");
            pool.blocks().check_invariants();
            Err(e)
        }
    }
}

fn patch(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let at = out.windows(from.len()).position(|w| w == from.as_bytes()).unwrap();
    out[at..at + from.len()].copy_from_slice(to.as_bytes());
    out
}

#[test]
fn truncation_anywhere_is_corrupt() {
    for codec in KvCodec::ALL {
        let f = fixture(codec);
        let mut rng = Rng::new(1);
        let mut cuts: Vec<usize> = (0..60).map(|_| rng.below(f.bytes.len())).collect();
        cuts.extend([0, 1, 7, 8, 9, f.bytes.len() - 1]);
        for cut in cuts {
            std::fs::write(&f.path, &f.bytes[..cut]).unwrap();
            let err = try_load(&f.path).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{codec} cut at {cut}: {err}");
            assert!(read_header(&f.path).is_err(), "the header alone already sees it");
        }
        // Trailing garbage is as bad as a missing tail.
        let mut longer = f.bytes.clone();
        longer.push(0);
        std::fs::write(&f.path, &longer).unwrap();
        assert!(matches!(try_load(&f.path), Err(CacheError::Corrupt { .. })));
    }
}

/// One flipped bit anywhere: an error, or (in the few header bytes that do
/// not matter, such as a timestamp digit) the exact original content.
/// Never wrong K/V. Every flip in the data section is caught.
#[test]
fn bit_flips_are_caught_or_harmless() {
    for codec in KvCodec::ALL {
        let f = fixture(codec);
        let data_start = 8 + u64::from_le_bytes(f.bytes[..8].try_into().unwrap()) as usize;
        let mut rng = Rng::new(7 + codec as u64);
        let (mut caught, mut harmless) = (0, 0);
        let mut positions: Vec<usize> = (0..300).map(|_| rng.below(f.bytes.len())).collect();
        positions.extend((0..100).map(|_| data_start + rng.below(f.bytes.len() - data_start)));
        for pos in positions {
            let mut bad = f.bytes.clone();
            bad[pos] ^= 1 << rng.below(8);
            std::fs::write(&f.path, &bad).unwrap();
            match try_load(&f.path) {
                Err(e) => {
                    assert!(e.should_quarantine(), "{codec} flip at {pos}: {e}");
                    caught += 1;
                }
                Ok((tokens, rows)) => {
                    assert!(pos < data_start, "{codec}: flip at data byte {pos} loaded");
                    assert_eq!(tokens, f.tokens);
                    assert!(rows == f.rows, "{codec}: flip at {pos} changed the K/V");
                    harmless += 1;
                }
            }
        }
        eprintln!("{codec}: {caught} flips caught, {harmless} harmless (header padding/timestamps)");
    }
}

#[test]
fn foreign_and_future_files_are_typed_and_quarantined() {
    let f = fixture(KvCodec::F16);
    let other = ModelFingerprint::new("0123456789abcdef").unwrap();
    let mut pool = KvPool::new(small(4), 8);
    let mut t = BlockTable::default();
    let err = load_agent_cache(&f.path, &other, &mut pool, &mut t).unwrap_err();
    match &err {
        CacheError::ForeignModel { expected, found, .. } => {
            assert_eq!((expected, found.as_str()), (&other, "b179c9523d0e6a0f"))
        }
        e => panic!("{e}"),
    }
    assert!(err.should_quarantine() && t.is_empty() && pool.n_free() == 8);

    std::fs::write(&f.path, patch(&f.bytes, "\"format_version\":\"1\"", "\"format_version\":\"2\"")).unwrap();
    let err = try_load(&f.path).unwrap_err();
    assert!(matches!(&err, CacheError::Version { found, supported: 1, .. } if found == "2"), "{err}");

    let moved = quarantine(&f.path).unwrap();
    assert!(!f.path.exists());
    assert_eq!(moved.parent().unwrap(), f.root.join("quarantine").join(fp().as_str()));
    assert!(moved.file_name().unwrap().to_str().unwrap().starts_with("f.safetensors."));
    // The same name again gets a fresh quarantine name.
    std::fs::write(&f.path, b"junk").unwrap();
    let again = quarantine(&f.path).unwrap();
    assert_ne!(again, moved);
    assert!(moved.exists() && again.exists());

    // Not a safetensors file at all; a header that is JSON but not ours.
    for junk in [&b"hello"[..], b"\x05\0\0\0\0\0\0\0{}   ", b"\x02\0\0\0\0\0\0\0{}"] {
        std::fs::write(&f.path, junk).unwrap();
        let err = try_load(&f.path).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
    }
}

/// Disk full at every stage of a save: a DiskFull error, no temp file and no
/// new file; the previous complete file, if any, is untouched.
#[test]
fn disk_full_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = 33;
    let (mut pool, table, skip) = filled_pool(small(4), n, 2, 0);
    let src = PoolSource::new(&pool, table.blocks());
    let a = agent("full");
    let sub = dir.path().join(fp().as_str());
    let size = write_agent_cache(dir.path(), &agent("probe"), &fp(), KvCodec::Q8_0, &tokens(n, 1), &src).unwrap().bytes;
    std::fs::remove_file(sub.join("probe.safetensors")).unwrap();
    for (round, fail_at) in [0, 1, 8, 100, size / 2, size - 1].into_iter().enumerate() {
        let opts = WriteOptions { fail_after_bytes: Some(fail_at) };
        let err = write_agent_cache_with(&opts, dir.path(), &a, &fp(), KvCodec::Q8_0, &tokens(n, 1), &src).unwrap_err();
        assert!(matches!(err, CacheError::DiskFull { .. }), "fail at {fail_at}: {err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        let want: &[&str] = if round < 3 { &[] } else { &["full.safetensors"] };
        assert_eq!(ls(&sub), want, "fail at {fail_at}");
        if round == 2 {
            // From now on an older complete file exists.
            write_agent_cache(dir.path(), &a, &fp(), KvCodec::F16, &tokens(5, 9), &src).unwrap();
        }
    }
    let (tokens_back, _) = try_load(&sub.join("full.safetensors")).unwrap();
    assert_eq!(tokens_back, tokens(5, 9), "the old file survived every failed save");
    let ok = WriteOptions { fail_after_bytes: Some(size) };
    write_agent_cache_with(&ok, dir.path(), &a, &fp(), KvCodec::Q8_0, &tokens(n, 1), &src).unwrap();
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

/// A save called off before it starts, or after writing but before the
/// rename, leaves no file and no temp file; an older file stays.
#[test]
fn a_cancelled_save_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let n = 33;
    let (mut pool, table, skip) = filled_pool(small(4), n, 2, 0);
    let src = PoolSource::new(&pool, table.blocks());
    let (a, sub) = (agent("gone"), dir.path().join(fp().as_str()));
    let opts = WriteOptions::default();
    let save = |cancelled: &dyn Fn() -> bool| {
        write_agent_cache_unless(&opts, dir.path(), &a, &fp(), KvCodec::F16, &tokens(n, 1), &src, cancelled)
    };
    assert!(matches!(save(&|| true), Err(CacheError::Cancelled(_))));
    assert!(ls(&sub).is_empty());
    // Called off between the write and the rename (the second question).
    let asked = std::cell::Cell::new(0);
    let second = || {
        asked.set(asked.get() + 1);
        asked.get() > 1
    };
    assert!(matches!(save(&second), Err(CacheError::Cancelled(_))));
    assert_eq!(asked.get(), 2);
    assert!(ls(&sub).is_empty(), "{:?}", ls(&sub));
    save(&|| false).unwrap();
    asked.set(0);
    assert!(matches!(save(&second), Err(CacheError::Cancelled(_))));
    assert_eq!(ls(&sub), ["gone.safetensors"], "the older file stays");
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

/// A real full file system where the test may mount a 1 MiB tmpfs (root);
/// skipped with a note elsewhere (the injected ENOSPC above covers it).
#[test]
fn real_enospc_on_a_small_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    // 2 layers x 2 x 2 heads x 8 dims x 2 bytes = 128 B/token: 16K tokens = 2 MiB.
    let n = 16_384;
    let snap = KvSnapshot::new(KvDims::from(&small(4)), n);
    let err = write_agent_cache(&mnt, &agent("big"), &fp(), KvCodec::F16, &tokens(n, 1), &snap).unwrap_err();
    assert!(matches!(err, CacheError::DiskFull { .. }), "{err}");
    assert_eq!(ls(&mnt.join(fp().as_str())), Vec::<String>::new());
    // The space came back: a small save still fits.
    write_agent_cache(&mnt, &agent("small"), &fp(), KvCodec::F16, &tokens(100, 1), &snap).unwrap();
    eprintln!("tmpfs ENOSPC: {err}");
}
