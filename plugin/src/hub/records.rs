//! Which cached files were checked, so that a 10 GB shard is hashed once, not at every start.
//!
//! A record holds a file's sha256 and the stamp (size, modification and change times, inode)
//! it had when it was checked. A file whose stamp is unchanged is trusted; one that was written
//! since (a stamp that differs) is hashed again before it is used. Records live in this
//! project's own folder, never inside the hub cache that Python tools share.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        #[cfg(unix)]
        let (ctime_ns, ino) = {
            use std::os::unix::fs::MetadataExt;
            (
                meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
                meta.ino(),
            )
        };
        #[cfg(not(unix))]
        let (ctime_ns, ino) = (-1, 0);
        Ok(Self {
            len: meta.len(),
            mtime_ns,
            ctime_ns,
            ino,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    sha256: String,
    stamp: Stamp,
}

/// What the records know about a file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// Checked before and untouched since: its sha256 then.
    Unchanged(String),
    /// Checked before, written since: the sha256 it had.
    Changed(String),
    Unknown,
}

pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    pub(crate) fn new(assets: &Path) -> Self {
        Self {
            dir: assets.join("verified"),
        }
    }

    fn record_path(&self, file: &Path) -> PathBuf {
        let canonical = file.canonicalize().unwrap_or_else(|_| file.to_owned());
        let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        let hex = format!("{digest:x}");
        self.dir.join(format!("{}.json", &hex[..32]))
    }

    pub(crate) fn known(&self, file: &Path) -> Known {
        let Ok(text) = std::fs::read(self.record_path(file)) else {
            return Known::Unknown;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&text) else {
            return Known::Unknown;
        };
        match Stamp::of(file) {
            Ok(stamp) if stamp == record.stamp => Known::Unchanged(record.sha256),
            Ok(_) => Known::Changed(record.sha256),
            Err(_) => Known::Unknown,
        }
    }

    /// Notes that `file` has `sha256` now. Best effort: without a record the file is only
    /// hashed again next time.
    pub(crate) fn remember(&self, file: &Path, sha256: &str) {
        let Ok(stamp) = Stamp::of(file) else { return };
        let record = Record {
            path: file.to_owned(),
            sha256: sha256.to_owned(),
            stamp,
        };
        let path = self.record_path(file);
        let tmp = path.with_extension("tmp");
        let written = std::fs::create_dir_all(&self.dir).is_ok()
            && serde_json::to_vec(&record)
                .ok()
                .is_some_and(|bytes| std::fs::write(&tmp, bytes).is_ok());
        if written {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    pub(crate) fn forget(&self, file: &Path) {
        let _ = std::fs::remove_file(self.record_path(file));
    }
}

/// sha256 of a whole file, as lowercase hex.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    hash_into(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Feeds everything `reader` holds to `hasher`; returns the byte count.
pub(crate) fn hash_into(reader: &mut impl Read, hasher: &mut Sha256) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_after_its_check_is_known_as_changed() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::new(&dir.path().join("assets"));
        let file = dir.path().join("blob");
        std::fs::write(&file, b"weights").unwrap();
        assert_eq!(records.known(&file), Known::Unknown);
        let sha = sha256_file(&file).unwrap();
        records.remember(&file, &sha);
        assert_eq!(records.known(&file), Known::Unchanged(sha.clone()));
        // Same size, other bytes: the stamp (change time) moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"weighTs").unwrap();
        assert_eq!(records.known(&file), Known::Changed(sha));
        records.forget(&file);
        assert_eq!(records.known(&file), Known::Unknown);
    }
}
