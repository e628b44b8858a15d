//! Messages the server "sends" (OTPs by SMS). Without a real gateway they stay
//! here until they are pruned; the sandbox lets tests read them. Text and OTP
//! are sealed.

use payrail_core::Timestamp;

use crate::StoreError;
use crate::tx::Tx;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub to: String,
    pub text: String,
    pub otp: Option<String>,
    pub sent_at: Timestamp,
}

fn context(to: &str, part: &str) -> String {
    format!("outbox:{part}:{to}")
}

pub fn send(tx: &mut Tx<'_>, to: &str, text: &str, otp: Option<&str>) -> Result<(), StoreError> {
    let text_sealed = tx.sealer().seal(&context(to, "text"), text.as_bytes());
    let otp_sealed = otp.map(|o| tx.sealer().seal(&context(to, "otp"), o.as_bytes()));
    let now = tx.now().millis();
    tx.execute(
        "INSERT INTO outbox_messages (recipient, text_sealed, otp_sealed, sent_at) VALUES (?1, ?2, ?3, ?4)",
        &[
            to.into(),
            text_sealed.as_slice().into(),
            otp_sealed.as_deref().into(),
            now.into(),
        ],
    )?;
    Ok(())
}

/// The newest `limit` messages, newest first, for one recipient or for all.
pub fn list(tx: &mut Tx<'_>, to: Option<&str>, limit: i64) -> Result<Vec<Message>, StoreError> {
    let rows = match to {
        Some(to) => tx.query(
            "SELECT recipient, text_sealed, otp_sealed, sent_at FROM outbox_messages
              WHERE recipient = ?1 ORDER BY id DESC LIMIT ?2",
            &[to.into(), limit.into()],
        )?,
        None => tx.query(
            "SELECT recipient, text_sealed, otp_sealed, sent_at FROM outbox_messages
              ORDER BY id DESC LIMIT ?1",
            &[limit.into()],
        )?,
    };
    let open = |tx: &Tx<'_>, to: &str, part: &str, sealed: &[u8]| -> Result<String, StoreError> {
        let plain = tx
            .sealer()
            .open(&context(to, part), sealed)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        String::from_utf8(plain)
            .map_err(|_| StoreError::Internal("sealed text is not UTF-8".into()))
    };
    rows.iter()
        .map(|row| {
            let to = row.text(0)?;
            let text = open(tx, &to, "text", &row.blob(1)?)?;
            let otp = match row.opt_blob(2)? {
                Some(b) => Some(open(tx, &to, "otp", &b)?),
                None => None,
            };
            Ok(Message {
                to,
                text,
                otp,
                sent_at: Timestamp::from_millis(row.int(3)?),
            })
        })
        .collect()
}

/// Deletes up to `limit` messages sent before `before`, oldest first; how
/// many. A message is only worth keeping while what it carries can be used
/// (an OTP lives minutes), and without this the table, sealed OTPs and all,
/// would only grow. Every node prunes; on PostgreSQL each skips the rows
/// another is already deleting, rather than wait for (or deadlock with) its
/// batch.
pub fn prune(tx: &mut Tx<'_>, before: Timestamp, limit: i64) -> Result<u64, StoreError> {
    debug_assert!(limit > 0, "SQLite reads a negative LIMIT as none");
    tx.execute(
        "DELETE FROM outbox_messages WHERE id IN
           (SELECT id FROM outbox_messages WHERE sent_at < ?1 ORDER BY sent_at LIMIT ?2
            /*FOR UPDATE SKIP LOCKED*/)",
        &[before.millis().into(), limit.into()],
    )
}
