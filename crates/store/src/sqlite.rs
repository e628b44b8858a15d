//! The SQLite engine: one file in WAL mode, one writer connection, a pool of
//! reader connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql, ffi};

use crate::conn::{Conn, Control, DbError, DbErrorKind, Dialect, Param, Row, Value};

/// How a connection will be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Writer,
    Reader,
    Checkpointer,
}

pub(crate) struct SqliteConn {
    conn: Connection,
    /// The writer's: what its commits wait on when the WAL is over its bound.
    wal: Option<Arc<WalGauge>>,
}

/// Takes the lock that keeps a database to one store at a time, in any
/// process, first creating the database file (readable by its owner only)
/// if there is none. The lock is released when the returned file is
/// dropped, or the process ends however it ends.
///
/// SQLite itself would let a second process write the same file, but this
/// store's durability does not survive it: each process syncs only the WAL
/// frames it wrote, and the other's checkpoint may move them into the
/// database file (not synced at that point) and restart the WAL over them.
///
/// The lock is a file of its own, `-lock` beside the database's real path
/// (symbolic links followed, as SQLite follows them to name its WAL), so
/// two names for one database share it. A lock on the database file itself
/// could not be used: opening the file at all, even to lock it, and closing
/// it drops every POSIX lock this process's SQLite connections hold on it.
/// For the same reason an existing database file is never opened here.
pub(crate) fn lock_database(path: &Path) -> Result<std::fs::File, crate::StoreError> {
    let fail = |what: &str, p: &Path, e: std::io::Error| {
        crate::StoreError::Internal(format!("cannot {what} {}: {e}", p.display()))
    };
    if !path.exists() {
        create_private(path).map_err(|e| fail("create", path, e))?;
    }
    let real = std::fs::canonicalize(path).map_err(|e| fail("resolve", path, e))?;
    let mut name = real.into_os_string();
    name.push("-lock");
    let lock_path = PathBuf::from(name);
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&lock_path)
        .map_err(|e| fail("open", &lock_path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::StoreError::InUse(lock_path)),
        Err(std::fs::TryLockError::Error(e)) => Err(fail("lock", &lock_path, e)),
    }
}

/// Creates the database file, readable by its owner only (through a
/// symbolic link, its target). SQLite would create it readable by everyone
/// (0644 less the umask), and it holds cells, e-mail addresses and the
/// ledger; the WAL and shared-memory files SQLite creates beside it take the
/// database file's permissions. An existing file keeps its own.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

impl SqliteConn {
    pub(crate) fn open(path: &Path, role: Role) -> Result<SqliteConn, DbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(classify)?;
        // Without the query planner stability guarantee, SQLite may mark a
        // join's plan as depending on a bound value; every rebind then expires
        // the statement and the next step compiles it again. That cost the
        // writer a third of its time on the wallet debit's token lookup.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(classify)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(classify)?;
        conn.set_prepared_statement_cache_capacity(256);
        // WAL: readers never wait for the writer and the writer does not wait
        // for readers (except at the WAL's bound, see `WalGauge`). synchronous=FULL: every commit fsyncs the WAL, so a commit
        // that returned is on disk; the writer makes that affordable by
        // committing many requests per transaction.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -16384;",
        )
        .map_err(classify)?;
        match role {
            // A reader's sorts and temporary tables spill to files: the
            // ledger's self-check groups every transfer, which in memory grew
            // the process by ~80 bytes per transfer (805 MB at 9.8M).
            Role::Reader => conn.execute_batch("PRAGMA query_only = ON; PRAGMA temp_store = FILE;"),
            // Checkpoints run on their own thread (see `Checkpointer`), not
            // inside the writer's commits.
            // After a burst, the WAL file is cut back to 128 MiB when it restarts.
            Role::Writer => conn.execute_batch(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 134217728;",
            ),
            Role::Checkpointer => Ok(()),
        }
        .map_err(classify)?;
        Ok(SqliteConn { conn, wal: None })
    }

    /// The WAL file SQLite writes for this database. Its name follows the
    /// full path SQLite resolved when it opened the file, with symbolic
    /// links followed, not the path payrail was given: the sync thread must
    /// sync the file that holds the frames, or it syncs nothing and answers
    /// callers before their commits are on disk.
    pub(crate) fn wal_file(&self) -> Result<PathBuf, DbError> {
        let db = self
            .conn
            .path()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| DbError::other("the database has no file, so no WAL to sync"))?;
        let wal = PathBuf::from(format!("{db}-wal"));
        // Opening in WAL mode created it; if it is not there, this is not
        // the file SQLite writes.
        std::fs::metadata(&wal)
            .map_err(|e| DbError::other(format!("the WAL is not at {}: {e}", wal.display())))?;
        Ok(wal)
    }
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Int(v) => ValueRef::Integer(v),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn read_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        // Real columns do not exist in payrail's schema; keep the bits visible
        // rather than silently rounding if one ever appears.
        ValueRef::Real(f) => Value::Text(f.to_string()),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

pub(crate) fn classify(e: rusqlite::Error) -> DbError {
    let kind = match &e {
        rusqlite::Error::SqliteFailure(err, _) => match err.code {
            ffi::ErrorCode::ConstraintViolation => match err.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    DbErrorKind::UniqueViolation
                }
                ffi::SQLITE_CONSTRAINT_FOREIGNKEY => DbErrorKind::ForeignKeyViolation,
                ffi::SQLITE_CONSTRAINT_CHECK => DbErrorKind::CheckViolation,
                _ => DbErrorKind::Other,
            },
            ffi::ErrorCode::DatabaseBusy | ffi::ErrorCode::DatabaseLocked => DbErrorKind::Retryable,
            ffi::ErrorCode::CannotOpen
            | ffi::ErrorCode::SystemIoFailure
            | ffi::ErrorCode::DiskFull
            | ffi::ErrorCode::PermissionDenied
            | ffi::ErrorCode::ReadOnly => DbErrorKind::Unavailable,
            _ => DbErrorKind::Other,
        },
        _ => DbErrorKind::Other,
    };
    DbError::new(kind, e.to_string())
}

impl Conn for SqliteConn {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, DbError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(classify)?;
        for (i, p) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, p).map_err(classify)?;
        }
        stmt.raw_execute().map(|n| n as u64).map_err(classify)
    }

    fn query(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(classify)?;
        for (i, p) in params.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, p).map_err(classify)?;
        }
        let ncols = stmt.column_count();
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(classify)? {
            let mut values = Vec::with_capacity(ncols);
            for i in 0..ncols {
                values.push(read_value(row.get_ref(i).map_err(classify)?));
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    /// SQLite compiles `RETURNING` as a temporary trigger, which makes every
    /// execution open an ephemeral table and a statement journal: a sixth of
    /// a ledger transfer's insert. The row's key is the connection's last
    /// inserted rowid instead (exact: a connection is used by one thread).
    fn insert_id(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, DbError> {
        Ok(match self.execute(sql, params)? {
            0 => None,
            _ => Some(self.conn.last_insert_rowid()),
        })
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        self.conn.execute_batch(sql).map_err(classify)
    }

    fn control(&mut self, c: Control) -> Result<(), DbError> {
        if let (Control::BeginWrite, Some(wal)) = (c, &self.wal) {
            wal.admit(&self.conn);
        }
        let statements: &[&str] = match c {
            Control::BeginWrite => &["BEGIN IMMEDIATE"],
            Control::Commit => &["COMMIT"],
            Control::Rollback => &["ROLLBACK"],
            Control::Savepoint => &["SAVEPOINT unit"],
            Control::ReleaseAndSavepoint => &["RELEASE SAVEPOINT unit", "SAVEPOINT unit"],
            Control::RollbackToSavepoint => &["ROLLBACK TO SAVEPOINT unit"],
            Control::StepSavepoint => &["SAVEPOINT step"],
            Control::StepRelease => &["RELEASE SAVEPOINT step"],
            Control::StepRollback => &["ROLLBACK TO SAVEPOINT step", "RELEASE SAVEPOINT step"],
        };
        for sql in statements {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.raw_execute())
                .map_err(classify)?;
        }
        Ok(())
    }
}

/// Copies committed pages from the WAL into the database file, on its own
/// thread and connection, so that the writer's commits do not pay for it
/// (unless it falls so far behind that the WAL reaches its bound; see
/// [`WalGauge`]).
///
/// It starts once the WAL holds `CHECKPOINT_FRAMES` frames, so that a page
/// changed by many commits (a merchant's balance, the end of an index) is
/// copied once rather than once per commit, and then loops until it has
/// caught up: only a fully copied WAL lets the writer start again from its
/// beginning, and overwriting WAL blocks costs a quarter of appending new ones
/// (measured here on ext4: 0.9 µs against 3.9 µs a frame). Without that the
/// WAL would only grow. PASSIVE checkpoints never block the writer or
/// readers; with `synchronous = FULL` the database file is synced before the
/// WAL is reused.
pub(crate) struct Checkpointer {
    kick: flume::Sender<()>,
    /// Frames in the WAL that start a checkpoint.
    threshold: i32,
    gauge: Arc<WalGauge>,
    /// Checkpoint passes so far (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    passes: Arc<AtomicU64>,
}

/// WAL size (in frames, 64 MiB of 4 KiB pages) that starts a checkpoint.
pub(crate) const CHECKPOINT_FRAMES: i32 = 16384;

/// WAL size (in frames: 256 MiB of pages) past which the writer starts the
/// WAL again before it begins another transaction (see [`WalGauge`]).
pub(crate) const WAL_BOUND_FRAMES: i32 = 4 * CHECKPOINT_FRAMES;

/// How long the writer goes on trying to start the WAL again at the bound
/// (an attempt under way may add the 5 s busy timeout). A reader that never
/// ends must not stop every write for good; past this the writer goes on,
/// and says so.
const WAL_BOUND_PATIENCE: Duration = Duration::from_secs(10);

/// Keeps the WAL bounded when the checkpointer falls behind. A writer that
/// commits every millisecond can outrun it (a database much larger than the
/// page cache, a slow disk, readers that always hold a snapshot in the WAL),
/// and the WAL only starts again from its beginning once it is wholly copied
/// and no reader is in it, so it then grows without end: 1.5 GB in one
/// measured run, which a restart must read back whole before it serves.
/// Past [`WAL_BOUND_FRAMES`] the writer, before its next transaction, runs a
/// RESTART checkpoint itself: it copies what is left, waits for readers to
/// leave the WAL, and so makes that transaction start the WAL again. Writes
/// wait meanwhile; that is the back-pressure. Below the bound this costs one
/// atomic load per transaction.
pub(crate) struct WalGauge {
    /// Frames in the WAL after the writer's last commit.
    frames: AtomicI32,
    bound: i32,
    /// WAL size that makes the writer act: `bound`, or after it gave up once,
    /// a further `bound` past where it gave up (so a reader that outstays the
    /// patience costs one wait per `bound` frames, not one per transaction).
    next_check: AtomicI32,
    /// Times the writer found the WAL at its bound (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    waits: AtomicU64,
}

impl WalGauge {
    /// Called by the writer, on its own connection, before each transaction.
    fn admit(&self, conn: &Connection) {
        let frames = self.frames.load(Ordering::Relaxed);
        if frames < self.next_check.load(Ordering::Relaxed) {
            return;
        }
        metrics::counter!("payrail_sqlite_wal_bound_waits_total").increment(1);
        self.waits.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        while started.elapsed() < WAL_BOUND_PATIENCE {
            // (1 if it could not finish, frames, frames copied). Readers are
            // waited for through the busy timeout; the checkpointer's own
            // pass, if one is running, makes it answer 1 (or BUSY) at once.
            match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
                Ok(0) => {
                    self.frames.store(0, Ordering::Relaxed);
                    self.next_check.store(self.bound, Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == ffi::ErrorCode::DatabaseBusy => {}
                // LOCKED (this connection still in a transaction) and the
                // rest do not pass by waiting.
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint at the bound failed");
                    self.give_up(frames);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!(
            frames,
            "the WAL is past its bound and could not be started again; writing on"
        );
        self.give_up(frames);
    }

    fn give_up(&self, frames: i32) {
        self.next_check
            .store(frames.saturating_add(self.bound), Ordering::Relaxed);
    }
}

impl Checkpointer {
    /// The thread runs until the `Checkpointer` and every writer connection
    /// it adopted are gone (they hold its only senders).
    ///
    /// `lock` (see [`lock_database`]) is held until the thread's last
    /// checkpoint is done. That is after the writers have gone, so a store
    /// that closes joins the returned thread: closed, the database is free
    /// for the next store at once.
    pub(crate) fn start(
        path: &Path,
        threshold: i32,
        bound: i32,
        lock: Option<Arc<std::fs::File>>,
    ) -> Result<(Checkpointer, std::thread::JoinHandle<()>), DbError> {
        let conn = SqliteConn::open(path, Role::Checkpointer)?;
        let (kick, rx) = flume::bounded::<()>(1);
        let gauge = Arc::new(WalGauge {
            frames: AtomicI32::new(0),
            bound,
            next_check: AtomicI32::new(bound),
            waits: AtomicU64::new(0),
        });
        let passes = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&passes);
        let thread = std::thread::Builder::new()
            .name("payrail-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let mut last_done = None;
                    loop {
                        let pass = checkpoint(&conn.conn);
                        counted.fetch_add(1, Ordering::Relaxed);
                        match pass {
                            Ok((log, done)) => {
                                // Caught up (or nothing to do): wait for a commit.
                                if done >= log {
                                    break;
                                }
                                // No frame copied since the last pass: a
                                // reader still needs them (it caps `done`,
                                // however many frames commits add). Wait a
                                // little rather than spin; stop once the
                                // writers are gone.
                                if last_done == Some(done)
                                    && rx.recv_timeout(Duration::from_millis(1))
                                        == Err(flume::RecvTimeoutError::Disconnected)
                                {
                                    break;
                                }
                                last_done = Some(done);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "WAL checkpoint failed");
                                break;
                            }
                        }
                    }
                }
                let _ = checkpoint(&conn.conn);
                drop(lock);
            })
            .map_err(|e| DbError::other(format!("cannot start the checkpointer: {e}")))?;
        let checkpointer = Checkpointer {
            kick,
            threshold,
            gauge,
            passes,
        };
        Ok((checkpointer, thread))
    }

    /// Opens a writer connection for the durable pipeline. Every writer
    /// connection, the first and any reconnection, comes from here: one
    /// without the WAL hook would never start a checkpoint, and its WAL would
    /// grow until the disk is full.
    pub(crate) fn open_writer(&self, path: &Path) -> Result<SqliteConn, DbError> {
        let mut conn = SqliteConn::open(path, Role::Writer)?;
        self.watch(&mut conn)?;
        conn.wal = Some(Arc::clone(&self.gauge));
        // Commits are not synced by the engine but by the pipeline (see
        // `durable`). NORMAL rather than OFF: in WAL mode NORMAL still syncs
        // the WAL's header each time the WAL starts again from its
        // beginning. Without that sync, a new frame can reach the disk
        // before the new header, and recovery after a power cut would
        // replay the previous cycle's stale frames over newer pages (SQLite
        // ticket ff5be73dee). It costs one fsync per WAL cycle (64 MiB).
        conn.conn
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(classify)?;
        Ok(conn)
    }

    /// Checkpoint passes run so far.
    #[cfg(test)]
    pub(crate) fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Watches the writer's commits: asks for a checkpoint when the WAL is
    /// large enough (free if one is already pending).
    fn watch(&self, writer: &mut SqliteConn) -> Result<(), DbError> {
        let kick = self.kick.clone();
        let threshold = self.threshold;
        let gauge = Arc::clone(&self.gauge);
        let mut last = 0;
        writer
            .conn
            .wal_hook(Some(
                move |_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
                    // Frames this commit wrote (the WAL restarts from 0 now and then).
                    let written = if frames >= last {
                        frames - last
                    } else {
                        // Started again: the bound is the plain one again.
                        gauge.next_check.store(gauge.bound, Ordering::Relaxed);
                        frames
                    };
                    last = frames;
                    gauge.frames.store(frames, Ordering::Relaxed);
                    metrics::histogram!("payrail_sqlite_wal_frames_per_commit")
                        .record(f64::from(written));
                    if frames >= threshold {
                        let _ = kick.try_send(());
                    }
                    Ok(())
                },
            ))
            .map_err(classify)
    }
}

/// One PASSIVE checkpoint: (frames in the WAL, frames copied).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with one table `t (id, v BLOB)`, in a directory of its own.
    fn table_t() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut setup = SqliteConn::open(&path, Role::Writer).unwrap();
        setup
            .batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        (dir, path)
    }

    /// The WAL bound of the two tests below, in frames.
    const BOUND: i32 = 64;

    /// The largest the WAL file may be: the bound, plus the commit that
    /// crossed it (a few pages), plus the header.
    const WAL_LIMIT_BYTES: u64 = (BOUND as u64 + 8) * (4096 + 24) + 32;

    /// One transaction writing about one page into `t`.
    fn commit_a_page(w: &mut SqliteConn) {
        w.control(Control::BeginWrite).unwrap();
        w.execute("INSERT INTO t (v) VALUES (zeroblob(3000))", &[])
            .unwrap();
        w.control(Control::Commit).unwrap();
    }

    /// A reader's sorts spill to files, so that a query over every row (the
    /// ledger's self-check) does not hold them all in memory; the writer
    /// keeps its small temporary structures in memory.
    #[test]
    fn readers_sort_on_disk_and_the_writer_in_memory() {
        let (_dir, path) = table_t();
        let temp_store = |role| {
            let c = SqliteConn::open(&path, role).unwrap();
            c.conn
                .query_row("PRAGMA temp_store", [], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(temp_store(Role::Reader), 1, "FILE");
        assert_eq!(temp_store(Role::Writer), 2, "MEMORY");
    }

    /// The database and the files SQLite makes beside it are the owner's.
    #[cfg(unix)]
    #[test]
    fn a_new_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let _lock = lock_database(&path).unwrap();
        let mut w = SqliteConn::open(&path, Role::Writer).unwrap();
        w.batch("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1);")
            .unwrap();
        for name in ["p.db", "p.db-wal", "p.db-shm", "p.db-lock"] {
            let mode = std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        }
    }

    /// One lock per database, whatever name it is opened by; a symbolic
    /// link's target is created privately too.
    #[cfg(unix)]
    #[test]
    fn a_database_is_locked_under_its_real_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let real = dir.path().join("data/real.db");
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let held = lock_database(&link).unwrap();
        let mode = std::fs::metadata(&real).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        for name in [&real, &link, &dir.path().join("data/../link.db")] {
            match lock_database(name) {
                Err(crate::StoreError::InUse(p)) => {
                    assert!(p.ends_with("data/real.db-lock"), "{}", p.display())
                }
                other => panic!("{}: {other:?}", name.display()),
            }
        }
        drop(held);
        lock_database(&real).unwrap();
    }

    /// Given a symbolic link, SQLite writes its WAL beside the file the
    /// link names; the sync thread must be told that file, not the link's
    /// name with `-wal` added, which does not exist.
    #[cfg(unix)]
    #[test]
    fn the_wal_to_sync_is_the_one_sqlite_writes_when_the_path_is_a_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(dir.path().join("data/real.db"), &link).unwrap();
        let mut w = SqliteConn::open(&link, Role::Writer).unwrap();
        w.batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        let wal = w.wal_file().unwrap();
        assert_eq!(
            wal,
            std::fs::canonicalize(dir.path().join("data"))
                .unwrap()
                .join("real.db-wal")
        );
        assert!(!dir.path().join("link.db-wal").exists());
        let before = std::fs::metadata(&wal).unwrap().len();
        commit_a_page(&mut w);
        assert!(
            std::fs::metadata(&wal).unwrap().len() > before,
            "the commit's frames are not in {}",
            wal.display()
        );
    }

    fn rows_in_t(w: &mut SqliteConn) -> i64 {
        w.query("SELECT count(*) FROM t", &[]).unwrap()[0]
            .int(0)
            .unwrap()
    }

    /// A reconnected writer (after a disk-full or I/O error) gets the same
    /// treatment as the first: its commits still start checkpoints, and the
    /// WAL header is still synced when the WAL starts again.
    #[test]
    fn every_writer_connection_starts_checkpoints_and_syncs_the_wal_header() {
        let (_dir, path) = table_t();
        let (checkpointer, _thread) = Checkpointer::start(&path, 1, i32::MAX, None).unwrap();
        let first = checkpointer.open_writer(&path).unwrap();
        drop(first); // as the writer does when the database reports an error
        let mut second = checkpointer.open_writer(&path).unwrap();
        let synchronous = second.query("PRAGMA synchronous", &[]).unwrap();
        assert_eq!(synchronous[0].int(0).unwrap(), 1, "NORMAL, not OFF");
        let before = checkpointer.passes();
        second
            .execute("INSERT INTO t (v) VALUES (zeroblob(5000))", &[])
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while checkpointer.passes() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint after the second connection's commit"
            );
            std::thread::yield_now();
        }
    }

    /// With a checkpointer that never catches up (here: never asked to), the
    /// writer itself starts the WAL again once it passes the bound, so the
    /// WAL file stops growing there.
    #[test]
    fn the_wal_stays_within_its_bound_when_the_checkpointer_falls_behind() {
        let (dir, path) = table_t();
        let (checkpointer, _thread) = Checkpointer::start(&path, i32::MAX, BOUND, None).unwrap();
        let mut writer = checkpointer.open_writer(&path).unwrap();
        let wal = dir.path().join("t.db-wal");
        let mut largest = 0;
        for _ in 0..400 {
            commit_a_page(&mut writer);
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        assert!(
            largest <= WAL_LIMIT_BYTES,
            "the WAL grew to {largest} bytes"
        );
        // Every row is there.
        assert_eq!(rows_in_t(&mut writer), 400);
    }

    /// A reader inside the WAL keeps it from starting again: at the bound
    /// the writer waits for that reader to leave, then starts it again.
    #[test]
    fn at_the_bound_the_writer_waits_for_readers_to_leave_the_wal() {
        let (dir, path) = table_t();
        let (checkpointer, _thread) = Checkpointer::start(&path, i32::MAX, BOUND, None).unwrap();
        let mut writer = checkpointer.open_writer(&path).unwrap();
        commit_a_page(&mut writer);
        // A reader whose snapshot is in the WAL, held until told.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (pinned, is_pinned) = std::sync::mpsc::channel::<()>();
        let reader_path = path.clone();
        let reader = std::thread::spawn(move || {
            let mut r = SqliteConn::open(&reader_path, Role::Reader).unwrap();
            r.batch("BEGIN").unwrap();
            r.query("SELECT count(*) FROM t", &[]).unwrap();
            pinned.send(()).unwrap();
            released.recv().unwrap();
            r.batch("COMMIT").unwrap();
        });
        is_pinned.recv().unwrap();
        let gauge = Arc::clone(&checkpointer.gauge);
        let writing = std::thread::spawn(move || {
            for _ in 0..200 {
                commit_a_page(&mut writer);
            }
            writer
        });
        // The writer reaches the bound and waits there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while gauge.waits.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "never waited");
            std::thread::yield_now();
        }
        assert!(!writing.is_finished(), "wrote past the bound");
        release.send(()).unwrap();
        reader.join().unwrap();
        let mut writer = writing.join().unwrap();
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(wal <= WAL_LIMIT_BYTES, "the WAL grew to {wal} bytes");
        assert_eq!(rows_in_t(&mut writer), 201);
    }

    /// Statements come from the cache compiled once: a recompilation on
    /// every execution would cost more than the statement itself.
    #[test]
    fn cached_statements_are_not_recompiled_when_rebound() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = SqliteConn::open(&dir.path().join("t.db"), Role::Writer).unwrap();
        crate::migrate::run(&mut conn, crate::migrate::SQLITE, 0).unwrap();
        // The wallet debit's token lookup, a join on a bound key.
        const SQL: &str = "SELECT t.digest, w.cell FROM mbk_tokens t
                             LEFT JOIN wallets w ON w.cell = t.cell WHERE t.digest = ?1";
        for i in 0..10u8 {
            conn.query(SQL, &[Param::Blob(&[i; 32])]).unwrap();
        }
        let stmt = conn.conn.prepare_cached(SQL).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }
}
