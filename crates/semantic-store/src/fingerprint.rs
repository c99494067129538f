//! The model fingerprint: the first 8 bytes of the sha256 of the GGUF file,
//! as 16 lowercase hex characters. It names the cache sub-directory and is
//! stored in every cache file, so a cache is never applied to another model.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::CacheError;

/// 16 lowercase hex characters; validated on construction, so it is always
/// safe as a directory name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelFingerprint([u8; 16]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model fingerprint must be 16 lowercase hex characters, got {0:?}")]
pub struct FingerprintError(pub String);

impl ModelFingerprint {
    /// Hashes the file in 1 MiB reads (sha256 with SHA-NI where the CPU has
    /// it: ~45 ms for the 98 MB default model here).
    pub fn of_file(path: &Path) -> Result<Self, CacheError> {
        let mut file = File::open(path).map_err(|e| CacheError::io("open", path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CacheError::io("read", path, e)),
            };
            hasher.update(&buf[..n]);
        }
        Ok(Self::from_sha256(&hasher.finalize().into()))
    }

    /// The fingerprint of a file whose sha256 is `digest`.
    pub fn from_sha256(digest: &[u8; 32]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in digest[..8].iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        Self(out)
    }

    /// Parses 16 lowercase hex characters (tests, file headers, dir names).
    pub fn new(s: &str) -> Result<Self, FingerprintError> {
        let bytes: [u8; 16] = s.as_bytes().try_into().map_err(|_| FingerprintError(s.to_owned()))?;
        if !bytes.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
            return Err(FingerprintError(s.to_owned()));
        }
        Ok(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("validated ascii hex")
    }
}

impl FromStr for ModelFingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_only_16_lowercase_hex() {
        let fp = ModelFingerprint::new("b179c9523d0e6a0f").unwrap();
        assert_eq!(fp.to_string(), "b179c9523d0e6a0f");
        assert_eq!("0123456789abcdef".parse::<ModelFingerprint>().unwrap().as_str(), "0123456789abcdef");
        for bad in
            ["", "b179c9523d0e6a0", "b179c9523d0e6a0f0", "B179C9523D0E6A0F", "g179c9523d0e6a0f", "../../../../etc/"]
        {
            assert!(ModelFingerprint::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn of_file_is_the_sha256_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223...
        std::fs::File::create(&path).unwrap().write_all(b"abc").unwrap();
        assert_eq!(ModelFingerprint::of_file(&path).unwrap().as_str(), "ba7816bf8f01cfea");
        // Larger than one read buffer.
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &big).unwrap();
        let want = ModelFingerprint::from_sha256(&Sha256::digest(&big).into());
        assert_eq!(ModelFingerprint::of_file(&path).unwrap(), want);
        assert!(matches!(ModelFingerprint::of_file(&dir.path().join("missing")), Err(CacheError::Io { .. })));
    }
}
