//! `semantic bench batching|resume|memory|all`: the HTTP benchmark suite of
//! `semantic-bench` against this binary's own `serve` (or `--target`), with
//! llama-server beside it on `--compare-llama`; writes the results JSON and
//! the Markdown report with its charts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use semantic_bench::server::default_llama_server;
use semantic_bench::suite::workspace_root;
use semantic_bench::{Group, Progress, StderrProgress, Suite, SuiteConfig};

use crate::bench::{BenchArgs, BenchKind};

/// One progress bar per stage.
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn stage(&mut self, name: &str, steps: u64) {
        self.finish();
        let style = ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {elapsed:>4} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::new(steps.max(1)).with_style(style).with_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn step(&mut self, msg: &str) {
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(msg.to_owned());
        }
    }

    fn note(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(format!("note: {msg}")),
            None => eprintln!("note: {msg}"),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

fn groups(what: BenchKind) -> &'static [Group] {
    match what {
        BenchKind::Batching => &[Group::Batching],
        BenchKind::Resume => &[Group::Cache, Group::CodecFidelity],
        BenchKind::Memory => &[Group::Memory],
        BenchKind::All | BenchKind::Engine => {
            &[Group::ModelLoad, Group::Batching, Group::Cache, Group::CodecFidelity, Group::Memory]
        }
    }
}

fn config(home: &Path, a: BenchArgs) -> Result<SuiteConfig> {
    let model = match a.model {
        Some(p) => p,
        None => crate::pull::ensure_default(home)?,
    };
    let llama_server =
        if a.compare_llama {
            let bin = a.llama_server.or_else(default_llama_server);
            Some(bin.context(
                "llama-server not found: build it with ../shared/peers/llama-server.sh or pass --llama-server",
            )?)
        } else {
            None
        };
    let report_dir = a.report.unwrap_or_else(|| match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    });
    let root = workspace_root();
    Ok(SuiteConfig {
        quick: a.quick,
        model,
        semantic_bin: std::env::current_exe().context("locating this binary")?,
        llama_server,
        target: a.target,
        output: a.output,
        report_dir,
        kv_pool_mb: a.kv_pool_mb,
        repo: if root.join(".git").exists() { root } else { std::env::current_dir()? },
    })
}

pub fn run(home: &Path, a: BenchArgs) -> Result<()> {
    let groups = groups(a.what);
    let notes = a.notes.clone();
    let cfg = config(home, a)?;
    // Progress bars on a terminal, plain lines in a log.
    let progress: Box<dyn Progress> =
        if std::io::stderr().is_terminal() { Box::new(Bars::default()) } else { Box::new(StderrProgress::default()) };
    let mut suite = Suite::new(cfg, progress)?;
    suite.results.metadata.notes.extend(notes);
    // Whatever was measured is written, also when a later part fails.
    let res = suite.run(groups);
    let report = suite.publish(false)?;
    println!("\n| criterion | source | threshold | measured | verdict |\n|---|---|---|---|---|");
    for v in &suite.results.verdicts {
        let measured = v.measured.map_or("–".into(), |x| format!("{x:.2} {}", v.unit));
        println!("| {} | {} | {} | {measured} | {} |", v.criterion, v.source, v.threshold, v.status.label());
    }
    println!("\nresults: {}\nreport:  {}", suite.cfg.output.display(), report.display());
    res.context("benchmark failed (partial results written)")
}
