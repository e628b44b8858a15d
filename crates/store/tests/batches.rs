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

/// Opens "from" and "to" (`to` with `flags`) and moves 5.00 from one to the
/// other under the key "paid".
async fn paid_pair(store: &Store, flags: AccountFlags) -> (AccountId, AccountId) {
    let a = store
        .write(move |tx| {
            Ok::<_, LedgerOpError>((
                ledger::open_account(tx, "from", Currency::INR, AccountFlags::NONE)?,
                ledger::open_account(tx, "to", Currency::INR, flags)?,
            ))
        })
        .await
        .unwrap();
    store
        .write(move |tx| ledger::transfer(tx, &transfer("paid", a.0, a.1)))
        .await
        .unwrap();
    a
}

#[tokio::test]
async fn a_refusing_unit_is_undone_and_runs_again_only_if_it_changed_data() {
    let t = common::open().await;
    let store = t.store.clone();
    let a = paid_pair(&store, AccountFlags::NONE).await;
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

/// Expiry passes over a reservation that cannot be voided (here a trigger
/// refuses its change of state, after its expiry transfer was written): it
/// stays pending with nothing of its void kept, and the others expire all
/// the same.
/// - A pass voids its reservations under one savepoint; when one fails, it
///   voids them again one savepoint each. The balance changes the first try
///   queued must go with it, or the ones voided twice over would be released
///   twice (the wallet's total below, and the self-check).
/// - Passes walk on from the last reservation the one before took up, so
///   stuck ones do not come first in every pass.
/// - Once the cause is gone, the next walk voids them too.
#[tokio::test]
async fn reservations_that_cannot_be_voided_do_not_hold_up_expiry() {
    const T0: i64 = 1_700_000_000_000;
    let db = payrail_store::testkit::TestDb::fresh();
    let clock = common::ManualClock::at(T0);
    let store = common::open_at(db.location.clone(), clock.clone()).await;
    let a = paid_pair(&store, AccountFlags::NEVER_NEGATIVE).await;
    let mut holds = Vec::new();
    for secs in [60, 61, 62, 63] {
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
    let wallet = || async { balances(&store, a).await.1 };
    assert_eq!(wallet().await, Money::from_minor(100), "four holds of 1.00");
    // The first and the last one due fail.
    let (first, last) = (holds[0], holds[3]);
    if db.is_postgres() {
        db.sql(&format!(
            "CREATE FUNCTION stuck() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'stuck'; END $$;
             CREATE TRIGGER stuck BEFORE UPDATE OF state ON transfers
                 FOR EACH ROW WHEN (OLD.id IN ({first}, {last})) EXECUTE FUNCTION stuck();"
        ));
    } else {
        db.sql(&format!(
            "CREATE TRIGGER stuck BEFORE UPDATE OF state ON transfers WHEN OLD.id IN ({first}, {last})
             BEGIN SELECT RAISE(ABORT, 'stuck'); END"
        ));
    }
    clock.set(T0 + 120_000);
    let expire = |limit: i64, after: Option<ledger::DueCursor>| {
        store.write(move |tx| ledger::expire_due(tx, limit, ledger::Held::Skip, after))
    };
    let voids = |id: i64| {
        db.sql(&format!(
            "SELECT state FROM transfers WHERE id = {id}
             UNION ALL SELECT count(*) FROM transfers WHERE pending_id = {id}"
        ))
    };

    // One at a time: the first is taken up and passed over, then the next.
    let pass = expire(1, None).await.unwrap();
    assert_eq!((pass.scanned, pass.done), (1, 0));
    let pass = expire(1, pass.last_due).await.unwrap();
    assert_eq!((pass.scanned, pass.done), (1, 1));
    // The rest in one pass: the second voids, the last does not.
    let pass = expire(1_000, pass.last_due).await.unwrap();
    assert_eq!((pass.scanned, pass.done), (2, 1));
    for id in [first, last] {
        assert_eq!(voids(id), ["0", "0"], "{id}: pending, no void of it kept");
    }
    for id in [holds[1], holds[2]] {
        assert_eq!(voids(id)[1], "1", "{id} expired");
    }
    assert_eq!(wallet().await, Money::from_minor(300), "two holds left");
    let v = store.read(ledger::verify).await.unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    // From the start, only the stuck ones are left.
    let pass = expire(1_000, None).await.unwrap();
    assert_eq!((pass.scanned, pass.done), (2, 0));

    db.sql(if db.is_postgres() {
        "DROP TRIGGER stuck ON transfers"
    } else {
        "DROP TRIGGER stuck"
    });
    let pass = expire(1_000, None).await.unwrap();
    assert_eq!((pass.scanned, pass.done), (2, 2));
    assert_eq!(wallet().await, Money::from_minor(500));
    let v = store.read(ledger::verify).await.unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    store.close().await;
}

/// A writer's marker row is read only by that writer, so a clean stop takes
/// it away: restarts do not leave one row per writer behind.
#[tokio::test]
async fn a_clean_stop_removes_the_writers_marker_rows() {
    let t = common::open().await;
    if !t.db.is_postgres() {
        return;
    }
    let a = paid_pair(&t.store, AccountFlags::NONE).await;
    t.store
        .write(move |tx| ledger::transfer(tx, &transfer("before close", a.0, a.1)))
        .await
        .unwrap();
    assert_ne!(
        t.db.sql("SELECT count(*) FROM payrail_writers WHERE last_batch > 0"),
        ["0"]
    );
    t.store.close().await;
    assert_eq!(t.db.sql("SELECT count(*) FROM payrail_writers"), ["0"]);
}

/// On PostgreSQL a batch writes its number into its writer's marker row, so
/// that a COMMIT whose answer is lost can be settled by reading it. Were the
/// row deleted behind the store's back (an operator pruning the table), a
/// batch that only updated it would leave no mark, and its lost COMMIT would
/// read as not committed: each batch puts the row back.
#[tokio::test]
async fn a_deleted_writer_marker_comes_back_with_the_next_batch() {
    let t = common::open().await;
    if !t.db.is_postgres() {
        return;
    }
    let a = paid_pair(&t.store, AccountFlags::NONE).await;
    assert_ne!(t.db.sql("SELECT count(*) FROM payrail_writers"), ["0"]);
    t.db.sql("DELETE FROM payrail_writers");
    t.store
        .write(move |tx| ledger::transfer(tx, &transfer("after", a.0, a.1)))
        .await
        .unwrap();
    assert_eq!(
        t.db.sql("SELECT count(*) FROM payrail_writers WHERE last_batch > 0"),
        ["1"]
    );
}
