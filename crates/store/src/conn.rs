//! The one seam between payrail's queries and a database engine.
//!
//! Every query in this crate is written once, in the SQL both engines accept,
//! with SQLite's numbered placeholders (`?1`, `?2`, ...). Row locks are written
//! as the comment `/*FOR UPDATE*/`: SQLite, whose single writer needs no row
//! locks, ignores it; the PostgreSQL connection turns it into `FOR UPDATE`
//! (likewise `/*FOR NO KEY UPDATE*/`, for rows that foreign keys point at,
//! and `/*FOR UPDATE SKIP LOCKED*/`, for work any node may do, such as
//! pruning). So each query has one text and two engines, rather than two copies that drift.

use std::fmt;

/// A parameter bound to a query.
#[derive(Clone, Copy, Debug)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(v: &'a [u8]) -> Self {
        Param::Blob(v)
    }
}

impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Param::Null, Into::into)
    }
}

/// A column value read back.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// One result row.
#[derive(Clone, Debug, Default)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, DbError> {
        self.0
            .get(i)
            .ok_or_else(|| DbError::other(format!("column {i} out of range")))
    }

    pub fn int(&self, i: usize) -> Result<i64, DbError> {
        match self.at(i)? {
            Value::Int(v) => Ok(*v),
            other => Err(DbError::other(format!(
                "column {i}: expected integer, got {other:?}"
            ))),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            other => Err(DbError::other(format!(
                "column {i}: expected integer, got {other:?}"
            ))),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, DbError> {
        match self.at(i)? {
            Value::Text(v) => Ok(v.clone()),
            other => Err(DbError::other(format!(
                "column {i}: expected text, got {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            other => Err(DbError::other(format!(
                "column {i}: expected text, got {other:?}"
            ))),
        }
    }

    pub fn blob(&self, i: usize) -> Result<Vec<u8>, DbError> {
        match self.at(i)? {
            Value::Blob(v) => Ok(v.clone()),
            other => Err(DbError::other(format!(
                "column {i}: expected blob, got {other:?}"
            ))),
        }
    }

    pub fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v.clone())),
            other => Err(DbError::other(format!(
                "column {i}: expected blob, got {other:?}"
            ))),
        }
    }
}

/// What kind of failure the engine reported; decides how the store reacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbErrorKind {
    UniqueViolation,
    ForeignKeyViolation,
    CheckViolation,
    /// Deadlock, serialization failure, lock timeout: the work may succeed if
    /// run again after this transaction ends.
    Retryable,
    /// The connection or the server is gone.
    Unavailable,
    Other,
}

/// An engine error. Its text may contain SQL or internals: it is logged, never
/// shown to a client.
#[derive(Clone, Debug)]
pub struct DbError {
    pub kind: DbErrorKind,
    pub detail: String,
}

impl DbError {
    pub fn new(kind: DbErrorKind, detail: impl Into<String>) -> DbError {
        DbError {
            kind,
            detail: detail.into(),
        }
    }

    pub fn other(detail: impl Into<String>) -> DbError {
        DbError::new(DbErrorKind::Other, detail)
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for DbError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Transaction control, run very often (several times per unit of work), so
/// an engine may keep them prepared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Begin a write transaction.
    BeginWrite,
    Commit,
    Rollback,
    Savepoint,
    /// Keep what was done since the savepoint and set a new one, in one go.
    ReleaseAndSavepoint,
    /// Undo everything since the savepoint; the savepoint stays set.
    RollbackToSavepoint,
    /// A savepoint inside a unit, around one step the unit can go on
    /// without (see `Tx::isolated`).
    StepSavepoint,
    /// Keep the step's work and drop its savepoint.
    StepRelease,
    /// Undo the step's work and drop its savepoint.
    StepRollback,
}

/// A connection to one engine. Used from one thread at a time.
pub trait Conn: Send {
    fn dialect(&self) -> Dialect;

    /// Runs a statement; returns the number of rows changed.
    fn execute(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, DbError>;

    /// Runs a query (or a statement with `RETURNING`) and returns its rows.
    fn query(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError>;

    /// Runs an `INSERT … ON CONFLICT … DO NOTHING /*RETURNING id*/` and
    /// returns the new row's integer key, or `None` if the conflict clause
    /// skipped the row.
    fn insert_id(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, DbError>;

    /// Runs parameterless SQL such as a migration.
    fn batch(&mut self, sql: &str) -> Result<(), DbError>;

    fn control(&mut self, c: Control) -> Result<(), DbError>;
}
