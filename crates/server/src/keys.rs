//! Where the master key comes from when it is not configured.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use payrail_store::{Location, MasterKey};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The configured key; else, for SQLite, a key file beside the database
/// (created on first start, readable by its owner only); else, for PostgreSQL
/// in sandbox mode, a fixed sandbox key shared by every node. A production
/// PostgreSQL deployment must configure the key: nodes cannot share a file.
pub fn resolve(cfg: &Config) -> Result<MasterKey, String> {
    if let Some(k) = &cfg.master_key {
        return Ok(k.clone());
    }
    match &cfg.db {
        Location::Sqlite(path) => key_file(&key_path(path)),
        Location::Postgres(_) if cfg.sandbox => {
            tracing::warn!(
                "no PAYRAIL_MASTER_KEY: using the fixed sandbox key; set one for anything but tests"
            );
            Ok(MasterKey::from_bytes(Sha256::digest(b"payrail sandbox master key").into()))
        }
        Location::Postgres(_) => Err(
            "PAYRAIL_MASTER_KEY (64 hex characters) is required with PostgreSQL outside sandbox mode, so that every node seals and opens secrets with the same key"
                .into(),
        ),
    }
}

fn key_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

fn key_file(path: &Path) -> Result<MasterKey, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => MasterKey::from_hex(&text).ok_or_else(|| {
            format!(
                "key file {} does not hold 64 hex characters",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create key file {}: {e}", path.display()))?;
            writeln!(f, "{}", key.to_hex())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("cannot write key file {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a master key file; keep it with the database");
            Ok(key)
        }
        Err(e) => Err(format!("cannot read key file {}: {e}", path.display())),
    }
}
