//! The Markdown report (`REPORT.md`) and its SVG charts, from a results
//! document. Values are medians with the range of the repetitions.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::error::BenchError;
use crate::results::{Group, Record, Results};
use crate::svg::{LineChart, Series};

pub const REPORT_FILE: &str = "REPORT.md";
pub const THROUGHPUT_SVG: &str = "throughput_vs_agents.svg";
pub const TTFT_SVG: &str = "ttft_cold_warm_vs_context.svg";
pub const MEMORY_SVG: &str = "memory_vs_agents.svg";

/// Writes `REPORT.md` and the charts into `dir`.
pub fn write(r: &Results, dir: &Path) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("creating", dir, e))?;
    for (file, chart) in charts(r) {
        let p = dir.join(file);
        std::fs::write(&p, chart.to_svg()).map_err(|e| BenchError::io("writing", &p, e))?;
    }
    let p = dir.join(REPORT_FILE);
    std::fs::write(&p, markdown(r)).map_err(|e| BenchError::io("writing", &p, e))?;
    Ok(p)
}

/// `median (min–max)` of a metric, or `–`.
pub fn cell(rec: Option<&Record>, metric: &str, digits: usize) -> String {
    match rec.and_then(|r| r.metric(metric)) {
        None => "–".into(),
        Some(m) if m.n > 1 && (m.max - m.min) > 0.0 => {
            format!("{:.d$} ({:.d$}–{:.d$})", m.median, m.min, m.max, d = digits)
        }
        Some(m) => format!("{:.d$}", m.median, d = digits),
    }
}

pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", headers.join(" | "), "---|".repeat(headers.len()));
    for row in rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}

fn sorted<'a>(r: &'a Results, group: Group, name: &'a str) -> Vec<&'a Record> {
    let mut v: Vec<&Record> = r.find(group, name).collect();
    let order = r.servers(group);
    let key = |x: &Record| {
        let server = order.iter().position(|s| *s == x.server).unwrap_or(usize::MAX);
        let codec = ["f16", "q8_0", "q4_0"].iter().position(|c| Some(*c) == x.param_str("codec")).unwrap_or(9);
        (
            server,
            codec,
            x.param_u64("prompt_tokens").unwrap_or(0),
            x.param_u64("tokens").unwrap_or(0),
            x.param_u64("agents").unwrap_or(0),
        )
    };
    v.sort_by_key(|x| key(x));
    v
}

fn header(r: &Results) -> String {
    let m = &r.metadata;
    let mut s = String::from("# semantic benchmark report\n\n");
    let mode = if m.quick { "quick run (`--quick`)" } else { "full run" };
    let _ = writeln!(
        s,
        "- **When**: {} ({mode}, {:.1} min)\n- **Machine**: {}, {} cores, {:.1} GiB RAM, {}",
        m.timestamp,
        m.duration_s / 60.0,
        m.cpu_model,
        m.cores,
        m.ram_bytes as f64 / (1u64 << 30) as f64,
        m.os
    );
    let sh = &m.model_shape;
    let _ = writeln!(
        s,
        "- **Model**: `{}` (fingerprint `{}`, {:.1} MiB; {}, {} layers, {} KV heads x {} → {} bytes of f16 KV per token)",
        m.model_path,
        m.model_fingerprint,
        m.model_file_bytes as f64 / 1048576.0,
        sh.arch,
        sh.n_layers,
        sh.n_kv_heads,
        sh.head_dim,
        m.kv_bytes_per_token_f16
    );
    let _ = writeln!(s, "- **Code**: semantic {} at commit `{}`", m.semantic_version, m.git_commit);
    if let Some(l) = &m.llama_server {
        let _ = writeln!(s, "- **Compared with**: llama.cpp `{l}`, same model file, same machine, same run");
    }
    if let Some(t) = &m.target {
        let _ = writeln!(s, "- **Target**: {t}");
    }
    let la = |v: &Option<[f64; 3]>| v.map_or("?".into(), |a| format!("{:.2} {:.2} {:.2}", a[0], a[1], a[2]));
    let _ =
        writeln!(s, "- **Load average** at start / end: {} / {}", la(&m.load_average_start), la(&m.load_average_end));
    if let Some([a, b]) = m.core_round_trip_ns {
        let _ = writeln!(
            s,
            "- **Cross-core round trip** at start / end: {a:.0} / {b:.0} ns (two threads passing a cache line; \
             on a 2-vCPU VM, 50-130 ns when the host put the vCPUs in one core complex, ~400 ns in two, \
             which slows multi-agent steps)"
        );
    }
    s.push_str("\nCells are `median (min–max)` over the repetitions; a single number is one sample.\n");
    s
}

fn verdict_section(r: &Results) -> String {
    let rows: Vec<Vec<String>> = r
        .verdicts
        .iter()
        .map(|v| {
            let measured = v.measured.map_or("–".into(), |x| format!("{x:.2} {}", v.unit));
            let status = if v.status == crate::verdict::Status::Poor { "**Poor**" } else { v.status.label() };
            vec![v.criterion.clone(), v.source.clone(), v.threshold.clone(), measured, status.into()]
        })
        .collect();
    format!(
        "\n## Verdicts (semantic)\n\n{}",
        table(&["criterion", "source", "threshold", "measured", "verdict"], &rows)
    )
}

fn batching_section(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::Batching, "throughput")
        .into_iter()
        .map(|x| {
            let p = |k| x.param_u64(k).map_or("?".into(), |v| v.to_string());
            let c = |m, d| cell(Some(x), m, d);
            vec![
                x.server.clone(),
                p("agents"),
                p("prompt_tokens"),
                p("gen_tokens"),
                c("aggregate_tok_s", 1),
                c("per_agent_tok_s", 1),
                c("speedup_vs_1_x", 2),
                c("ttft_ms", 0),
                c("itl_p50_ms", 1),
                c("itl_p99_ms", 1),
            ]
        })
        .collect();
    let heads = [
        "server",
        "agents",
        "prompt tokens",
        "generated/agent",
        "aggregate tok/s",
        "per-agent tok/s",
        "speedup vs 1",
        "TTFT ms",
        "ITL p50 ms",
        "ITL p99 ms",
    ];
    let itl: Vec<Vec<String>> = sorted(r, Group::Batching, "itl_under_prefill")
        .into_iter()
        .map(|x| {
            vec![
                x.server.clone(),
                x.param_u64("prefill_tokens").unwrap_or(0).to_string(),
                cell(Some(x), "itl_p50_alone_ms", 1),
                cell(Some(x), "itl_p50_ms", 1),
                cell(Some(x), "itl_p99_ms", 1),
                cell(Some(x), "p99_over_p50_x", 2),
            ]
        })
        .collect();
    let sampling: Vec<Vec<String>> = sorted(r, Group::Batching, "api_default_sampling")
        .into_iter()
        .map(|x| {
            vec![
                x.server.clone(),
                x.param_u64("agents").unwrap_or(0).to_string(),
                cell(Some(x), "greedy_tok_s", 1),
                cell(Some(x), "default_tok_s", 1),
                cell(Some(x), "default_over_greedy_x", 2),
            ]
        })
        .collect();
    format!(
        "\n## {}\n\n![throughput vs agents]({THROUGHPUT_SVG})\n\n{}\n### Inter-token latency of one agent while another prefills\n\n{}\n### Sampling as clients send it\n\nNo `temperature` in the request: the API default (1, the whole vocabulary) against greedy, same agents, interleaved.\n\n{}",
        Group::Batching.title(),
        table(&heads, &rows),
        table(&["server", "prefill tokens", "ITL p50 alone ms", "ITL p50 during ms", "ITL p99 during ms", "p99 during / p50 alone"], &itl),
        table(&["server", "agents", "greedy tok/s", "default sampling tok/s", "default / greedy"], &sampling)
    )
}

fn find_same<'a>(r: &'a Results, name: &'a str, like: &Record) -> Option<&'a Record> {
    r.find(Group::Cache, name).find(|x| {
        x.server == like.server
            && x.param_str("codec") == like.param_str("codec")
            && x.param_u64("tokens") == like.param_u64("tokens")
    })
}

fn cache_keys(x: &Record) -> Vec<String> {
    vec![
        x.server.clone(),
        x.param_str("codec").unwrap_or("?").into(),
        x.param_str("size").unwrap_or("?").into(),
        x.param_u64("prompt_tokens").map_or("–".into(), |v| v.to_string()),
    ]
}

const CACHE_KEYS: [&str; 4] = ["server", "codec", "size", "prompt tokens"];

/// File size, save and load times.
fn cache_io_table(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::Cache, "cache_save_time")
        .into_iter()
        .map(|x| {
            let load = find_same(r, "cache_load_time", x);
            let mut row = cache_keys(x);
            row.extend([cell(Some(x), "file_mib", 1), cell(Some(x), "save_ms", 1)]);
            row.extend(["load_ms", "load_ms_dropped_caches", "load_ms_after_restart"].map(|m| cell(load, m, 1)));
            row
        })
        .collect();
    let heads =
        ["file MiB", "save ms", "load ms (page cache)", "load ms (page cache dropped)", "load ms (after restart)"];
    table(&[&CACHE_KEYS[..], &heads].concat(), &rows)
}

/// TTFT cold and warm, and decode speed after a resume.
fn cache_ttft_table(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::Cache, "cold_start_vs_cache_resume")
        .into_iter()
        .map(|x| {
            let res = find_same(r, "resume_generation_speed", x);
            let mut row = cache_keys(x);
            row.push(cell(Some(x), "ttft_cold_ms", 0));
            let warm = ["ttft_warm_ram_ms", "ttft_warm_disk_ms", "ttft_dropped_caches_ms", "ttft_after_restart_ms"];
            row.extend(warm.map(|m| cell(res, m, 1)));
            row.extend([cell(Some(x), "speedup_disk_x", 0), cell(res, "decode_tok_s_after_resume", 1)]);
            row
        })
        .collect();
    let heads = ["TTFT cold ms", "warm (RAM) ms", "warm (disk) ms", "page cache dropped ms", "after restart ms"];
    let heads = [&CACHE_KEYS[..], &heads, &["cold / warm (disk)", "decode tok/s after resume"]].concat();
    table(&heads, &rows)
}

/// Another agent's decoding while a cache is written behind.
fn stall_table(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::Cache, "cache_save_stall")
        .into_iter()
        .map(|x| {
            let mut row = cache_keys(x);
            let metrics = ["engine_slice_max_ms", "itl_p50_alone_ms", "itl_max_during_save_ms", "stall_ms"];
            row.extend(metrics.map(|m| cell(Some(x), m, 1)));
            row
        })
        .collect();
    let heads = [
        "longest engine-thread slice of the save ms",
        "other agent's ITL p50 ms",
        "its longest gap from the resume to the end of the save ms",
        "gap - p50 ms",
    ];
    table(&[&CACHE_KEYS[..], &heads].concat(), &rows)
}

fn cache_section(r: &Results) -> String {
    format!(
        "\n## {}\n\n![TTFT cold and warm vs context]({TTFT_SVG})\n\n### Save and load (timings reported by the server)\n\n\
         `semantic`: the persister's write (temp file, fsync, rename) and the engine's read into pool blocks, from \
         `GET /v1/agents/{{id}}`. llama-server: `timings.save_ms` / `restore_ms` of `POST /slots/0?action=save|restore`.\n\n{}\n\
         ### Time to first token\n\nClient-measured over localhost. llama-server's warm-from-disk TTFT includes its separate \
         restore call.\n\n{}\n### Engine stall while a cache is saved\n\nAn agent decodes while the largest cache is \
         resumed for one token and then written behind (copied out of the pool in slices by the engine thread, written \
         by the persister thread). The engine-thread slice is what holds a model step back (server-side, \
         `last_save_engine_max_ms` of `GET /v1/agents/{{id}}`). The client-side gap also contains the resume's own \
         steps: its new tokens attend to the whole 8K context.\n\n{}",
        Group::Cache.title(),
        cache_io_table(r),
        cache_ttft_table(r),
        stall_table(r)
    )
}

fn fidelity_section(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::CodecFidelity, crate::fidelity::NAME)
        .into_iter()
        .map(|x| {
            let (c, n) = (|m, d| cell(Some(x), m, d), |k| x.param_u64(k).map_or("?".into(), |v| v.to_string()));
            let mut row = vec![x.param_str("codec").unwrap_or("?").into(), x.param_str("prompt").unwrap_or("?").into()];
            row.extend([
                n("prompt_tokens"),
                c("token_agreement", 3),
                format!("{} / {}", c("identical_prefix", 0), n("gen_tokens")),
            ]);
            let same = x.get("first_argmax_same").map_or("–", |v| if v == 1.0 { "yes" } else { "**no**" });
            row.push(format!("{same} ({})", c("first_top2_margin", 3)));
            row.extend(
                [("first_max_abs_dlogit", 4), ("first_rms_dlogit", 4), ("forced_mean_rms_dlogit", 4)]
                    .map(|(m, d)| c(m, d)),
            );
            row.extend([c("forced_top1_agreement", 3), c("kv_worst_err_over_bound", 3)]);
            row
        })
        .collect();
    let heads = [
        "codec",
        "prompt",
        "prompt tokens",
        "greedy agreement",
        "identical prefix",
        "first-step argmax same (reference top-2 margin)",
        "first-step max \\|Δlogit\\|",
        "first-step rms Δlogit",
        "teacher-forced mean rms Δlogit",
        "teacher-forced top-1 agreement",
        "K/V worst error / stated bound",
    ];
    format!(
        "\n## {}\n\nIn process on the model: the prompt's K/V (all but its last token) saved with each codec and \
         loaded back through the agent cache files, then greedy decoding from the f16 original and from the \
         round-tripped copy. Agreement and identical prefix: the copy's own greedy tokens against the original's. \
         First step: the logits of the prompt's last token over the loaded K/V (a flip where the original's top \
         two logits are close says little). Teacher-forced: the copy fed the \
         original's tokens, logits compared at every step. f16 is the control (lossless: agreement 1, error 0). \
         K/V error over the codec's stated bound (`KvCodec::max_abs_error`) holds when at most 1.\n\n{}",
        Group::CodecFidelity.title(),
        table(&heads, &rows)
    )
}

/// (metric, label, decimals) rows of a quantity/value/unit table.
type Rows = &'static [(&'static str, &'static str, usize)];

const PADDING: Rows = &[
    ("used_token_slots", "tokens cached", 0),
    ("allocated_token_slots", "token slots allocated", 0),
    ("overhead_pct_total", "overhead, all agents", 1),
    ("overhead_pct_per_agent", "overhead per agent", 1),
];

const RATIO: Rows = &[
    ("model_file_mib", "model file", 1),
    ("rss_at_ready_mib", "RSS at ready (model loaded)", 1),
    ("kv_per_agent_mib", "KV of one agent", 1),
    ("kv_per_agent_over_model_x", "one agent's KV / model", 3),
    ("kv_8k_tokens_over_model_x", "8K-token KV / model", 3),
    ("kv_all_agents_over_model_x", "all agents' KV / model", 3),
];

const THEORY: Rows = &[
    ("theory_bytes_per_token", "theory (layers x 2 x kv heads x head dim x 2 B)", 0),
    ("pool_bytes_per_token", "pool blocks / tokens", 0),
    ("rss_bytes_per_token", "RSS growth / tokens added", 0),
    ("disk_bytes_per_token", "file bytes / tokens", 0),
    ("pool_overhead_pct", "pool over theory", 1),
    ("measured_bytes_per_token", "measured (RSS growth, + pool blocks when the pool is resident)", 0),
    ("measured_overhead_pct", "measured over theory", 1),
    ("disk_overhead_pct", "file over theory", 1),
];

const LEAK: Rows = &[
    ("used_blocks_before", "pool blocks in use before", 0),
    ("used_blocks_after", "pool blocks in use after", 0),
    ("leaked_blocks", "leaked blocks", 0),
    ("leftover_agents", "leftover agents", 0),
    ("leftover_files", "leftover cache files", 0),
    ("rss_before_mib", "RSS before", 1),
    ("rss_after_mib", "RSS after", 1),
    ("rss_growth_total_mib", "RSS growth over all cycles", 1),
    ("rss_growth_mib", "RSS growth over the second half of the cycles, largest single step left out", 1),
];

/// One record as a quantity / value / unit table.
fn quantities(rec: Option<&Record>, rows: Rows) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(m, label, d)| {
            let unit = rec.and_then(|x| x.metric(m)).map_or(String::new(), |m| m.unit.clone());
            vec![label.to_string(), cell(rec, m, *d), unit]
        })
        .collect();
    table(&["quantity", "value", "unit"], &rows)
}

fn memory_section(r: &Results) -> String {
    let per: Vec<Vec<String>> = sorted(r, Group::Memory, "memory_per_agent")
        .into_iter()
        .map(|x| {
            let mut row = vec![x.server.clone(), x.param_u64("agents").unwrap_or(0).to_string()];
            let metrics =
                [("rss_mib", 0), ("rss_growth_mib", 1), ("rss_per_agent_mib", 1), ("memory_per_agent_mib", 1)];
            let kv = [("kv_mib", 1), ("kv_per_agent_mib", 1), ("tokens", 0)];
            row.extend(metrics.iter().chain(&kv).map(|(m, d)| cell(Some(x), m, *d)));
            row
        })
        .collect();
    let heads = ["server", "agents", "RSS MiB", "RSS growth MiB", "RSS growth per agent MiB", "memory per agent MiB"];
    let heads = [&heads[..], &["KV MiB", "KV per agent MiB", "tokens cached"]].concat();
    let one = |name: &'static str| r.find(Group::Memory, name).find(|x| x.server == "semantic");
    let pad = one("block_padding_overhead");
    let pad_note = pad.map_or(String::new(), |p| {
        format!(" ({} tokens per block; {})", p.param_u64("block_tokens").unwrap_or(0), p.notes.join("; "))
    });
    let cycles = one("leak_check").and_then(|x| x.param_u64("cycles")).unwrap_or(50);
    format!(
        "\n## {}\n\n![memory vs agents]({MEMORY_SVG})\n\nRSS growth is over a fresh server after one warm-up request; \
         KV is the pool blocks the agents hold; memory per agent adds them to the RSS growth when the pool was resident \
         from the start (see the notes).\n\n{}\n### Block padding overhead{pad_note}\n\n{}\n### Cache vs model memory\n\n{}\n\
         ### Actual vs theoretical bytes per token\n\n{}\n### Leak check ({cycles} create/use/delete cycles)\n\n{}",
        Group::Memory.title(),
        table(&heads, &per),
        quantities(pad, PADDING),
        quantities(one("cache_vs_model_memory_ratio"), RATIO),
        quantities(one("actual_vs_theoretical_memory"), THEORY),
        quantities(one("leak_check"), LEAK)
    )
}

fn load_section(r: &Results) -> String {
    let rows: Vec<Vec<String>> = sorted(r, Group::ModelLoad, "model_load_time")
        .into_iter()
        .map(|x| {
            vec![
                x.server.clone(),
                cell(Some(x), "ready_ms", 0),
                cell(Some(x), "rss_at_ready_mib", 1),
                x.notes.join("; "),
            ]
        })
        .collect();
    format!(
        "\n## {}\n\nSpawn to ready (`/health/ready` for semantic, `/health` for llama-server).\n\n{}",
        Group::ModelLoad.title(),
        table(&["server", "ready ms", "RSS at ready MiB", "notes"], &rows)
    )
}

pub fn markdown(r: &Results) -> String {
    let mut s = header(r);
    s.push_str(&verdict_section(r));
    s.push_str(&batching_section(r));
    s.push_str(&cache_section(r));
    s.push_str(&fidelity_section(r));
    s.push_str(&memory_section(r));
    s.push_str(&load_section(r));
    let shown_elsewhere = ["block_padding_overhead", "model_load_time"];
    let record_notes = r
        .records
        .iter()
        .filter(|x| !shown_elsewhere.contains(&x.name.as_str()))
        .flat_map(|x| x.notes.iter().map(move |n| format!("{} `{}`: {n}", x.server, x.name)));
    let notes: Vec<String> = r.metadata.notes.iter().cloned().chain(record_notes).collect();
    if !notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn points(recs: &[&Record], x: &str, metric: &str) -> Vec<(f64, f64)> {
    recs.iter().filter_map(|r| Some((r.param_u64(x)? as f64, r.get(metric)?))).collect()
}

/// "Memory for cached agents (2K tokens each)", from the records.
fn memory_title(r: &Results) -> String {
    let per_agent =
        r.find(Group::Memory, "memory_per_agent").find_map(|x| Some(x.get("tokens")? / x.param_u64("agents")? as f64));
    match per_agent {
        Some(t) => format!("Memory for cached agents ({} tokens each)", crate::context::Plan::size_label(t as usize)),
        None => "Memory for cached agents".into(),
    }
}

/// The three charts: throughput vs agents, TTFT vs context, memory vs agents.
pub fn charts(r: &Results) -> Vec<(&'static str, LineChart)> {
    let mut tp = Vec::new();
    for server in r.servers(Group::Batching) {
        let recs: Vec<&Record> = r.find(Group::Batching, "throughput").filter(|x| x.server == server).collect();
        let mut prompts: Vec<u64> = recs.iter().filter_map(|x| x.param_u64("prompt_tokens")).collect();
        prompts.sort_unstable();
        prompts.dedup();
        for p in prompts {
            let of_p: Vec<&Record> = recs.iter().copied().filter(|x| x.param_u64("prompt_tokens") == Some(p)).collect();
            tp.push(Series::new(&format!("{server}, {p}-token prompts"), points(&of_p, "agents", "aggregate_tok_s")));
        }
    }
    let mut ttft = Vec::new();
    for server in r.servers(Group::Cache) {
        let f16 = |name: &'static str| -> Vec<&Record> {
            r.find(Group::Cache, name).filter(|x| x.server == server && x.param_str("codec") == Some("f16")).collect()
        };
        let (cmp, res) = (f16("cold_start_vs_cache_resume"), f16("resume_generation_speed"));
        for (label, recs, metric) in [
            ("cold", &cmp, "ttft_cold_ms"),
            ("warm (RAM)", &res, "ttft_warm_ram_ms"),
            ("warm (disk)", &res, "ttft_warm_disk_ms"),
            ("after restart", &res, "ttft_after_restart_ms"),
        ] {
            let pts = points(recs, "tokens", metric);
            if !pts.is_empty() {
                ttft.push(Series::new(&format!("{server} {label}"), pts));
            }
        }
    }
    let mut mem = Vec::new();
    for server in r.servers(Group::Memory) {
        let recs: Vec<&Record> = r.find(Group::Memory, "memory_per_agent").filter(|x| x.server == server).collect();
        let total: Vec<(f64, f64)> = recs
            .iter()
            .filter_map(|x| {
                let n = x.param_u64("agents")? as f64;
                Some((n, x.get("memory_per_agent_mib")? * n))
            })
            .collect();
        mem.push(Series::new(&format!("{server}: memory for the agents"), total));
        let kv = points(&recs, "agents", "kv_mib");
        if !kv.is_empty() {
            let per_token = r.metadata.kv_bytes_per_token_f16 as f64;
            let theory: Vec<(f64, f64)> = recs
                .iter()
                .filter_map(|x| Some((x.param_u64("agents")? as f64, x.get("tokens")? * per_token / 1048576.0)))
                .collect();
            mem.push(Series::new(&format!("{server}: KV blocks held"), kv));
            mem.push(Series { dashed: true, ..Series::new("theory: f16 KV of the tokens", theory) });
        }
    }
    let chart = |title: &str, x: &str, y: &str, series, log_y| LineChart {
        title: title.into(),
        x_label: x.into(),
        y_label: y.into(),
        series,
        log_y,
    };
    vec![
        (THROUGHPUT_SVG, chart("Aggregate throughput vs concurrent agents", "agents", "generated tokens/s", tp, false)),
        (TTFT_SVG, chart("Time to first token vs cached context (f16)", "context tokens", "TTFT ms (log)", ttft, true)),
        (MEMORY_SVG, chart(&memory_title(r), "agents", "MiB", mem, false)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Metadata;
    use crate::svg::tests::assert_well_formed;

    fn results() -> Results {
        let meta = Metadata { quick: true, kv_bytes_per_token_f16: 23_040, ..Metadata::default() };
        let mut r = Results::new(meta);
        for (n, tps) in [(1, 100.0), (3, 250.0)] {
            r.upsert(
                Record::new(Group::Batching, "throughput", "semantic")
                    .param("agents", n)
                    .param("prompt_tokens", 128)
                    .samples("aggregate_tok_s", "tok/s", &[tps, tps + 10.0]),
            );
        }
        let cache = |name: &str, m: &str, v: f64| {
            Record::new(Group::Cache, name, "semantic")
                .param("codec", "f16")
                .param("tokens", 2048)
                .param("size", "2K")
                .value(m, "ms", v)
        };
        r.upsert(cache("cold_start_vs_cache_resume", "ttft_cold_ms", 2200.0));
        r.upsert(cache("resume_generation_speed", "ttft_warm_disk_ms", 20.0));
        r.upsert(cache("cache_save_time", "save_ms", 28.0));
        r.upsert(
            Record::new(Group::Memory, "memory_per_agent", "semantic")
                .param("agents", 1)
                .value("rss_growth_mib", "MiB", 50.0)
                .value("memory_per_agent_mib", "MiB", 55.0)
                .value("kv_mib", "MiB", 45.0)
                .value("tokens", "tokens", 2048.0),
        );
        r.upsert(
            Record::new(Group::CodecFidelity, crate::fidelity::NAME, "semantic")
                .param("codec", "q4_0")
                .param("prompt", "story")
                .param("prompt_tokens", 60)
                .param("gen_tokens", 32)
                .value("token_agreement", "fraction", 0.75)
                .value("identical_prefix", "tokens", 12.0)
                .value("first_argmax_same", "bool", 1.0)
                .value("first_top2_margin", "logit", 0.5),
        );
        r.verdicts = crate::verdict::verdicts(&r);
        r.metadata.notes.push("other builds were running".into());
        r
    }

    #[test]
    fn markdown_has_every_section_and_the_numbers() {
        let md = markdown(&results());
        for h in [
            "# semantic benchmark report",
            "## Verdicts",
            "## Batching performance",
            "## Cache save",
            "## KV codec fidelity",
            "## Memory utilization",
            "## Model load",
            "## Notes",
        ] {
            assert!(md.contains(h), "missing {h}");
        }
        assert!(md.contains("| semantic | 3 | 128 | ? | 255.0 (250.0–260.0) |"), "{md}");
        assert!(md.contains("| semantic | f16 | 2K | – | – | 28.0 |"));
        assert!(md.contains("| q4_0 | story | 60 | 0.750 | 12 / 32 | yes (0.500) | – |"), "{md}");
        assert!(md.contains("2200"));
        assert!(md.contains("**Poor**") || md.contains("Good"));
        assert!(md.contains("other builds were running"));
        assert!(md.contains(&format!("]({TTFT_SVG})")));
    }

    #[test]
    fn charts_carry_the_series() {
        let c = charts(&results());
        assert_eq!(c.len(), 3);
        let tp = &c[0].1;
        assert_eq!(tp.series[0].name, "semantic, 128-token prompts");
        assert_eq!(tp.series[0].points, vec![(1.0, 105.0), (3.0, 255.0)]);
        let ttft = &c[1].1;
        assert!(ttft.log_y);
        assert_eq!(
            ttft.series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["semantic cold", "semantic warm (disk)"]
        );
        let mem = &c[2].1;
        assert_eq!(mem.series[0].name, "semantic: memory for the agents");
        assert_eq!(mem.title, "Memory for cached agents (2K tokens each)");
        assert_eq!(mem.series[0].points, vec![(1.0, 55.0)]);
        assert_eq!(mem.series[1].points, vec![(1.0, 45.0)]);
        assert!((mem.series[2].points[0].1 - 2048.0 * 23_040.0 / 1048576.0).abs() < 1e-9);
        assert!(mem.series[2].dashed);
        for (_, chart) in &c {
            assert_well_formed(&chart.to_svg());
        }
    }

    #[test]
    fn writes_the_report_and_charts() {
        let dir = std::env::temp_dir().join(format!("semantic-bench-report-{}", std::process::id()));
        let p = write(&results(), &dir).unwrap();
        assert!(std::fs::read_to_string(p).unwrap().starts_with("# semantic benchmark report"));
        for f in [THROUGHPUT_SVG, TTFT_SVG, MEMORY_SVG] {
            assert!(std::fs::read_to_string(dir.join(f)).unwrap().contains("<svg"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(cell(None, "x", 1), "–");
    }
}
