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

use payrail_core::{AccountFlags, AccountId, Currency, Money, TransferOp, TransferRequest};
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

/// Expiry voids each due reservation under a savepoint of its own. One that
/// cannot be voided (here a trigger refuses its change of state, after its
/// expiry transfer was written) stays pending with nothing of its void kept,
/// and the reservations due after it expire all the same; once the cause is
/// gone, the next pass voids it too.
#[tokio::test]
async fn a_reservation_that_cannot_be_voided_does_not_hold_up_expiry() {
    const T0: i64 = 1_700_000_000_000;
    let db = payrail_store::testkit::TestDb::fresh();
    let clock = common::ManualClock::at(T0);
    let store = common::open_at(db.location.clone(), clock.clone()).await;
    let a = store
        .write(|tx| {
            Ok::<_, LedgerOpError>((
                ledger::open_account(tx, "issuer", Currency::INR, AccountFlags::NONE)?,
                ledger::open_account(tx, "wallet", Currency::INR, AccountFlags::NEVER_NEGATIVE)?,
            ))
        })
        .await
        .unwrap();
    store
        .write(move |tx| ledger::transfer(tx, &transfer("fund", a.0, a.1)))
        .await
        .unwrap();
    let mut holds = Vec::new();
    for secs in [60, 61, 62] {
        let hold = TransferRequest {
            scope: "test".into(),
            key: format!("hold-{secs}"),
            op: TransferOp::Reserve {
                debit: a.1,
                credit: a.0,
                currency: Currency::INR,
                amount: Money::from_minor(100),
                timeout: Some(std::time::Duration::from_secs(secs)),
            },
        };
        let id = store
            .write(move |tx| ledger::transfer(tx, &hold))
            .await
            .unwrap()
            .record
            .id;
        holds.push(id.0);
    }
    // The first one due is the one that fails.
    let stuck = holds[0];
    if db.is_postgres() {
        db.sql(&format!(
            "CREATE FUNCTION stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'stuck'; END $$;
             CREATE TRIGGER stuck BEFORE UPDATE OF state ON transfers
                 FOR EACH ROW WHEN (OLD.id = {stuck}) EXECUTE FUNCTION stuck();"
        ));
    } else {
        db.sql(&format!(
            "CREATE TRIGGER stuck BEFORE UPDATE OF state ON transfers WHEN OLD.id = {stuck}
             BEGIN SELECT RAISE(ABORT, 'stuck'); END"
        ));
    }
    clock.set(T0 + 120_000);
    let expire = || store.write(|tx| ledger::expire_due(tx, 1_000, ledger::Held::Skip));

    let pass = expire().await.unwrap();
    assert_eq!((pass.scanned, pass.done), (3, 2));
    let resolved = |id: i64| {
        db.sql(&format!(
            "SELECT state FROM transfers WHERE id = {id}
             UNION ALL SELECT count(*) FROM transfers WHERE pending_id = {id}"
        ))
    };
    assert_eq!(
        resolved(stuck),
        ["0", "0"],
        "pending, and no void of it kept"
    );
    for &id in &holds[1..] {
        assert_eq!(resolved(id)[1], "1", "{id} expired");
    }
    let (_, wallet) = balances(&store, a).await;
    assert_eq!(wallet, Money::from_minor(400), "one hold of 1.00 left");
    let v = store.read(ledger::verify).await.unwrap();
    assert!(v.ok(), "{:?}", v.problems);

    db.sql(if db.is_postgres() {
        "DROP TRIGGER stuck ON transfers"
    } else {
        "DROP TRIGGER stuck"
    });
    let pass = expire().await.unwrap();
    assert_eq!((pass.scanned, pass.done), (1, 1));
    assert_eq!(resolved(stuck)[1], "1");
    assert_eq!(balances(&store, a).await.1, Money::from_minor(500));
    store.close().await;
}
