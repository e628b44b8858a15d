//! payrail's domain core: money, identifiers, time and the ledger's rules
//! (and [`Throttle`], for log lines that repeat while a cause lasts).
//!
//! Nothing in this crate performs I/O. The store persists what these types
//! describe; the rails translate wire requests into them.

pub mod clock;
pub mod ledger;
pub mod money;
pub mod throttle;

pub use clock::{Clock, SystemClock, Timestamp};
pub use ledger::{
    AccountFlags, AccountId, Balances, Currency, Delta, LedgerError, PendingState, TransferId,
    TransferKind, TransferOp, TransferRecord, TransferRequest,
};
pub use money::{AmountError, Money, Percent};
pub use throttle::Throttle;
