//! payrail's persistence.
//!
//! Everything durable (the ledger, every rail's state, the sandbox's clock and
//! outbox) lives behind one interface: a unit of work is a closure over a
//! [`Tx`], run by [`Store::write`] (durable when it returns) or
//! [`Store::read`] (a consistent snapshot). Rails express their rules in Rust
//! against the typed functions of this crate's modules and never see SQL.
//!
//! Engines: SQLite (embedded, the default) and PostgreSQL (several nodes). Both
//! run the same queries through the [`conn::Conn`] seam.

pub mod conn;
mod durable;
pub mod ledger;
#[cfg(test)]
mod long_read_tests;
mod migrate;
pub mod mobikwik;
pub mod outbox;
mod pgtls;
mod postgres;
pub mod sandbox;
pub mod seal;
mod sqlite;
#[cfg(feature = "testkit")]
pub mod testkit;
mod tx;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use payrail_core::Clock;
use tokio::sync::{Semaphore, oneshot};

pub use conn::{DbError, DbErrorKind, Dialect};
pub use ledger::LedgerOpError;
pub use seal::{MasterKey, Sealer};
pub use tx::Tx;

/// PostgreSQL: the advisory lock a node holds while it migrates the schema.
pub const MIGRATION_LOCK: i64 = 7_405_319;

/// PostgreSQL: how long a starting node waits for another node's migration.
const MIGRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

use conn::Conn;
use tx::Deferred;
use writer::{Connect, Job, Msg, Outcome, WriterConfig};

/// A store failure. Its `Display` is safe to show; details (SQL, engine
/// messages) are only in `Debug`, for logs.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable")]
    Unavailable(String),
    #[error("database busy")]
    Busy(DbError),
    #[error("database constraint violated")]
    Constraint(DbError),
    #[error("store closed")]
    Closed,
    /// Nothing was written: the work waited longer than
    /// [`Options::max_wait`] for a writer or a reader, so it was refused
    /// rather than done after its caller had likely given up.
    #[error("store overloaded")]
    Overloaded,
    /// The work's `COMMIT` was sent but its answer was lost, and whether it
    /// took effect could not be learned in time (the database stayed down,
    /// or the store stopped). The caller must not be told it failed: it may
    /// have been kept.
    #[error("the outcome of a commit is unknown")]
    OutcomeUnknown,
    #[error("internal store error")]
    Internal(String),
    #[error("the master key does not match the one this database was sealed with")]
    WrongMasterKey,
    /// SQLite: another store (in this process or another) has the file open.
    #[error("another payrail process has this database open")]
    InUse(PathBuf),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> StoreError {
        match e.kind {
            DbErrorKind::UniqueViolation
            | DbErrorKind::ForeignKeyViolation
            | DbErrorKind::CheckViolation => StoreError::Constraint(e),
            DbErrorKind::Retryable => StoreError::Busy(e),
            DbErrorKind::Unavailable => StoreError::Unavailable(e.detail),
            DbErrorKind::Other => StoreError::Internal(e.detail),
        }
    }
}

/// Where the data lives. Printed with any password hidden (it is logged at
/// start-up).
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Location::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&redact_password(url))
                .finish(),
        }
    }
}

/// A PostgreSQL URL with the password of its user part and of a
/// `password=` parameter replaced by `***`.
pub fn redact_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    // `password=` parameters first, wherever they are: the credentials'
    // end is found by an '@' below, and a password parameter may hold one.
    let rest = rest
        .split('&')
        .map(|part| {
            let lower = part.to_ascii_lowercase();
            match lower.find("password=") {
                Some(i) if i == 0 || lower[..i].ends_with('?') => {
                    format!("{}***", &part[..i + "password=".len()])
                }
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    // The credentials end at an '@', which may come after a '/' or '?' of
    // the password's own (the driver takes them up to the first '@'). The
    // last '@' is taken, so that whatever the driver reads as a password is
    // hidden, and a name that looks like more than a name is hidden too.
    let shown = match rest.rfind('@') {
        Some(at) => {
            let user = match rest[..at].split_once(':') {
                Some((name, _)) if !name.contains(['/', '?']) => format!("{name}:***"),
                None if !rest[..at].contains(['/', '?']) => rest[..at].to_string(),
                _ => "***".to_string(),
            };
            format!("{user}@{}", &rest[at + 1..])
        }
        None => rest,
    };
    if scheme.is_empty() {
        shown
    } else {
        format!("{scheme}://{shown}")
    }
}

impl Location {
    /// `sqlite://PATH`, `sqlite:PATH`, a bare path, or `postgres://...`.
    pub fn parse(url: &str) -> Result<Location, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Location::Postgres(url.to_string()));
        }
        // A mistyped PostgreSQL URL must not become a local SQLite file (with
        // a key beside it) that quietly takes the writes meant for the cluster.
        let lower = url.get(..11).unwrap_or(url).to_ascii_lowercase();
        if lower.starts_with("postgres:") || lower.starts_with("postgresql:") {
            return Err("unsupported database URL: PostgreSQL URLs begin with postgres://".into());
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path.contains("://") {
            // The URL may hold a password (a misspelt scheme, say).
            return Err(format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://...",
                redact_password(url)
            ));
        }
        Ok(Location::Sqlite(PathBuf::from(path)))
    }
}

/// PostgreSQL settings.
#[derive(Clone, Debug)]
pub struct PgTuning {
    /// Writer connections, each running its own group commits.
    pub writers: usize,
    /// Most units in one PostgreSQL commit; every unit costs round trips while
    /// the batch holds its row locks, so batches are kept smaller than on SQLite.
    pub max_batch: usize,
    pub connect_timeout: std::time::Duration,
    pub statement_timeout: std::time::Duration,
    pub lock_timeout: std::time::Duration,
}

impl Default for PgTuning {
    fn default() -> Self {
        PgTuning {
            // Each unit costs several round trips, so a writer connection
            // spends most of its time waiting; but every writer and backend
            // also competes for CPU. Two was best on the 2-core development
            // machine (see the README's measurements); raise it with cores.
            writers: 2,
            max_batch: 128,
            connect_timeout: std::time::Duration::from_secs(2),
            statement_timeout: std::time::Duration::from_secs(5),
            // Short, because the waits it ends are mostly cycles. A batch
            // holds its row locks until it commits, and batches on different
            // nodes take them in the order their units came, so two nodes
            // debiting the same few wallets wait on each other in cycles;
            // with `lock_timeout` under the server's `deadlock_timeout`
            // (1 s), this timeout is what breaks them, and the unit runs again
            // in a later batch. On 40 wallets over three nodes, 500 ms gave
            // 170-340 debits/s with p99 1.0-2.5 s, 50 ms 1,290-1,360/s with
            // p99 0.17 s; one node's spread run was the same with either
            // (README, *Contention between nodes*).
            lock_timeout: std::time::Duration::from_millis(50),
        }
    }
}

/// How to open a store.
pub struct Options {
    pub location: Location,
    pub master_key: MasterKey,
    pub clock: Arc<dyn Clock>,
    /// Read the sandbox clock offset (sandbox mode only).
    pub sandbox_clock: bool,
    /// Most units one commit may carry.
    pub max_batch: usize,
    /// Units waiting for a writer before callers are made to wait.
    pub queue_capacity: usize,
    /// Reader connections.
    pub readers: usize,
    /// Longest a unit of work waits for a writer to start it, or a read for
    /// a reader, before it is refused with [`StoreError::Overloaded`].
    pub max_wait: std::time::Duration,
    pub postgres: PgTuning,
}

impl Options {
    pub fn new(location: Location, master_key: MasterKey, clock: Arc<dyn Clock>) -> Options {
        Options {
            location,
            master_key,
            clock,
            sandbox_clock: false,
            max_batch: 1024,
            queue_capacity: 65_536,
            readers: 8,
            max_wait: DEFAULT_MAX_WAIT,
            postgres: PgTuning::default(),
        }
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// One queue per writer (see [`Store::write_keyed`]).
    queues: Vec<flume::Sender<Msg>>,
    next_queue: std::sync::atomic::AtomicUsize,
    writers: Mutex<Vec<JoinHandle<()>>>,
    /// SQLite: the threads that end once the writers are gone, joined in
    /// this order: the one that syncs and answers, then the checkpointer.
    after_writers: Mutex<Vec<JoinHandle<()>>>,
    /// SQLite: the sync thread's watermarks.
    marks: Option<Arc<durable::Watermarks>>,
    read_permits: Arc<Semaphore>,
    /// See [`Options::max_wait`].
    max_wait: std::time::Duration,
    /// One [`Store::read_alone`] at a time.
    alone_permit: Arc<Semaphore>,
    /// SQLite: held until the store closes (or, unclosed, is dropped), and
    /// by the checkpointer until its last checkpoint (see
    /// `sqlite::lock_database`).
    lock: Mutex<Option<Arc<std::fs::File>>>,
    idle_readers: Mutex<Vec<Box<dyn Conn>>>,
    connect_reader: Connect,
    sealer: Sealer,
    clock: Arc<dyn Clock>,
    sandbox_clock: bool,
    dialect: Dialect,
    closed: AtomicBool,
}

/// SQLite's durable pipeline, as `Store::start` takes it.
struct SqlitePipeline {
    syncer: durable::Syncer,
    marks: Arc<durable::Watermarks>,
    /// The threads that end after the writers (see `Inner::after_writers`).
    threads: Vec<JoinHandle<()>>,
}

/// A closure queued as a unit of work, with the channel its answer goes back on.
struct ClosureJob<F, T, E> {
    f: F,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
    /// When it was queued; the wait until a batch first runs it (behind the
    /// units before it in that batch) is measured.
    queued: std::time::Instant,
    ran: bool,
    /// See [`Options::max_wait`].
    max_wait: std::time::Duration,
    /// Refused at its first run for waiting too long. Kept, so that if its
    /// batch runs again the unit is refused again rather than done.
    expired: bool,
}

impl<F, T, E> Job for ClosureJob<F, T, E>
where
    F: FnMut(&mut Tx<'_>) -> Result<T, E> + Send,
    T: Send,
    E: From<StoreError> + Send,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> Outcome {
        if !std::mem::replace(&mut self.ran, true) {
            let waited = self.queued.elapsed();
            metrics::histogram!("payrail_group_commit_queue_seconds").record(waited.as_secs_f64());
            // Decided here, by the writer, and not by the caller timing out
            // its wait: only the writer knows the unit has not run, so a unit
            // refused this way has certainly moved nothing.
            if waited > self.max_wait {
                self.expired = true;
                metrics::counter!("payrail_store_overloaded_total", "wait" => "writer")
                    .increment(1);
            }
        }
        if self.expired {
            self.result = Some(Err(E::from(StoreError::Overloaded)));
            return Outcome::Rollback;
        }
        self.result = None;
        let r = (self.f)(tx);
        let outcome = if r.is_ok() {
            Outcome::Commit
        } else {
            Outcome::Rollback
        };
        self.result = Some(r);
        outcome
    }

    fn finish(self: Box<Self>, durable: Result<(), StoreError>) {
        let answer = match (durable, self.result) {
            (Ok(()), Some(r)) => r,
            (Ok(()), None) => Err(E::from(StoreError::Internal(
                "unit of work never ran".into(),
            ))),
            (Err(e), _) => Err(E::from(e)),
        };
        // The caller may have gone away; the work is done either way.
        let _ = self.reply.send(answer);
    }

    fn within_wait(&self) -> bool {
        self.queued.elapsed() <= self.max_wait
    }
}

/// Longer than the stalls payrail itself can cause (the SQLite WAL bound
/// waits about 10 s for readers, a PostgreSQL statement times out in 5 s by
/// default), so those delay work rather than refuse it; shorter than the 30 s
/// a client commonly waits, so that work is refused rather than done after
/// its caller has given up and cannot learn the answer.
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a writer keeps trying to learn whether a COMMIT whose answer was
/// lost took effect, while that batch's callers wait. The outcome is known
/// once the database is back, and a restart or a failover takes seconds to a
/// minute; only past this (or when the store stops) do the callers hear
/// [`StoreError::OutcomeUnknown`].
const OUTCOME_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The statement timeout of a [`Store::read_alone`] on PostgreSQL.
const LONG_READ_TIMEOUT: &str = "SET LOCAL statement_timeout = '1h'";

impl Store {
    /// Opens (creating and migrating if needed) the store at `opts.location`.
    pub async fn open(opts: Options) -> Result<Store, StoreError> {
        tokio::task::spawn_blocking(move || Store::open_blocking(opts))
            .await
            .map_err(|e| StoreError::Internal(format!("open task failed: {e}")))?
    }

    fn open_blocking(opts: Options) -> Result<Store, StoreError> {
        match &opts.location {
            Location::Sqlite(path) => {
                let path = path.clone();
                let lock = Arc::new(sqlite::lock_database(&path)?);
                {
                    // Set-up commits are synced one by one (synchronous=FULL),
                    // before the pipeline exists.
                    let mut setup = sqlite::SqliteConn::open(&path, sqlite::Role::Writer)?;
                    migrate::run(&mut setup, migrate::SQLITE, opts.clock.now().millis())?;
                    check_master_key(&mut setup, &Sealer::new(&opts.master_key))?;
                }
                let (checkpointer, checkpoint_thread) = sqlite::Checkpointer::start(
                    &path,
                    sqlite::CHECKPOINT_FRAMES,
                    sqlite::WAL_BOUND_FRAMES,
                    Some(Arc::clone(&lock)),
                )?;
                let checkpointer = Arc::new(checkpointer);
                let writer_conn = checkpointer.open_writer(&path)?;
                let marks = durable::Watermarks::new();
                let wal = writer_conn.wal_file()?;
                let (syncer, sync_thread) = durable::Syncer::start(wal, Arc::clone(&marks))
                    .map_err(|e| {
                        StoreError::Internal(format!("cannot start the sync thread: {e}"))
                    })?;
                let reader_path = path.clone();
                let connect_reader: Connect = Arc::new(move || {
                    Ok(Box::new(sqlite::SqliteConn::open(
                        &reader_path,
                        sqlite::Role::Reader,
                    )?) as Box<dyn Conn>)
                });
                let connect_writer: Connect = Arc::new(move || {
                    Ok(Box::new(checkpointer.open_writer(&path)?) as Box<dyn Conn>)
                });
                // SQLite allows one writer at a time: one writer thread.
                Ok(Store::start(
                    opts,
                    Dialect::Sqlite,
                    vec![Some(Box::new(writer_conn) as Box<dyn Conn>)],
                    connect_writer,
                    connect_reader,
                    Some(SqlitePipeline {
                        syncer,
                        marks,
                        threads: vec![sync_thread, checkpoint_thread],
                    }),
                    Some(lock),
                ))
            }
            Location::Postgres(url) => {
                let pg = postgres::PgOptions {
                    url: url.clone(),
                    connect_timeout: opts.postgres.connect_timeout,
                    statement_timeout: opts.postgres.statement_timeout,
                    lock_timeout: opts.postgres.lock_timeout,
                };
                for host in pgtls::plain_remote_hosts(url) {
                    tracing::warn!(
                        %host,
                        "PostgreSQL is reached over the network without TLS; add sslmode=verify-full (and sslrootcert) to the URL"
                    );
                }
                let mut first = postgres::PgConn::connect(&pg)?;
                // Several nodes may start at once: one migrates, the others
                // wait here and then find nothing left to do. The timeouts
                // meant for requests would cut both the wait and a long
                // migration short, so they are lifted here: the wait is
                // bounded only by `MIGRATION_WAIT`.
                first.batch(&format!(
                    "SET statement_timeout = 0; SET lock_timeout = {}; SELECT pg_advisory_lock({MIGRATION_LOCK})",
                    MIGRATION_WAIT.as_millis()
                ))?;
                let migrated =
                    migrate::run(&mut first, migrate::POSTGRES, opts.clock.now().millis())
                        .and_then(|()| {
                            check_master_key(&mut first, &Sealer::new(&opts.master_key))
                        });
                first.batch(&format!(
                    "SELECT pg_advisory_unlock({MIGRATION_LOCK}); RESET statement_timeout; RESET lock_timeout"
                ))?;
                migrated?;
                let connect: Connect =
                    Arc::new(
                        move || Ok(Box::new(postgres::PgConn::connect(&pg)?) as Box<dyn Conn>),
                    );
                let mut writers: Vec<Option<Box<dyn Conn>>> = vec![Some(Box::new(first))];
                for _ in 1..opts.postgres.writers.max(1) {
                    writers.push(Some(connect()?));
                }
                let mut opts = opts;
                opts.max_batch = opts.max_batch.min(opts.postgres.max_batch);
                Ok(Store::start(
                    opts,
                    Dialect::Postgres,
                    writers,
                    Arc::clone(&connect),
                    connect,
                    None,
                    None,
                ))
            }
        }
    }

    fn start(
        opts: Options,
        dialect: Dialect,
        writer_conns: Vec<Option<Box<dyn Conn>>>,
        connect_writer: Connect,
        connect_reader: Connect,
        pipeline: Option<SqlitePipeline>,
        lock: Option<Arc<std::fs::File>>,
    ) -> Store {
        let (pipeline, marks, after_writers) = match pipeline {
            Some(SqlitePipeline {
                syncer,
                marks,
                threads,
            }) => (Some((syncer, Arc::clone(&marks))), Some(marks), threads),
            None => (None, None, Vec::new()),
        };
        let sealer = Sealer::new(&opts.master_key);
        let cfg = Arc::new(WriterConfig {
            max_batch: opts.max_batch.max(1),
            max_attempts: 5,
            clock: Arc::clone(&opts.clock),
            sandbox_clock: opts.sandbox_clock,
            sealer: sealer.clone(),
            connect: connect_writer,
            outcome_wait: OUTCOME_WAIT.max(opts.postgres.statement_timeout * 2),
            pipeline,
        });
        let writer_count = writer_conns.len();
        let per_queue = (opts.queue_capacity / writer_count.max(1)).max(1);
        let mut queues = Vec::with_capacity(writer_count);
        let handles = writer_conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| {
                let (tx, rx) = flume::bounded(per_queue);
                queues.push(tx);
                let cfg = Arc::clone(&cfg);
                std::thread::Builder::new()
                    .name(format!("payrail-writer-{i}"))
                    .spawn(move || writer::run(conn, rx, cfg))
                    .expect("spawning a writer thread")
            })
            .collect();
        Store {
            inner: Arc::new(Inner {
                queues,
                next_queue: Default::default(),
                writers: Mutex::new(handles),
                after_writers: Mutex::new(after_writers),
                marks,
                read_permits: Arc::new(Semaphore::new(opts.readers.max(1))),
                max_wait: opts.max_wait,
                alone_permit: Arc::new(Semaphore::new(1)),
                lock: Mutex::new(lock),
                idle_readers: Mutex::new(Vec::new()),
                connect_reader,
                sealer,
                clock: opts.clock,
                sandbox_clock: opts.sandbox_clock,
                dialect,
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// Runs `f` as a unit of work and returns its result once it is durable.
    ///
    /// `Ok` keeps the unit's changes, `Err` undoes all of them. The unit shares
    /// a transaction and a commit with whatever else is waiting (group commit);
    /// its answer is sent only after that commit, and if the commit fails the
    /// answer is the commit's error, never a success that was not saved.
    ///
    /// `f` runs on the writer thread, synchronously: it must not block on
    /// anything but the database. It may run more than once (after a lock
    /// conflict, or when another unit of its batch fails and the batch runs
    /// again), so it must not consume its captures.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(self.next_queue(), self.inner.max_wait, f).await
    }

    /// [`Store::write`] without the bound on waiting for a writer
    /// ([`Options::max_wait`]), for the server's own work (sweeps, start-up):
    /// no client waits for it, and done late is better than not done, since
    /// an expired reservation keeps its money held until it runs.
    pub async fn write_unbounded<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(self.next_queue(), std::time::Duration::MAX, f)
            .await
    }

    /// [`Store::write`], for a unit whose locks are named by `key` (a wallet,
    /// say): units with the same key always run on the same writer.
    ///
    /// With several writers (PostgreSQL), two writers each holding one of two
    /// wallets' rows in an open batch and waiting for the other's would wait
    /// until the lock timeout; routing by key keeps such units on one writer,
    /// in one batch or in order.
    pub async fn write_keyed<T, E, F>(&self, key: &[u8], f: F) -> Result<T, E>
    where
        F: FnMut(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let queue = if self.inner.queues.len() == 1 {
            0
        } else {
            // FNV-1a: cheap and well spread for short keys.
            let h = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            });
            (h % self.inner.queues.len() as u64) as usize
        };
        self.submit(queue, self.inner.max_wait, f).await
    }

    /// The writers' queues in turn, for units that name no locks.
    fn next_queue(&self) -> usize {
        let n = self.inner.next_queue.fetch_add(1, Ordering::Relaxed);
        n % self.inner.queues.len()
    }

    /// Units waiting in the first writer's queue.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.inner.queues[0].len()
    }

    async fn submit<T, E, F>(
        &self,
        queue: usize,
        max_wait: std::time::Duration,
        f: F,
    ) -> Result<T, E>
    where
        F: FnMut(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(E::from(StoreError::Closed));
        }
        let (reply, answer) = oneshot::channel();
        let job = Box::new(ClosureJob {
            f,
            result: None,
            reply,
            queued: std::time::Instant::now(),
            ran: false,
            max_wait,
            expired: false,
        });
        if self.inner.queues[queue]
            .send_async(Msg::Job(job))
            .await
            .is_err()
        {
            return Err(E::from(StoreError::Closed));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(E::from(StoreError::Closed)))
    }

    /// Runs `f` against a consistent read-only snapshot, on a reader
    /// connection: reads never wait for the writer.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.off_runtime(
            &self.inner.read_permits,
            Some(self.inner.max_wait),
            move |inner| inner.run_read(f),
        )
        .await
    }

    /// Runs `f` like [`Store::read`], but on a connection of its own, opened
    /// for it and closed after, and one such read at a time.
    ///
    /// For reads that take time in proportion to the whole ledger (its
    /// self-check): on a pooled reader, a few of them at once held every
    /// reader, and wallet reads waited for them (22 s in one run). Callers
    /// wait here without holding a reader. On PostgreSQL the request
    /// statement timeout would cancel such a read on a large ledger, so this
    /// one has a longer one (an hour).
    ///
    /// Waiting for the one before it is bounded like any read's wait for a
    /// reader (`max_wait`, then `Overloaded`): the server answers a request
    /// whose client has gone (see `half_close` in the server's `http.rs`),
    /// so self-checks abandoned by impatient clients would otherwise queue
    /// up and each scan the whole ledger in turn.
    pub async fn read_alone<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let max_wait = Some(self.inner.max_wait);
        self.off_runtime(&self.inner.alone_permit, max_wait, move |inner| {
            let mut conn = (inner.connect_reader)().map_err(|e| E::from(e.into()))?;
            conn.batch(inner.begin_read())
                .map_err(|e| E::from(e.into()))?;
            if inner.dialect == Dialect::Postgres {
                // For this transaction only, and still bounded: its snapshot
                // holds back VACUUM while it runs.
                conn.batch(LONG_READ_TIMEOUT)
                    .map_err(|e| E::from(e.into()))?;
            }
            inner.read_on(conn, f).1
        })
        .await
    }

    /// Runs a read on the blocking pool once `permits` grants one, which it
    /// holds while it runs; answers once what it could see is durable. Past
    /// `max_wait` for a permit the read is refused, having run nothing.
    async fn off_runtime<T, E, F>(
        &self,
        permits: &Arc<Semaphore>,
        max_wait: Option<std::time::Duration>,
        read: F,
    ) -> Result<T, E>
    where
        F: FnOnce(&Inner) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let acquire = Arc::clone(permits).acquire_owned();
        let acquired = match max_wait {
            Some(d) => tokio::time::timeout(d, acquire).await.map_err(|_| {
                metrics::counter!("payrail_store_overloaded_total", "wait" => "reader")
                    .increment(1);
                E::from(StoreError::Overloaded)
            })?,
            None => acquire.await,
        };
        let permit = acquired.map_err(|_| E::from(StoreError::Closed))?;
        let inner = Arc::clone(&self.inner);
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            read(&inner)
        })
        .await
        .unwrap_or_else(|e| {
            Err(E::from(StoreError::Internal(format!(
                "read task failed: {e}"
            ))))
        });
        // Nothing a read saw reaches the caller before it is durable.
        if let Some(marks) = &self.inner.marks {
            marks.settle_read().await;
        }
        result
    }

    /// Is the database reachable?
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|tx| tx.query_one("SELECT 1", &[]).map(|_| ()))
            .await
    }

    /// Stops taking work, commits everything already queued (unless a
    /// writer is learning a lost COMMIT's outcome: then its queue fails, as
    /// it would with the database down), and waits for the writers to finish.
    /// Once it returns, another store may open the database.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for q in &self.inner.queues {
            let _ = q.send_async(Msg::Stop).await;
        }
        let handles = std::mem::take(&mut *self.inner.writers.lock());
        let after_writers = std::mem::take(&mut *self.inner.after_writers.lock());
        let _ = tokio::task::spawn_blocking(move || {
            // The writers gone, so are the sync thread's queue and the
            // checkpointer's wake-ups: the one answers what is left, the
            // other makes its last checkpoint and lets the database go.
            for h in handles.into_iter().chain(after_writers) {
                let _ = h.join();
            }
        })
        .await;
        self.inner.lock.lock().take();
    }
}

/// Refuses to start with a master key other than the one the database's
/// secrets are sealed with, instead of failing later on every sealed read.
fn check_master_key(conn: &mut dyn Conn, sealer: &Sealer) -> Result<(), StoreError> {
    const CONTEXT: &str = "payrail:key-check";
    const PLAIN: &[u8] = b"payrail";
    match conn
        .query("SELECT sealed FROM key_check WHERE id = 1", &[])?
        .first()
    {
        Some(row) => match sealer.open(CONTEXT, &row.blob(0)?) {
            Ok(p) if p == PLAIN => Ok(()),
            _ => Err(StoreError::WrongMasterKey),
        },
        None => {
            let sealed = sealer.seal(CONTEXT, PLAIN);
            conn.execute(
                "INSERT INTO key_check (id, sealed) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
                &[sealed.as_slice().into()],
            )?;
            Ok(())
        }
    }
}

impl Drop for Inner {
    /// Idle connections are closed on a plain thread: closing a PostgreSQL
    /// connection blocks, which is not allowed on an async runtime's thread,
    /// where the last handle to the store is usually dropped.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.idle_readers.lock());
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

impl Inner {
    fn run_read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let begin = self.begin_read();
        // A pooled connection may have died while idle (a database restart);
        // that shows at BEGIN, before anything was read, so a fresh one is
        // tried once.
        let pooled = self.idle_readers.lock().pop();
        let conn = match pooled {
            Some(mut c) => match c.batch(begin) {
                Ok(()) => c,
                Err(e) if e.kind == DbErrorKind::Unavailable => {
                    let mut c = (self.connect_reader)().map_err(|e| E::from(e.into()))?;
                    c.batch(begin).map_err(|e| E::from(e.into()))?;
                    c
                }
                Err(e) => return Err(E::from(e.into())),
            },
            None => {
                let mut c = (self.connect_reader)().map_err(|e| E::from(e.into()))?;
                c.batch(begin).map_err(|e| E::from(e.into()))?;
                c
            }
        };
        match self.read_on(conn, f) {
            (Some(conn), result) => {
                self.idle_readers.lock().push(conn);
                result
            }
            (None, result) => result,
        }
    }

    /// Runs `f` in the read transaction `conn` has begun, and ends it. The
    /// connection comes back unless it could not end its transaction.
    fn read_on<T, E, F>(
        &self,
        mut conn: Box<dyn Conn>,
        f: F,
    ) -> (Option<Box<dyn Conn>>, Result<T, E>)
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let mut broken = false;
        let result = (|| {
            let now = writer::read_now(conn.as_mut(), &*self.clock, self.sandbox_clock)
                .map_err(E::from)?;
            let empty = Deferred::new();
            let mut tx = Tx::new(conn.as_mut(), now, &self.sealer, &empty, false);
            let r = f(&mut tx);
            broken = tx.failed;
            r
        })();
        let end = if broken { "ROLLBACK" } else { "COMMIT" };
        match conn.batch(end) {
            Ok(()) => (Some(conn), result),
            // A connection that cannot end its transaction is not reused.
            Err(e) => {
                tracing::warn!(error = %e, "dropping a reader connection");
                (None, result)
            }
        }
    }

    /// The statement that begins a read-only snapshot.
    fn begin_read(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "BEGIN",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn database_urls_print_without_their_password() {
        for (url, shown) in [
            (
                "postgres://payrail:S3cret@db:5432/payrail",
                "postgres://payrail:***@db:5432/payrail",
            ),
            (
                "postgresql://u:p@ss@h/d?sslmode=disable&password=x",
                "postgresql://u:***@h/d?sslmode=disable&password=***",
            ),
            (
                "postgres://postgres@127.0.0.1/x",
                "postgres://postgres@127.0.0.1/x",
            ),
            (
                "postgres://payrail:S3cr/et@127.0.0.1:15432/payrail",
                "postgres://payrail:***@127.0.0.1:15432/payrail",
            ),
            ("postgres://u:a?b/c@h/d", "postgres://u:***@h/d"),
            ("postgres://h/d?password=x@y", "postgres://h/d?password=***"),
        ] {
            assert_eq!(redact_password(url), shown);
        }
        let printed = format!("{:?}", Location::parse("postgres://a:S3cret@h/d").unwrap());
        assert!(!printed.contains("S3cret"), "{printed}");
    }

    #[test]
    fn a_mistyped_database_url_is_refused_without_its_password() {
        for url in [
            "postgress://app:S3cret@db/pay",
            "mysql://app:S3cret@db/pay",
            "postgres:/app:S3cret@db/pay",
            "postgresql:app:S3cret@db/pay",
            "POSTGRES:/app:S3cret@db/pay",
            "PostgreSQL://app:S3cret@db/pay",
        ] {
            let e = Location::parse(url).expect_err(url);
            assert!(!e.contains("S3cret"), "{e}");
        }
        assert!(matches!(
            Location::parse("sqlite:data/p.db"),
            Ok(Location::Sqlite(p)) if p == std::path::Path::new("data/p.db")
        ));
    }

    proptest! {
        #[test]
        fn no_password_survives_printing(
            user in "[a-z]{1,8}",
            password in "[A-Z0-9:@]{8,20}",
            odd in "[/?#=&]{1,3}",
            host in "[a-z.]{1,12}",
            in_query in any::<bool>(),
        ) {
            let url = if in_query {
                format!("postgres://{host}/db?user={user}&password={password}")
            } else {
                // Characters a URL would give a meaning elsewhere.
                let password = format!("{password}{odd}{password}");
                format!("postgres://{user}:{password}@{host}/db")
            };
            let shown = format!("{:?}", Location::Postgres(url));
            prop_assert!(!shown.contains(&password), "{}", shown);
        }
    }
}
