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

/// Records that sandbox mode serves this database; see [`was_used`].
pub fn mark_used(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    tx.execute("UPDATE sandbox_clock SET used = 1 WHERE id = 1", &[])?;
    Ok(())
}

/// Whether sandbox mode has ever served this database. Its fixtures include
/// a merchant whose secret is published, so such a database is not one to
/// serve outside sandbox mode.
pub fn was_used(tx: &mut Tx<'_>) -> Result<bool, StoreError> {
    let rows = tx.query("SELECT used FROM sandbox_clock WHERE id = 1", &[])?;
    Ok(match rows.first() {
        Some(row) => row.int(0)? != 0,
        None => false,
    })
}

/// Moves the clock forward by `seconds` (which must not be negative) for every
/// rule, and returns the new time.
pub fn advance_clock(tx: &mut Tx<'_>, seconds: i64) -> Result<Timestamp, StoreError> {
    let ms = seconds
        .checked_mul(1000)
        .filter(|ms| *ms >= 0)
        .ok_or_else(|| StoreError::Internal("clock advance out of range".into()))?;
    tx.execute(
        "UPDATE sandbox_clock SET offset_ms = offset_ms + ?1 WHERE id = 1",
        &[ms.into()],
    )?;
    let now = Timestamp::from_millis(tx.now().millis() + ms);
    tx.set_now(now);
    Ok(now)
}
