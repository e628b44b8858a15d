//! The SQLite engine: one file in WAL mode, one writer connection, a pool of
//! reader connections.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, ToSql, ffi};

use crate::conn::{Conn, DbError, DbErrorKind, Dialect, Param, Row, Value};

/// How a connection will be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Writer,
    Reader,
}

pub(crate) struct SqliteConn {
    conn: Connection,
}

impl SqliteConn {
    pub(crate) fn open(path: &Path, role: Role) -> Result<SqliteConn, DbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(classify)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(classify)?;
        conn.set_prepared_statement_cache_capacity(256);
        // WAL: readers never wait for the writer and the writer never waits for
        // readers. synchronous=FULL: every commit fsyncs the WAL, so a commit
        // that returned is on disk; the writer makes that affordable by
        // committing many requests per transaction.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -65536;",
        )
        .map_err(classify)?;
        if role == Role::Reader {
            conn.execute_batch("PRAGMA query_only = ON;")
                .map_err(classify)?;
        }
        Ok(SqliteConn { conn })
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

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        self.conn.execute_batch(sql).map_err(classify)
    }
}
