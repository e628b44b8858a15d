//! The ledger, persisted: accounts, transfers, expiry and self-verification.
//!
//! How the rules are enforced, on both engines:
//! - idempotency: `UNIQUE (scope, idem_key)` with `ON CONFLICT DO NOTHING`; a
//!   conflicting insert waits for the other writer and then reads its row;
//! - never negative: a debit is one conditional `UPDATE ... WHERE available
//!   covers it`, which on PostgreSQL locks the row and re-checks after any
//!   concurrent writer commits (READ COMMITTED re-evaluation);
//! - one currency: composite foreign keys `(account, currency)`;
//! - a reservation resolves once: a unique index on `pending_id`, and the
//!   pending row is locked while it is resolved.

use std::time::Duration;

use payrail_core::ledger::{check_resolvable, effects};
use payrail_core::{
    AccountFlags, AccountId, Balances, Currency, Delta, LedgerError, Money, PendingState,
    Timestamp, TransferId, TransferKind, TransferOp, TransferRecord, TransferRequest,
};

use crate::StoreError;
use crate::conn::{DbErrorKind, Row};
use crate::tx::{Deferred, Tx};

/// An account with its totals, including changes queued in this batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub code: String,
    pub currency: Currency,
    pub flags: AccountFlags,
    pub balances: Balances,
}

/// A transfer's outcome; `replayed` when the key had already been used for
/// the same transfer, which is then returned unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub record: TransferRecord,
    pub replayed: bool,
}

/// A ledger operation either is refused by a rule or fails in the store.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LedgerOpError {
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<crate::conn::DbError> for LedgerOpError {
    fn from(e: crate::conn::DbError) -> Self {
        LedgerOpError::Store(e.into())
    }
}

/// `SELECT` of every account column, in the order `account_from_row` reads.
/// `SELECT` of every account column, in the order `account_from_row` reads,
/// with the account's delta rows added to its totals (see `account_deltas`).
macro_rules! select_account {
    ($where:literal) => {
        concat!(
            "SELECT a.id, a.code, a.currency, a.flags, ",
            "CAST(a.debits_pending + COALESCE((SELECT SUM(d.debits_pending) FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT), ",
            "CAST(a.debits_posted + COALESCE((SELECT SUM(d.debits_posted) FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT), ",
            "CAST(a.credits_pending + COALESCE((SELECT SUM(d.credits_pending) FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT), ",
            "CAST(a.credits_posted + COALESCE((SELECT SUM(d.credits_posted) FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT) ",
            "FROM accounts a ",
            $where
        )
    };
}

/// Every account's totals including its delta rows, as `totals`, for verify.
macro_rules! with_totals {
    ($query:literal) => {
        concat!(
            "WITH totals AS (
                 SELECT a.id, a.code, a.currency, a.flags,
                        CAST(a.debits_pending + COALESCE(SUM(d.debits_pending), 0) AS BIGINT) AS debits_pending,
                        CAST(a.debits_posted + COALESCE(SUM(d.debits_posted), 0) AS BIGINT) AS debits_posted,
                        CAST(a.credits_pending + COALESCE(SUM(d.credits_pending), 0) AS BIGINT) AS credits_pending,
                        CAST(a.credits_posted + COALESCE(SUM(d.credits_posted), 0) AS BIGINT) AS credits_posted
                   FROM accounts a LEFT JOIN account_deltas d ON d.account_id = a.id
                  GROUP BY a.id, a.code, a.currency, a.flags,
                           a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted
             ) ",
            $query
        )
    };
}

/// `SELECT` of every transfer column, in the order `transfer_from_row` reads.
macro_rules! select_transfer {
    ($where:literal) => {
        concat!(
            "SELECT id, scope, idem_key, kind, debit_account, credit_account, currency, amount, pending_id, state, timeout_ms, expires_at, created_at FROM transfers ",
            $where
        )
    };
}

fn account_from_row(tx: &Tx<'_>, row: &Row) -> Result<Account, StoreError> {
    let id = AccountId(row.int(0)?);
    let currency = row.text(2)?;
    let mut balances = Balances {
        debits_pending: row.int(4)?,
        debits_posted: row.int(5)?,
        credits_pending: row.int(6)?,
        credits_posted: row.int(7)?,
    };
    balances.apply(&tx.deferred(id));
    Ok(Account {
        id,
        code: row.text(1)?,
        currency: Currency::parse(&currency)
            .ok_or_else(|| StoreError::Internal(format!("bad currency {currency:?}")))?,
        flags: AccountFlags::from_bits(row.int(3)? as u32),
        balances,
    })
}

/// Opens the account named `code`, or returns it if it already exists with
/// the same currency and flags.
pub fn open_account(
    tx: &mut Tx<'_>,
    code: &str,
    currency: Currency,
    flags: AccountFlags,
) -> Result<AccountId, LedgerOpError> {
    let now = tx.now().millis();
    let inserted = tx.query_opt(
        "INSERT INTO accounts (code, currency, flags, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (code) DO NOTHING RETURNING id",
        &[
            code.into(),
            currency.as_str().into(),
            i64::from(flags.bits()).into(),
            now.into(),
        ],
    )?;
    if let Some(row) = inserted {
        return Ok(AccountId(row.int(0)?));
    }
    let existing = account_by_code(tx, code)?
        .ok_or_else(|| StoreError::Internal(format!("account {code} vanished")))?;
    if existing.currency != currency {
        return Err(LedgerError::IdempotencyConflict { field: "currency" }.into());
    }
    if existing.flags != flags {
        return Err(LedgerError::IdempotencyConflict { field: "flags" }.into());
    }
    Ok(existing.id)
}

pub fn account(tx: &mut Tx<'_>, id: AccountId) -> Result<Option<Account>, StoreError> {
    match tx.query_opt(select_account!("WHERE a.id = ?1"), &[id.0.into()])? {
        Some(row) => Ok(Some(account_from_row(tx, &row)?)),
        None => Ok(None),
    }
}

/// What the account can spend now: its available balance with its delta rows
/// and this batch's queued changes. The one figure a debit's check needs,
/// read without the account's other columns (a debit reads it every time).
pub fn available(tx: &mut Tx<'_>, id: AccountId) -> Result<Option<Money>, StoreError> {
    let Some(row) = tx.query_opt(
        "SELECT a.credits_posted - a.debits_posted - a.debits_pending
                + CAST(COALESCE((SELECT SUM(d.credits_posted - d.debits_posted - d.debits_pending)
                                   FROM account_deltas d WHERE d.account_id = a.id), 0) AS BIGINT)
           FROM accounts a WHERE a.id = ?1",
        &[id.0.into()],
    )?
    else {
        return Ok(None);
    };
    let available = row.int(0)? + tx.deferred(id).available_change();
    Ok(Some(Money::from_minor(available)))
}

pub fn account_by_code(tx: &mut Tx<'_>, code: &str) -> Result<Option<Account>, StoreError> {
    match tx.query_opt(select_account!("WHERE a.code = ?1"), &[code.into()])? {
        Some(row) => Ok(Some(account_from_row(tx, &row)?)),
        None => Ok(None),
    }
}

fn transfer_from_row(row: &Row) -> Result<TransferRecord, StoreError> {
    let bad = |what: &str| StoreError::Internal(format!("bad transfer {what}"));
    Ok(TransferRecord {
        id: TransferId(row.int(0)?),
        scope: row.text(1)?,
        key: row.text(2)?,
        kind: TransferKind::from_code(row.int(3)?).ok_or_else(|| bad("kind"))?,
        debit: AccountId(row.int(4)?),
        credit: AccountId(row.int(5)?),
        currency: Currency::parse(&row.text(6)?).ok_or_else(|| bad("currency"))?,
        amount: Money::from_minor(row.int(7)?),
        pending_id: row.opt_int(8)?.map(TransferId),
        state: PendingState::from_code(row.int(9)?).ok_or_else(|| bad("state"))?,
        timeout_ms: row.opt_int(10)?,
        expires_at: row.opt_int(11)?.map(Timestamp::from_millis),
        created_at: Timestamp::from_millis(row.int(12)?),
    })
}

pub fn transfer_by_key(
    tx: &mut Tx<'_>,
    scope: &str,
    key: &str,
) -> Result<Option<TransferRecord>, StoreError> {
    tx.query_opt(
        select_transfer!("WHERE scope = ?1 AND idem_key = ?2"),
        &[scope.into(), key.into()],
    )?
    .map(|r| transfer_from_row(&r))
    .transpose()
}

pub fn get_transfer(tx: &mut Tx<'_>, id: TransferId) -> Result<Option<TransferRecord>, StoreError> {
    tx.query_opt(select_transfer!("WHERE id = ?1"), &[id.0.into()])?
        .map(|r| transfer_from_row(&r))
        .transpose()
}

/// Reads a pending transfer and, on PostgreSQL, locks it until the commit.
fn lock_transfer(tx: &mut Tx<'_>, id: TransferId) -> Result<Option<TransferRecord>, StoreError> {
    tx.query_opt(
        select_transfer!("WHERE id = ?1 /*FOR UPDATE*/"),
        &[id.0.into()],
    )?
    .map(|r| transfer_from_row(&r))
    .transpose()
}

/// Inserts a transfer row unless its key is taken. `None`: the key is taken.
#[allow(clippy::too_many_arguments)]
fn insert_transfer(
    tx: &mut Tx<'_>,
    req: &TransferRequest,
    kind: TransferKind,
    debit: AccountId,
    credit: AccountId,
    currency: Currency,
    amount: Money,
    pending_id: Option<TransferId>,
    timeout_ms: Option<i64>,
    expires_at: Option<Timestamp>,
) -> Result<Option<TransferId>, LedgerOpError> {
    let now = tx.now().millis();
    let id = tx
        .insert_id(
            "INSERT INTO transfers (scope, idem_key, kind, debit_account, credit_account, currency, amount, pending_id, state, timeout_ms, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, ?10, ?11)
             ON CONFLICT (scope, idem_key) DO NOTHING /*RETURNING id*/",
            &[
                req.scope.as_str().into(),
                req.key.as_str().into(),
                kind.code().into(),
                debit.0.into(),
                credit.0.into(),
                currency.as_str().into(),
                amount.minor().into(),
                pending_id.map(|p| p.0).into(),
                timeout_ms.into(),
                expires_at.map(|t| t.millis()).into(),
                now.into(),
            ],
        )
        .map_err(|e| match e {
            StoreError::Constraint(d) if d.kind == DbErrorKind::ForeignKeyViolation => {
                LedgerOpError::Rejected(LedgerError::AccountNotFound)
            }
            e => LedgerOpError::Store(e),
        })?;
    Ok(id.map(TransferId))
}

/// The key is taken: a faithful replay gets the original, anything else is refused.
fn replay(tx: &mut Tx<'_>, req: &TransferRequest) -> Result<Transfer, LedgerOpError> {
    let record = transfer_by_key(tx, &req.scope, &req.key)?
        .ok_or_else(|| StoreError::Internal("conflicting idempotency key not found".into()))?;
    if let Some(field) = record.mismatch(req) {
        return Err(LedgerError::IdempotencyConflict { field }.into());
    }
    Ok(Transfer {
        record,
        replayed: true,
    })
}

/// What became of a checked change to an account.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Yes,
    /// A never-negative account cannot cover it.
    Uncovered,
    /// A total would pass `i64::MAX` (see [`ceilings`]).
    OutOfRange,
}

/// The largest value each total may have before `delta` is added to it.
///
/// Totals are i64 in both engines, and neither can be trusted to stop at the
/// edge: SQLite turns an integer sum past `i64::MAX` into a REAL (a float in a
/// money column), PostgreSQL fails the statement. So the checked update and
/// SQLite's batch-end update carry these as conditions, and an addition that
/// would not fit changes nothing. (PostgreSQL's delta rows and fold keep the
/// engine's own error: it stores no wrong number.)
fn ceilings(delta: &Delta) -> [i64; 4] {
    [
        delta.debits_pending,
        delta.debits_posted,
        delta.credits_pending,
        delta.credits_posted,
    ]
    .map(|d| i64::MAX - d.max(0))
}

/// With several writers, a debit of an account without the never-negative
/// rule is queued to the batch's end, like a credit, while the account's
/// debits (reserved and posted together) stay at or below this; past it,
/// it takes the checked update. Accounts that issue money (the issuance and
/// promotions accounts) are debited by every wallet opening, admin credit
/// and cashback: checked, each such debit locked the one row until its
/// batch committed, and writers took turns on it.
///
/// A queued change cannot be refused one by one: a total pushed past
/// `i64::MAX` would fail the account's fold instead (PostgreSQL stores no
/// wrong number). What a writer has queued but not committed is unseen by
/// the others, but each keeps what it sees, with its own batch's changes,
/// within this limit; so W writers with open batches take the sum to at
/// most W times it, and this one (`i64::MAX / 4096`, 2.2e15 minor units)
/// leaves room for 4,096 writers over all nodes. The sum, not each total:
/// posting a reservation moves its amount from reserved to posted unchecked.
/// The totals only grow (but for voids): past the limit over its life, an
/// account's debits are all checked, at two more round trips each.
///
/// Never-negative accounts are never queued, so their delta rows still only
/// raise what they have available, and the checked update's floor, which
/// may miss a delta row committed meanwhile, stays conservative (migration
/// 0004 says this of every delta row; migrations are digested, not edited).
pub const QUEUED_DEBIT_LIMIT: i64 = i64::MAX >> 12;

/// PostgreSQL: may `delta`, which lowers what `account` (an account without
/// the never-negative rule) has available, be queued? Only if its debits,
/// with the committed delta rows and this batch's queued changes, stay
/// within [`QUEUED_DEBIT_LIMIT`]. One statement reads the row and its delta
/// rows, so a fold committing meanwhile is seen whole or not at all.
fn may_queue_debit(tx: &mut Tx<'_>, account: AccountId, delta: &Delta) -> Result<bool, StoreError> {
    let mut landing = tx.deferred(account);
    landing.add(delta);
    let ceiling = QUEUED_DEBIT_LIMIT
        .saturating_sub(landing.debits_pending.max(0))
        .saturating_sub(landing.debits_posted.max(0));
    let roomy = tx.query_opt(
        "SELECT a.id FROM accounts a LEFT JOIN account_deltas d ON d.account_id = a.id
          WHERE a.id = ?1 GROUP BY a.id
         HAVING CAST(a.debits_pending AS NUMERIC) + a.debits_posted
                + COALESCE(SUM(CAST(d.debits_pending AS NUMERIC) + d.debits_posted), 0)
                <= CAST(?2 AS BIGINT)",
        &[account.0.into(), ceiling.into()],
    )?;
    Ok(roomy.is_some())
}

/// PostgreSQL: the debits in `account`'s committed delta rows (negative
/// sums, from releases, as 0). Once an account without the never-negative
/// rule is past [`QUEUED_DEBIT_LIMIT`], its checked debits count them too:
/// debits queued before it got there may not be folded yet.
fn queued_debits(tx: &mut Tx<'_>, account: AccountId) -> Result<(i64, i64), StoreError> {
    let row = tx.query_one(
        "SELECT CAST(LEAST(COALESCE(SUM(debits_pending), 0), 9223372036854775807) AS BIGINT),
                CAST(LEAST(COALESCE(SUM(debits_posted), 0), 9223372036854775807) AS BIGINT)
           FROM account_deltas WHERE account_id = ?1",
        &[account.0.into()],
    )?;
    Ok((row.int(0)?.max(0), row.int(1)?.max(0)))
}

/// Applies `delta` to `account`: at once and only if the account's rules allow
/// it when it lowers what is available; otherwise queued for the batch's end.
/// On PostgreSQL, a debit of an account without the never-negative rule is
/// queued too, within [`QUEUED_DEBIT_LIMIT`].
fn apply_delta(tx: &mut Tx<'_>, account: AccountId, delta: Delta) -> Result<Applied, StoreError> {
    if !delta.needs_check() {
        tx.defer(account, delta);
        return Ok(Applied::Yes);
    }
    // Queued credits to this account count: they commit with this change.
    // So do committed delta rows; one committed after this statement began
    // is missed, which can only refuse a debit that would have fitted.
    //
    // With several writers the row is locked first, in its own statement.
    // An UPDATE that waits for the row re-checks its condition against the
    // row's newest version but reads the delta rows as of its start: after a
    // fold (which moves delta rows into the row) it would count that money
    // twice. The statement after the lock starts after the fold committed
    // and sees both halves of it.
    //
    // Only a never-negative account's row is locked by the first statement
    // (a locking read locks only the rows it returns); any other account's
    // debit is queued if it may be (see [`QUEUED_DEBIT_LIMIT`]), else locked.
    let mut unfolded = (0, 0);
    if !tx.serialized() {
        let locked = tx
            .query_opt(
                "SELECT id FROM accounts WHERE id = ?1 AND (flags & 1) = 1 FOR NO KEY UPDATE",
                &[account.0.into()],
            )?
            .is_some();
        if !locked {
            if may_queue_debit(tx, account, &delta)? {
                tx.defer(account, delta);
                return Ok(Applied::Yes);
            }
            tx.query_opt(
                "SELECT id FROM accounts WHERE id = ?1 FOR NO KEY UPDATE",
                &[account.0.into()],
            )?;
            unfolded = queued_debits(tx, account)?;
        }
    }
    let floor = tx.deferred(account).available_change() + delta.available_change();
    // With this batch's queued changes to the account, which land at the
    // batch's end (delta rows committed earlier, on PostgreSQL, are not
    // counted: their sum fails reads instead).
    let mut landing = tx.deferred(account);
    landing.add(&delta);
    let [dp, dpo, cp, cpo] = ceilings(&landing);
    let (dp, dpo) = (
        dp.saturating_sub(unfolded.0),
        dpo.saturating_sub(unfolded.1),
    );
    let changed = tx.execute(
        "UPDATE accounts
            SET debits_pending = debits_pending + ?2, debits_posted = debits_posted + ?3,
                credits_pending = credits_pending + ?4, credits_posted = credits_posted + ?5
          WHERE id = ?1
            AND debits_pending <= ?7 AND debits_posted <= ?8
            AND credits_pending <= ?9 AND credits_posted <= ?10
            AND ((flags & 1) = 0
                 OR credits_posted - debits_posted - debits_pending
                    + CAST(COALESCE((SELECT SUM(d.credits_posted - d.debits_posted - d.debits_pending)
                                       FROM account_deltas d WHERE d.account_id = ?1), 0) AS BIGINT)
                    + ?6 >= 0)",
        &[
            account.0.into(),
            delta.debits_pending.into(),
            delta.debits_posted.into(),
            delta.credits_pending.into(),
            delta.credits_posted.into(),
            floor.into(),
            dp.into(),
            dpo.into(),
            cp.into(),
            cpo.into(),
        ],
    )?;
    if changed == 1 {
        return Ok(Applied::Yes);
    }
    // Refused: the cheap question first, the rare one only now.
    let out_of_range = tx.query_opt(
        "SELECT id FROM accounts
          WHERE id = ?1 AND NOT (debits_pending <= ?2 AND debits_posted <= ?3
                                 AND credits_pending <= ?4 AND credits_posted <= ?5)",
        &[
            account.0.into(),
            dp.into(),
            dpo.into(),
            cp.into(),
            cpo.into(),
        ],
    )?;
    Ok(if out_of_range.is_some() {
        Applied::OutOfRange
    } else {
        Applied::Uncovered
    })
}

/// Executes a transfer request.
pub fn transfer(tx: &mut Tx<'_>, req: &TransferRequest) -> Result<Transfer, LedgerOpError> {
    req.validate()?;
    match req.op {
        TransferOp::Single {
            debit,
            credit,
            currency,
            amount,
        } => create(
            tx,
            req,
            TransferKind::Single,
            debit,
            credit,
            currency,
            amount,
            None,
        ),
        TransferOp::Reserve {
            debit,
            credit,
            currency,
            amount,
            timeout,
        } => create(
            tx,
            req,
            TransferKind::Pending,
            debit,
            credit,
            currency,
            amount,
            timeout,
        ),
        TransferOp::Post { pending, amount } => resolve(tx, req, pending, Some(amount)),
        TransferOp::Void { pending } => resolve(tx, req, pending, None),
    }
}

#[allow(clippy::too_many_arguments)]
fn create(
    tx: &mut Tx<'_>,
    req: &TransferRequest,
    kind: TransferKind,
    debit: AccountId,
    credit: AccountId,
    currency: Currency,
    amount: Money,
    timeout: Option<Duration>,
) -> Result<Transfer, LedgerOpError> {
    let timeout_ms = timeout.map(|t| t.as_millis() as i64);
    let expires_at = timeout.map(|t| tx.now().plus(t));
    let Some(id) = insert_transfer(
        tx, req, kind, debit, credit, currency, amount, None, timeout_ms, expires_at,
    )?
    else {
        return replay(tx, req);
    };
    let (debit_delta, credit_delta) = effects(kind, amount, None);
    let refusal = match apply_delta(tx, debit, debit_delta)? {
        Applied::Yes => None,
        Applied::Uncovered => Some(LedgerError::InsufficientFunds(debit)),
        Applied::OutOfRange => Some(LedgerError::TotalOverflow(debit)),
    };
    if let Some(refusal) = refusal {
        // Keep the refusal atomic on its own: the caller may go on and commit
        // other work, so the row inserted above must not survive.
        tx.execute("DELETE FROM transfers WHERE id = ?1", &[id.0.into()])?;
        return Err(refusal.into());
    }
    let applied = apply_delta(tx, credit, credit_delta)?;
    debug_assert_eq!(applied, Applied::Yes, "credits never need a check");
    Ok(Transfer {
        record: TransferRecord {
            id,
            scope: req.scope.clone(),
            key: req.key.clone(),
            kind,
            debit,
            credit,
            currency,
            amount,
            pending_id: None,
            state: PendingState::Pending,
            timeout_ms,
            expires_at,
            created_at: tx.now(),
        },
        replayed: false,
    })
}

/// Posts (`amount` given) or voids (`None`) a pending transfer.
fn resolve(
    tx: &mut Tx<'_>,
    req: &TransferRequest,
    pending_id: TransferId,
    amount: Option<Money>,
) -> Result<Transfer, LedgerOpError> {
    // A replay must get its original answer even though the reservation is
    // no longer open, so the key is looked up before the reservation's state.
    if transfer_by_key(tx, &req.scope, &req.key)?.is_some() {
        return replay(tx, req);
    }
    let pending = lock_transfer(tx, pending_id)?.ok_or(LedgerError::PendingNotFound)?;
    if let Err(e) = check_resolvable(&pending, tx.now()) {
        // With several writers, the same request on another one may have
        // resolved it while this one waited for the lock: its result, then.
        if transfer_by_key(tx, &req.scope, &req.key)?.is_some() {
            return replay(tx, req);
        }
        return Err(e.into());
    }
    let (kind, state, amount) = match amount {
        Some(a) if a > pending.amount => return Err(LedgerError::ExceedsPending.into()),
        Some(a) => (TransferKind::Post, PendingState::Posted, a),
        None => (TransferKind::Void, PendingState::Voided, pending.amount),
    };
    let Some(id) = insert_transfer(
        tx,
        req,
        kind,
        pending.debit,
        pending.credit,
        pending.currency,
        amount,
        Some(pending.id),
        None,
        None,
    )?
    else {
        return replay(tx, req);
    };
    settle_pending(tx, &pending, kind, state, amount)?;
    Ok(Transfer {
        record: TransferRecord {
            id,
            scope: req.scope.clone(),
            key: req.key.clone(),
            kind,
            debit: pending.debit,
            credit: pending.credit,
            currency: pending.currency,
            amount,
            pending_id: Some(pending.id),
            state: PendingState::Pending,
            timeout_ms: None,
            expires_at: None,
            created_at: tx.now(),
        },
        replayed: false,
    })
}

/// Marks a reservation resolved and releases (and for posts, moves) its money.
fn settle_pending(
    tx: &mut Tx<'_>,
    pending: &TransferRecord,
    kind: TransferKind,
    state: PendingState,
    amount: Money,
) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE transfers SET state = ?2 WHERE id = ?1 AND state = 0",
        &[pending.id.0.into(), state.code().into()],
    )?;
    if changed != 1 {
        return Err(StoreError::Internal(format!(
            "{} changed while locked",
            pending.id
        )));
    }
    let posted = if kind == TransferKind::Post {
        amount
    } else {
        Money::ZERO
    };
    let (debit_delta, credit_delta) = effects(kind, posted, Some(pending));
    // Resolving only ever releases reserved money: no rule can refuse it.
    debug_assert!(!debit_delta.needs_check() && !credit_delta.needs_check());
    tx.defer(pending.debit, debit_delta);
    tx.defer(pending.credit, credit_delta);
    Ok(())
}

/// The scope of the ledger's own expiry transfers.
pub const EXPIRY_SCOPE: &str = "ledger.expiry";

/// What one pass of housekeeping did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Rows (accounts, for the fold) it took up: its limit when more may be
    /// left.
    pub scanned: usize,
    /// Of those, the ones it changed.
    pub done: usize,
    /// The last account the fold took up; the next pass may start after it.
    pub last: Option<i64>,
    /// The last reservation expiry took up; the next pass may start after it.
    pub last_due: Option<DueCursor>,
}

/// A place in the walk over due reservations, in the order expiry takes them
/// up (by expiry time, then id). Passes that start after the last one's
/// pass over any reservation that could not be voided, instead of taking
/// the same ones up first every time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DueCursor {
    expires_at: i64,
    id: i64,
}

/// Whether a pass waits for rows another transaction holds (PostgreSQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Leave them to a later pass: for background sweeps.
    Skip,
    /// Wait for them: for a caller that must see everything due done.
    Wait,
}

/// Voids up to `limit` reservations whose time has run out, from after
/// `after` (the start if `None`).
///
/// Locked as they are found. The sweeper skips any another transaction
/// holds (`Held::Skip`): nodes sweeping at once each take different
/// reservations, instead of every node's writer waiting for the first
/// one's batch and then finding the same rows voided.
pub fn expire_due(
    tx: &mut Tx<'_>,
    limit: i64,
    held: Held,
    after: Option<DueCursor>,
) -> Result<Pass, StoreError> {
    debug_assert!(limit > 0, "SQLite reads a negative LIMIT as none");
    let now = tx.now();
    // The scan takes whole rows: once locked, a row is what the void needs.
    // On PostgreSQL a row resolved while the scan waited for its lock is
    // re-checked against the WHERE and left out.
    let sql = match held {
        Held::Skip => select_transfer!(
            "WHERE kind = 1 AND state = 0 AND expires_at <= ?1 AND (expires_at, id) > (?3, ?4)
              ORDER BY expires_at, id LIMIT ?2 /*FOR UPDATE SKIP LOCKED*/"
        ),
        Held::Wait => select_transfer!(
            "WHERE kind = 1 AND state = 0 AND expires_at <= ?1 AND (expires_at, id) > (?3, ?4)
              ORDER BY expires_at, id LIMIT ?2 /*FOR UPDATE*/"
        ),
    };
    let after = after.unwrap_or(DueCursor {
        expires_at: i64::MIN,
        id: i64::MIN,
    });
    let due = tx.query(
        sql,
        &[
            now.millis().into(),
            limit.into(),
            after.expires_at.into(),
            after.id.into(),
        ],
    )?;
    let last_due = match due.last() {
        Some(row) => Some(DueCursor {
            expires_at: row.int(11)?,
            id: row.int(0)?,
        }),
        None => None,
    };
    // One reservation that cannot be voided, whatever the reason, must not
    // keep the others from expiring. Almost every pass voids them all, under
    // one savepoint; only if that fails are they voided again one savepoint
    // each (a savepoint per row would cost PostgreSQL a subtransaction per
    // row, and past 64 in one transaction every snapshot in the cluster
    // gets slower). One that fails then stays pending, and is logged and
    // counted each time a pass takes it up.
    let done = match tx.isolated(|tx| void_all(tx, &due, false))? {
        Ok(n) => n,
        Err(_) => void_all(tx, &due, true)?,
    };
    Ok(Pass {
        scanned: due.len(),
        done,
        last: None,
        last_due,
    })
}

/// Voids the due reservations in `rows`; how many it voided. `isolate`:
/// each under a savepoint of its own, passing over those that fail.
fn void_all(tx: &mut Tx<'_>, rows: &[Row], isolate: bool) -> Result<usize, StoreError> {
    let mut voided = 0;
    for row in rows {
        let pending = match transfer_from_row(row) {
            Ok(p) => p,
            Err(e) if isolate => {
                unvoidable(row.int(0).unwrap_or_default(), &e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if pending.state != PendingState::Pending {
            continue; // the WHERE leaves these out
        }
        let done = if isolate {
            match tx.isolated(|tx| void_expired(tx, &pending))? {
                Ok(done) => done,
                Err(e) => {
                    unvoidable(pending.id.0, &e);
                    false
                }
            }
        } else {
            void_expired(tx, &pending)?
        };
        voided += usize::from(done);
    }
    Ok(voided)
}

/// Reports a due reservation that expiry had to leave pending.
fn unvoidable(id: i64, e: &StoreError) {
    metrics::counter!("payrail_ledger_expiry_failures_total").increment(1);
    tracing::error!(reservation = id, error = %e, "a due reservation could not be voided; it stays pending");
}

/// Voids one due reservation with an expiry transfer; false if one exists
/// already.
fn void_expired(tx: &mut Tx<'_>, pending: &TransferRecord) -> Result<bool, StoreError> {
    let id = pending.id;
    let req = TransferRequest {
        scope: EXPIRY_SCOPE.into(),
        key: id.0.to_string(),
        op: TransferOp::Void { pending: id },
    };
    let inserted = insert_transfer(
        tx,
        &req,
        TransferKind::Expire,
        pending.debit,
        pending.credit,
        pending.currency,
        pending.amount,
        Some(id),
        None,
        None,
    )
    .map_err(|e| match e {
        LedgerOpError::Store(s) => s,
        LedgerOpError::Rejected(r) => StoreError::Internal(r.to_string()),
    })?;
    if inserted.is_none() {
        return Ok(false);
    }
    settle_pending(
        tx,
        pending,
        TransferKind::Expire,
        PendingState::Expired,
        Money::ZERO,
    )?;
    Ok(true)
}

/// Applies the batch's queued changes.
///
/// With a single writer (SQLite) they go straight into the account rows.
/// With several (`writer` given: PostgreSQL), each writer adds them to its own
/// delta row per account, so no two writers, on any nodes, ever wait for the
/// same row here. Accounts are taken in order either way.
pub(crate) fn apply_deferred(
    tx: &mut Tx<'_>,
    deferred: &Deferred,
    writer: Option<i64>,
) -> Result<(), StoreError> {
    for (account, d) in deferred {
        if d.is_zero() {
            continue;
        }
        let values = [
            account.0.into(),
            d.debits_pending.into(),
            d.debits_posted.into(),
            d.credits_pending.into(),
            d.credits_posted.into(),
        ];
        let [dp, dpo, cp, cpo] = ceilings(d);
        let changed = match writer {
            // Queued changes are summed over the batch, past the point where
            // one unit could be refused: one that would not fit fails the
            // whole batch (below). PostgreSQL's delta rows take it instead,
            // and reads of the account fail (see `fold_deltas`).
            None => tx.execute(
                "UPDATE accounts
                    SET debits_pending = debits_pending + ?2, debits_posted = debits_posted + ?3,
                        credits_pending = credits_pending + ?4, credits_posted = credits_posted + ?5
                  WHERE id = ?1
                    AND debits_pending <= ?6 AND debits_posted <= ?7
                    AND credits_pending <= ?8 AND credits_posted <= ?9",
                &[
                    values[0],
                    values[1],
                    values[2],
                    values[3],
                    values[4],
                    dp.into(),
                    dpo.into(),
                    cp.into(),
                    cpo.into(),
                ],
            )?,
            Some(w) => tx.execute(
                "INSERT INTO account_deltas (account_id, debits_pending, debits_posted, credits_pending, credits_posted, writer_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account_id, writer_id) DO UPDATE
                    SET debits_pending = account_deltas.debits_pending + excluded.debits_pending,
                        debits_posted = account_deltas.debits_posted + excluded.debits_posted,
                        credits_pending = account_deltas.credits_pending + excluded.credits_pending,
                        credits_posted = account_deltas.credits_posted + excluded.credits_posted",
                &[values[0], values[1], values[2], values[3], values[4], w.into()],
            )?,
        };
        if changed != 1 {
            return Err(StoreError::Internal(format!(
                "queued change for {account} not applied: the account is missing or a total would pass i64::MAX"
            )));
        }
    }
    Ok(())
}

/// Folds delta rows into their accounts' rows, for up to `limit` accounts
/// with delta rows, in id order from after `after`. Only where there are
/// several writers (PostgreSQL).
///
/// Never waits: an account row or delta row locked by a writer is skipped and
/// folded another time. What it locks stays locked until its batch commits,
/// and a writer adding to a folded account's delta row waits for that; a
/// lock cycle through other units of the batch is broken by the lock
/// timeout, and the batch runs again. `after` lets a series of
/// passes walk past accounts that stay skipped (locked, or too large to
/// fold) instead of taking them up again each time.
pub fn fold_deltas(tx: &mut Tx<'_>, after: Option<i64>, limit: i64) -> Result<Pass, StoreError> {
    debug_assert!(limit > 0, "SQLite reads a negative LIMIT as none");
    if tx.serialized() {
        return Ok(Pass::default());
    }
    let candidates = tx.query(
        "SELECT DISTINCT account_id FROM account_deltas WHERE account_id > ?1
          ORDER BY account_id LIMIT ?2",
        &[after.unwrap_or(i64::MIN).into(), limit.into()],
    )?;
    let mut pass = Pass {
        scanned: candidates.len(),
        ..Pass::default()
    };
    for row in candidates {
        let account = row.int(0)?;
        pass.last = Some(account);
        if tx
            .query_opt(
                // NO KEY: a writer adding this account's first delta row
                // takes a key-share lock on it, which FOR UPDATE would
                // make wait for the fold's whole batch.
                //
                // An account whose totals the fold would take past i64::MAX
                // stays unfolded (reads of it fail: they sum the same rows)
                // rather than fail the fold of every other account. The sums
                // are numeric: the comparison itself cannot overflow. Rows
                // committed after this check, or a locked row skipped below,
                // can still fail one fold (rolled back whole); the next sees
                // them.
                "SELECT a.id FROM accounts a
                  WHERE a.id = ?1
                    AND NOT EXISTS (
                        SELECT 1 FROM account_deltas d WHERE d.account_id = a.id
                        HAVING a.debits_pending + SUM(d.debits_pending) > 9223372036854775807
                            OR a.debits_posted + SUM(d.debits_posted) > 9223372036854775807
                            OR a.credits_pending + SUM(d.credits_pending) > 9223372036854775807
                            OR a.credits_posted + SUM(d.credits_posted) > 9223372036854775807)
                  FOR NO KEY UPDATE OF a SKIP LOCKED",
                &[account.into()],
            )?
            .is_none()
        {
            continue;
        }
        let moved = tx.query(
            "WITH free AS (
                 SELECT writer_id FROM account_deltas WHERE account_id = ?1 FOR UPDATE SKIP LOCKED
             ), gone AS (
                 DELETE FROM account_deltas d USING free f
                  WHERE d.account_id = ?1 AND d.writer_id = f.writer_id
                 RETURNING d.debits_pending, d.debits_posted, d.credits_pending, d.credits_posted
             )
             SELECT CAST(COALESCE(SUM(debits_pending), 0) AS BIGINT), CAST(COALESCE(SUM(debits_posted), 0) AS BIGINT),
                    CAST(COALESCE(SUM(credits_pending), 0) AS BIGINT), CAST(COALESCE(SUM(credits_posted), 0) AS BIGINT),
                    COUNT(*)
               FROM gone",
            &[account.into()],
        )?;
        let Some(m) = moved.first() else { continue };
        if m.int(4)? == 0 {
            continue; // every delta row is locked by a writer: nothing moved
        }
        tx.execute(
            "UPDATE accounts
                SET debits_pending = debits_pending + ?2, debits_posted = debits_posted + ?3,
                    credits_pending = credits_pending + ?4, credits_posted = credits_posted + ?5
              WHERE id = ?1",
            &[
                account.into(),
                m.int(0)?.into(),
                m.int(1)?.into(),
                m.int(2)?.into(),
                m.int(3)?.into(),
            ],
        )?;
        pass.done += 1;
    }
    Ok(pass)
}

/// The result of checking the ledger against its own rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub accounts: i64,
    pub transfers: i64,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks that balances sum to zero per currency, that every account's totals
/// equal the sums of its transfers, that no never-negative account is
/// negative, and that no reservation was posted for more than it held.
///
/// Run it in a read transaction so that it sees one consistent snapshot.
pub fn verify(tx: &mut Tx<'_>) -> Result<Verification, StoreError> {
    let mut problems = Vec::new();
    let mut accounts = 0;
    for row in tx.query(
        with_totals!(
            "SELECT currency, COUNT(*),
                    CAST(COALESCE(SUM(credits_posted - debits_posted), 0) AS BIGINT),
                    CAST(COALESCE(SUM(credits_pending - debits_pending), 0) AS BIGINT)
               FROM totals GROUP BY currency ORDER BY currency"
        ),
        &[],
    )? {
        let (currency, n, posted, pending) = (row.text(0)?, row.int(1)?, row.int(2)?, row.int(3)?);
        accounts += n;
        if posted != 0 {
            problems.push(format!(
                "{currency}: posted balances sum to {posted}, not 0"
            ));
        }
        if pending != 0 {
            problems.push(format!(
                "{currency}: pending balances sum to {pending}, not 0"
            ));
        }
    }

    for row in tx.query(
        with_totals!(
        ", legs AS (
             SELECT debit_account AS account,
                    CASE WHEN kind IN (0, 2) THEN amount ELSE 0 END AS dpost,
                    CASE WHEN kind = 1 AND state = 0 THEN amount ELSE 0 END AS dpend,
                    0 AS cpost, 0 AS cpend
               FROM transfers
             UNION ALL
             SELECT credit_account, 0, 0,
                    CASE WHEN kind IN (0, 2) THEN amount ELSE 0 END,
                    CASE WHEN kind = 1 AND state = 0 THEN amount ELSE 0 END
               FROM transfers
         ), sums AS (
             SELECT account, SUM(dpost) AS dpost, SUM(dpend) AS dpend,
                    SUM(cpost) AS cpost, SUM(cpend) AS cpend
               FROM legs GROUP BY account
         )
         SELECT a.code, a.debits_posted, a.debits_pending, a.credits_posted, a.credits_pending,
                CAST(COALESCE(s.dpost, 0) AS BIGINT), CAST(COALESCE(s.dpend, 0) AS BIGINT),
                CAST(COALESCE(s.cpost, 0) AS BIGINT), CAST(COALESCE(s.cpend, 0) AS BIGINT)
           FROM totals a LEFT JOIN sums s ON s.account = a.id
          WHERE a.debits_posted <> COALESCE(s.dpost, 0) OR a.debits_pending <> COALESCE(s.dpend, 0)
             OR a.credits_posted <> COALESCE(s.cpost, 0) OR a.credits_pending <> COALESCE(s.cpend, 0)
          ORDER BY a.id LIMIT 100"
        ),
        &[],
    )? {
        problems.push(format!(
            "{}: totals (dpost {}, dpend {}, cpost {}, cpend {}) differ from its transfers ({}, {}, {}, {})",
            row.text(0)?,
            row.int(1)?,
            row.int(2)?,
            row.int(3)?,
            row.int(4)?,
            row.int(5)?,
            row.int(6)?,
            row.int(7)?,
            row.int(8)?,
        ));
    }

    for row in tx.query(
        with_totals!(
            "SELECT code, CAST(credits_posted - debits_posted - debits_pending AS BIGINT) FROM totals
              WHERE (flags & 1) = 1 AND credits_posted - debits_posted - debits_pending < 0
              ORDER BY id LIMIT 100"
        ),
        &[],
    )? {
        problems.push(format!(
            "{}: never-negative account has {} available",
            row.text(0)?,
            Money::from_minor(row.int(1)?)
        ));
    }

    for row in tx.query(
        "SELECT p.id, p.amount, x.amount FROM transfers x JOIN transfers p ON p.id = x.pending_id
          WHERE x.kind = 2 AND x.amount > p.amount LIMIT 100",
        &[],
    )? {
        problems.push(format!(
            "transfer {}: posted {} of a {} reservation",
            row.int(0)?,
            row.int(2)?,
            row.int(1)?
        ));
    }

    let transfers = tx
        .query_one("SELECT COUNT(*) FROM transfers", &[])?
        .int(0)?;
    Ok(Verification {
        accounts,
        transfers,
        problems,
    })
}

/// Parameters for a single transfer in the common case.
pub fn single(
    scope: &str,
    key: impl Into<String>,
    debit: AccountId,
    credit: AccountId,
    currency: Currency,
    amount: Money,
) -> TransferRequest {
    TransferRequest {
        scope: scope.into(),
        key: key.into(),
        op: TransferOp::Single {
            debit,
            credit,
            currency,
            amount,
        },
    }
}
