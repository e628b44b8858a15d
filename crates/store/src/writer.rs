//! Group commit: one writer thread per connection takes every unit of work
//! waiting in the queue, runs them in one transaction and commits once (see
//! `try_batch` for when units get savepoints of their own). A caller hears
//! back only after that commit, so every answer is durable, and one fsync
//! serves the whole batch.
//!
//! Failures are sorted by what is known about the batch:
//! - it surely did not commit (an error before `COMMIT` was sent): its units
//!   may run again, on a new connection if the old one broke;
//! - it surely did (the `COMMIT` answered): answers go out;
//! - nobody knows (the connection broke during `COMMIT`, PostgreSQL only):
//!   the writer reconnects and reads its own marker row, written inside every
//!   batch, to learn which it was before answering anyone: kept, its units
//!   are answered; not kept, they run again as in the first case (those
//!   still within their callers' `max_wait`); if it cannot learn in time,
//!   they hear `StoreError::OutcomeUnknown`, never "failed".

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payrail_core::{Clock, Throttle};

use crate::StoreError;
use crate::conn::{Conn, Control, DbError, DbErrorKind, Dialect};
use crate::seal::Sealer;
use crate::tx::{Deferred, Tx, UnitTime};

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

    /// Whether it may still be started afresh: its caller's bound on waiting
    /// for a start (`Options::max_wait`) has not passed.
    fn within_wait(&self) -> bool {
        true
    }
}

pub(crate) enum Msg {
    Job(Box<dyn Job>),
    Stop,
}

pub(crate) type Connect = Arc<dyn Fn() -> Result<Box<dyn Conn>, DbError> + Send + Sync>;

pub(crate) struct WriterConfig {
    pub max_batch: usize,
    /// Runs a unit gets while each ends on a lock conflict, before it fails
    /// with the last error (runs ended by an outage count apart).
    pub max_attempts: u32,
    pub clock: Arc<dyn Clock>,
    pub sandbox_clock: bool,
    pub sealer: Sealer,
    pub connect: Connect,
    /// How long to keep trying to learn a lost COMMIT's outcome.
    pub outcome_wait: Duration,
    /// SQLite: commits are not synced by the engine; this syncs the WAL and
    /// answers callers afterwards (see [`crate::durable`]).
    pub pipeline: Option<(crate::durable::Syncer, Arc<crate::durable::Watermarks>)>,
}

struct Queued {
    job: Box<dyn Job>,
    /// Runs ended by a lock conflict (or a batch's other retryable error),
    /// up to `max_attempts`.
    attempts: u32,
    /// Runs ended by a broken connection, up to [`OUTAGE_RUNS`]. Counted
    /// apart so that a unit which waited out a lock still gets its run on a
    /// fresh connection after an outage; each count is bounded, so a unit
    /// still runs a bounded number of times.
    outages: u32,
}

impl Queued {
    fn new(job: Box<dyn Job>) -> Queued {
        Queued {
            job,
            attempts: 0,
            outages: 0,
        }
    }
}

/// Runs a unit gets when each ends on a broken connection: one more, on a
/// fresh connection, and then its caller hears of the outage.
const OUTAGE_RUNS: u32 = 2;

/// How long a writer whose database is unreachable fails work at once instead
/// of trying to reconnect for every batch.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);

pub(crate) fn run(conn: Option<Box<dyn Conn>>, rx: flume::Receiver<Msg>, cfg: Arc<WriterConfig>) {
    let mut w = Writer {
        conn: None,
        cfg,
        down_until: None,
        id: rand::random_range(1..i64::MAX),
        seq: 0,
        rx: rx.clone(),
        stop_seen: false,
    };
    if let Some(c) = conn {
        w.adopt(c);
    }
    let mut carry: Vec<Queued> = Vec::new();
    loop {
        if carry.is_empty() {
            if w.stop_seen {
                break;
            }
            match rx.recv() {
                Ok(Msg::Job(job)) => carry.push(Queued::new(job)),
                Ok(Msg::Stop) | Err(_) => break,
            }
        }
        while !w.stop_seen && carry.len() < w.cfg.max_batch {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => carry.push(Queued::new(job)),
                Ok(Msg::Stop) => w.stop_seen = true,
                Err(_) => break,
            }
        }
        let batch = std::mem::take(&mut carry);
        carry = w.run_batch(batch);
    }
    // Work queued behind the Stop (sent by a caller that checked the store
    // was open just before it closed) will never run: say so rather than
    // leave its caller waiting.
    for msg in rx.try_iter() {
        if let Msg::Job(job) = msg {
            job.finish(Err(StoreError::Closed));
        }
    }
    if let Some(c) = w.conn.as_mut() {
        match c.dialect() {
            // Whoever closes the database last checkpoints it; make sure that
            // checkpoint syncs even if it is this connection.
            Dialect::Sqlite => {
                let _ = c.batch("PRAGMA synchronous = FULL");
            }
            // Only this writer reads its marker row, and only to learn a lost
            // COMMIT's outcome; its id is random and dies with it. With no
            // batch left, nothing can need the row, so a clean stop removes
            // it rather than leave one row per writer per start. (A held
            // connection has no batch of unknown outcome: that drops it. A
            // crashed node's rows stay, for an operator to prune.)
            Dialect::Postgres => {
                if let Err(e) =
                    c.execute("DELETE FROM payrail_writers WHERE id = ?1", &[w.id.into()])
                {
                    tracing::warn!(error = %e, "cannot remove the writer's marker row");
                }
            }
        }
    }
}

/// Refuses a unit that would be started afresh past its caller's bound on
/// waiting for a start, as the unit itself refuses a first run that late.
fn refuse_late(q: Queued) {
    metrics::counter!("payrail_store_overloaded_total", "wait" => "writer").increment(1);
    q.job.finish(Err(StoreError::Overloaded));
}

/// What became of a batch whose `COMMIT` lost its answer.
enum Learned {
    Committed,
    NotCommitted,
    Unknown,
}

/// Why a batch did not commit, and whether it might have.
struct BatchFailure {
    error: StoreError,
    /// Units that were to be committed (or to run), to retry or fail.
    units: Vec<Queued>,
    /// Units rolled back for a lock conflict, to run in a later batch whatever
    /// became of this one.
    retry: Vec<Queued>,
    /// Units that settled on their own (rolled back, panicked) with their
    /// answers. They keep their count of runs: a batch that fails runs them
    /// again, and a count started afresh each time would let batches that
    /// keep failing (a lock cycle at the end of every batch) run them for
    /// ever.
    settled: Vec<(Queued, Option<StoreError>)>,
    /// The error came while `COMMIT` was in flight.
    during_commit: bool,
    /// A unit ran without a savepoint and failed after writing, or after a
    /// database error: nothing was committed, and the batch must run again
    /// with savepoints.
    redo_with_savepoints: bool,
}

struct Writer {
    conn: Option<Box<dyn Conn>>,
    cfg: Arc<WriterConfig>,
    down_until: Option<Instant>,
    /// This writer's marker row (PostgreSQL), random so nodes never collide.
    id: i64,
    /// Number of this writer's last batch.
    seq: i64,
    /// The queue, for units that arrive while a COMMIT's outcome is learned.
    rx: flume::Receiver<Msg>,
    /// A `Stop` was taken from the queue, or every sender is gone: finish
    /// what is in hand and end.
    stop_seen: bool,
}

impl Writer {
    /// Takes a fresh connection into use, registering the marker row.
    ///
    /// Registered with batch 0, which no batch has: a connection is made
    /// after `run_batch` has numbered the batch it serves, and a row put back
    /// (after an operator deleted it) with that number would say the batch
    /// committed before it ran.
    fn adopt(&mut self, mut conn: Box<dyn Conn>) {
        if conn.dialect() == Dialect::Postgres {
            let now = self.cfg.clock.now().millis();
            if let Err(e) = conn.execute(
                "INSERT INTO payrail_writers (id, last_batch, started_at) VALUES (?1, 0, ?2) ON CONFLICT (id) DO NOTHING",
                &[self.id.into(), now.into()],
            ) {
                tracing::warn!(error = %e, "cannot register the writer's marker row");
                return;
            }
        }
        self.down_until = None;
        self.conn = Some(conn);
    }

    fn connection(&mut self) -> Result<&mut Box<dyn Conn>, StoreError> {
        if self.conn.is_none() {
            if self.down_until.is_some_and(|t| Instant::now() < t) {
                return Err(StoreError::Unavailable(
                    "database unreachable (backing off)".into(),
                ));
            }
            match (self.cfg.connect)() {
                Ok(c) => {
                    self.adopt(c);
                    if self.conn.is_some() {
                        tracing::info!("writer connected to the database");
                    }
                }
                Err(e) => {
                    self.down_until = Some(Instant::now() + RECONNECT_BACKOFF);
                    return Err(StoreError::from(e));
                }
            }
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("writer has no connection".into()))
    }

    /// Runs one batch; returns the units to run again in the next one.
    fn run_batch(&mut self, batch: Vec<Queued>) -> Vec<Queued> {
        let started = Instant::now();
        let size = batch.len();
        self.seq += 1;
        // Units set aside on a lock conflict before a rerun were in no batch
        // that commits or fails now: they go to the next one (see `settle`).
        let (result, later) = match self.try_batch(batch, false) {
            Err(f) if f.redo_with_savepoints => {
                metrics::counter!("payrail_group_commit_redos_total").increment(1);
                let settled = f.settled.into_iter().map(|(q, _)| q);
                let units = f.units.into_iter().chain(settled).collect();
                (self.try_batch(units, true), f.retry)
            }
            other => (other, Vec::new()),
        };
        metrics::histogram!("payrail_group_commit_batch_size").record(size as f64);
        metrics::histogram!("payrail_group_commit_seconds").record(started.elapsed().as_secs_f64());
        self.settle(result, later, size)
    }

    /// Answers a batch's units, or sorts them for another run; returns
    /// the units to run again.
    #[allow(clippy::type_complexity)]
    fn settle(
        &mut self,
        result: Result<(Vec<(Box<dyn Job>, Option<StoreError>)>, Vec<Queued>), BatchFailure>,
        set_aside: Vec<Queued>,
        size: usize,
    ) -> Vec<Queued> {
        let mut failure = match result {
            Ok((done, retry)) => {
                metrics::counter!("payrail_ledger_commits_total").increment(1);
                match &self.cfg.pipeline {
                    Some((syncer, _)) => syncer.submit(crate::durable::Synced {
                        committed: Instant::now(),
                        seq: self.seq as u64,
                        jobs: done,
                    }),
                    None => {
                        for (job, err) in done {
                            job.finish(err.map_or(Ok(()), Err));
                        }
                    }
                }
                return retry.into_iter().chain(set_aside).collect();
            }
            Err(f) => f,
        };
        failure.retry.extend(set_aside);
        if let Some((syncer, _)) = &self.cfg.pipeline {
            // Nothing of this batch is visible; keep the watermark moving, in order.
            syncer.submit(crate::durable::Synced {
                committed: Instant::now(),
                seq: self.seq as u64,
                jobs: Vec::new(),
            });
        }
        if matches!(failure.error, StoreError::Unavailable(_)) {
            self.conn = None;
        }
        // A COMMIT cut off whose marker shows it was not kept is as surely
        // not committed as a batch that never reached COMMIT.
        let mut surely_not_committed = !failure.during_commit;
        if failure.during_commit {
            let learned = self.learn_outcome();
            // That may have taken up to `outcome_wait`. Units set aside for
            // a lock conflict were rolled back whatever the outcome; those
            // whose caller's bound on waiting for a start has passed since
            // are not started afresh (the caller may have given up and asked
            // `/checkstatus`), but refused, having done nothing.
            let (in_time, late): (Vec<_>, Vec<_>) =
                failure.retry.drain(..).partition(|q| q.job.within_wait());
            late.into_iter().for_each(refuse_late);
            failure.retry = in_time;
            match learned {
                Learned::Committed => {
                    metrics::counter!("payrail_ledger_commits_total").increment(1);
                    for (q, err) in failure.settled {
                        q.job.finish(err.map_or(Ok(()), Err));
                    }
                    for q in failure.units {
                        q.job.finish(Ok(()));
                    }
                    return failure.retry;
                }
                Learned::NotCommitted => surely_not_committed = true,
                // Units that settled alone are told too: a refusal may rest
                // on a sibling's work (a duplicate orderid, say), kept or not.
                Learned::Unknown => {
                    metrics::counter!("payrail_commit_outcome_unknown_total").increment(1);
                    let settled = failure.settled.into_iter().map(|(q, _)| q);
                    for q in failure.units.into_iter().chain(settled) {
                        q.job.finish(Err(StoreError::OutcomeUnknown));
                    }
                    return failure.retry;
                }
            }
        }
        // The batch did not commit. Units that settled alone may have answered
        // from a sibling's lost work (a duplicate order, say): they are run
        // again with the others rather than answered.
        let e = failure.error;
        // A lock conflict or an outage is the database's weather, and its
        // units run again (or their callers hear of it); anything else is a
        // fault to look into.
        match &e {
            StoreError::Unavailable(_) | StoreError::Closed | StoreError::Busy(_) => {
                // Apart, so that an outage's lines do not hide contention's.
                static OUTAGE: Throttle = Throttle::per_second();
                static CONTENTION: Throttle = Throttle::per_second();
                let throttle = match e {
                    StoreError::Busy(_) => &CONTENTION,
                    _ => &OUTAGE,
                };
                if let Some(suppressed) = throttle.admit() {
                    tracing::warn!(error = ?e, units = size, suppressed, "batch not committed")
                }
            }
            _ => tracing::error!(error = ?e, units = size, "batch not committed"),
        }
        // Work that surely did not commit may run again: at once on a lock
        // conflict, once more on a broken connection (a fresh one may work).
        let may_retry =
            surely_not_committed && matches!(e, StoreError::Busy(_) | StoreError::Unavailable(_));
        let outage = matches!(e, StoreError::Unavailable(_));
        // Units set aside for a lock conflict were rolled back before this
        // batch failed, and were counted then: they go to the next batch.
        let mut again = failure.retry;
        let settled = failure.settled.into_iter().map(|(q, _)| q);
        for mut q in failure.units.into_iter().chain(settled) {
            let runs_left = if outage {
                q.outages += 1;
                q.outages < OUTAGE_RUNS
            } else {
                q.attempts += 1;
                q.attempts < self.cfg.max_attempts
            };
            if !(may_retry && runs_left) {
                q.job.finish(Err(e.clone()));
            } else if failure.during_commit && !q.job.within_wait() {
                // As for units set aside, above.
                refuse_late(q);
            } else {
                again.push(q);
            }
        }
        again
    }

    /// Fails every unit waiting in the queue, none of which has run.
    fn fail_queued(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.refuse(msg);
        }
    }

    /// A message that arrived while a COMMIT's outcome is learned.
    fn refuse(&mut self, msg: Msg) {
        match msg {
            Msg::Job(job) => job.finish(Err(StoreError::Unavailable(
                "database unreachable (a commit's outcome is being learned)".into(),
            ))),
            Msg::Stop => self.stop_seen = true,
        }
    }

    /// After a COMMIT whose answer was lost: did it commit? Reads this
    /// writer's marker on a new connection, for up to `outcome_wait`; once
    /// the store is stopping, one more try.
    ///
    /// The batch's callers wait for the answer, because telling them
    /// "failed" about work that was kept would invite a second charge; if
    /// it cannot be learned, they are told exactly that. Units queued
    /// meanwhile have not run, so they fail at once, as everywhere else
    /// while the database is down, instead of waiting behind them.
    fn learn_outcome(&mut self) -> Learned {
        let started = Instant::now();
        let deadline = started + self.cfg.outcome_wait;
        loop {
            match (self.cfg.connect)() {
                Ok(mut c) => {
                    // The batch's transaction wrote this row (updated it, or
                    // inserted it if it had been deleted), and may still be
                    // running on the server (a COMMIT slow to flush, or
                    // waiting for a standby) after the client gave up. A plain
                    // read would see the old value, or no row, and call the
                    // batch failed. An upsert waits for that transaction
                    // either way (on the row's lock, or on the unique key of
                    // a row it inserted) and returns the value it left. (So
                    // the read writes: on a read-only server it fails until
                    // `outcome_wait` runs out, and the outcome is unknown.)
                    let now = self.cfg.clock.now().millis();
                    let marker = c
                        .query(
                            "INSERT INTO payrail_writers (id, last_batch, started_at) VALUES (?1, 0, ?2) \
                             ON CONFLICT (id) DO UPDATE SET last_batch = payrail_writers.last_batch RETURNING last_batch",
                            &[self.id.into(), now.into()],
                        )
                        .and_then(|rows| match rows.first() {
                            Some(row) => row.int(0),
                            None => Err(DbError::other("the marker upsert returned no row")),
                        });
                    match marker {
                        Ok(last) => {
                            self.adopt(c);
                            let committed = last == self.seq;
                            tracing::warn!(
                                committed,
                                waited_ms = started.elapsed().as_millis() as u64,
                                "learned a lost COMMIT's outcome from the writer's marker"
                            );
                            return if committed {
                                Learned::Committed
                            } else {
                                Learned::NotCommitted
                            };
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the writer's marker yet"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reconnect to learn a COMMIT's outcome yet")
                }
            }
            if Instant::now() >= deadline || self.stop_seen {
                tracing::error!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "a COMMIT's outcome is unknown; its callers get no answer"
                );
                return Learned::Unknown;
            }
            // Back off before the next try, failing units as they come.
            self.fail_queued();
            let retry_at = Instant::now() + RECONNECT_BACKOFF;
            while !self.stop_seen {
                match self.rx.recv_deadline(retry_at) {
                    Ok(msg) => self.refuse(msg),
                    Err(flume::RecvTimeoutError::Timeout) => break,
                    Err(flume::RecvTimeoutError::Disconnected) => self.stop_seen = true,
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_batch(
        &mut self,
        batch: Vec<Queued>,
        safe: bool,
    ) -> Result<(Vec<(Box<dyn Job>, Option<StoreError>)>, Vec<Queued>), BatchFailure> {
        let fail = |error: StoreError, units: Vec<Queued>| BatchFailure {
            error,
            units,
            retry: Vec::new(),
            settled: Vec::new(),
            during_commit: false,
            redo_with_savepoints: false,
        };
        let cfg = Arc::clone(&self.cfg);
        let (id, seq) = (self.id, self.seq);
        // A pooled connection may have died while idle (a database restart):
        // BEGIN is where that shows, and nothing has been done yet, so one
        // fresh connection is tried before giving up.
        let mut fresh_tried = false;
        loop {
            let conn = match self.connection() {
                Ok(c) => c,
                Err(e) => return Err(fail(e, batch)),
            };
            match conn.control(Control::BeginWrite) {
                Ok(()) => break,
                Err(e) if e.kind == DbErrorKind::Unavailable && !fresh_tried => {
                    fresh_tried = true;
                    self.conn = None;
                    self.down_until = None;
                }
                Err(e) => return Err(fail(e.into(), batch)),
            }
        }
        let conn = self.conn.as_mut().expect("connected above").as_mut();
        let mut now = match read_now(conn, &*cfg.clock, cfg.sandbox_clock) {
            Ok(t) => t,
            Err(e) => {
                let _ = conn.control(Control::Rollback);
                return Err(fail(e, batch));
            }
        };

        let mut deferred = Deferred::new();
        let mut committed: Vec<Queued> = Vec::with_capacity(batch.len());
        let mut settled: Vec<(Queued, Option<StoreError>)> = Vec::new();
        let mut retry: Vec<Queued> = Vec::new();
        let mut rest = batch.into_iter();
        // A batch first runs without savepoints: units check before they
        // write, so almost every unit either commits or refuses having changed
        // nothing. A unit that fails after writing, or after any database
        // error (on PostgreSQL one error aborts the whole transaction), makes
        // the batch roll back and run again with a savepoint per unit, which
        // undoes a failing unit alone. Savepoints cost SQLite a copy of every
        // page they touch, and PostgreSQL a round trip per unit plus a
        // subtransaction each (past 64 in one transaction, every snapshot in
        // the cluster gets slower).
        let savepoints = safe;

        // One savepoint serves every unit: after a unit it is released and
        // set again in one round trip, or rolled back to (which keeps it).
        let mut first = true;
        while let Some(mut q) = rest.next() {
            if savepoints
                && std::mem::take(&mut first)
                && let Err(e) = conn.control(Control::Savepoint)
            {
                let _ = conn.control(Control::Rollback);
                return Err(BatchFailure {
                    error: e.into(),
                    units: committed.into_iter().chain(Some(q)).chain(rest).collect(),
                    retry,
                    settled,
                    during_commit: false,
                    redo_with_savepoints: false,
                });
            }
            let (outcome, failed, wants_retry, wrote, job_deferred, unit_time) = {
                let mut tx = Tx::new(conn, now, &cfg.sealer, &deferred, true);
                let outcome = catch_unwind(AssertUnwindSafe(|| q.job.run(&mut tx)));
                let d = tx.take_deferred();
                (outcome, tx.failed, tx.retry, tx.wrote, d, tx.time())
            };
            let keep = matches!(outcome, Ok(Outcome::Commit)) && !failed;
            if !savepoints && !keep && (wrote || failed) {
                let _ = conn.control(Control::Rollback);
                // A lock conflict waits for a later batch rather than meeting
                // the same lock again in the rerun.
                let unit = if wants_retry && q.attempts + 1 < cfg.max_attempts {
                    q.attempts += 1;
                    retry.push(q);
                    None
                } else {
                    Some(q)
                };
                return Err(BatchFailure {
                    error: StoreError::Internal("a unit failed without a savepoint".into()),
                    units: committed.into_iter().chain(unit).chain(rest).collect(),
                    retry,
                    settled,
                    during_commit: false,
                    redo_with_savepoints: true,
                });
            }
            let step = match (savepoints, keep) {
                (false, _) => Ok(()),
                (true, true) => conn.control(Control::ReleaseAndSavepoint),
                (true, false) => conn.control(Control::RollbackToSavepoint),
            };
            if let Err(e) = step {
                let _ = conn.control(Control::Rollback);
                return Err(BatchFailure {
                    error: e.into(),
                    units: committed.into_iter().chain(Some(q)).chain(rest).collect(),
                    retry,
                    settled,
                    during_commit: false,
                    redo_with_savepoints: false,
                });
            }
            if keep {
                // A unit may move the sandbox clock; the units after it see
                // the new time only if its move is kept, as they would in a
                // batch of their own.
                now = unit_time;
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
                settled.push((q, err));
            }
        }

        let conn_dialect = conn.dialect();
        let mut prepared = {
            let empty = Deferred::new();
            let mut tx = Tx::new(conn, now, &cfg.sealer, &empty, true);
            let writer = (conn_dialect == Dialect::Postgres).then_some(id);
            crate::ledger::apply_deferred(&mut tx, &deferred, writer)
        };
        if prepared.is_ok() && conn.dialect() == Dialect::Postgres {
            // An upsert, not an UPDATE: were the row deleted (an operator
            // pruning the table), an UPDATE would change nothing, and a lost
            // COMMIT of this batch would then read as not committed.
            prepared = conn
                .execute(
                    "INSERT INTO payrail_writers (id, last_batch, started_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO UPDATE SET last_batch = excluded.last_batch",
                    &[id.into(), seq.into(), now.wall.millis().into()],
                )
                .map(drop)
                .map_err(StoreError::from);
        }
        if let Err(e) = prepared {
            let _ = conn.control(Control::Rollback);
            return Err(BatchFailure {
                error: e,
                units: committed,
                retry,
                settled,
                during_commit: false,
                redo_with_savepoints: false,
            });
        }
        if let Some((_, marks)) = &cfg.pipeline {
            marks.announce(seq as u64);
        }
        if let Err(e) = conn.control(Control::Commit) {
            let _ = conn.control(Control::Rollback);
            // An `ERROR` from the server, or the connection's own refusal,
            // means no commit. A broken connection, or a session the server
            // ended (a `PANIC` on an `fsync` failure, for one), leaves it
            // open: both are `Unavailable` (see `postgres::kind_of`).
            let during_commit =
                e.kind == DbErrorKind::Unavailable && conn.dialect() == Dialect::Postgres;
            return Err(BatchFailure {
                error: e.into(),
                units: committed,
                retry,
                settled,
                during_commit,
                redo_with_savepoints: false,
            });
        }
        let done = settled
            .into_iter()
            .map(|(q, err)| (q.job, err))
            .chain(committed.into_iter().map(|q| (q.job, None)))
            .collect();
        Ok((done, retry))
    }
}

/// The time a batch or a read runs at: the clock plus, in sandbox mode, the
/// offset the sandbox has advanced it by (kept in the database so that every
/// node agrees).
pub(crate) fn read_now(
    conn: &mut dyn Conn,
    clock: &dyn Clock,
    sandbox: bool,
) -> Result<UnitTime, StoreError> {
    let offset_ms = if sandbox {
        crate::sandbox::clock_offset_ms(conn)?
    } else {
        0
    };
    Ok(UnitTime {
        wall: clock.now(),
        offset_ms,
    })
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::Duration;

    use payrail_core::{AccountFlags, AccountId, Currency, Money, SystemClock, TransferRequest};

    use crate::ledger::{self, LedgerOpError};
    use crate::testkit::TestDb;
    use crate::{MasterKey, Options, Store, StoreError};

    /// One writer connection, so that the units of a test share its batches.
    fn one_writer(db: &TestDb) -> Options {
        let mut o = Options::new(
            db.location.clone(),
            MasterKey::from_bytes([7; 32]),
            Arc::new(SystemClock),
        );
        o.postgres.writers = 1;
        o
    }

    /// Waits until `n` units wait for the writer. The deadline only turns a
    /// hang into a failure.
    async fn queued(store: &Store, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.queued() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "never {n} units queued"
            );
            tokio::task::yield_now().await;
        }
    }

    /// Queues `f` as a unit of work from a task of its own.
    fn spawn_write<T, E, F>(store: &Store, f: F) -> tokio::task::JoinHandle<Result<T, E>>
    where
        F: FnMut(&mut crate::Tx<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let store = store.clone();
        tokio::spawn(async move { store.write(f).await })
    }

    /// Holds the writer in a unit of its own until the sender is used, so
    /// that the units queued meanwhile share the next batch.
    async fn hold_writer(
        store: &Store,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        mpsc::Sender<()>,
    ) {
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (open_tx, open_rx) = mpsc::channel::<()>();
        let (started_tx, open_rx) = (Mutex::new(started_tx), Mutex::new(open_rx));
        let gate = spawn_write(store, move |_tx| {
            let _ = started_tx.lock().unwrap().send(());
            let _ = open_rx.lock().unwrap().recv();
            Ok::<_, StoreError>(())
        });
        tokio::task::spawn_blocking(move || started_rx.recv())
            .await
            .unwrap()
            .unwrap();
        (gate, open_tx)
    }

    /// A unit whose read fails shares a batch with one that wrote before it.
    /// On PostgreSQL that error aborts the whole transaction, and `COMMIT`
    /// then quietly rolls back: the writing unit must still be kept, and
    /// told the truth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_read_spoils_no_sibling_in_its_batch() {
        let db = TestDb::fresh();
        let (store, a, b) = with_two_accounts(one_writer(&db)).await;

        // A gate unit holds the writer until both units below are queued, so
        // that they share the next batch, the writing one first.
        let (gate, open_tx) = hold_writer(&store).await;
        let paid = spawn_write(&store, move |tx| ledger::transfer(tx, &pay(a, b, "paid")));
        queued(&store, 1).await;
        let failed = spawn_write(&store, |tx| {
            // The error is ignored, as a careless unit might.
            let _ = tx.query("SELECT no_such_column FROM accounts", &[]);
            Ok::<_, StoreError>(())
        });
        queued(&store, 2).await;
        open_tx.send(()).unwrap();

        gate.await.unwrap().unwrap();
        let paid = paid.await.unwrap();
        assert!(paid.is_ok(), "{paid:?}");
        let failed = failed.await.unwrap();
        assert!(matches!(failed, Err(StoreError::Internal(_))), "{failed:?}");
        let kept = store
            .read(|tx| ledger::transfer_by_key(tx, "t", "paid"))
            .await
            .unwrap();
        assert!(kept.is_some(), "a unit told it succeeded was not kept");
        store.close().await;
    }

    /// A unit that panics is rolled back alone: the unit queued after it, in
    /// the same batch, is kept and told so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_unit_is_rolled_back_alone() {
        let db = TestDb::fresh();
        let (store, a, b) = with_two_accounts(one_writer(&db)).await;

        let (gate, open_tx) = hold_writer(&store).await;
        let boom = spawn_write(&store, move |tx| {
            ledger::transfer(tx, &pay(a, b, "boom"))?;
            if tx.is_writable() {
                panic!("deliberate panic inside a unit of work");
            }
            Ok::<_, LedgerOpError>(())
        });
        queued(&store, 1).await;
        let fine = spawn_write(&store, move |tx| ledger::transfer(tx, &pay(a, b, "fine")));
        queued(&store, 2).await;
        open_tx.send(()).unwrap();

        gate.await.unwrap().unwrap();
        let boom = boom.await.unwrap();
        assert!(
            matches!(boom, Err(LedgerOpError::Store(StoreError::Internal(_)))),
            "{boom:?}"
        );
        let fine = fine.await.unwrap();
        assert!(fine.is_ok(), "{fine:?}");
        let (boomed, kept) = store
            .read(|tx| {
                Ok::<_, StoreError>((
                    ledger::transfer_by_key(tx, "t", "boom")?,
                    ledger::transfer_by_key(tx, "t", "fine")?,
                ))
            })
            .await
            .unwrap();
        assert!(boomed.is_none(), "the panicking unit's transfer was kept");
        assert!(kept.is_some(), "a unit told it succeeded was not kept");
        store.close().await;
    }

    /// A unit that moved the sandbox clock and then failed is undone alone;
    /// the unit after it in the same batch must not run at the time it set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clock_move_rolled_back_is_not_seen_by_the_next_unit() {
        let db = TestDb::fresh();
        let mut o = one_writer(&db);
        o.sandbox_clock = true;
        let store = Store::open(o).await.unwrap();
        let before = store
            .write(|tx| Ok::<_, StoreError>(tx.now()))
            .await
            .unwrap();

        let (gate, open_tx) = hold_writer(&store).await;
        let moved = spawn_write(&store, |tx| {
            crate::sandbox::advance_clock(tx, 86_400)?;
            Err::<(), _>(StoreError::Internal("refused after the move".into()))
        });
        queued(&store, 1).await;
        let next = tokio::spawn({
            let store = store.clone();
            async move { store.write(|tx| Ok::<_, StoreError>(tx.now())).await }
        });
        queued(&store, 2).await;
        open_tx.send(()).unwrap();

        gate.await.unwrap().unwrap();
        assert!(moved.await.unwrap().is_err());
        let seen = next.await.unwrap().unwrap();
        let later = store
            .write(|tx| Ok::<_, StoreError>(tx.now()))
            .await
            .unwrap();
        assert!(
            seen.millis() - before.millis() < 3_600_000,
            "the next unit ran a day ahead: {before:?} then {seen:?}"
        );
        assert!(later.millis() - before.millis() < 3_600_000, "{later:?}");
        store.close().await;
    }

    /// A unit that waited past `max_wait` for the writer is refused without
    /// running, and stays refused when its batch runs again because another
    /// unit failed after writing. `write_unbounded` work waits it out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_that_waited_too_long_is_refused_having_moved_nothing() {
        let db = TestDb::fresh();
        let (store, a, b) = bounded_store(&db).await;

        let (gate, open_tx) = hold_writer(&store).await;
        let ran = Arc::new(AtomicBool::new(false));
        let late = tokio::spawn({
            let (store, ran) = (store.clone(), Arc::clone(&ran));
            async move {
                store
                    .write(move |tx| {
                        ran.store(true, Ordering::SeqCst);
                        ledger::transfer(tx, &pay(a, b, "late"))
                    })
                    .await
            }
        });
        queued(&store, 1).await;
        // The server's own work waits as long, and is done.
        let housekeeping = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write_unbounded(move |tx| ledger::transfer(tx, &pay(a, b, "sweep")))
                    .await
            }
        });
        queued(&store, 2).await;
        // What is tested is a wait longer than max_wait, so time must pass.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        // Queued now, so well within max_wait when the batch runs: it writes,
        // then fails, and the batch runs again with savepoints.
        let (spoiler, spoiler_runs) = write_then_fail(&store, None);
        queued(&store, 3).await;
        open_tx.send(()).unwrap();

        gate.await.unwrap().unwrap();
        let late = late.await.unwrap();
        assert!(
            matches!(late, Err(LedgerOpError::Store(StoreError::Overloaded))),
            "{late:?}"
        );
        assert!(!ran.load(Ordering::SeqCst), "the late unit ran");
        let spoiler = spoiler.await.unwrap();
        assert!(
            matches!(spoiler, Err(LedgerOpError::Store(StoreError::Internal(_)))),
            "{spoiler:?}"
        );
        assert!(
            spoiler_runs.load(Ordering::SeqCst) >= 2,
            "the batch did not run again"
        );
        let moved = store
            .read(|tx| ledger::transfer_by_key(tx, "t", "late"))
            .await
            .unwrap();
        assert!(moved.is_none(), "a refused unit moved money: {moved:?}");
        let swept = housekeeping.await.unwrap();
        assert!(swept.is_ok(), "{swept:?}");
        // The writer goes on: the same transfer asked again is done.
        store
            .write(move |tx| ledger::transfer(tx, &pay(a, b, "late")))
            .await
            .unwrap();
        store.close().await;
    }

    /// A unit that started within `max_wait` is finished, even when its
    /// batch runs again after `max_wait` has passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unit_started_in_time_is_finished_however_long_its_batch_takes() {
        let db = TestDb::fresh();
        let (store, a, b) = bounded_store(&db).await;

        let (gate, open_tx) = hold_writer(&store).await;
        let paid = spawn_write(&store, move |tx| ledger::transfer(tx, &pay(a, b, "paid")));
        queued(&store, 1).await;
        // After `paid` in the batch: takes longer than max_wait, then fails
        // after writing, so `paid` runs again past max_wait.
        let (spoiler, spoiler_runs) = write_then_fail(&store, Some(Duration::from_millis(1_000)));
        queued(&store, 2).await;
        open_tx.send(()).unwrap();

        gate.await.unwrap().unwrap();
        let paid = paid.await.unwrap();
        assert!(paid.is_ok(), "{paid:?}");
        assert!(spoiler.await.unwrap().is_err());
        assert!(
            spoiler_runs.load(Ordering::SeqCst) >= 2,
            "the batch did not run again"
        );
        let kept = store
            .read(|tx| ledger::transfer_by_key(tx, "t", "paid"))
            .await
            .unwrap();
        assert!(kept.is_some(), "a unit told it succeeded was not kept");
        store.close().await;
    }

    /// A store whose units may wait 500 ms for the writer, and two accounts.
    async fn bounded_store(db: &TestDb) -> (Store, AccountId, AccountId) {
        let mut o = one_writer(db);
        o.max_wait = Duration::from_millis(500);
        with_two_accounts(o).await
    }

    /// A store, and two accounts in it to move money between.
    async fn with_two_accounts(o: Options) -> (Store, AccountId, AccountId) {
        let store = Store::open(o).await.unwrap();
        let (a, b) = store
            .write(|tx| {
                let a = ledger::open_account(tx, "a", Currency::INR, AccountFlags::NONE)?;
                let b = ledger::open_account(tx, "b", Currency::INR, AccountFlags::NONE)?;
                Ok::<_, LedgerOpError>((a, b))
            })
            .await
            .unwrap();
        (store, a, b)
    }

    fn pay(a: AccountId, b: AccountId, key: &str) -> TransferRequest {
        ledger::single("t", key, a, b, Currency::INR, Money::from_minor(5))
    }

    type Spawned = tokio::task::JoinHandle<Result<(), LedgerOpError>>;

    /// Queues a unit that writes, then (on its first run only) takes `slow`,
    /// then fails: its batch must run again with savepoints. Counts its runs.
    fn write_then_fail(store: &Store, slow: Option<Duration>) -> (Spawned, Arc<AtomicUsize>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let unit = tokio::spawn({
            let (store, runs) = (store.clone(), Arc::clone(&runs));
            async move {
                store
                    .write(move |tx| {
                        let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
                        ledger::open_account(tx, "c", Currency::INR, AccountFlags::NONE)?;
                        if let Some(d) = slow.filter(|_| first) {
                            std::thread::sleep(d); // the time under test
                        }
                        Err::<(), _>(LedgerOpError::Store(StoreError::Internal("fails".into())))
                    })
                    .await
            }
        });
        (unit, runs)
    }
}

/// The writer against a scripted PostgreSQL connection, for what a real
/// server cannot be made to do on cue: lose the answer to a `COMMIT` that
/// took effect, then stay unreachable.
#[cfg(test)]
mod lost_commit {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use payrail_core::SystemClock;

    use super::*;
    use crate::conn::{Param, Row, Value};
    use crate::seal::MasterKey;

    /// What the scripted server holds.
    #[derive(Default)]
    struct Server {
        /// Refuses connections (and breaks open ones) while set.
        down: AtomicBool,
        /// The next `COMMIT` takes effect, but its answer is lost and the
        /// server goes down.
        lose_next_commit: AtomicBool,
        /// The writer's marker row, as committed, and as its open batch set it.
        marker: AtomicI64,
        pending_marker: AtomicI64,
        /// With `lose_next_commit`: the lost COMMIT is still running on the
        /// server (its row lock held) until `finish_commit`.
        slow_commit: AtomicBool,
        in_flight: AtomicBool,
        /// The marker's upsert is waiting for the in-flight COMMIT.
        lock_waited: AtomicBool,
        /// Every batch's marker write meets a lock timeout.
        marker_busy: AtomicBool,
        /// With `lose_next_commit`: the lost COMMIT did not take effect.
        lost_commit_aborts: AtomicBool,
        /// Bumped by a restart: connections made before it are broken.
        generation: AtomicI64,
    }

    /// `Server::marker` while the row does not exist.
    const NO_ROW: i64 = -1;

    /// The `last_batch` an `INSERT … VALUES (id, last_batch, …)` writes: a
    /// literal or a parameter.
    fn inserted_batch(sql: &str, params: &[Param<'_>]) -> i64 {
        let values = &sql[sql.find("VALUES (").expect("an INSERT") + 8..];
        let second = values.split(',').nth(1).expect("a second value").trim();
        match second.strip_prefix('?') {
            Some(n) => match params.get(n.parse::<usize>().unwrap() - 1) {
                Some(Param::Int(v)) => *v,
                other => panic!("last_batch bound to {other:?}"),
            },
            None => second.parse().unwrap(),
        }
    }

    impl Server {
        fn finish_commit(&self) {
            let seq = self.pending_marker.load(Ordering::SeqCst);
            self.marker.store(seq, Ordering::SeqCst);
            self.in_flight.store(false, Ordering::SeqCst);
        }
    }

    /// A connection, and the server generation it was made in.
    struct FakeConn(Arc<Server>, i64);

    impl FakeConn {
        fn broken(&self) -> bool {
            self.0.down.load(Ordering::SeqCst) || self.0.generation.load(Ordering::SeqCst) != self.1
        }
    }

    fn gone() -> DbError {
        DbError::new(DbErrorKind::Unavailable, "connection closed")
    }

    impl Conn for FakeConn {
        fn dialect(&self) -> Dialect {
            Dialect::Postgres
        }

        fn execute(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, DbError> {
            if self.broken() {
                return Err(gone());
            }
            // A connection registering the marker row.
            if sql.contains("DO NOTHING") && self.0.marker.load(Ordering::SeqCst) == NO_ROW {
                self.0
                    .marker
                    .store(inserted_batch(sql, params), Ordering::SeqCst);
            }
            // The batch's marker write.
            if sql.contains("DO UPDATE SET last_batch") {
                if self.0.marker_busy.load(Ordering::SeqCst) {
                    return Err(DbError::new(DbErrorKind::Retryable, "lock timeout"));
                }
                if let Some(Param::Int(seq)) = params.get(1) {
                    self.0.pending_marker.store(*seq, Ordering::SeqCst);
                }
            }
            Ok(1)
        }

        fn query(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
            if self.broken() {
                return Err(gone());
            }
            // The marker's upsert waits for the in-flight transaction.
            assert!(sql.contains("RETURNING last_batch"), "unscripted: {sql}");
            while self.0.in_flight.load(Ordering::SeqCst) {
                self.0.lock_waited.store(true, Ordering::SeqCst);
                std::thread::yield_now();
            }
            let _ = self.0.marker.compare_exchange(
                NO_ROW,
                inserted_batch(sql, params),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            Ok(vec![Row(vec![Value::Int(
                self.0.marker.load(Ordering::SeqCst),
            )])])
        }

        fn insert_id(&mut self, _: &'static str, _: &[Param<'_>]) -> Result<Option<i64>, DbError> {
            Ok(Some(1))
        }

        fn batch(&mut self, _: &str) -> Result<(), DbError> {
            Ok(())
        }

        fn control(&mut self, c: Control) -> Result<(), DbError> {
            if self.broken() {
                return Err(gone());
            }
            if c == Control::Commit {
                let lost = self.0.lose_next_commit.swap(false, Ordering::SeqCst);
                if lost && self.0.lost_commit_aborts.load(Ordering::SeqCst) {
                    // The server went down before the commit record.
                } else if lost && self.0.slow_commit.load(Ordering::SeqCst) {
                    // Takes effect later, at `finish_commit`.
                    self.0.in_flight.store(true, Ordering::SeqCst);
                } else {
                    let seq = self.0.pending_marker.load(Ordering::SeqCst);
                    self.0.marker.store(seq, Ordering::SeqCst);
                }
                if lost {
                    self.0.down.store(true, Ordering::SeqCst);
                    return Err(gone());
                }
            }
            Ok(())
        }
    }

    /// A unit that writes nothing itself, ends as told (`Rollback`: it
    /// refuses), counts its runs, and reports how it was answered.
    struct Probe(
        Outcome,
        mpsc::Sender<Result<(), StoreError>>,
        Arc<AtomicI64>,
    );

    impl Job for Probe {
        fn run(&mut self, _: &mut Tx<'_>) -> Outcome {
            self.2.fetch_add(1, Ordering::SeqCst);
            self.0
        }

        fn finish(self: Box<Self>, durable: Result<(), StoreError>) {
            let _ = self.1.send(durable);
        }
    }

    /// A probe whose caller's bound on waiting for a start has passed.
    struct Stale(Probe);

    impl Job for Stale {
        fn run(&mut self, tx: &mut Tx<'_>) -> Outcome {
            self.0.run(tx)
        }

        fn finish(self: Box<Self>, durable: Result<(), StoreError>) {
            Box::new(self.0).finish(durable)
        }

        fn within_wait(&self) -> bool {
            false
        }
    }

    /// A probe that meets a lock conflict on its first run, so that it is
    /// set aside for a later batch.
    struct ConflictFirst(Probe);

    impl Job for ConflictFirst {
        fn run(&mut self, tx: &mut Tx<'_>) -> Outcome {
            if self.0.2.load(Ordering::SeqCst) == 0 {
                self.0.2.fetch_add(1, Ordering::SeqCst);
                let _ = tx.conflict("lock timeout");
                return Outcome::Rollback;
            }
            self.0.run(tx)
        }

        fn finish(self: Box<Self>, durable: Result<(), StoreError>) {
            Box::new(self.0).finish(durable)
        }

        fn within_wait(&self) -> bool {
            false
        }
    }

    /// A probe that meets a lock conflict on its first run, and whose next
    /// batch's COMMIT is then lost (the server going down) without taking
    /// effect.
    struct ConflictThenLost(Probe, Arc<Server>);

    impl Job for ConflictThenLost {
        fn run(&mut self, tx: &mut Tx<'_>) -> Outcome {
            match self.0.2.load(Ordering::SeqCst) {
                0 => {
                    self.0.2.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.conflict("lock timeout");
                    Outcome::Rollback
                }
                1 => {
                    self.1.lost_commit_aborts.store(true, Ordering::SeqCst);
                    self.1.lose_next_commit.store(true, Ordering::SeqCst);
                    self.0.run(tx)
                }
                _ => self.0.run(tx),
            }
        }

        fn finish(self: Box<Self>, durable: Result<(), StoreError>) {
            Box::new(self.0).finish(durable)
        }
    }

    fn probe(queue: &flume::Sender<Msg>) -> mpsc::Receiver<Result<(), StoreError>> {
        sent(queue, Outcome::Commit)
    }

    fn sent(queue: &flume::Sender<Msg>, ends: Outcome) -> mpsc::Receiver<Result<(), StoreError>> {
        let (probe, answer, _) = new_probe(ends);
        queue.send(Msg::Job(Box::new(probe))).unwrap();
        answer
    }

    /// A probe ending as told, with its answer channel and its count of runs.
    fn new_probe(
        ends: Outcome,
    ) -> (
        Probe,
        mpsc::Receiver<Result<(), StoreError>>,
        Arc<AtomicI64>,
    ) {
        let (tx, rx) = mpsc::channel();
        let runs = Arc::new(AtomicI64::new(0));
        (Probe(ends, tx, Arc::clone(&runs)), rx, runs)
    }

    /// Only a hang guard: every wait below ends on an event.
    const GUARD: Duration = Duration::from_secs(30);

    /// A writer on the scripted server, and its queue.
    fn start() -> (Arc<Server>, flume::Sender<Msg>, std::thread::JoinHandle<()>) {
        start_after(|_| {})
    }

    /// The same, with messages queued before the writer starts.
    fn start_after(
        queued: impl FnOnce(&flume::Sender<Msg>),
    ) -> (Arc<Server>, flume::Sender<Msg>, std::thread::JoinHandle<()>) {
        let server = Arc::new(Server::default());
        let connect: Connect = {
            let server = Arc::clone(&server);
            Arc::new(move || {
                if server.down.load(Ordering::SeqCst) {
                    Err(gone())
                } else {
                    let generation = server.generation.load(Ordering::SeqCst);
                    Ok(Box::new(FakeConn(Arc::clone(&server), generation)) as Box<dyn Conn>)
                }
            })
        };
        let cfg = Arc::new(WriterConfig {
            max_batch: 16,
            max_attempts: 5,
            clock: Arc::new(SystemClock),
            sandbox_clock: false,
            sealer: Sealer::new(&MasterKey::from_bytes([7; 32])),
            connect,
            // Longer than any wait below: an answer that comes at all came
            // before the writer gave up on its own.
            outcome_wait: GUARD * 2,
            pipeline: None,
        });
        let (queue, rx) = flume::unbounded();
        queued(&queue);
        let writer = std::thread::spawn(move || run(None, rx, cfg));
        (server, queue, writer)
    }

    /// Commits one batch normally, then one whose answer is lost, after
    /// which the server stays down; returns that batch's answer channel.
    fn lose_a_commit(
        server: &Server,
        queue: &flume::Sender<Msg>,
    ) -> mpsc::Receiver<Result<(), StoreError>> {
        commit_one(queue);
        let (probe, in_doubt, _) = new_probe(Outcome::Commit);
        lose_the_commit_of(server, queue, probe);
        in_doubt
    }

    /// Commits one batch normally (the marker row is registered and set).
    fn commit_one(queue: &flume::Sender<Msg>) {
        assert!(probe(queue).recv_timeout(GUARD).unwrap().is_ok());
    }

    /// Queues `job` with the next COMMIT's answer to be lost, and returns once
    /// it is (the server then stays down).
    fn lose_the_commit_of(server: &Server, queue: &flume::Sender<Msg>, job: impl Job + 'static) {
        server.lose_next_commit.store(true, Ordering::SeqCst);
        queue.send(Msg::Job(Box::new(job))).unwrap();
        while !server.down.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_commit_whose_answer_is_lost_is_answered_truly_once_known_and_blocks_nobody_meanwhile() {
        let (server, queue, writer) = start();
        let in_doubt = lose_a_commit(&server, &queue);
        // Work queued meanwhile has not run: it fails at once, and the
        // batch in doubt is not answered while its outcome is unknown.
        for _ in 0..3 {
            let answer = probe(&queue).recv_timeout(GUARD).unwrap();
            assert!(
                matches!(answer, Err(StoreError::Unavailable(_))),
                "{answer:?}"
            );
        }
        assert!(
            in_doubt.try_recv().is_err(),
            "answered before its outcome was known"
        );

        // The server is back: the marker shows the batch committed.
        server.down.store(false, Ordering::SeqCst);
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "a kept batch was told {answer:?}");
        assert!(probe(&queue).recv_timeout(GUARD).unwrap().is_ok());

        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// The lost COMMIT did not take effect: once the server is back (and not
    /// before) its units run again, once, and their callers hear of that run.
    #[test]
    fn a_lost_commit_that_did_not_take_effect_is_run_again() {
        let (server, queue, writer) = start();
        server.lost_commit_aborts.store(true, Ordering::SeqCst);
        commit_one(&queue);
        let (probe_in_doubt, in_doubt, runs) = new_probe(Outcome::Commit);
        lose_the_commit_of(&server, &queue, probe_in_doubt);
        let before = server.marker.load(Ordering::SeqCst);
        // Work queued behind it is refused while the outcome is learned.
        let answer = probe(&queue).recv_timeout(GUARD).unwrap();
        assert!(
            matches!(answer, Err(StoreError::Unavailable(_))),
            "{answer:?}"
        );
        assert!(
            in_doubt.try_recv().is_err(),
            "answered before its outcome was known"
        );
        server.down.store(false, Ordering::SeqCst);
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "a batch run again was told {answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 2, "runs of the unit");
        assert!(
            server.marker.load(Ordering::SeqCst) > before,
            "answered without a committed batch"
        );
        assert!(probe(&queue).recv_timeout(GUARD).unwrap().is_ok());
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// As above, but the unit's caller's bound on waiting for a start has
    /// passed by the time the outcome is known: it is told it failed, and not
    /// run again.
    #[test]
    fn a_lost_commit_not_kept_is_not_started_again_past_its_wait() {
        let (server, queue, writer) = start();
        commit_one(&queue);
        server.lost_commit_aborts.store(true, Ordering::SeqCst);
        let (probe_in_doubt, in_doubt, runs) = new_probe(Outcome::Commit);
        lose_the_commit_of(&server, &queue, Stale(probe_in_doubt));
        server.down.store(false, Ordering::SeqCst);
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(matches!(answer, Err(StoreError::Overloaded)), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "runs of the unit");
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// A unit set aside for a lock conflict, in a batch whose COMMIT is then
    /// lost (and kept): it was rolled back, and once the outcome is learned
    /// its caller's bound on waiting for a start has passed, so it is refused
    /// rather than started afresh.
    #[test]
    fn a_unit_set_aside_is_not_started_again_past_its_wait_after_a_lost_commit() {
        let (server, queue, writer) = start();
        commit_one(&queue);
        let (probe_set_aside, set_aside, runs) = new_probe(Outcome::Commit);
        lose_the_commit_of(&server, &queue, ConflictFirst(probe_set_aside));
        server.down.store(false, Ordering::SeqCst);
        let answer = set_aside.recv_timeout(GUARD).unwrap();
        assert!(matches!(answer, Err(StoreError::Overloaded)), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "runs of the unit");
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// A unit that waited out a lock conflict still gets its run on a fresh
    /// connection after an outage: the runs each cause ends are counted
    /// apart.
    #[test]
    fn a_unit_that_met_a_lock_conflict_still_runs_again_after_an_outage() {
        let (server, queue, writer) = start();
        commit_one(&queue);
        let (probe, answer, runs) = new_probe(Outcome::Commit);
        queue
            .send(Msg::Job(Box::new(ConflictThenLost(
                probe,
                Arc::clone(&server),
            ))))
            .unwrap();
        while !server.down.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        server.down.store(false, Ordering::SeqCst);
        let answer = answer.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "runs of the unit");
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// The marker row was deleted (an operator pruning the table) and the
    /// server restarted: the connection made for the next batch puts the row
    /// back, and that must not name the batch, whose COMMIT is then lost
    /// without taking effect. It is run again, not told it was kept.
    #[test]
    fn a_marker_row_put_back_on_reconnecting_names_no_batch() {
        let (server, queue, writer) = start();
        commit_one(&queue);
        server.marker.store(NO_ROW, Ordering::SeqCst);
        server.generation.fetch_add(1, Ordering::SeqCst);
        server.lost_commit_aborts.store(true, Ordering::SeqCst);
        let (probe_in_doubt, in_doubt, runs) = new_probe(Outcome::Commit);
        lose_the_commit_of(&server, &queue, probe_in_doubt);
        server.down.store(false, Ordering::SeqCst);
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 2, "runs of the unit");
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// The server is back before the lost COMMIT has finished there: the
    /// outcome is read only once that transaction has ended.
    #[test]
    fn a_commit_still_running_on_the_server_is_waited_for() {
        let (server, queue, writer) = start();
        server.slow_commit.store(true, Ordering::SeqCst);
        let in_doubt = lose_a_commit(&server, &queue);
        server.down.store(false, Ordering::SeqCst);
        loop {
            if let Ok(answer) = in_doubt.try_recv() {
                panic!("answered {answer:?} while the COMMIT was still running");
            }
            if server.lock_waited.load(Ordering::SeqCst) {
                break;
            }
            std::thread::yield_now();
        }
        server.finish_commit();
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "a kept batch was told {answer:?}");
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    /// Work that reaches the queue behind the Stop is told the store closed.
    #[test]
    fn work_queued_behind_a_stop_is_answered() {
        let mut answers = Vec::new();
        let (_server, _queue, writer) = start_after(|queue| {
            answers.push(probe(queue));
            queue.send(Msg::Stop).unwrap();
            answers.push(probe(queue));
        });
        writer.join().unwrap();
        let late = answers.pop().unwrap();
        assert!(answers[0].recv_timeout(GUARD).unwrap().is_ok());
        let answer = late.recv_timeout(GUARD).unwrap();
        assert!(matches!(answer, Err(StoreError::Closed)), "{answer:?}");
    }

    /// The outcome is still unknown when the store stops: the batch's
    /// callers are told so, not that it failed (it may have been kept).
    #[test]
    fn a_stop_while_the_database_is_down_ends_the_wait() {
        let (server, queue, writer) = start();
        let in_doubt = lose_a_commit(&server, &queue);
        queue.send(Msg::Stop).unwrap();
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(
            matches!(answer, Err(StoreError::OutcomeUnknown)),
            "{answer:?}"
        );
        writer.join().unwrap();
    }

    #[test]
    fn a_stop_still_reads_the_outcome_once_more() {
        let (server, queue, writer) = start();
        let in_doubt = lose_a_commit(&server, &queue);
        server.down.store(false, Ordering::SeqCst);
        queue.send(Msg::Stop).unwrap();
        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "a kept batch was told {answer:?}");
        writer.join().unwrap();
    }

    /// A real PostgreSQL connection whose next `COMMIT` is held back: the
    /// caller hears the connection broke, while the transaction stays open on
    /// the server until the test decides whether it commits. That is a lost
    /// `COMMIT` still running there, on cue.
    #[cfg(feature = "testkit")]
    struct Lossy {
        inner: Option<Box<dyn Conn>>,
        hold: Arc<HoldNext>,
    }

    #[cfg(feature = "testkit")]
    #[derive(Default)]
    struct HoldNext {
        armed: AtomicBool,
        /// Decides the held transaction: `true` commits it.
        decide: std::sync::Mutex<Option<mpsc::Sender<bool>>>,
        settled: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
        /// Marker reads that failed (a lock wait that timed out).
        failed_marker_reads: AtomicI64,
    }

    #[cfg(feature = "testkit")]
    impl Lossy {
        fn conn(&mut self) -> Result<&mut Box<dyn Conn>, DbError> {
            self.inner.as_mut().ok_or_else(gone)
        }
    }

    #[cfg(feature = "testkit")]
    impl Conn for Lossy {
        fn dialect(&self) -> Dialect {
            Dialect::Postgres
        }

        fn execute(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, DbError> {
            self.conn()?.execute(sql, params)
        }

        fn query(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
            let rows = self.conn()?.query(sql, params);
            if rows.is_err() && sql.contains("RETURNING last_batch") {
                self.hold.failed_marker_reads.fetch_add(1, Ordering::SeqCst);
            }
            rows
        }

        fn insert_id(
            &mut self,
            sql: &'static str,
            params: &[Param<'_>],
        ) -> Result<Option<i64>, DbError> {
            self.conn()?.insert_id(sql, params)
        }

        fn batch(&mut self, sql: &str) -> Result<(), DbError> {
            self.conn()?.batch(sql)
        }

        fn control(&mut self, c: Control) -> Result<(), DbError> {
            if c == Control::Commit && self.hold.armed.swap(false, Ordering::SeqCst) {
                let mut held = self.inner.take().ok_or_else(gone)?;
                let (decide, decided) = mpsc::channel::<bool>();
                *self.hold.decide.lock().unwrap() = Some(decide);
                *self.hold.settled.lock().unwrap() = Some(std::thread::spawn(move || {
                    let end = if decided.recv().unwrap() {
                        Control::Commit
                    } else {
                        Control::Rollback
                    };
                    held.control(end).unwrap();
                }));
                return Err(gone());
            }
            self.conn()?.control(c)
        }
    }

    /// A test that fails before deciding the held transaction ends it, so
    /// that dropping the test database does not wait on it.
    #[cfg(feature = "testkit")]
    struct RollBackIfUndecided(Arc<HoldNext>);

    #[cfg(feature = "testkit")]
    impl Drop for RollBackIfUndecided {
        fn drop(&mut self) {
            if let Some(decide) = self.0.decide.lock().unwrap().take() {
                let _ = decide.send(false);
            }
            if let Some(settled) = self.0.settled.lock().unwrap().take() {
                let _ = settled.join();
            }
        }
    }

    /// On a real server: the batch's `COMMIT` is lost while its transaction,
    /// which put back the deleted marker row, is still open there. The
    /// writer's read of the marker must wait for it (a plain read sees no row
    /// and calls the batch failed), and then the outcome decides: kept, the
    /// unit is answered having run once; not kept, it runs again.
    #[cfg(feature = "testkit")]
    fn lost_commit_of_a_put_back_marker(kept: bool) {
        let Some(admin) = crate::testkit::postgres_admin_url() else {
            return;
        };
        let db = crate::testkit::TestDb::postgres(&admin);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let opts = crate::Options::new(
                db.location.clone(),
                MasterKey::from_bytes([7; 32]),
                Arc::new(SystemClock),
            );
            crate::Store::open(opts).await.unwrap().close().await;
        });
        let pg = crate::postgres::PgOptions {
            url: db.url.clone(),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_millis(50),
        };
        let hold = Arc::new(HoldNext::default());
        let _undecided = RollBackIfUndecided(Arc::clone(&hold));
        let connect: Connect = {
            let hold = Arc::clone(&hold);
            Arc::new(move || {
                let inner = crate::postgres::PgConn::connect(&pg)?;
                Ok(Box::new(Lossy {
                    inner: Some(Box::new(inner)),
                    hold: Arc::clone(&hold),
                }) as Box<dyn Conn>)
            })
        };
        let cfg = Arc::new(WriterConfig {
            max_batch: 16,
            max_attempts: 5,
            clock: Arc::new(SystemClock),
            sandbox_clock: false,
            sealer: Sealer::new(&MasterKey::from_bytes([7; 32])),
            connect,
            outcome_wait: GUARD * 2,
            pipeline: None,
        });
        let (queue, rx) = flume::unbounded();
        let writer = std::thread::spawn(move || run(None, rx, cfg));

        commit_one(&queue);
        db.sql("DELETE FROM payrail_writers");
        hold.armed.store(true, Ordering::SeqCst);
        let (probe_in_doubt, in_doubt, runs) = new_probe(Outcome::Commit);
        queue.send(Msg::Job(Box::new(probe_in_doubt))).unwrap();
        // The writer has tried to read the marker, and had to wait for the
        // held transaction (past its lock timeout): the read is in doubt too.
        let deadline = std::time::Instant::now() + GUARD;
        while hold.failed_marker_reads.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the marker read never waited for the held transaction (answered {:?})",
                in_doubt.try_recv()
            );
            std::thread::yield_now();
        }
        assert!(in_doubt.try_recv().is_err(), "answered while in doubt");
        let decide = hold.decide.lock().unwrap().take().unwrap();
        decide.send(kept).unwrap();
        hold.settled.lock().unwrap().take().unwrap().join().unwrap();

        let answer = in_doubt.recv_timeout(GUARD).unwrap();
        assert!(answer.is_ok(), "{answer:?}");
        let expected_runs = if kept { 1 } else { 2 };
        assert_eq!(
            runs.load(Ordering::SeqCst),
            expected_runs,
            "runs of the unit"
        );
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn on_postgres_a_lost_commit_that_put_back_the_marker_and_was_kept_is_answered() {
        lost_commit_of_a_put_back_marker(true);
    }

    #[cfg(feature = "testkit")]
    #[test]
    fn on_postgres_a_lost_commit_that_put_back_the_marker_and_was_not_kept_runs_again() {
        lost_commit_of_a_put_back_marker(false);
    }

    /// A unit that refuses settles alone, but its batch may still fail
    /// (here every batch's marker write meets a lock timeout), and then it
    /// runs again with the others. Its runs are counted across batches, so it
    /// is answered once the limit is reached instead of running for ever.
    #[test]
    fn a_refusal_in_batches_that_keep_failing_is_answered() {
        let (server, queue, writer) = start();
        server.marker_busy.store(true, Ordering::SeqCst);
        let refused = sent(&queue, Outcome::Rollback);
        let answer = refused.recv_timeout(GUARD).unwrap();
        assert!(matches!(answer, Err(StoreError::Busy(_))), "{answer:?}");
        server.marker_busy.store(false, Ordering::SeqCst);
        assert!(probe(&queue).recv_timeout(GUARD).unwrap().is_ok());
        queue.send(Msg::Stop).unwrap();
        writer.join().unwrap();
    }
}
