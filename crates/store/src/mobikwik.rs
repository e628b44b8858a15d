//! The Mobikwik-style wallet rail's tables. Rules live in the rail; these
//! functions only read and write rows.

use payrail_core::{AccountId, Money, Timestamp};
use secrecy::{ExposeSecret, SecretString};

use crate::StoreError;
use crate::conn::Row;
use crate::tx::Tx;

// ---------------------------------------------------------------- merchants

pub struct MerchantRow {
    pub mid: String,
    pub name: String,
    pub secret: SecretString,
    /// Secret for `/tokenregenerate`, when configured apart from `secret`.
    pub regen_secret: Option<SecretString>,
    pub aggregated_ids: Vec<String>,
    pub account: AccountId,
}

fn secret_context(mid: &str, which: &str) -> String {
    format!("mbk:merchant:{which}:{mid}")
}

/// Inserts a merchant unless the mid exists. Returns whether it was inserted.
pub fn insert_merchant(tx: &mut Tx<'_>, m: &MerchantRow) -> Result<bool, StoreError> {
    let secret = tx.sealer().seal(
        &secret_context(&m.mid, "secret"),
        m.secret.expose_secret().as_bytes(),
    );
    let regen = m.regen_secret.as_ref().map(|s| {
        tx.sealer().seal(
            &secret_context(&m.mid, "regen"),
            s.expose_secret().as_bytes(),
        )
    });
    let now = tx.now().millis();
    let n = tx.execute(
        "INSERT INTO mbk_merchants (mid, name, secret_sealed, regen_secret_sealed, aggregated_ids, account_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (mid) DO NOTHING",
        &[
            m.mid.as_str().into(),
            m.name.as_str().into(),
            secret.as_slice().into(),
            regen.as_deref().into(),
            m.aggregated_ids.join(" ").as_str().into(),
            m.account.0.into(),
            now.into(),
        ],
    )?;
    Ok(n == 1)
}

pub fn merchant(tx: &mut Tx<'_>, mid: &str) -> Result<Option<MerchantRow>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT mid, name, secret_sealed, regen_secret_sealed, aggregated_ids, account_id FROM mbk_merchants WHERE mid = ?1",
        &[mid.into()],
    )?
    else {
        return Ok(None);
    };
    let open = |tx: &Tx<'_>, which: &str, sealed: &[u8]| -> Result<SecretString, StoreError> {
        let plain = tx
            .sealer()
            .open(&secret_context(mid, which), sealed)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        let text = String::from_utf8(plain)
            .map_err(|_| StoreError::Internal("merchant secret is not UTF-8".into()))?;
        Ok(SecretString::from(text))
    };
    let secret = open(tx, "secret", &row.blob(2)?)?;
    let regen_secret = match row.opt_blob(3)? {
        Some(b) => Some(open(tx, "regen", &b)?),
        None => None,
    };
    Ok(Some(MerchantRow {
        mid: row.text(0)?,
        name: row.text(1)?,
        secret,
        regen_secret,
        aggregated_ids: row.text(4)?.split_whitespace().map(String::from).collect(),
        account: AccountId(row.int(5)?),
    }))
}

// ---------------------------------------------------------------- wallets

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletRow {
    pub cell: String,
    pub account: AccountId,
    pub email: Option<String>,
    pub blocked: bool,
}

fn wallet_from_row(row: &Row) -> Result<WalletRow, StoreError> {
    Ok(WalletRow {
        cell: row.text(0)?,
        account: AccountId(row.int(1)?),
        email: row.opt_text(2)?,
        blocked: row.int(3)? != 0,
    })
}

/// Inserts a wallet unless the cell has one. Returns whether it was inserted.
pub fn insert_wallet(
    tx: &mut Tx<'_>,
    cell: &str,
    account: AccountId,
    email: Option<&str>,
) -> Result<bool, StoreError> {
    let now = tx.now().millis();
    let n = tx.execute(
        "INSERT INTO wallets (cell, account_id, email, blocked, created_at) VALUES (?1, ?2, ?3, 0, ?4)
         ON CONFLICT (cell) DO NOTHING",
        &[cell.into(), account.0.into(), email.into(), now.into()],
    )?;
    Ok(n == 1)
}

pub fn wallet(tx: &mut Tx<'_>, cell: &str) -> Result<Option<WalletRow>, StoreError> {
    tx.query_opt(
        "SELECT cell, account_id, email, blocked FROM wallets WHERE cell = ?1",
        &[cell.into()],
    )?
    .map(|r| wallet_from_row(&r))
    .transpose()
}

pub fn set_wallet_blocked(tx: &mut Tx<'_>, cell: &str, blocked: bool) -> Result<bool, StoreError> {
    let n = tx.execute(
        "UPDATE wallets SET blocked = ?2 WHERE cell = ?1",
        &[cell.into(), i64::from(blocked).into()],
    )?;
    Ok(n == 1)
}

// ---------------------------------------------------------------- tokens

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub digest: Vec<u8>,
    pub mid: String,
    pub cell: String,
    pub cap: Money,
    pub lineage: Vec<u8>,
    pub replaced: bool,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
}

pub fn insert_token(tx: &mut Tx<'_>, t: &TokenRow, regenerated: bool) -> Result<bool, StoreError> {
    let n = tx.execute(
        "INSERT INTO mbk_tokens (digest, mid, cell, cap, lineage, regenerated, state, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (digest) DO NOTHING",
        &[
            t.digest.as_slice().into(),
            t.mid.as_str().into(),
            t.cell.as_str().into(),
            t.cap.minor().into(),
            t.lineage.as_slice().into(),
            i64::from(regenerated).into(),
            i64::from(t.replaced).into(),
            t.created_at.millis().into(),
            t.expires_at.millis().into(),
        ],
    )?;
    Ok(n == 1)
}

pub fn token(tx: &mut Tx<'_>, digest: &[u8]) -> Result<Option<TokenRow>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT digest, mid, cell, cap, lineage, state, created_at, expires_at FROM mbk_tokens WHERE digest = ?1",
        &[digest.into()],
    )?
    else {
        return Ok(None);
    };
    Ok(Some(token_from_row(&row)?))
}

/// A token from the first eight columns of `row`, in `token`'s order.
fn token_from_row(row: &Row) -> Result<TokenRow, StoreError> {
    Ok(TokenRow {
        digest: row.blob(0)?,
        mid: row.text(1)?,
        cell: row.text(2)?,
        cap: Money::from_minor(row.int(3)?),
        lineage: row.blob(4)?,
        replaced: row.int(5)? != 0,
        created_at: Timestamp::from_millis(row.int(6)?),
        expires_at: Timestamp::from_millis(row.int(7)?),
    })
}

/// A wallet and what it has available.
pub type WalletWithBalance = (WalletRow, Money);

/// A token, the wallet of its cell and what that wallet has available (as
/// [`crate::ledger::available`] reads it), in one look-up: every debit needs all
/// three, and on PostgreSQL each statement is a round trip.
pub fn token_with_wallet(
    tx: &mut Tx<'_>,
    digest: &[u8],
) -> Result<Option<(TokenRow, Option<WalletWithBalance>)>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT t.digest, t.mid, t.cell, t.cap, t.lineage, t.state, t.created_at, t.expires_at,
                w.cell, w.account_id, w.email, w.blocked,
                a.credits_posted - a.debits_posted - a.debits_pending
                + CAST(COALESCE((SELECT SUM(d.credits_posted - d.debits_posted - d.debits_pending)
                                   FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT)
           FROM mbk_tokens t LEFT JOIN wallets w ON w.cell = t.cell
                LEFT JOIN accounts a ON a.id = w.account_id
          WHERE t.digest = ?1",
        &[digest.into()],
    )?
    else {
        return Ok(None);
    };
    let token = token_from_row(&row)?;
    let wallet = match row.opt_text(8)? {
        Some(cell) => {
            let account = AccountId(row.int(9)?);
            let committed = row
                .opt_int(12)?
                .ok_or_else(|| StoreError::Internal("wallet account missing".into()))?;
            let wallet = WalletRow {
                cell,
                account,
                email: row.opt_text(10)?,
                blocked: row.int(11)? != 0,
            };
            let available = committed.saturating_add(tx.deferred(account).available_change());
            Some((wallet, Money::from_minor(available)))
        }
        None => None,
    };
    Ok(Some((token, wallet)))
}

/// Marks an active token replaced. `false`: it was not active (a concurrent
/// regeneration won), so the caller must not issue a successor.
pub fn replace_token(tx: &mut Tx<'_>, digest: &[u8]) -> Result<bool, StoreError> {
    let n = tx.execute(
        "UPDATE mbk_tokens SET state = 1 WHERE digest = ?1 AND state = 0",
        &[digest.into()],
    )?;
    Ok(n == 1)
}

/// Regenerated tokens of a lineage issued at or after `since`.
pub fn regenerations_since(
    tx: &mut Tx<'_>,
    lineage: &[u8],
    since: Timestamp,
) -> Result<i64, StoreError> {
    tx.query_one(
        "SELECT COUNT(*) FROM mbk_tokens WHERE lineage = ?1 AND regenerated = 1 AND created_at >= ?2",
        &[lineage.into(), since.millis().into()],
    )?
    .int(0)
    .map_err(Into::into)
}

// ---------------------------------------------------------------- OTPs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtpState {
    Open = 0,
    Used = 1,
    Superseded = 2,
    Locked = 3,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtpRow {
    pub id: i64,
    pub digest: Vec<u8>,
    pub failed_attempts: i64,
    pub expires_at: Timestamp,
    /// What it was requested for (None: issued before amounts were kept).
    pub amount: Option<Money>,
}

/// OTPs issued to `cell` (for any merchant) at or after `since`.
///
/// On PostgreSQL this first takes a lock on the cell, held until the batch
/// commits: the count is a limit only if no other writer can count the
/// same rows and issue beside it. The unique open OTP per (mid, cell)
/// already orders two writers issuing for one merchant; for two merchants
/// nothing else would, and nodes could each issue the cell's last allowed
/// OTP. A writer kept waiting past `lock_timeout_ms` runs the unit again.
pub fn otps_issued_since(tx: &mut Tx<'_>, cell: &str, since: Timestamp) -> Result<i64, StoreError> {
    if !tx.serialized() {
        // Two 32-bit keys: a key space apart from MIGRATION_LOCK's 64-bit one.
        tx.query(
            "SELECT 1 FROM pg_advisory_xact_lock(7405320, hashtext(?1))",
            &[cell.into()],
        )?;
    }
    tx.query_one(
        "SELECT COUNT(*) FROM mbk_otps WHERE cell = ?1 AND created_at >= ?2",
        &[cell.into(), since.millis().into()],
    )?
    .int(0)
    .map_err(Into::into)
}

/// Issues an OTP for (mid, cell); any older open one stops working.
///
/// One open OTP per (mid, cell) is a unique index. An OTP issued by another
/// writer and committed after this unit's UPDATE is not closed by it; the
/// insert then finds that OTP and the unit runs again, after it, closing
/// it: the later of two OTPs issued at once is the one that works.
pub fn issue_otp(
    tx: &mut Tx<'_>,
    mid: &str,
    cell: &str,
    digest: &[u8],
    amount: Money,
    expires_at: Timestamp,
) -> Result<i64, StoreError> {
    tx.execute(
        "UPDATE mbk_otps SET state = 2 WHERE mid = ?1 AND cell = ?2 AND state = 0",
        &[mid.into(), cell.into()],
    )?;
    let now = tx.now().millis();
    let row = tx.query_opt(
        "INSERT INTO mbk_otps (mid, cell, digest, failed_attempts, state, created_at, expires_at, amount)
         VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?6)
         ON CONFLICT (mid, cell) WHERE state = 0 DO NOTHING RETURNING id",
        &[
            mid.into(),
            cell.into(),
            digest.into(),
            now.into(),
            expires_at.millis().into(),
            amount.minor().into(),
        ],
    )?;
    match row {
        Some(row) => Ok(row.int(0)?),
        None => Err(tx.conflict("an OTP for this cell was issued at the same time")),
    }
}

/// Deletes up to `limit` expired OTPs issued before `before`, oldest first;
/// returns how many. Once expired and past the hourly request count, an OTP
/// row is read by nothing, and without this the table would only grow. The
/// row's own expiry is checked too: an OTP issued under a longer `otp_ttl`
/// (before a restart, or by another node) keeps working to its end. As with
/// the outbox, a node skips the rows another is already deleting.
pub fn prune_otps(tx: &mut Tx<'_>, before: Timestamp, limit: i64) -> Result<u64, StoreError> {
    let now = tx.now().millis();
    tx.execute(
        "DELETE FROM mbk_otps WHERE id IN
           (SELECT id FROM mbk_otps WHERE created_at < ?1 AND expires_at <= ?2
             ORDER BY created_at LIMIT ?3 /*FOR UPDATE SKIP LOCKED*/)",
        &[before.millis().into(), now.into(), limit.into()],
    )
}

/// The open OTP for (mid, cell), locked for update.
pub fn open_otp(tx: &mut Tx<'_>, mid: &str, cell: &str) -> Result<Option<OtpRow>, StoreError> {
    tx.query_opt(
        "SELECT id, digest, failed_attempts, expires_at, amount FROM mbk_otps
          WHERE mid = ?1 AND cell = ?2 AND state = 0 ORDER BY id DESC LIMIT 1 /*FOR UPDATE*/",
        &[mid.into(), cell.into()],
    )?
    .map(|row| {
        Ok(OtpRow {
            id: row.int(0)?,
            digest: row.blob(1)?,
            failed_attempts: row.int(2)?,
            expires_at: Timestamp::from_millis(row.int(3)?),
            amount: row.opt_int(4)?.map(Money::from_minor),
        })
    })
    .transpose()
}

pub fn set_otp_state(tx: &mut Tx<'_>, id: i64, state: OtpState) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE mbk_otps SET state = ?2 WHERE id = ?1",
        &[id.into(), (state as i64).into()],
    )?;
    Ok(())
}

/// Counts a wrong attempt; returns the new number of failures.
pub fn fail_otp(tx: &mut Tx<'_>, id: i64) -> Result<i64, StoreError> {
    Ok(tx
        .query_one(
            "UPDATE mbk_otps SET failed_attempts = failed_attempts + 1 WHERE id = ?1 RETURNING failed_attempts",
            &[id.into()],
        )?
        .int(0)?)
}

// ---------------------------------------------------------------- coupons

/// Inserts a coupon unless the code exists. Returns whether it was inserted.
pub fn insert_coupon(tx: &mut Tx<'_>, code: &str, basis_points: u32) -> Result<bool, StoreError> {
    let now = tx.now().millis();
    Ok(tx.execute(
        "INSERT INTO mbk_coupons (code, basis_points, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (code) DO NOTHING",
        &[code.into(), i64::from(basis_points).into(), now.into()],
    )? == 1)
}

pub fn coupon(tx: &mut Tx<'_>, code: &str) -> Result<Option<u32>, StoreError> {
    match tx.query_opt(
        "SELECT basis_points FROM mbk_coupons WHERE code = ?1",
        &[code.into()],
    )? {
        Some(row) => Ok(Some(row.int(0)? as u32)),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------- orders

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRow {
    pub mid: String,
    pub orderid: String,
    pub txnid: String,
    pub cell: String,
    pub amount: Money,
    pub cashback: Money,
    pub coupon: Option<String>,
    pub aggregated_id: Option<String>,
    pub refunded: Money,
    pub refunded_cashback: Money,
    pub created_at: Timestamp,
}

/// Records a debit unless the merchant already used the orderid. Returns
/// whether it was recorded.
pub fn insert_order(tx: &mut Tx<'_>, o: &OrderRow) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "INSERT INTO mbk_orders (mid, orderid, txnid, cell, amount, cashback, coupon, aggregated_id, refunded, refunded_cashback, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, 0, ?9) ON CONFLICT (mid, orderid) DO NOTHING",
        &[
            o.mid.as_str().into(),
            o.orderid.as_str().into(),
            o.txnid.as_str().into(),
            o.cell.as_str().into(),
            o.amount.minor().into(),
            o.cashback.minor().into(),
            o.coupon.as_deref().into(),
            o.aggregated_id.as_deref().into(),
            o.created_at.millis().into(),
        ],
    )? == 1)
}

macro_rules! select_order {
    ($where:literal) => {
        concat!(
            "SELECT mid, orderid, txnid, cell, amount, cashback, coupon, aggregated_id, refunded, refunded_cashback, created_at FROM mbk_orders ",
            $where
        )
    };
}

fn order_from_row(row: &Row) -> Result<OrderRow, StoreError> {
    Ok(OrderRow {
        mid: row.text(0)?,
        orderid: row.text(1)?,
        txnid: row.text(2)?,
        cell: row.text(3)?,
        amount: Money::from_minor(row.int(4)?),
        cashback: Money::from_minor(row.int(5)?),
        coupon: row.opt_text(6)?,
        aggregated_id: row.opt_text(7)?,
        refunded: Money::from_minor(row.int(8)?),
        refunded_cashback: Money::from_minor(row.int(9)?),
        created_at: Timestamp::from_millis(row.int(10)?),
    })
}

/// One order of `mid` by the statement's second parameter.
fn order_where(
    tx: &mut Tx<'_>,
    sql: &'static str,
    mid: &str,
    key: &str,
) -> Result<Option<OrderRow>, StoreError> {
    tx.query_opt(sql, &[mid.into(), key.into()])?
        .map(|r| order_from_row(&r))
        .transpose()
}

pub fn order(tx: &mut Tx<'_>, mid: &str, orderid: &str) -> Result<Option<OrderRow>, StoreError> {
    order_where(
        tx,
        select_order!("WHERE mid = ?1 AND orderid = ?2"),
        mid,
        orderid,
    )
}

/// The order, locked until the transaction ends: for work that computes
/// from its totals. `NO KEY UPDATE` (PostgreSQL; SQLite has one writer):
/// a refund claims its refundid before it locks the order, and that
/// insert's foreign-key check holds a KEY SHARE lock on the order row,
/// which `FOR UPDATE` would wait for. Two refunds of one order on two
/// writers would each wait for the other's claim until the lock timeout.
pub fn lock_order(
    tx: &mut Tx<'_>,
    mid: &str,
    orderid: &str,
) -> Result<Option<OrderRow>, StoreError> {
    order_where(
        tx,
        select_order!("WHERE mid = ?1 AND orderid = ?2 /*FOR NO KEY UPDATE*/"),
        mid,
        orderid,
    )
}

pub fn order_by_txnid(
    tx: &mut Tx<'_>,
    mid: &str,
    txnid: &str,
) -> Result<Option<OrderRow>, StoreError> {
    order_where(
        tx,
        select_order!("WHERE mid = ?1 AND txnid = ?2"),
        mid,
        txnid,
    )
}

/// Adds a refund to an order's totals if they stay within the order.
/// `false`: it would exceed what was paid.
pub fn add_refund_to_order(
    tx: &mut Tx<'_>,
    mid: &str,
    orderid: &str,
    amount: Money,
    cashback: Money,
) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE mbk_orders SET refunded = refunded + ?3, refunded_cashback = refunded_cashback + ?4
          WHERE mid = ?1 AND orderid = ?2 AND refunded + ?3 <= amount AND refunded_cashback + ?4 <= cashback",
        &[mid.into(), orderid.into(), amount.minor().into(), cashback.minor().into()],
    )? == 1)
}

// ---------------------------------------------------------------- refunds

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundRow {
    pub mid: String,
    pub refundid: String,
    pub orderid: String,
    pub amount: Money,
    pub refid: String,
    pub created_at: Timestamp,
}

/// Records a refund unless the refundid was used. Returns whether it was.
pub fn insert_refund(tx: &mut Tx<'_>, r: &RefundRow) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "INSERT INTO mbk_refunds (mid, refundid, orderid, amount, refid, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (mid, refundid) DO NOTHING",
        &[
            r.mid.as_str().into(),
            r.refundid.as_str().into(),
            r.orderid.as_str().into(),
            r.amount.minor().into(),
            r.refid.as_str().into(),
            r.created_at.millis().into(),
        ],
    )? == 1)
}

pub fn refund(tx: &mut Tx<'_>, mid: &str, refundid: &str) -> Result<Option<RefundRow>, StoreError> {
    tx.query_opt(
        "SELECT mid, refundid, orderid, amount, refid, created_at FROM mbk_refunds WHERE mid = ?1 AND refundid = ?2",
        &[mid.into(), refundid.into()],
    )?
    .map(|row| {
        Ok(RefundRow {
            mid: row.text(0)?,
            refundid: row.text(1)?,
            orderid: row.text(2)?,
            amount: Money::from_minor(row.int(3)?),
            refid: row.text(4)?,
            created_at: Timestamp::from_millis(row.int(5)?),
        })
    })
    .transpose()
}
