//! The PostgreSQL engine: several payrail nodes over one database.
//!
//! The same queries as SQLite run here (see [`crate::conn`]): `?N` becomes
//! `$N`, `/*FOR UPDATE*/` becomes `FOR UPDATE` (and `/*FOR UPDATE SKIP
//! LOCKED*/` the same, skipping locked rows) and `/*RETURNING id*/` becomes
//! `RETURNING id`. Writers run at READ
//! COMMITTED; what keeps money right across nodes is in the queries
//! themselves (conditional updates that re-check after a lock wait, row locks,
//! unique constraints), explained where each is used.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use postgres::error::{Severity, SqlState};
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};

use crate::conn::{Conn, Control, DbError, DbErrorKind, Dialect, Param, Row, Value};

/// Connection settings.
#[derive(Clone)]
pub struct PgOptions {
    pub url: String,
    pub connect_timeout: Duration,
    /// A statement running longer is cancelled (and its unit retried or failed).
    pub statement_timeout: Duration,
    /// A unit waiting this long for a row lock gives up and is retried in a
    /// later batch, once this writer's own locks are released: it breaks
    /// cross-node lock cycles long before PostgreSQL's deadlock detector.
    pub lock_timeout: Duration,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &crate::redact_password(&self.url))
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .finish()
    }
}

pub(crate) struct PgConn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// A statement failed since the transaction (or its savepoint) began.
    /// PostgreSQL then answers `COMMIT` with a rollback and no error, so
    /// the commit is refused here instead: nobody may be told that work was
    /// saved when it was not.
    aborted: bool,
}

impl PgConn {
    pub(crate) fn connect(o: &PgOptions) -> Result<PgConn, DbError> {
        let secured = crate::pgtls::secure(&o.url)?;
        let mut cfg = postgres::Config::from_str(&secured.url).map_err(|e| {
            DbError::new(DbErrorKind::Unavailable, format!("bad PostgreSQL URL: {e}"))
        })?;
        cfg.connect_timeout(o.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(o.statement_timeout + Duration::from_secs(5))
            .application_name("payrail")
            .options(&format!(
                "-c statement_timeout={} -c lock_timeout={} -c idle_in_transaction_session_timeout={}",
                o.statement_timeout.as_millis(),
                o.lock_timeout.as_millis(),
                (o.statement_timeout * 4).as_millis(),
            ));
        let client = match secured.tls {
            Some(tls) => cfg.connect(tls),
            None => cfg.connect(NoTls),
        }
        .map_err(classify)?;
        let mut conn = PgConn {
            client,
            statements: HashMap::new(),
            aborted: false,
        };
        conn.keep_commits_durable()?;
        Ok(conn)
    }

    /// Callers are answered once `COMMIT` returns, so it must return only
    /// once the commit is flushed. `synchronous_commit = off`, a common
    /// tuning set for a database or role, makes it return before: this
    /// session raises it to `on`. `local`, `remote_write` and `remote_apply`
    /// are flushed locally already and are kept. `fsync = off` cannot be
    /// undone from a session; it is reported once.
    fn keep_commits_durable(&mut self) -> Result<(), DbError> {
        if self.setting("synchronous_commit")? == "off" {
            self.client
                .batch_execute("SET synchronous_commit = on")
                .map_err(classify)?;
        }
        if self.setting("fsync")? == "off" {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "PostgreSQL runs with fsync = off: a crash of its machine can lose debits already answered SUCCESS"
                );
            });
        }
        Ok(())
    }

    fn setting(&mut self, name: &str) -> Result<String, DbError> {
        let messages = self
            .client
            .simple_query(&format!("SHOW {name}"))
            .map_err(classify)?;
        messages
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| DbError::other(format!("SHOW {name} returned no row")))
    }

    fn statement(&mut self, sql: &'static str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&translate(sql)).map_err(|e| {
            self.aborted = true;
            classify(e)
        })?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// Rewrites a query from the shared dialect into PostgreSQL's.
pub(crate) fn translate(sql: &str) -> String {
    let sql = sql
        .replace("/*FOR UPDATE*/", "FOR UPDATE")
        .replace("/*FOR NO KEY UPDATE*/", "FOR NO KEY UPDATE")
        .replace("/*FOR UPDATE SKIP LOCKED*/", "FOR UPDATE SKIP LOCKED")
        .replace("/*RETURNING id*/", "RETURNING id");
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn classify(e: postgres::Error) -> DbError {
    let kind = match e.as_db_error() {
        Some(db) => kind_of(db.code(), db.parsed_severity()),
        // No SQLSTATE: the connection failed (refused, reset, closed), or the
        // client refused a value before sending it.
        None if e.is_closed() || io_error(&e) => DbErrorKind::Unavailable,
        None => DbErrorKind::Other,
    };
    let detail = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // With its causes: "error performing TLS handshake" alone does not
        // say that the certificate's issuer is unknown.
        None => {
            let mut text = e.to_string();
            let mut source = StdError::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    };
    DbError::new(kind, detail)
}

/// What an error the server reported means for the work in hand.
///
/// Its severity comes first. `FATAL` and `PANIC` end the session, whatever
/// the code (a standby's recovery conflict is `FATAL` with 40001, which would
/// otherwise read as "run it again here"), and only they can follow a
/// `COMMIT` whose record is already on disk: an `fsync` failure while
/// flushing it is a `PANIC` sent to the client, and so is any error after
/// the commit record is written ("cannot abort transaction …, it was
/// already committed"). Classed as `Unavailable`, such an answer to
/// `COMMIT` is settled from the writer's marker row, like a lost
/// connection. An `ERROR` answer to `COMMIT` is a rollback.
fn kind_of(code: &SqlState, severity: Option<Severity>) -> DbErrorKind {
    if matches!(severity, Some(Severity::Fatal | Severity::Panic)) {
        return DbErrorKind::Unavailable;
    }
    match code {
        c if *c == SqlState::UNIQUE_VIOLATION => DbErrorKind::UniqueViolation,
        c if *c == SqlState::FOREIGN_KEY_VIOLATION => DbErrorKind::ForeignKeyViolation,
        c if *c == SqlState::CHECK_VIOLATION => DbErrorKind::CheckViolation,
        c if *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::QUERY_CANCELED =>
        {
            DbErrorKind::Retryable
        }
        c if *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || *c == SqlState::CONNECTION_EXCEPTION
            || *c == SqlState::CONNECTION_FAILURE
            || *c == SqlState::TOO_MANY_CONNECTIONS
            || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT =>
        {
            DbErrorKind::Unavailable
        }
        _ => DbErrorKind::Other,
    }
}

fn io_error(e: &postgres::Error) -> bool {
    let mut source = StdError::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A parameter bound to whatever type PostgreSQL inferred for its slot.
#[derive(Debug)]
struct PgParam<'a>(Param<'a>);

impl ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self.0 {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(v) => match *ty {
                Type::INT8 => v.to_sql(ty, out),
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                _ => Err(format!("integer bound to a {ty} parameter").into()),
            },
            Param::Text(s) => s.to_sql(ty, out),
            Param::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn read_row(row: &postgres::Row) -> Result<Row, DbError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let bad = |e: postgres::Error| DbError::other(format!("column {}: {e}", col.name()));
        let v = match *col.type_() {
            Type::INT8 => row
                .try_get::<_, Option<i64>>(i)
                .map_err(bad)?
                .map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)
                .map_err(bad)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)
                .map_err(bad)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(i)
                .map_err(bad)?
                .map(|v| Value::Int(v.into())),
            Type::BYTEA => row
                .try_get::<_, Option<Vec<u8>>>(i)
                .map_err(bad)?
                .map(Value::Blob),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => row
                .try_get::<_, Option<String>>(i)
                .map_err(bad)?
                .map(Value::Text),
            ref other => {
                return Err(DbError::other(format!(
                    "column {}: unsupported type {other}",
                    col.name()
                )));
            }
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl Conn for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        let bound: Vec<PgParam<'_>> = params.iter().map(|p| PgParam(*p)).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let result = self.client.execute(&stmt, &refs);
        self.aborted |= result.is_err();
        result.map_err(classify)
    }

    fn query(&mut self, sql: &'static str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
        let stmt = self.statement(sql)?;
        let bound: Vec<PgParam<'_>> = params.iter().map(|p| PgParam(*p)).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let result = self.client.query(&stmt, &refs);
        self.aborted |= result.is_err();
        result.map_err(classify)?.iter().map(read_row).collect()
    }

    fn insert_id(
        &mut self,
        sql: &'static str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, DbError> {
        self.query(sql, params)?
            .first()
            .map(|r| r.int(0))
            .transpose()
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        let result = self.client.batch_execute(sql);
        match &result {
            Err(_) => self.aborted = true,
            // A read's transaction (see `Store::read`) starts clean.
            Ok(()) if sql.starts_with("BEGIN") => self.aborted = false,
            Ok(()) => {}
        }
        result.map_err(classify)
    }

    fn control(&mut self, c: Control) -> Result<(), DbError> {
        if c == Control::Commit && self.aborted {
            let _ = self.batch("ROLLBACK");
            self.aborted = false;
            return Err(DbError::other(
                "COMMIT refused: a statement failed earlier in the transaction",
            ));
        }
        self.batch(match c {
            Control::BeginWrite => "BEGIN ISOLATION LEVEL READ COMMITTED",
            Control::Commit => "COMMIT",
            Control::Rollback => "ROLLBACK",
            Control::Savepoint => "SAVEPOINT unit",
            Control::ReleaseAndSavepoint => "RELEASE SAVEPOINT unit; SAVEPOINT unit",
            Control::RollbackToSavepoint => "ROLLBACK TO SAVEPOINT unit",
            Control::StepSavepoint => "SAVEPOINT step",
            Control::StepRelease => "RELEASE SAVEPOINT step",
            Control::StepRollback => "ROLLBACK TO SAVEPOINT step; RELEASE SAVEPOINT step",
        })?;
        if matches!(
            c,
            Control::BeginWrite
                | Control::Rollback
                | Control::RollbackToSavepoint
                | Control::StepRollback
                | Control::Commit
        ) {
            self.aborted = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{kind_of, translate};
    use crate::conn::DbErrorKind;
    use postgres::error::{Severity, SqlState};

    #[test]
    fn an_error_that_ends_the_session_leaves_a_commit_open() {
        use DbErrorKind::*;
        let (panic, fatal, error) = (
            Some(Severity::Panic),
            Some(Severity::Fatal),
            Some(Severity::Error),
        );
        let cases = [
            // An fsync failure while flushing a commit record.
            (SqlState::IO_ERROR, panic, Unavailable),
            (SqlState::DISK_FULL, panic, Unavailable),
            (SqlState::INTERNAL_ERROR, panic, Unavailable),
            // A standby's recovery conflict ends the session.
            (SqlState::T_R_SERIALIZATION_FAILURE, fatal, Unavailable),
            (SqlState::T_R_SERIALIZATION_FAILURE, error, Retryable),
            (SqlState::IO_ERROR, error, Other),
            (SqlState::DISK_FULL, None, Other),
            (SqlState::UNIQUE_VIOLATION, error, UniqueViolation),
            (SqlState::FOREIGN_KEY_VIOLATION, error, ForeignKeyViolation),
            (SqlState::CHECK_VIOLATION, error, CheckViolation),
            (SqlState::LOCK_NOT_AVAILABLE, error, Retryable),
            (SqlState::ADMIN_SHUTDOWN, fatal, Unavailable),
            (SqlState::ADMIN_SHUTDOWN, None, Unavailable),
        ];
        for (code, severity, want) in cases {
            assert_eq!(kind_of(&code, severity), want, "{code:?} {severity:?}");
        }
    }

    #[test]
    fn translates_placeholders_and_locks() {
        assert_eq!(
            translate("SELECT a FROM t WHERE id = ?1 AND b = ?12 /*FOR UPDATE*/"),
            "SELECT a FROM t WHERE id = $1 AND b = $12 FOR UPDATE"
        );
        assert_eq!(
            translate("SELECT a FROM t LIMIT ?1 /*FOR UPDATE SKIP LOCKED*/"),
            "SELECT a FROM t LIMIT $1 FOR UPDATE SKIP LOCKED"
        );
        assert_eq!(
            translate("SELECT a FROM t WHERE id = ?1 /*FOR NO KEY UPDATE*/"),
            "SELECT a FROM t WHERE id = $1 FOR NO KEY UPDATE"
        );
        assert_eq!(translate("SELECT '?' AS q"), "SELECT '?' AS q");
        assert_eq!(
            translate("INSERT INTO t (a) VALUES (?1) ON CONFLICT (a) DO NOTHING /*RETURNING id*/"),
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO NOTHING RETURNING id"
        );
    }
}

#[cfg(all(test, feature = "testkit"))]
mod live {
    use std::time::Duration;

    use super::{PgConn, PgOptions};
    use crate::conn::{Conn, Control};
    use crate::testkit::{TestDb, postgres_admin_url};

    /// PostgreSQL answers `COMMIT` in an aborted transaction with a silent
    /// rollback; the connection must turn that into an error.
    #[test]
    fn commit_after_a_failed_statement_is_an_error_not_a_silent_rollback() {
        let Some(admin) = postgres_admin_url() else {
            return;
        };
        let db = TestDb::postgres(&admin);
        let mut c = PgConn::connect(&PgOptions {
            url: db.url.clone(),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(1),
        })
        .unwrap();
        c.batch("CREATE TABLE kept (n BIGINT)").unwrap();
        let count = |c: &mut PgConn| {
            c.query("SELECT count(*) FROM kept", &[]).unwrap()[0]
                .int(0)
                .unwrap()
        };

        c.control(Control::BeginWrite).unwrap();
        c.execute("INSERT INTO kept (n) VALUES (1)", &[]).unwrap();
        assert!(c.query("SELECT no_such_column FROM kept", &[]).is_err());
        assert!(c.control(Control::Commit).is_err());
        assert_eq!(count(&mut c), 0);

        // The next transaction starts clean.
        c.control(Control::BeginWrite).unwrap();
        c.execute("INSERT INTO kept (n) VALUES (2)", &[]).unwrap();
        c.control(Control::Commit).unwrap();
        assert_eq!(count(&mut c), 1);
    }

    /// A database (or role) tuned with `synchronous_commit = off` would let
    /// COMMIT return before the flush, and callers be told SUCCESS for work
    /// a crash can take back: payrail's sessions raise it to `on`, and keep
    /// a setting that is durable already.
    #[test]
    fn commits_are_flushed_even_where_the_database_turns_that_off() {
        let Some(admin) = postgres_admin_url() else {
            return;
        };
        let db = TestDb::postgres(&admin);
        let name = db.sql("SELECT current_database()").remove(0);
        let synchronous_commit = |c: &mut PgConn| c.setting("synchronous_commit").unwrap();
        for (database_setting, session) in [
            ("off", "on"),
            ("local", "local"),
            ("remote_apply", "remote_apply"),
        ] {
            db.sql(&format!(
                "ALTER DATABASE {name} SET synchronous_commit = {database_setting}"
            ));
            // What a plain session there gets, and what payrail's gets.
            let mut plain = postgres::Client::connect(&db.url, postgres::NoTls).unwrap();
            let plain: String = plain
                .query_one("SHOW synchronous_commit", &[])
                .unwrap()
                .get(0);
            assert_eq!(plain, database_setting);
            let mut c = PgConn::connect(&options(db.url.clone())).unwrap();
            assert_eq!(
                synchronous_commit(&mut c),
                session,
                "database: {database_setting}"
            );
        }
    }

    fn options(url: String) -> PgOptions {
        PgOptions {
            url,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(1),
        }
    }

    /// With `sslmode=verify-full` the connection is TLS, and only to a
    /// server whose certificate chains to `sslrootcert`. The CA comes from
    /// the test cluster (`scripts/pg-test-cluster ca DIR`).
    #[test]
    fn tls_is_verified_against_the_given_root_or_refused() {
        let Some(admin) = postgres_admin_url() else {
            return;
        };
        let Ok(ca) = std::env::var("PAYRAIL_TEST_PG_CA") else {
            assert!(
                std::env::var("PAYRAIL_REQUIRE_PG_TLS").map_or(true, |v| v != "1"),
                "PAYRAIL_REQUIRE_PG_TLS=1 but PAYRAIL_TEST_PG_CA is not set"
            );
            eprintln!("skipped: PAYRAIL_TEST_PG_CA is not set (scripts/pg-test-cluster ca DIR)");
            return;
        };
        let db = TestDb::postgres(&admin);
        let ssl = |c: &mut PgConn| {
            c.query(
                "SELECT CASE WHEN ssl THEN 1 ELSE 0 END::bigint FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()[0]
                .int(0)
                .unwrap()
        };
        let with = |query: &str| format!("{}?{query}", db.url);

        let mut c = PgConn::connect(&options(with(&format!(
            "sslmode=verify-full&sslrootcert={ca}"
        ))))
        .unwrap();
        assert_eq!(ssl(&mut c), 1);
        let mut c = PgConn::connect(&options(with(&format!("sslrootcert={ca}")))).unwrap();
        assert_eq!(ssl(&mut c), 1);
        // Without TLS settings: plain, as before.
        let mut c = PgConn::connect(&options(db.url.clone())).unwrap();
        assert_eq!(ssl(&mut c), 0);

        // A server whose certificate another CA signed is not talked to, and
        // neither is one checked against the public roots.
        let other = ca.replace("ca.crt", "other-ca.crt");
        for query in [
            format!("sslmode=verify-full&sslrootcert={other}"),
            "sslmode=require".to_string(),
            "sslmode=prefer".to_string(),
        ] {
            let e = PgConn::connect(&options(with(&query))).err().unwrap();
            assert!(e.detail.contains("certificate"), "{query}: {e}");
        }
    }
}
