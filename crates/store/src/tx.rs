//! The transaction a unit of work runs in.

use std::collections::BTreeMap;

use payrail_core::{AccountId, Delta, Timestamp};

use crate::StoreError;
use crate::conn::{Conn, Control, DbErrorKind, Param, Row};
use crate::seal::Sealer;

/// Balance changes that cannot break any rule (credits, releases; on
/// PostgreSQL, also debits of accounts that may go negative, within
/// `ledger::QUEUED_DEBIT_LIMIT`), applied to
/// the account rows once per batch, just before the commit, instead of once
/// per request. A merchant credited by a thousand debits in one batch is
/// updated once, and on PostgreSQL its row is locked only for that moment.
pub(crate) type Deferred = BTreeMap<AccountId, Delta>;

/// The time a unit of work runs at: the clock as read when its batch began,
/// and the sandbox clock's offset (0 outside sandbox mode) as this unit
/// knows it. Kept apart because moving the sandbox clock must check the
/// offset the database holds, which another writer (PostgreSQL) may have
/// moved since the batch began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnitTime {
    pub wall: Timestamp,
    pub offset_ms: i64,
}

impl UnitTime {
    pub(crate) fn now(self) -> Timestamp {
        Timestamp::from_millis(self.wall.millis().saturating_add(self.offset_ms))
    }
}

/// One unit of work's view of the database: queries, the current time, and
/// the batch it shares a commit with.
///
/// Everything a unit does is undone together if it fails; see
/// [`crate::Store::write`].
pub struct Tx<'a> {
    conn: &'a mut dyn Conn,
    time: UnitTime,
    sealer: &'a Sealer,
    batch_deferred: &'a Deferred,
    job_deferred: Vec<(AccountId, Delta)>,
    writable: bool,
    /// A database error happened: on PostgreSQL the transaction is unusable
    /// until rolled back, so the unit's work is discarded whatever it returns.
    pub(crate) failed: bool,
    /// The error was a deadlock or lock timeout: run the unit again later.
    pub(crate) retry: bool,
    /// A statement changed data, or a statement that changes data failed:
    /// the unit may have something to undo if it does not commit.
    pub(crate) wrote: bool,
}

/// Does `sql` change data? Every query starts with its verb, or with `WITH`.
/// A `WITH` may hide a DELETE (the PostgreSQL fold's): missing it would let a
/// unit that failed after that statement pass for one that wrote nothing,
/// and its batch commit the deletion alone. Any `WITH` naming a write verb
/// counts; a false positive only costs a rerun.
fn writes(sql: &str) -> bool {
    let verb = sql.trim_start().as_bytes();
    let starts = |w: &[u8]| verb.len() >= w.len() && verb[..w.len()].eq_ignore_ascii_case(w);
    if starts(b"WITH") {
        return verb.windows(6).any(|w| {
            w.eq_ignore_ascii_case(b"INSERT")
                || w.eq_ignore_ascii_case(b"UPDATE")
                || w.eq_ignore_ascii_case(b"DELETE")
        });
    }
    starts(b"INSERT") || starts(b"UPDATE") || starts(b"DELETE")
}

impl<'a> Tx<'a> {
    pub(crate) fn new(
        conn: &'a mut dyn Conn,
        time: UnitTime,
        sealer: &'a Sealer,
        batch_deferred: &'a Deferred,
        writable: bool,
    ) -> Tx<'a> {
        Tx {
            conn,
            time,
            sealer,
            batch_deferred,
            job_deferred: Vec::new(),
            writable,
            failed: false,
            retry: false,
            wrote: false,
        }
    }

    /// The time every rule in this unit uses: the clock (with the sandbox's
    /// offset) as read when the batch began.
    pub fn now(&self) -> Timestamp {
        self.time.now()
    }

    pub(crate) fn time(&self) -> UnitTime {
        self.time
    }

    pub(crate) fn set_clock_offset(&mut self, offset_ms: i64) {
        self.time.offset_ms = offset_ms;
    }

    pub fn sealer(&self) -> &Sealer {
        self.sealer
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Only one unit writes at a time (SQLite's single writer): what a unit
    /// reads cannot change before it writes. Where this is false (several
    /// PostgreSQL writers), the writes themselves must refuse races, as the
    /// ledger's conditional updates and unique keys do.
    pub fn serialized(&self) -> bool {
        self.conn.dialect() == crate::conn::Dialect::Sqlite
    }

    /// Work another writer committed meanwhile conflicts with this unit's:
    /// the unit is undone and runs again, as after a lock timeout.
    pub(crate) fn conflict(&mut self, detail: &str) -> StoreError {
        self.note(crate::conn::DbError::new(DbErrorKind::Retryable, detail))
    }

    fn note(&mut self, e: crate::conn::DbError) -> StoreError {
        self.failed = true;
        if e.kind == DbErrorKind::Retryable {
            self.retry = true;
        }
        StoreError::from(e)
    }

    pub(crate) fn execute(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<u64, StoreError> {
        // A write that changed no row (an `ON CONFLICT DO NOTHING` that hit
        // the conflict, a conditional update that did not match) leaves
        // nothing to undo; a failed one is counted, to be safe.
        match self.conn.execute(sql, params) {
            Ok(n) => {
                self.wrote |= n > 0 && writes(sql);
                Ok(n)
            }
            Err(e) => {
                self.wrote |= writes(sql);
                Err(self.note(e))
            }
        }
    }

    pub(crate) fn query(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        self.wrote |= writes(sql);
        match self.conn.query(sql, params) {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.note(e)),
        }
    }

    pub(crate) fn insert_id(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, StoreError> {
        match self.conn.insert_id(sql, params) {
            Ok(id) => {
                self.wrote |= id.is_some();
                Ok(id)
            }
            Err(e) => {
                self.wrote = true;
                Err(self.note(e))
            }
        }
    }

    pub(crate) fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    pub(crate) fn query_one(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Internal(format!("query returned no row: {sql}")))
    }

    /// Queues a rule-safe balance change for the end of the batch.
    pub(crate) fn defer(&mut self, account: AccountId, delta: Delta) {
        if !delta.is_zero() {
            self.job_deferred.push((account, delta));
        }
    }

    /// Changes queued for `account` in this batch and not yet applied.
    pub(crate) fn deferred(&self, account: AccountId) -> Delta {
        let mut total = self
            .batch_deferred
            .get(&account)
            .copied()
            .unwrap_or_default();
        for (a, d) in &self.job_deferred {
            if *a == account {
                total.add(d);
            }
        }
        total
    }

    /// Runs `step` under a savepoint of its own. If it fails, its writes, its
    /// queued balance changes and any move of the sandbox clock it made are
    /// undone and the unit goes on: the
    /// outer `Err` is for what must still fail the unit (the savepoint
    /// itself, or a lock conflict, which reruns the whole unit), the inner
    /// one the step's own failure.
    ///
    /// For housekeeping over many independent rows, where one row that
    /// always fails must not hold up the rest. Each use costs a savepoint,
    /// so request paths do not use it.
    pub(crate) fn isolated<T>(
        &mut self,
        step: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<Result<T, StoreError>, StoreError> {
        self.control(Control::StepSavepoint)?;
        let (queued, failed, time) = (self.job_deferred.len(), self.failed, self.time);
        match step(self) {
            Ok(v) => {
                self.control(Control::StepRelease)?;
                Ok(Ok(v))
            }
            Err(e) if self.retry => Err(e),
            Err(e) => {
                // The database's part goes with the savepoint; the queued
                // balance changes live here, and go with the truncation.
                self.control(Control::StepRollback)?;
                self.job_deferred.truncate(queued);
                self.failed = failed;
                self.time = time;
                Ok(Err(e))
            }
        }
    }

    fn control(&mut self, c: Control) -> Result<(), StoreError> {
        self.conn.control(c).map_err(|e| self.note(e))
    }

    pub(crate) fn take_deferred(&mut self) -> Vec<(AccountId, Delta)> {
        std::mem::take(&mut self.job_deferred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{Role, SqliteConn};

    fn credit(minor: i64) -> Delta {
        Delta {
            credits_posted: minor,
            ..Delta::default()
        }
    }

    /// A step that fails leaves nothing behind, in the database or among
    /// the queued balance changes, and the unit goes on: what came before
    /// it and what comes after it are kept. A step that succeeds keeps
    /// both of its parts.
    #[test]
    fn an_isolated_step_that_fails_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = SqliteConn::open(&dir.path().join("t.db"), Role::Writer).unwrap();
        conn.batch("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .unwrap();
        let sealer = Sealer::new(&crate::MasterKey::generate());
        let (batch, a) = (Deferred::new(), AccountId(1));
        conn.control(Control::BeginWrite).unwrap();
        let time = UnitTime {
            wall: Timestamp::from_millis(0),
            offset_ms: 0,
        };
        let mut tx = Tx::new(&mut conn, time, &sealer, &batch, true);
        tx.execute("INSERT INTO t (id) VALUES (1)", &[]).unwrap();
        tx.defer(a, credit(1));

        let failed = tx
            .isolated(|tx| {
                tx.execute("INSERT INTO t (id) VALUES (2)", &[])?;
                tx.defer(a, credit(10));
                // A database error, as a void's would be: the unit must not
                // be taken for one that continued after it.
                tx.execute("INSERT INTO t (id) VALUES (1)", &[])?;
                Ok(())
            })
            .expect("only the step fails");
        assert!(failed.is_err());
        assert!(!tx.failed, "the step's error is undone with it");
        assert_eq!(tx.deferred(a), credit(1));

        let kept = tx.isolated(|tx| {
            tx.execute("INSERT INTO t (id) VALUES (3)", &[])?;
            tx.defer(a, credit(100));
            Ok(7)
        });
        assert_eq!(kept.unwrap().unwrap(), 7);
        assert_eq!(tx.deferred(a), credit(101));
        tx.execute("INSERT INTO t (id) VALUES (4)", &[]).unwrap();
        assert!(!tx.failed);
        drop(tx);
        conn.control(Control::Commit).unwrap();
        let rows = conn.query("SELECT id FROM t ORDER BY id", &[]).unwrap();
        let ids: Vec<i64> = rows.iter().map(|r| r.int(0).unwrap()).collect();
        assert_eq!(ids, [1, 3, 4]);
    }

    #[test]
    fn a_write_is_recognised_also_inside_a_with() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "  update t SET a = 1",
            "DELETE FROM t",
            "WITH gone AS (DELETE FROM t RETURNING a) SELECT sum(a) FROM gone",
            "with x as (select 1) insert into t select * from x",
        ] {
            assert!(writes(sql), "{sql}");
        }
        for sql in [
            "SELECT a FROM t",
            "WITH totals AS (SELECT a FROM t) SELECT * FROM totals",
            "",
        ] {
            assert!(!writes(sql), "{sql}");
        }
    }
}
