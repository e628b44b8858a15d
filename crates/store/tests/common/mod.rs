//! Shared set-up for the store's tests; `PAYRAIL_TEST_BACKEND` picks the engine.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use payrail_core::{Clock, Timestamp};
use payrail_store::testkit::TestDb;
use payrail_store::{Location, MasterKey, Options, Store};

/// A clock that only moves when told to.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(ms)))
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

pub struct TestStore {
    pub store: Store,
    pub db: TestDb,
}

pub fn options(location: Location, clock: Arc<dyn Clock>) -> Options {
    let mut o = Options::new(location, MasterKey::from_bytes([7; 32]), clock);
    o.sandbox_clock = true;
    o
}

pub async fn open_at(location: Location, clock: Arc<dyn Clock>) -> Store {
    Store::open(options(location, clock))
        .await
        .expect("open store")
}

pub async fn open() -> TestStore {
    let db = TestDb::fresh();
    let store = open_at(db.location.clone(), ManualClock::at(1_700_000_000_000)).await;
    TestStore { store, db }
}

/// Moves `minor` from `debit` to `credit` (INR) under `key`, in scope "test".
pub async fn pay(
    store: &Store,
    key: &str,
    debit: payrail_core::AccountId,
    credit: payrail_core::AccountId,
    minor: i64,
) -> Result<(), payrail_store::ledger::LedgerOpError> {
    use payrail_core::{Currency, Money};
    let key = key.to_string();
    store
        .write(move |tx| {
            payrail_store::ledger::transfer(
                tx,
                &payrail_store::ledger::single(
                    "test",
                    key.clone(),
                    debit,
                    credit,
                    Currency::INR,
                    Money::from_minor(minor),
                ),
            )
            .map(drop)
        })
        .await
}

/// Reserves `minor` from `debit` to `credit` (INR, no timeout) under the key
/// "hold", and returns the pending transfer.
pub async fn reserve(
    store: &Store,
    debit: payrail_core::AccountId,
    credit: payrail_core::AccountId,
    minor: i64,
) -> payrail_core::TransferId {
    use payrail_core::{Currency, Money, TransferOp, TransferRequest};
    store
        .write(move |tx| {
            payrail_store::ledger::transfer(
                tx,
                &TransferRequest {
                    scope: "test".into(),
                    key: "hold".into(),
                    op: TransferOp::Reserve {
                        debit,
                        credit,
                        currency: Currency::INR,
                        amount: Money::from_minor(minor),
                        timeout: None,
                    },
                },
            )
        })
        .await
        .expect("reserve")
        .record
        .id
}

/// Posts `minor` of the reservation `pending` under the key "capture".
pub async fn post(
    store: &Store,
    pending: payrail_core::TransferId,
    minor: i64,
) -> Result<payrail_store::ledger::Transfer, payrail_store::ledger::LedgerOpError> {
    use payrail_core::{Money, TransferOp, TransferRequest};
    store
        .write(move |tx| {
            payrail_store::ledger::transfer(
                tx,
                &TransferRequest {
                    scope: "test".into(),
                    key: "capture".into(),
                    op: TransferOp::Post {
                        pending,
                        amount: Money::from_minor(minor),
                    },
                },
            )
        })
        .await
}
