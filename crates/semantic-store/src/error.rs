//! Errors of the cache store. Every way a file can be bad is a value here,
//! never a panic: the caller logs it, calls [`crate::quarantine`] when
//! [`CacheError::should_quarantine`] says so, and serves a cold prefill.

use std::io;
use std::path::PathBuf;

use crate::ModelFingerprint;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The file is truncated, bit-flipped, inconsistent or not ours.
    #[error("corrupt cache file {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The file was written for another model (or copied between dirs).
    #[error("cache file {path} belongs to model {found}, expected {expected}")]
    ForeignModel { path: PathBuf, expected: ModelFingerprint, found: String },
    /// The file is of a format version this build does not read.
    #[error("cache file {path} has format version {found}, this build reads {supported}")]
    Version { path: PathBuf, found: String, supported: u32 },
    /// The device ran out of space (ENOSPC / EDQUOT) while writing; the
    /// temporary file has been removed.
    #[error("disk full while writing {path}: {source}")]
    DiskFull { path: PathBuf, source: io::Error },
    /// Any other I/O failure (permissions, a vanished file, ...).
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    /// The KV pool has too few free blocks for the cache; nothing was loaded.
    #[error("KV pool has {free} free blocks, the cache needs {needed}")]
    PoolFull { needed: usize, free: usize },
    /// The save was called off before its file was published (the agent
    /// was deleted meanwhile); nothing was left on disk.
    #[error("saving {0} was cancelled")]
    Cancelled(PathBuf),
    /// The caller passed arguments that cannot describe a cache (a bug in
    /// the caller, not a bad file).
    #[error("invalid cache request: {0}")]
    Invalid(String),
}

impl CacheError {
    /// True for errors that mean "this file will never load": corrupt,
    /// foreign or of another version. Such a file is moved to `quarantine/`.
    /// I/O errors and a full pool are not the file's fault.
    pub fn should_quarantine(&self) -> bool {
        matches!(self, Self::Corrupt { .. } | Self::ForeignModel { .. } | Self::Version { .. })
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt { path: path.into(), reason: reason.into() }
    }

    /// Maps an I/O error; out-of-space becomes [`CacheError::DiskFull`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_out_of_space(&source) {
            Self::DiskFull { path, source }
        } else {
            Self::Io { op, path, source }
        }
    }

    /// Maps an I/O error met while reading a file whose length was already
    /// checked: an early end means the file changed under us or is short.
    pub(crate) fn read(path: impl Into<PathBuf>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Self::corrupt(path, "truncated: unexpected end of file")
        } else {
            Self::io("read", path, source)
        }
    }
}

/// ENOSPC (28) and EDQUOT (122) on Linux.
fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122)) || e.kind() == io::ErrorKind::StorageFull
}
