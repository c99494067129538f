//! Save -> load round trips: exactness, codec bounds, interoperability.

mod common;

use common::*;
use half::f16;
use semantic_core::AgentId;
use semantic_kv::{BlockTable, KvLayout, KvPool};
use semantic_store::*;

/// f16 is bit-exact, and the file does not depend on the block size: saved
/// from block size 4 (37 tokens: a partial last block), loaded into a pool
/// of block size 16 whose table starts at another block id.
#[test]
fn f16_round_trip_is_bit_exact_across_block_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let n = 37;
    let (mut pool, table, skip) = filled_pool(small(4), n, 1, 3);
    let toks = tokens(n, 2);
    let a = agent("coder-1");
    let stats =
        write_agent_cache(dir.path(), &a, &fp(), KvCodec::F16, &toks, &PoolSource::new(&pool, table.blocks())).unwrap();
    assert_eq!(stats.path, dir.path().join("b179c9523d0e6a0f/coder-1.safetensors"));
    assert_eq!(stats.bytes, std::fs::metadata(&stats.path).unwrap().len());
    assert_eq!(ls(&dir.path().join("b179c9523d0e6a0f")), ["coder-1.safetensors"], "no temp left");

    let mut other = KvPool::new(small(16), 8);
    let mut hold = BlockTable::default();
    assert!(other.ensure_capacity(&mut hold, 20));
    let mut t2 = BlockTable::default();
    let loaded = load_agent_cache(&stats.path, &fp(), &mut other, &mut t2).unwrap();
    assert_eq!(loaded.tokens, toks);
    assert_eq!(t2.len(), 3);
    assert_eq!(bits(&export(&other, &t2, n)), bits(&export(&pool, &table, n)));
    let h = &loaded.header;
    assert_eq!((h.agent.as_str(), h.codec, h.n_tokens), ("coder-1", KvCodec::F16, n));
    assert_eq!(h.dims, KvDims::from(&small(1)));
    assert!(h.created_at <= h.updated_at && h.updated_at > 1_600_000_000);
    assert_eq!(stats.bytes as usize, read_header(&stats.path).unwrap().bytes as usize);
    // 2 layers x K,V x 2 heads x 37 x 8 x 2 bytes + 37 tokens x 4 + header.
    assert!(stats.bytes as usize > 2 * 2 * 2 * n * 8 * 2 + 4 * n);

    other.free_table(t2).unwrap();
    other.free_table(hold).unwrap();
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

/// Any f16 bits, NaN payloads and infinities included, come back unchanged.
#[test]
fn arbitrary_f16_bits_survive() {
    let dir = tempfile::tempdir().unwrap();
    let l = small(4);
    let n = 9;
    let mut snap = KvSnapshot::new(KvDims::from(&l), n);
    let mut rng = Rng::new(5);
    for (layer, kv, head) in rows(&l) {
        for x in snap.row_mut(layer, kv, head) {
            *x = f16::from_bits(rng.next_u64() as u16);
        }
    }
    snap.row_mut(0, 0, 0)[0] = f16::from_bits(0x7e01); // a NaN payload
    let stats = write_agent_cache(dir.path(), &agent("a"), &fp(), KvCodec::F16, &tokens(n, 1), &snap).unwrap();
    let (_, back) = load_agent_snapshot(&stats.path, &fp(), &KvDims::from(&l)).unwrap();
    for (layer, kv, head) in rows(&l) {
        let b = |s: &KvSnapshot| s.row(layer, kv, head).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(b(&back), b(&snap));
    }
}

/// q8_0 and q4_0 through the pool stay within `KvCodec::max_abs_error` of
/// each value's group (32 consecutive values of a row). Head dims 8 (groups
/// span 4 tokens, short last group) and 64 (groups inside one token).
#[test]
fn quantized_codecs_round_trip_within_their_bounds() {
    for head_dim in [8, 64] {
        let l = KvLayout { head_dim, ..small(16) };
        let n = 45;
        let (mut pool, table, skip) = filled_pool(l, n, 9, 0);
        let want = export(&pool, &table, n);
        let dir = tempfile::tempdir().unwrap();
        let mut sizes = Vec::new();
        for codec in KvCodec::ALL {
            let src = PoolSource::new(&pool, table.blocks());
            let stats = write_agent_cache(dir.path(), &agent(codec.name()), &fp(), codec, &tokens(n, 3), &src).unwrap();
            sizes.push(stats.bytes);
            let mut dst = KvPool::new(KvLayout { block_size: 7, ..l }, 16);
            let mut t = BlockTable::default();
            let loaded = load_agent_cache(&stats.path, &fp(), &mut dst, &mut t).unwrap();
            assert_eq!(loaded.header.codec, codec);
            let got = export(&dst, &t, n);
            let mut worst = 0.0f32;
            for (w, g) in want.iter().zip(&got) {
                for (wg, gg) in w.chunks(GROUP).zip(g.chunks(GROUP)) {
                    let m = wg.iter().fold(0.0f32, |m, x| m.max(x.to_f32().abs()));
                    for (x, y) in wg.iter().zip(gg) {
                        let err = (x.to_f32() - y.to_f32()).abs();
                        assert!(err <= codec.max_abs_error(m), "{codec} dim {head_dim}: {x} -> {y}, group max {m}");
                        worst = worst.max(err / m.max(1e-6));
                    }
                }
            }
            eprintln!("{codec} head_dim {head_dim}: {} bytes, worst |err| / group max {worst:.4}", stats.bytes);
            dst.free_table(t).unwrap();
        }
        assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2], "{sizes:?}");
        pool.free_table(table).unwrap();
        pool.free_table(skip).unwrap();
    }
}

/// The file opens with the reference safetensors reader, with the names,
/// dtypes, shapes and bytes of DESIGN.md.
#[test]
fn files_are_standard_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let l = KvLayout { head_dim: 64, ..small(16) };
    let n = 20;
    let (mut pool, table, skip) = filled_pool(l, n, 4, 1);
    let toks = tokens(n, 8);
    for codec in KvCodec::ALL {
        let src = PoolSource::new(&pool, table.blocks());
        let stats = write_agent_cache(dir.path(), &agent("x"), &fp(), codec, &toks, &src).unwrap();
        let bytes = std::fs::read(&stats.path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().as_ref().unwrap();
        assert_eq!(md["format_version"], "1");
        assert_eq!(md["model_fingerprint"], "b179c9523d0e6a0f");
        assert_eq!(md["agent_id"], "x");
        assert_eq!(md["kv_codec"], codec.name());
        assert_eq!(md["n_tokens"], "20");
        assert_eq!((md["n_layers"].as_str(), md["n_kv_heads"].as_str(), md["head_dim"].as_str()), ("2", "2", "64"));
        assert!(md["checksum"].starts_with("xxh64:") && md["checksum"].len() == 22);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("tokens").unwrap();
        assert_eq!((t.dtype(), t.shape()), (safetensors::Dtype::U32, &[n][..]));
        let back: Vec<u32> = t.data().chunks(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(back, toks);
        let k1 = st.tensor("layers.1.k").unwrap();
        let (dtype, last) = match codec {
            KvCodec::F16 => (safetensors::Dtype::F16, 64),
            KvCodec::Q8_0 => (safetensors::Dtype::I8, 64),
            KvCodec::Q4_0 => (safetensors::Dtype::U8, 32),
        };
        assert_eq!((k1.dtype(), k1.shape()), (dtype, &[2, n, last][..]));
        let n_scales = st.names().iter().filter(|s| s.ends_with(".scales")).count();
        if codec == KvCodec::F16 {
            assert_eq!(st.len(), 5);
            assert_eq!(n_scales, 0);
            // [head][token][dim] rows are the pool's rows, little endian.
            let want: Vec<u8> =
                export(&pool, &table, n)[4..6].iter().flatten().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            assert!(k1.data() == &want[..], "layers.1.k = rows (1, K, 0..2)");
        } else {
            assert_eq!(n_scales, 4);
            let s = st.tensor("layers.1.v.scales").unwrap();
            assert_eq!((s.dtype(), s.shape()), (safetensors::Dtype::F16, &[2, n * 64 / 32][..]));
        }
    }
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

/// A snapshot (the persister's copy) writes the same file as the pool, and
/// a snapshot load writes back into a pool bit-exactly.
#[test]
fn snapshot_paths_match_the_pool_paths() {
    let dir = tempfile::tempdir().unwrap();
    let l = small(4);
    let n = 13;
    let (mut pool, table, skip) = filled_pool(l, n, 21, 2);
    let toks = tokens(n, 1);
    let from_pool =
        write_agent_cache(dir.path(), &agent("p"), &fp(), KvCodec::F16, &toks, &PoolSource::new(&pool, table.blocks()))
            .unwrap();
    let snap = KvSnapshot::from_pool(&pool, table.blocks(), n);
    assert_eq!(snap.bytes(), n * l.bytes_per_token());
    let from_snap = write_agent_cache(dir.path(), &agent("s"), &fp(), KvCodec::F16, &toks, &snap).unwrap();
    assert_eq!(read_header(&from_pool.path).unwrap().checksum, read_header(&from_snap.path).unwrap().checksum);

    let (loaded, back) = load_agent_snapshot(&from_snap.path, &fp(), &KvDims::from(&l)).unwrap();
    assert_eq!(loaded.tokens, toks);
    let mut dst = KvPool::new(small(8), 4);
    let mut t = BlockTable::default();
    assert!(dst.ensure_capacity(&mut t, n));
    back.write_to_pool(&mut dst, t.blocks());
    assert_eq!(bits(&export(&dst, &t, n)), bits(&export(&pool, &table, n)));
    dst.free_table(t).unwrap();
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

/// A second save replaces the file and keeps the first save's created_at.
#[test]
fn resave_replaces_the_file_and_keeps_created_at() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pool, table, skip) = filled_pool(small(4), 12, 3, 0);
    let a = agent("re");
    let src = PoolSource::new(&pool, table.blocks());
    let first = write_agent_cache(dir.path(), &a, &fp(), KvCodec::F16, &tokens(12, 1), &src).unwrap();
    // Backdate created_at in place (same length; the checksum covers data).
    let mut bytes = std::fs::read(&first.path).unwrap();
    let h = read_header(&first.path).unwrap();
    let old = format!("\"created_at\":\"{}\"", h.created_at);
    let at = bytes.windows(old.len()).position(|w| w == old.as_bytes()).unwrap();
    bytes[at..at + old.len()].copy_from_slice(b"\"created_at\":\"1000000000\"");
    std::fs::write(&first.path, &bytes).unwrap();

    let second = write_agent_cache(dir.path(), &a, &fp(), KvCodec::Q8_0, &tokens(7, 2), &src).unwrap();
    let h2 = read_header(&second.path).unwrap();
    assert_eq!((h2.created_at, h2.n_tokens, h2.codec), (1_000_000_000, 7, KvCodec::Q8_0));
    assert!(h2.updated_at >= h.updated_at);
    assert_eq!(ls(&dir.path().join(fp().as_str())), ["re.safetensors"]);
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

#[test]
fn an_empty_cache_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let snap = KvSnapshot::new(KvDims::from(&small(4)), 0);
    let stats = write_agent_cache(dir.path(), &agent("e"), &fp(), KvCodec::Q4_0, &[], &snap).unwrap();
    let mut pool = KvPool::new(small(4), 2);
    let mut t = BlockTable::default();
    let loaded = load_agent_cache(&stats.path, &fp(), &mut pool, &mut t).unwrap();
    assert!(loaded.tokens.is_empty() && t.is_empty());
    assert_eq!(pool.n_free(), 2);
}

/// Errors that are not the file's fault leave everything as it was.
#[test]
fn load_refusals_leave_the_table_empty_and_the_pool_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let n = 30;
    let (mut pool, table, skip) = filled_pool(small(4), n, 3, 0);
    let stats = write_agent_cache(
        dir.path(),
        &agent("r"),
        &fp(),
        KvCodec::F16,
        &tokens(n, 1),
        &PoolSource::new(&pool, table.blocks()),
    )
    .unwrap();

    let mut tiny = KvPool::new(small(4), 7);
    let mut t = BlockTable::default();
    let err = load_agent_cache(&stats.path, &fp(), &mut tiny, &mut t).unwrap_err();
    assert!(matches!(err, CacheError::PoolFull { needed: 8, free: 7 }), "{err}");
    assert!(!err.should_quarantine());
    assert!(t.is_empty() && tiny.n_free() == 7);

    let mut other_heads = KvPool::new(KvLayout { n_kv_heads: 3, ..small(4) }, 16);
    let err = load_agent_cache(&stats.path, &fp(), &mut other_heads, &mut t).unwrap_err();
    assert!(matches!(err, CacheError::Corrupt { .. }), "{err}");
    assert_eq!(other_heads.n_free(), 16);

    let mut big = KvPool::new(small(4), 16);
    let mut used = BlockTable::default();
    assert!(big.ensure_capacity(&mut used, 1));
    let err = load_agent_cache(&stats.path, &fp(), &mut big, &mut used).unwrap_err();
    assert!(matches!(err, CacheError::Invalid(_)), "{err}");
    assert_eq!(used.len(), 1);
    big.free_table(used).unwrap();

    let err = load_agent_cache(&dir.path().join("missing.safetensors"), &fp(), &mut big, &mut t).unwrap_err();
    assert!(matches!(err, CacheError::Io { .. }) && !err.should_quarantine(), "{err}");
    assert_eq!(big.n_free(), 16);
    pool.free_table(table).unwrap();
    pool.free_table(skip).unwrap();
}

#[test]
fn bad_save_requests_are_refused_without_files() {
    let dir = tempfile::tempdir().unwrap();
    let snap = KvSnapshot::new(KvDims::from(&small(4)), 5);
    let err = write_agent_cache(dir.path(), &agent("a"), &fp(), KvCodec::F16, &tokens(6, 1), &snap).unwrap_err();
    assert!(matches!(err, CacheError::Invalid(_)), "{err}");
    let odd = KvSnapshot::new(KvDims { n_layers: 1, n_kv_heads: 1, head_dim: 7 }, 5);
    let err = write_agent_cache(dir.path(), &agent("a"), &fp(), KvCodec::Q4_0, &tokens(5, 1), &odd).unwrap_err();
    assert!(matches!(err, CacheError::Invalid(_)), "{err}");
    write_agent_cache(dir.path(), &agent("a"), &fp(), KvCodec::Q8_0, &tokens(5, 1), &odd).unwrap();
    assert_eq!(ls(&dir.path().join(fp().as_str())), ["a.safetensors"]);
}

/// Agent ids become file names only through `AgentId`; a file renamed to
/// another agent's name is not trusted.
#[test]
fn agent_ids_are_validated_and_bound_to_their_file() {
    for bad in ["", "../etc", "a/b", "a..b", "..", "a b", "é", &"x".repeat(129)] {
        assert!(AgentId::new(bad).is_err(), "{bad:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let id = agent("A.b_c-9");
    assert_eq!(cache_path(dir.path(), &fp(), &id), dir.path().join("b179c9523d0e6a0f/A.b_c-9.safetensors"));
    let snap = KvSnapshot::new(KvDims::from(&small(4)), 3);
    let stats = write_agent_cache(dir.path(), &id, &fp(), KvCodec::F16, &tokens(3, 1), &snap).unwrap();
    let renamed = stats.path.with_file_name("other.safetensors");
    std::fs::rename(&stats.path, &renamed).unwrap();
    let err = read_header(&renamed).unwrap_err();
    assert!(matches!(err, CacheError::Corrupt { .. }) && err.should_quarantine(), "{err}");
}
