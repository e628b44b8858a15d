//! Group commit: one writer thread per connection takes every unit of work
//! waiting in the queue, runs them in one transaction (each inside its own
//! savepoint) and commits once. A caller hears back only after that commit, so
//! every answer is durable, and one fsync serves the whole batch.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payrail_core::{Clock, Timestamp};

use crate::StoreError;
use crate::conn::{Conn, DbError, DbErrorKind, Dialect};
use crate::seal::Sealer;
use crate::tx::{Deferred, Tx};

/// Whether a unit's changes are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Commit,
    Rollback,
}

/// A unit of work queued for the writer.
pub(crate) trait Job: Send {
    /// Runs the unit. May be called again (after a rollback) if the database
    /// asked for a retry, so it must not consume its inputs.
    fn run(&mut self, tx: &mut Tx<'_>) -> Outcome;

    /// Delivers the unit's result: `Ok` once its batch is committed, `Err` if
    /// its work could not be made durable.
    fn finish(self: Box<Self>, durable: Result<(), StoreError>);
}

pub(crate) enum Msg {
    Job(Box<dyn Job>),
    Stop,
}

pub(crate) type Connect = Arc<dyn Fn() -> Result<Box<dyn Conn>, DbError> + Send + Sync>;

pub(crate) struct WriterConfig {
    pub max_batch: usize,
    pub max_attempts: u32,
    pub clock: Arc<dyn Clock>,
    pub sandbox_clock: bool,
    pub sealer: Sealer,
    pub connect: Connect,
}

struct Queued {
    job: Box<dyn Job>,
    attempts: u32,
}

/// How long a writer whose database is unreachable fails work at once instead
/// of trying to reconnect for every batch.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

pub(crate) fn run(conn: Option<Box<dyn Conn>>, rx: flume::Receiver<Msg>, cfg: Arc<WriterConfig>) {
    let mut w = Writer {
        conn,
        cfg,
        down_until: None,
    };
    let mut carry: Vec<Queued> = Vec::new();
    let mut stopping = false;
    loop {
        if carry.is_empty() {
            if stopping {
                break;
            }
            match rx.recv() {
                Ok(Msg::Job(job)) => carry.push(Queued { job, attempts: 0 }),
                Ok(Msg::Stop) | Err(_) => break,
            }
        }
        while !stopping && carry.len() < w.cfg.max_batch {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => carry.push(Queued { job, attempts: 0 }),
                Ok(Msg::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        let batch = std::mem::take(&mut carry);
        carry = w.run_batch(batch);
    }
}

struct Writer {
    conn: Option<Box<dyn Conn>>,
    cfg: Arc<WriterConfig>,
    down_until: Option<Instant>,
}

impl Writer {
    fn connection(&mut self) -> Result<&mut Box<dyn Conn>, StoreError> {
        if self.conn.is_none() {
            if self.down_until.is_some_and(|t| Instant::now() < t) {
                return Err(StoreError::Unavailable(
                    "database unreachable (backing off)".into(),
                ));
            }
            match (self.cfg.connect)() {
                Ok(c) => {
                    tracing::info!("writer reconnected to the database");
                    self.down_until = None;
                    self.conn = Some(c);
                }
                Err(e) => {
                    self.down_until = Some(Instant::now() + RECONNECT_BACKOFF);
                    return Err(StoreError::from(e));
                }
            }
        }
        Ok(self.conn.as_mut().expect("connection was just ensured"))
    }

    /// Drops the connection after an error that may mean it is broken.
    fn on_error(&mut self, e: &StoreError) {
        if matches!(e, StoreError::Unavailable(_)) {
            self.conn = None;
        }
    }

    /// Runs one batch; returns the units to run again in the next one.
    fn run_batch(&mut self, batch: Vec<Queued>) -> Vec<Queued> {
        let started = Instant::now();
        let size = batch.len();
        let result = self.try_batch(batch);
        metrics::histogram!("payrail_group_commit_batch_size").record(size as f64);
        metrics::histogram!("payrail_group_commit_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok((done, retry)) => {
                metrics::counter!("payrail_ledger_commits_total").increment(1);
                for (job, err) in done {
                    job.finish(err.map_or(Ok(()), Err));
                }
                retry
            }
            Err((e, jobs)) => {
                self.on_error(&e);
                let retryable = matches!(e, StoreError::Busy(_));
                if !matches!(e, StoreError::Unavailable(_)) {
                    tracing::error!(error = ?e, units = size, "group commit failed");
                }
                let mut again = Vec::new();
                for mut q in jobs {
                    q.attempts += 1;
                    if retryable && q.attempts < self.cfg.max_attempts {
                        again.push(q);
                    } else {
                        q.job.finish(Err(e.clone()));
                    }
                }
                again
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_batch(
        &mut self,
        batch: Vec<Queued>,
    ) -> Result<(Vec<(Box<dyn Job>, Option<StoreError>)>, Vec<Queued>), (StoreError, Vec<Queued>)>
    {
        let cfg = Arc::clone(&self.cfg);
        let conn = match self.connection() {
            Ok(c) => c.as_mut(),
            Err(e) => return Err((e, batch)),
        };
        let begin = match conn.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL READ COMMITTED",
        };
        if let Err(e) = conn.batch(begin) {
            return Err((e.into(), batch));
        }
        let mut now = match read_now(conn, &*cfg.clock, cfg.sandbox_clock) {
            Ok(t) => t,
            Err(e) => {
                let _ = conn.batch("ROLLBACK");
                return Err((e, batch));
            }
        };

        let mut deferred = Deferred::new();
        let mut committed: Vec<Queued> = Vec::with_capacity(batch.len());
        let mut settled: Vec<(Box<dyn Job>, Option<StoreError>)> = Vec::new();
        let mut retry: Vec<Queued> = Vec::new();
        let mut rest = batch.into_iter();

        while let Some(mut q) = rest.next() {
            if let Err(e) = conn.batch("SAVEPOINT unit") {
                let _ = conn.batch("ROLLBACK");
                return Err((
                    e.into(),
                    committed.into_iter().chain(Some(q)).chain(rest).collect(),
                ));
            }
            let (outcome, failed, wants_retry, job_deferred) = {
                let mut tx = Tx::new(conn, now, &cfg.sealer, &deferred, true);
                let outcome = catch_unwind(AssertUnwindSafe(|| q.job.run(&mut tx)));
                now = tx.now();
                let d = tx.take_deferred();
                (outcome, tx.failed, tx.retry, d)
            };
            let keep = matches!(outcome, Ok(Outcome::Commit)) && !failed;
            let step = if keep {
                conn.batch("RELEASE SAVEPOINT unit")
            } else {
                conn.batch("ROLLBACK TO SAVEPOINT unit; RELEASE SAVEPOINT unit")
            };
            if let Err(e) = step {
                let _ = conn.batch("ROLLBACK");
                return Err((
                    e.into(),
                    committed.into_iter().chain(Some(q)).chain(rest).collect(),
                ));
            }
            if keep {
                for (account, d) in job_deferred {
                    deferred.entry(account).or_default().add(&d);
                }
                committed.push(q);
            } else if wants_retry && q.attempts + 1 < cfg.max_attempts {
                q.attempts += 1;
                retry.push(q);
            } else {
                let err = match outcome {
                    Err(_) => {
                        tracing::error!("a unit of work panicked; its changes were rolled back");
                        Some(StoreError::Internal("unit of work panicked".into()))
                    }
                    Ok(_) if wants_retry => Some(StoreError::Busy(DbError::new(
                        DbErrorKind::Retryable,
                        "gave up after repeated lock conflicts",
                    ))),
                    Ok(Outcome::Commit) => Some(StoreError::Internal(
                        "unit of work continued after a database error".into(),
                    )),
                    // The unit chose to roll back and reports its own error.
                    Ok(Outcome::Rollback) => None,
                };
                settled.push((q.job, err));
            }
        }

        let flushed = {
            let empty = Deferred::new();
            let mut tx = Tx::new(conn, now, &cfg.sealer, &empty, true);
            crate::ledger::apply_deferred(&mut tx, &deferred)
        };
        let committed_ok = flushed.and_then(|()| conn.batch("COMMIT").map_err(StoreError::from));
        if let Err(e) = committed_ok {
            let _ = conn.batch("ROLLBACK");
            // Even units that rolled back on their own may have answered from
            // a sibling's now-lost work (a duplicate order, say), so every
            // answer in the batch becomes "failed, outcome not applied".
            for (job, _) in settled {
                job.finish(Err(e.clone()));
            }
            return Err((e, committed.into_iter().chain(retry).collect()));
        }
        settled.extend(committed.into_iter().map(|q| (q.job, None)));
        Ok((settled, retry))
    }
}

/// The time a batch or a read runs at: the clock plus, in sandbox mode, the
/// offset the sandbox has advanced it by (kept in the database so that every
/// node agrees).
pub(crate) fn read_now(
    conn: &mut dyn Conn,
    clock: &dyn Clock,
    sandbox: bool,
) -> Result<Timestamp, StoreError> {
    let now = clock.now();
    if !sandbox {
        return Ok(now);
    }
    Ok(Timestamp::from_millis(
        now.millis() + crate::sandbox::clock_offset_ms(conn)?,
    ))
}
