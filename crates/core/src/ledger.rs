//! The ledger's rules: accounts, transfers and what a transfer does to balances.
//!
//! Double entry: every movement of money is one transfer that debits one account
//! and credits another by the same amount, so the sum of all balances is zero at
//! all times. Two-phase transfers reserve (pending) and later post or void; an
//! unresolved reservation voids itself when it expires.
//!
//! This module decides *what* a transfer changes. The store decides how to make
//! that change durable and atomic.

use std::fmt;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::money::Money;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(pub i64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub i64);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "account {}", self.0)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transfer {}", self.0)
    }
}

/// An ISO 4217 code. Transfers only move money between accounts of one currency.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub const INR: Currency = Currency(*b"INR");
    pub const NGN: Currency = Currency(*b"NGN");

    pub fn parse(code: &str) -> Option<Currency> {
        let b = code.as_bytes();
        (b.len() == 3 && b.iter().all(u8::is_ascii_uppercase)).then(|| Currency([b[0], b[1], b[2]]))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from three ASCII uppercase letters.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-account rules, fixed when the account is created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccountFlags(u32);

impl AccountFlags {
    pub const NONE: AccountFlags = AccountFlags(0);
    /// The account can never go negative: posted and reserved debits together
    /// never exceed posted credits. Wallets and merchant accounts carry it;
    /// system accounts that issue money do not.
    pub const NEVER_NEGATIVE: AccountFlags = AccountFlags(1);

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits(bits: u32) -> AccountFlags {
        AccountFlags(bits)
    }

    pub const fn never_negative(self) -> bool {
        self.0 & 1 != 0
    }
}

/// An account's four running totals, in minor units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balances {
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
}

impl Balances {
    /// Posted credits minus posted debits.
    pub fn balance(&self) -> Money {
        Money::from_minor(self.credits_posted - self.debits_posted)
    }

    /// What may still be debited: the balance less outstanding reservations.
    ///
    /// Saturating: each total is at most `i64::MAX`, so `balance` always
    /// fits, but less the reservations it need not, and a wrapped figure
    /// would turn a debt into money.
    pub fn available(&self) -> Money {
        Money::from_minor(
            self.credits_posted
                .saturating_sub(self.debits_posted)
                .saturating_sub(self.debits_pending),
        )
    }

    pub fn apply(&mut self, d: &Delta) {
        self.debits_pending += d.debits_pending;
        self.debits_posted += d.debits_posted;
        self.credits_pending += d.credits_pending;
        self.credits_posted += d.credits_posted;
    }
}

/// A change to an account's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
}

impl Delta {
    /// How this delta moves [`Balances::available`].
    pub fn available_change(&self) -> i64 {
        self.credits_posted - self.debits_posted - self.debits_pending
    }

    /// A delta that lowers `available` can break the never-negative rule and
    /// must be checked against the account; any other delta is always allowed,
    /// which lets the store apply it late and in bulk.
    pub fn needs_check(&self) -> bool {
        self.available_change() < 0
    }

    pub fn add(&mut self, other: &Delta) {
        self.debits_pending += other.debits_pending;
        self.debits_posted += other.debits_posted;
        self.credits_pending += other.credits_pending;
        self.credits_posted += other.credits_posted;
    }

    pub fn is_zero(&self) -> bool {
        *self == Delta::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// Posted at once.
    Single = 0,
    /// Reserves the amount on both accounts until posted, voided or expired.
    Pending = 1,
    /// Posts (part of) a pending transfer.
    Post = 2,
    /// Releases a pending transfer.
    Void = 3,
    /// Releases a pending transfer whose time ran out.
    Expire = 4,
}

impl TransferKind {
    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<TransferKind> {
        Some(match code {
            0 => TransferKind::Single,
            1 => TransferKind::Pending,
            2 => TransferKind::Post,
            3 => TransferKind::Void,
            4 => TransferKind::Expire,
            _ => return None,
        })
    }
}

/// Where a pending transfer stands. Meaningless for other kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PendingState {
    Pending = 0,
    Posted = 1,
    Voided = 2,
    Expired = 3,
}

impl PendingState {
    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(code: i64) -> Option<PendingState> {
        Some(match code {
            0 => PendingState::Pending,
            1 => PendingState::Posted,
            2 => PendingState::Voided,
            3 => PendingState::Expired,
            _ => return None,
        })
    }
}

/// What a caller asks the ledger to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferOp {
    Single {
        debit: AccountId,
        credit: AccountId,
        currency: Currency,
        amount: Money,
    },
    Reserve {
        debit: AccountId,
        credit: AccountId,
        currency: Currency,
        amount: Money,
        /// `None`: the reservation never expires.
        timeout: Option<Duration>,
    },
    /// Posts `amount` (at most the reserved amount) and releases the rest.
    Post {
        pending: TransferId,
        amount: Money,
    },
    Void {
        pending: TransferId,
    },
}

/// A ledger operation with its idempotency key.
///
/// The key is unique within its scope: the same key with the same fields
/// returns the original result, with different fields it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRequest {
    pub scope: String,
    pub key: String,
    pub op: TransferOp,
}

pub const MAX_SCOPE_LEN: usize = 32;
pub const MAX_KEY_LEN: usize = 160;
/// Reservations last at most a year; longer holds are a bug, not a policy.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// A transfer as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: TransferId,
    pub scope: String,
    pub key: String,
    pub kind: TransferKind,
    pub debit: AccountId,
    pub credit: AccountId,
    pub currency: Currency,
    pub amount: Money,
    /// For posts, voids and expiries: the pending transfer they resolve.
    pub pending_id: Option<TransferId>,
    /// For pending transfers: where they stand.
    pub state: PendingState,
    pub timeout_ms: Option<i64>,
    pub expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

impl TransferRecord {
    /// The first field in which `req` differs from the transfer recorded under
    /// the same key, or `None` if `req` is a faithful replay.
    pub fn mismatch(&self, req: &TransferRequest) -> Option<&'static str> {
        match &req.op {
            TransferOp::Single {
                debit,
                credit,
                currency,
                amount,
            } => {
                if self.kind != TransferKind::Single {
                    return Some("kind");
                }
                self.mismatch_legs(*debit, *credit, *currency, *amount)
            }
            TransferOp::Reserve {
                debit,
                credit,
                currency,
                amount,
                timeout,
            } => {
                if self.kind != TransferKind::Pending {
                    return Some("kind");
                }
                if let Some(field) = self.mismatch_legs(*debit, *credit, *currency, *amount) {
                    return Some(field);
                }
                let timeout_ms = timeout.map(|t| t.as_millis() as i64);
                (self.timeout_ms != timeout_ms).then_some("timeout")
            }
            TransferOp::Post { pending, amount } => {
                if self.kind != TransferKind::Post {
                    return Some("kind");
                }
                if self.pending_id != Some(*pending) {
                    return Some("pending_id");
                }
                (self.amount != *amount).then_some("amount")
            }
            TransferOp::Void { pending } => {
                if self.kind != TransferKind::Void {
                    return Some("kind");
                }
                (self.pending_id != Some(*pending)).then_some("pending_id")
            }
        }
    }

    fn mismatch_legs(
        &self,
        debit: AccountId,
        credit: AccountId,
        currency: Currency,
        amount: Money,
    ) -> Option<&'static str> {
        if self.debit != debit {
            Some("debit_account")
        } else if self.credit != credit {
            Some("credit_account")
        } else if self.currency != currency {
            Some("currency")
        } else if self.amount != amount {
            Some("amount")
        } else {
            None
        }
    }
}

/// Why the ledger refused an operation. Nothing was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("invalid transfer: {0}")]
    Invalid(&'static str),
    #[error("account not found, or not in the transfer's currency")]
    AccountNotFound,
    #[error("{0} has insufficient funds")]
    InsufficientFunds(AccountId),
    /// One of the account's totals would pass `i64::MAX` minor units.
    #[error("{0}'s totals would pass the ledger's range")]
    TotalOverflow(AccountId),
    #[error("idempotency key reused with a different {field}")]
    IdempotencyConflict { field: &'static str },
    #[error("pending transfer not found")]
    PendingNotFound,
    #[error("{0} is not a pending transfer")]
    NotPending(TransferId),
    #[error("pending transfer already posted")]
    AlreadyPosted,
    #[error("pending transfer already voided")]
    AlreadyVoided,
    #[error("pending transfer expired")]
    PendingExpired,
    #[error("post amount exceeds the pending amount")]
    ExceedsPending,
}

impl TransferRequest {
    /// Shape checks that need no stored state.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.scope.is_empty() || self.scope.len() > MAX_SCOPE_LEN {
            return Err(LedgerError::Invalid("scope must be 1 to 32 bytes"));
        }
        if self.key.is_empty() || self.key.len() > MAX_KEY_LEN {
            return Err(LedgerError::Invalid("key must be 1 to 160 bytes"));
        }
        let positive = |m: Money| {
            if m.is_positive() && m <= Money::MAX {
                Ok(())
            } else {
                Err(LedgerError::Invalid(
                    "amount must be positive and within bounds",
                ))
            }
        };
        match &self.op {
            TransferOp::Single {
                debit,
                credit,
                amount,
                ..
            } => {
                positive(*amount)?;
                if debit == credit {
                    return Err(LedgerError::Invalid(
                        "debit and credit accounts must differ",
                    ));
                }
            }
            TransferOp::Reserve {
                debit,
                credit,
                amount,
                timeout,
                ..
            } => {
                positive(*amount)?;
                if debit == credit {
                    return Err(LedgerError::Invalid(
                        "debit and credit accounts must differ",
                    ));
                }
                if let Some(t) = timeout
                    && (t.is_zero() || *t > MAX_TIMEOUT)
                {
                    return Err(LedgerError::Invalid(
                        "timeout must be positive and at most a year",
                    ));
                }
            }
            TransferOp::Post { amount, .. } => positive(*amount)?,
            TransferOp::Void { .. } => {}
        }
        Ok(())
    }
}

/// Can `pending` still be resolved at `now`?
pub fn check_resolvable(pending: &TransferRecord, now: Timestamp) -> Result<(), LedgerError> {
    if pending.kind != TransferKind::Pending {
        return Err(LedgerError::NotPending(pending.id));
    }
    match pending.state {
        PendingState::Pending => {}
        PendingState::Posted => return Err(LedgerError::AlreadyPosted),
        PendingState::Voided => return Err(LedgerError::AlreadyVoided),
        PendingState::Expired => return Err(LedgerError::PendingExpired),
    }
    match pending.expires_at {
        Some(at) if at <= now => Err(LedgerError::PendingExpired),
        _ => Ok(()),
    }
}

/// The balance changes of a transfer of `kind` and `amount`, debit side first.
///
/// For posts, voids and expiries `pending` is the reservation being resolved
/// and `amount` what is posted (zero for voids and expiries).
pub fn effects(
    kind: TransferKind,
    amount: Money,
    pending: Option<&TransferRecord>,
) -> (Delta, Delta) {
    let a = amount.minor();
    let reserved = pending.map_or(0, |p| p.amount.minor());
    match kind {
        TransferKind::Single => (
            Delta {
                debits_posted: a,
                ..Delta::default()
            },
            Delta {
                credits_posted: a,
                ..Delta::default()
            },
        ),
        TransferKind::Pending => (
            Delta {
                debits_pending: a,
                ..Delta::default()
            },
            Delta {
                credits_pending: a,
                ..Delta::default()
            },
        ),
        TransferKind::Post => (
            Delta {
                debits_pending: -reserved,
                debits_posted: a,
                ..Delta::default()
            },
            Delta {
                credits_pending: -reserved,
                credits_posted: a,
                ..Delta::default()
            },
        ),
        TransferKind::Void | TransferKind::Expire => (
            Delta {
                debits_pending: -reserved,
                ..Delta::default()
            },
            Delta {
                credits_pending: -reserved,
                ..Delta::default()
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(amount: i64, expires_at: Option<i64>) -> TransferRecord {
        TransferRecord {
            id: TransferId(7),
            scope: "t".into(),
            key: "k".into(),
            kind: TransferKind::Pending,
            debit: AccountId(1),
            credit: AccountId(2),
            currency: Currency::INR,
            amount: Money::from_minor(amount),
            pending_id: None,
            state: PendingState::Pending,
            timeout_ms: None,
            expires_at: expires_at.map(Timestamp::from_millis),
            created_at: Timestamp::from_millis(0),
        }
    }

    #[test]
    fn every_effect_balances_to_zero() {
        let p = pending(500, None);
        for (kind, amount) in [
            (TransferKind::Single, 300),
            (TransferKind::Pending, 300),
            (TransferKind::Post, 300),
            (TransferKind::Void, 0),
            (TransferKind::Expire, 0),
        ] {
            let (d, c) = effects(kind, Money::from_minor(amount), Some(&p));
            // The two accounts' balance changes cancel out, posted and pending.
            let posted =
                (d.credits_posted - d.debits_posted) + (c.credits_posted - c.debits_posted);
            let pending =
                (d.credits_pending - d.debits_pending) + (c.credits_pending - c.debits_pending);
            assert_eq!((posted, pending), (0, 0), "{kind:?}");
        }
    }

    #[test]
    fn available_saturates_instead_of_wrapping_into_money() {
        let deep = Balances {
            debits_posted: i64::MAX,
            debits_pending: i64::MAX,
            ..Balances::default()
        };
        assert_eq!(deep.available(), Money::from_minor(i64::MIN));
        assert_eq!(deep.balance(), Money::from_minor(-i64::MAX));
    }

    #[test]
    fn only_lowering_available_needs_a_check() {
        let p = pending(500, None);
        let one = Money::from_minor(100);
        assert!(effects(TransferKind::Single, one, None).0.needs_check());
        assert!(effects(TransferKind::Pending, one, None).0.needs_check());
        // Posting less than reserved frees the difference: never a check.
        assert!(!effects(TransferKind::Post, one, Some(&p)).0.needs_check());
        assert!(
            !effects(TransferKind::Void, Money::ZERO, Some(&p))
                .0
                .needs_check()
        );
        // Credits never need a check.
        assert!(!effects(TransferKind::Single, one, None).1.needs_check());
    }

    #[test]
    fn resolvable_until_expired_or_resolved() {
        let p = pending(500, Some(1_000));
        assert_eq!(check_resolvable(&p, Timestamp::from_millis(999)), Ok(()));
        assert_eq!(
            check_resolvable(&p, Timestamp::from_millis(1_000)),
            Err(LedgerError::PendingExpired)
        );
        let mut posted = p.clone();
        posted.state = PendingState::Posted;
        assert_eq!(
            check_resolvable(&posted, Timestamp::from_millis(0)),
            Err(LedgerError::AlreadyPosted)
        );
        let mut single = p;
        single.kind = TransferKind::Single;
        assert_eq!(
            check_resolvable(&single, Timestamp::from_millis(0)),
            Err(LedgerError::NotPending(TransferId(7)))
        );
    }

    #[test]
    fn replays_match_and_changes_conflict() {
        let rec = TransferRecord {
            kind: TransferKind::Single,
            ..pending(500, None)
        };
        let req = |amount: i64, credit: i64| TransferRequest {
            scope: "t".into(),
            key: "k".into(),
            op: TransferOp::Single {
                debit: AccountId(1),
                credit: AccountId(credit),
                currency: Currency::INR,
                amount: Money::from_minor(amount),
            },
        };
        assert_eq!(rec.mismatch(&req(500, 2)), None);
        assert_eq!(rec.mismatch(&req(501, 2)), Some("amount"));
        assert_eq!(rec.mismatch(&req(500, 3)), Some("credit_account"));
        let void = TransferRequest {
            scope: "t".into(),
            key: "k".into(),
            op: TransferOp::Void {
                pending: TransferId(1),
            },
        };
        assert_eq!(rec.mismatch(&void), Some("kind"));
    }

    #[test]
    fn validation_refuses_malformed_requests() {
        let base = TransferRequest {
            scope: "t".into(),
            key: "k".into(),
            op: TransferOp::Single {
                debit: AccountId(1),
                credit: AccountId(1),
                currency: Currency::INR,
                amount: Money::from_minor(1),
            },
        };
        assert!(base.validate().is_err());
        let zero = TransferRequest {
            op: TransferOp::Single {
                debit: AccountId(1),
                credit: AccountId(2),
                currency: Currency::INR,
                amount: Money::ZERO,
            },
            ..base.clone()
        };
        assert!(zero.validate().is_err());
        let long_key = TransferRequest {
            key: "k".repeat(MAX_KEY_LEN + 1),
            ..base
        };
        assert!(long_key.validate().is_err());
        assert!(Currency::parse("inr").is_none());
        assert_eq!(Currency::parse("NGN"), Some(Currency::NGN));
    }
}
