//! The sandbox clock: an offset added to the real clock, kept in the database
//! so that every node (and every restart) sees the same time.

use payrail_core::Timestamp;

use crate::StoreError;
use crate::conn::Conn;
use crate::tx::Tx;

pub(crate) fn clock_offset_ms(conn: &mut dyn Conn) -> Result<i64, StoreError> {
    let rows = conn.query("SELECT offset_ms FROM sandbox_clock WHERE id = 1", &[])?;
    match rows.first() {
        Some(row) => Ok(row.int(0)?),
        None => Ok(0),
    }
}

/// Which kind of server serves a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Sandbox,
    Production,
}

/// Records that a server in `mode` serves this database, unless one in the
/// other mode has: then nothing is written and that mode is returned.
///
/// A database serves one mode for good. Sandbox fixtures include a merchant
/// whose secret is published, so production must not serve a database
/// sandbox mode has; and sandbox mode would put them into a live ledger and
/// show its OTP messages to the published sandbox admin token.
///
/// One conditional statement both checks and marks: two nodes starting at
/// once in different modes cannot both read "unclaimed" and go on (on
/// PostgreSQL the second UPDATE waits for the first, then sees its mark).
pub fn claim(tx: &mut Tx<'_>, mode: Mode) -> Result<Option<Mode>, StoreError> {
    let claimed = match mode {
        Mode::Sandbox => tx.execute(
            "UPDATE sandbox_clock SET used = 1 WHERE id = 1 AND production = 0",
            &[],
        )?,
        Mode::Production => tx.execute(
            "UPDATE sandbox_clock SET production = 1 WHERE id = 1 AND used = 0",
            &[],
        )?,
    };
    Ok(match (claimed, mode) {
        (0, Mode::Sandbox) => Some(Mode::Production),
        (0, Mode::Production) => Some(Mode::Sandbox),
        _ => None,
    })
}

/// The latest a move may take the sandbox clock to: 9000-01-01T00:00:00Z
/// (real time still moves it on from there).
///
/// Far past the reach of any rule, and far enough before the year 10000
/// that every time worked out from it (a token's expiry, a retention
/// window) still has the four-digit year RFC 3339 writes. Without a bound,
/// repeated moves of the most allowed at once would take every timestamp
/// the admin API shows past what it can write.
pub const LATEST: Timestamp = Timestamp::from_millis(221_845_392_000_000);

/// Moves the clock forward by `seconds` (which must not be negative) for every
/// rule, and returns the new time; `None`, with nothing changed, if that
/// would take it past [`LATEST`].
///
/// The check and the move are one statement on the offset the database
/// holds: with several writers (PostgreSQL) another may have moved the
/// clock since this unit's batch read it, and two moves that each fit on
/// their own must not pass the bound together.
pub fn advance_clock(tx: &mut Tx<'_>, seconds: i64) -> Result<Option<Timestamp>, StoreError> {
    let ms = seconds
        .checked_mul(1000)
        .filter(|ms| *ms >= 0)
        .ok_or_else(|| StoreError::Internal("clock advance out of range".into()))?;
    let wall = tx.time().wall.millis();
    let Some(most) = LATEST
        .millis()
        .checked_sub(wall)
        .and_then(|m| m.checked_sub(ms))
    else {
        return Ok(None);
    };
    let moved = tx.query(
        "UPDATE sandbox_clock SET offset_ms = offset_ms + ?1
          WHERE id = 1 AND offset_ms <= ?2
          RETURNING offset_ms",
        &[ms.into(), most.into()],
    )?;
    let Some(row) = moved.first() else {
        return Ok(None);
    };
    tx.set_clock_offset(row.int(0)?);
    Ok(Some(tx.now()))
}
