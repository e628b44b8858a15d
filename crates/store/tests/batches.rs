//! How the writer treats a unit that refuses, seen from outside: through how
//! many times the unit runs and what it leaves behind.
//!
//! Units run without savepoints at first; one that refuses after changing
//! data makes its batch run again with savepoints. One that changed nothing
//! has nothing to undo and must run once: a replayed idempotency key (or a
//! used orderid) is refused at the cost of one run, not of its whole batch.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use payrail_core::{AccountFlags, AccountId, Currency, Money, TransferRequest};
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::{Store, StoreError};

#[derive(Debug)]
enum Unit {
    Failed(#[allow(dead_code)] LedgerOpError),
    Refused,
}

impl From<StoreError> for Unit {
    fn from(e: StoreError) -> Self {
        Unit::Failed(LedgerOpError::Store(e))
    }
}

fn transfer(key: &str, from: AccountId, to: AccountId) -> TransferRequest {
    ledger::single("test", key, from, to, Currency::INR, Money::from_minor(500))
}

/// Runs the transfer `key` in a unit that then refuses; returns how many
/// times the unit ran.
async fn runs_of_refusing_unit(
    store: &Store,
    key: &'static str,
    a: (AccountId, AccountId),
) -> usize {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let result = store
        .write(move |tx| {
            counted.fetch_add(1, Ordering::SeqCst);
            ledger::transfer(tx, &transfer(key, a.0, a.1)).map_err(Unit::Failed)?;
            Err::<(), _>(Unit::Refused)
        })
        .await;
    assert!(matches!(result, Err(Unit::Refused)), "{result:?}");
    runs.load(Ordering::SeqCst)
}

async fn balances(store: &Store, a: (AccountId, AccountId)) -> (Money, Money) {
    store
        .read(move |tx| {
            Ok::<_, StoreError>((
                ledger::account(tx, a.0)?.unwrap().balances.available(),
                ledger::account(tx, a.1)?.unwrap().balances.available(),
            ))
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_refusing_unit_is_undone_and_runs_again_only_if_it_changed_data() {
    let t = common::open().await;
    let store = t.store.clone();
    let a = store
        .write(|tx| {
            Ok::<_, LedgerOpError>((
                ledger::open_account(tx, "from", Currency::INR, AccountFlags::NONE)?,
                ledger::open_account(tx, "to", Currency::INR, AccountFlags::NONE)?,
            ))
        })
        .await
        .unwrap();
    store
        .write(move |tx| ledger::transfer(tx, &transfer("paid", a.0, a.1)))
        .await
        .unwrap();
    let paid = (Money::from_minor(-500), Money::from_minor(500));
    assert_eq!(balances(&store, a).await, paid);

    // A new transfer changes data; refusing undoes it, by running the batch
    // again with a savepoint: two runs.
    assert_eq!(runs_of_refusing_unit(&store, "new", a).await, 2);
    assert_eq!(balances(&store, a).await, paid);

    // A faithful replay inserts nothing: nothing to undo, one run.
    assert_eq!(runs_of_refusing_unit(&store, "paid", a).await, 1);
    assert_eq!(balances(&store, a).await, paid);
}
