//! Test support (feature `testkit`): a fresh database per test, on the
//! backend chosen by `PAYRAIL_TEST_BACKEND` (`sqlite`, the default, or
//! `postgres`, using the server at `PAYRAIL_TEST_PG_URL`). One parameterised
//! suite runs against either.

use std::path::Path;

use crate::Location;

/// Runs `f` on a plain thread: the synchronous PostgreSQL client must not run
/// on an async runtime's thread, and tests call this from both kinds.
fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f)
        .join()
        .expect("test database helper panicked")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn backend() -> Backend {
    match std::env::var("PAYRAIL_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        Ok("sqlite") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("PAYRAIL_TEST_BACKEND={other}: use sqlite or postgres"),
    }
}

/// The PostgreSQL server tests may use, if any. With `PAYRAIL_REQUIRE_PG=1`
/// (set by `scripts/test`) its absence is an error, so that CI cannot skip
/// the PostgreSQL tests by accident.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("PAYRAIL_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("PAYRAIL_REQUIRE_PG").is_ok_and(|v| v == "1") => {
            panic!("PAYRAIL_REQUIRE_PG=1 but PAYRAIL_TEST_PG_URL is not set")
        }
        _ => None,
    }
}

/// A database for one test, and a scratch directory; both removed on drop.
pub struct TestDb {
    pub url: String,
    pub location: Location,
    dir: tempfile::TempDir,
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// On the backend `PAYRAIL_TEST_BACKEND` selects.
    pub fn fresh() -> TestDb {
        match backend() {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => {
                let admin = postgres_admin_url()
                    .expect("PAYRAIL_TEST_BACKEND=postgres needs PAYRAIL_TEST_PG_URL");
                TestDb::postgres(&admin)
            }
        }
    }

    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("payrail.db");
        TestDb {
            url: format!("sqlite://{}", path.display()),
            location: Location::Sqlite(path),
            dir,
            postgres: None,
        }
    }

    /// A new, empty database on the server at `admin_url`.
    pub fn postgres(admin_url: &str) -> TestDb {
        let name = format!("payrail_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        let (admin, create) = (admin_url.to_string(), format!("CREATE DATABASE {name}"));
        off_runtime(move || {
            let mut admin = postgres::Client::connect(&admin, postgres::NoTls)
                .expect("connect to the test PostgreSQL");
            admin
                .batch_execute(&create)
                .expect("create a test database");
        });
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        let url = format!("{base}/{name}");
        TestDb {
            location: Location::Postgres(url.clone()),
            url,
            dir: tempfile::tempdir().expect("tempdir"),
            postgres: Some((admin_url.to_string(), name)),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres.is_some()
    }

    /// A scratch directory that lives as long as the database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sql` behind the store's back, to reach a state its API cannot;
    /// returns each row's first column as text (NULL as "NULL").
    pub fn sql(&self, sql: &str) -> Vec<String> {
        let sql = sql.to_string();
        match &self.location {
            Location::Sqlite(path) => {
                let c = rusqlite::Connection::open(path).expect("open the test database");
                c.busy_timeout(std::time::Duration::from_secs(10))
                    .expect("busy timeout");
                let mut stmt = c.prepare(&sql).expect("prepare");
                let rows = stmt
                    .query_map([], |r| {
                        Ok(match r.get_ref(0)? {
                            rusqlite::types::ValueRef::Null => "NULL".to_string(),
                            rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                            rusqlite::types::ValueRef::Real(f) => format!("{f:?}"),
                            rusqlite::types::ValueRef::Text(t)
                            | rusqlite::types::ValueRef::Blob(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                        })
                    })
                    .expect("run");
                rows.map(|r| r.expect("row")).collect()
            }
            Location::Postgres(url) => {
                let url = url.clone();
                off_runtime(move || {
                    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                    c.simple_query(&sql)
                        .expect("run")
                        .into_iter()
                        .filter_map(|m| match m {
                            postgres::SimpleQueryMessage::Row(r) => {
                                Some(r.get(0).unwrap_or("NULL").to_string())
                            }
                            _ => None,
                        })
                        .collect()
                })
            }
        }
    }

    /// Everything the database holds, as bytes, to search for plain text.
    pub fn dump(&self) -> Vec<u8> {
        match &self.location {
            Location::Sqlite(path) => {
                let mut bytes = std::fs::read(path).unwrap_or_default();
                let mut wal = path.as_os_str().to_owned();
                wal.push("-wal");
                bytes.extend(std::fs::read(wal).unwrap_or_default());
                bytes
            }
            Location::Postgres(url) => {
                let url = url.clone();
                off_runtime(move || dump_postgres(&url))
            }
        }
    }
}

fn dump_postgres(url: &str) -> Vec<u8> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let tables: Vec<String> = c
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for t in tables {
        for row in c
            .query(&format!("SELECT t::text FROM {t} t"), &[])
            .expect("dump")
        {
            let text: String = row.get(0);
            out.extend_from_slice(text.as_bytes());
            out.push(b'\n');
        }
    }
    out
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.postgres.take() {
            off_runtime(move || {
                if let Ok(mut c) = postgres::Client::connect(&admin, postgres::NoTls) {
                    let _ =
                        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
                }
            });
        }
    }
}

/// Another node caught mid-batch (PostgreSQL): a transaction on its own
/// connection that has done some work and holds its row locks until
/// [`Held::commit_once_waited_on`].
pub struct Held {
    url: String,
    go: std::sync::mpsc::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

/// Runs `work` in a transaction at `url` and returns while it holds its locks.
pub async fn hold<F>(url: &str, work: F) -> Held
where
    F: FnOnce(&mut postgres::Transaction<'_>) + Send + 'static,
{
    let (go, release) = std::sync::mpsc::channel::<()>();
    let (held, is_held) = tokio::sync::oneshot::channel::<()>();
    let conn_url = url.to_string();
    let done = tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&conn_url, postgres::NoTls).expect("connect");
        let mut tx = c.transaction().expect("begin");
        work(&mut tx);
        let _ = held.send(());
        let _ = release.recv();
        tx.commit().expect("commit");
    });
    if is_held.await.is_err() {
        // The work panicked: show its message, not this one.
        match done.await {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            other => panic!("the holding transaction ended early: {other:?}"),
        }
    }
    Held {
        url: url.to_string(),
        go,
        done,
    }
}

impl Held {
    /// Commits once `waiters` of payrail's statements wait for a lock in
    /// this database (on this transaction, or on one that waits for it),
    /// which is when the race under test is set up.
    pub async fn commit_once_waited_on(self, waiters: i64) {
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || wait_for_lock_waiters(&url, waiters))
            .await
            .expect("lock watch");
        let _ = self.go.send(());
        self.done.await.expect("the holding transaction");
    }
}

/// Returns once `n` of payrail's statements wait for a lock in the database
/// at `url` (PostgreSQL). Only that database's count: tests share one
/// cluster, each with a database of its own, and another test's lock waits
/// would set this one off before its race was set up. The deadline only
/// turns a hang into a failure.
fn wait_for_lock_waiters(url: &str, n: i64) {
    let mut watch = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while watch
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'payrail' AND wait_event_type = 'Lock'
                AND datname = current_database()",
            &[],
        )
        .expect("pg_stat_activity")
        .get::<_, i64>(0)
        < n
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never {n} waiting for a lock"
        );
        // Not a spin: the statements awaited need the same two cores.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
