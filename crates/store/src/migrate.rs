//! Schema migrations, embedded in the binary and applied in order at start.
//!
//! Each applied migration is recorded with a digest of its text; a recorded
//! migration whose text has since changed stops the start, because the
//! database no longer matches what the code expects.

use sha2::{Digest, Sha256};

use crate::StoreError;
use crate::conn::Conn;

pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! migrations {
    ($dir:literal: $($version:literal $name:literal),* $(,)?) => {
        &[$(Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!("../migrations/", $dir, "/", $name, ".sql")),
        }),*]
    };
}

pub(crate) const SQLITE: &[Migration] = migrations!("sqlite":
    1 "0001_ledger",
    2 "0002_platform",
    3 "0003_mobikwik",
    4 "0004_account_deltas",
    5 "0005_otp_amount",
    6 "0006_sandbox_mark",
    7 "0007_outbox_by_time",
    8 "0008_one_open_otp",
    9 "0009_otps_by_time",
    10 "0010_production_mark",
);

pub(crate) const POSTGRES: &[Migration] = migrations!("postgres":
    1 "0001_ledger",
    2 "0002_platform",
    3 "0003_mobikwik",
    4 "0004_account_deltas",
    5 "0005_otp_amount",
    6 "0006_sandbox_mark",
    7 "0007_outbox_by_time",
    8 "0008_one_open_otp",
    9 "0009_otps_by_time",
    10 "0010_production_mark",
);

fn digest(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Applies every migration not yet applied, each in its own transaction.
pub(crate) fn run(conn: &mut dyn Conn, set: &[Migration], now_ms: i64) -> Result<(), StoreError> {
    conn.batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    BIGINT PRIMARY KEY,
             name       TEXT   NOT NULL,
             digest     TEXT   NOT NULL,
             applied_at BIGINT NOT NULL
         )",
    )?;
    let applied = conn.query(
        "SELECT version, name, digest FROM schema_migrations ORDER BY version",
        &[],
    )?;
    for m in set {
        let d = digest(m.sql);
        if let Some(row) = applied.iter().find(|r| r.int(0).ok() == Some(m.version)) {
            if row.text(2)? != d {
                return Err(StoreError::Internal(format!(
                    "migration {} ({}) was changed after it was applied",
                    m.version, m.name
                )));
            }
            continue;
        }
        conn.batch("BEGIN")?;
        let result = conn.batch(m.sql).and_then(|()| {
            conn.execute(
                "INSERT INTO schema_migrations (version, name, digest, applied_at) VALUES (?1, ?2, ?3, ?4)",
                &[m.version.into(), m.name.into(), d.as_str().into(), now_ms.into()],
            )
        });
        match result {
            Ok(_) => conn.batch("COMMIT")?,
            Err(e) => {
                let _ = conn.batch("ROLLBACK");
                return Err(StoreError::Internal(format!(
                    "migration {} failed: {e}",
                    m.name
                )));
            }
        }
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    if let Some(row) = applied
        .iter()
        .find(|r| r.int(0).ok() > set.last().map(|m| m.version))
    {
        return Err(StoreError::Internal(format!(
            "database has migration {} which this build does not know; refusing to run an older build on it",
            row.int(0)?
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{Role, SqliteConn};

    /// Migration 0010 marks a database production served before it
    /// (it has accounts, and sandbox mode never served it), and only those.
    #[test]
    fn databases_served_before_the_production_mark_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let production = |path: &std::path::Path| {
            let mut c = SqliteConn::open(path, Role::Writer).unwrap();
            run(&mut c, SQLITE, 0).unwrap();
            let rows = c
                .query("SELECT production FROM sandbox_clock WHERE id = 1", &[])
                .unwrap();
            rows[0].int(0).unwrap()
        };
        let at_nine = |name: &str, setup: &str| {
            let path = dir.path().join(name);
            let mut c = SqliteConn::open(&path, Role::Writer).unwrap();
            run(&mut c, &SQLITE[..9], 0).unwrap();
            c.batch(setup).unwrap();
            path
        };
        let account =
            "INSERT INTO accounts (code, currency, flags, created_at) VALUES ('a', 'INR', 0, 0);";
        let served = at_nine("served.db", account);
        let sandbox = at_nine(
            "sandbox.db",
            &format!("{account} UPDATE sandbox_clock SET used = 1;"),
        );
        let unused = at_nine("unused.db", "SELECT 1;");
        assert_eq!(production(&served), 1);
        assert_eq!(production(&sandbox), 0);
        assert_eq!(production(&unused), 0);
    }
}
