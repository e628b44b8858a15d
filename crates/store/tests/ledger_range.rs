//! Account totals are i64 minor units. Money::MAX keeps one transfer far
//! below that, but a total is a sum; one that would pass i64::MAX must be
//! refused or fail, and never be stored as a float (SQLite's answer to an
//! integer overflow) or read back wrapped.
//!
//! The tests put totals near the edge behind the store's back (no API can in
//! reasonable time) and then move money through the store.

mod common;

use payrail_core::{
    AccountFlags, AccountId, Currency, LedgerError, Money, TransferOp, TransferRequest,
};
use payrail_store::ledger::{self, Account, LedgerOpError};
use payrail_store::{Store, StoreError, testkit};

/// Where every test puts a total: 100 below the most it may hold.
const EDGE: i64 = i64::MAX - 100;

/// A fresh store with two accounts, "from" and "to"; `column` of `on` (0 for
/// "from", 1 for "to") set to [`EDGE`].
async fn near_the_edge(column: &str, on: usize) -> (common::TestStore, (AccountId, AccountId)) {
    let t = common::open().await;
    let a = t
        .store
        .write(move |tx| {
            Ok::<_, LedgerOpError>((
                ledger::open_account(tx, "from", Currency::INR, AccountFlags::NONE)?,
                ledger::open_account(tx, "to", Currency::INR, AccountFlags::NONE)?,
            ))
        })
        .await
        .unwrap();
    let id = [a.0, a.1][on];
    t.db.sql(&format!(
        "UPDATE accounts SET {column} = {EDGE} WHERE id = {}",
        id.0
    ));
    (t, a)
}

/// The account as the store reads it.
async fn account(store: &Store, id: AccountId) -> Result<Account, StoreError> {
    store
        .read(move |tx| ledger::account(tx, id))
        .await
        .map(|a| a.expect("account exists"))
}

/// The stored column, as the database has it: SQLite says which type it holds.
fn stored(t: &common::TestStore, column: &str, id: AccountId) -> String {
    let sql = if t.db.is_postgres() {
        format!("SELECT {column}::text FROM accounts WHERE id = {}", id.0)
    } else {
        format!(
            "SELECT typeof({column}) || ' ' || {column} FROM accounts WHERE id = {}",
            id.0
        )
    };
    let rows = t.db.sql(&sql);
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0].trim_start_matches("integer ").to_string()
}

#[tokio::test]
async fn a_checked_debit_past_the_range_is_refused_and_one_that_fits_goes_through() {
    let (t, a) = near_the_edge("debits_posted", 0).await;

    let refused = common::pay(&t.store, "over", a.0, a.1, 101).await;
    assert!(
        matches!(
            refused,
            Err(LedgerOpError::Rejected(LedgerError::TotalOverflow(id))) if id == a.0
        ),
        "{refused:?}"
    );
    assert_eq!(stored(&t, "debits_posted", a.0), EDGE.to_string());
    assert_eq!(stored(&t, "credits_posted", a.1), "0");
    let key_kept = t
        .store
        .read(|tx| ledger::transfer_by_key(tx, "test", "over"))
        .await
        .unwrap();
    assert!(key_kept.is_none(), "a refused transfer left its row");

    // Exactly up to the edge is still money that fits.
    common::pay(&t.store, "to-the-edge", a.0, a.1, 100)
        .await
        .unwrap();
    assert_eq!(stored(&t, "debits_posted", a.0), i64::MAX.to_string());
    let from = account(&t.store, a.0).await.unwrap();
    assert_eq!(from.balances.available(), Money::from_minor(-i64::MAX));
}

#[tokio::test]
async fn a_credit_past_the_range_never_stores_or_reads_a_wrong_total() {
    let (t, a) = near_the_edge("credits_posted", 1).await;
    common::pay(&t.store, "fits", a.0, a.1, 100).await.unwrap();

    // Credits are applied late, in bulk, where nothing can refuse them one by
    // one: past the edge they fail instead. SQLite fails the batch at its
    // end; PostgreSQL keeps them in delta rows, and every read that sums
    // them fails.
    let over = common::pay(&t.store, "over", a.0, a.1, 1).await;
    if t.db.is_postgres() {
        over.unwrap();
        let read = account(&t.store, a.1).await;
        assert!(matches!(read, Err(StoreError::Internal(_))), "{read:?}");
        // The fold leaves that account alone and still folds the others.
        let other = t
            .store
            .write(move |tx| {
                let other = ledger::open_account(tx, "other", Currency::INR, AccountFlags::NONE)?;
                ledger::transfer(
                    tx,
                    &ledger::single(
                        "test",
                        "other",
                        a.0,
                        other,
                        Currency::INR,
                        Money::from_minor(5),
                    ),
                )?;
                Ok::<_, LedgerOpError>(other)
            })
            .await
            .unwrap();
        let deltas = |id: AccountId| {
            t.db.sql(&format!(
                "SELECT count(*) FROM account_deltas WHERE account_id = {}",
                id.0
            ))
        };
        assert_eq!(deltas(other), ["1"]);
        t.store
            .write(|tx| ledger::fold_deltas(tx, None, 1_000))
            .await
            .unwrap();
        assert_eq!(deltas(other), ["0"]);
        assert_ne!(deltas(a.1), ["0"]);
        // The row itself holds no more than it did; the rest waits in delta
        // rows that cannot be folded into it.
        assert_eq!(stored(&t, "credits_posted", a.1), EDGE.to_string());
        assert_eq!(stored(&t, "credits_posted", other), "5");
    } else {
        assert!(
            matches!(over, Err(LedgerOpError::Store(StoreError::Internal(_)))),
            "{over:?}"
        );
        let to = account(&t.store, a.1).await.unwrap();
        assert_eq!(to.balances.credits_posted, i64::MAX);
        let from = account(&t.store, a.0).await.unwrap();
        assert_eq!(
            from.balances.debits_posted, 100,
            "the failed batch's debit was rolled back"
        );
        assert_eq!(stored(&t, "credits_posted", a.1), i64::MAX.to_string());
    }
}

/// A post queues its debit for the batch's end; a checked debit of the same
/// account in the same batch counts it, and is refused on its own instead of
/// failing the batch at its end.
#[tokio::test]
async fn a_checked_debit_counts_what_the_batch_already_queued_for_the_account() {
    let (t, a) = near_the_edge("debits_posted", 0).await;
    let pending = common::reserve(&t.store, a.0, a.1, 80).await;
    // One unit: the post (queued: debits_posted + 80) and then a debit of 50
    // that fits the row alone but not with the post.
    let unit = t
        .store
        .write(move |tx| {
            let post = TransferRequest {
                scope: "test".into(),
                key: "capture".into(),
                op: TransferOp::Post {
                    pending,
                    amount: Money::from_minor(80),
                },
            };
            ledger::transfer(tx, &post)?;
            let debit = ledger::single(
                "test",
                "after",
                a.0,
                a.1,
                Currency::INR,
                Money::from_minor(50),
            );
            match ledger::transfer(tx, &debit) {
                Err(LedgerOpError::Rejected(e)) => Ok(Some(e)),
                other => other.map(|_| None),
            }
        })
        .await;
    assert!(
        matches!(&unit, Ok(Some(LedgerError::TotalOverflow(id))) if *id == a.0),
        "{unit:?}"
    );
    let from = account(&t.store, a.0).await.unwrap();
    assert_eq!(from.balances.debits_posted, i64::MAX - 20);
    assert_eq!(from.balances.debits_pending, 0);
}

/// Two accounts without the never-negative rule, "issuer" and "to".
async fn issuing_pair(t: &common::TestStore) -> (AccountId, AccountId) {
    t.store
        .write(move |tx| {
            Ok::<_, LedgerOpError>((
                ledger::open_account(tx, "issuer", Currency::INR, AccountFlags::NONE)?,
                ledger::open_account(tx, "to", Currency::INR, AccountFlags::NONE)?,
            ))
        })
        .await
        .unwrap()
}

/// PostgreSQL: an issuing account's debits are queued, not checked, only
/// while its debits, reserved and posted together, stay within
/// `QUEUED_DEBIT_LIMIT`, counting the delta rows already committed. Its row
/// is held elsewhere: a debit to exactly the limit goes through without
/// waiting, into a delta row; the next, past the limit only with reserved
/// money and the first one's delta row counted, takes the checked path,
/// waits for the row, and lands in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuing_debits_are_queued_only_within_the_limit() {
    let t = common::open().await;
    let payrail_store::Location::Postgres(url) = t.db.location.clone() else {
        return; // SQLite: every debit is checked, in one writer.
    };
    let (issuer, to) = issuing_pair(&t).await;
    let (posted, reserved) = (ledger::QUEUED_DEBIT_LIMIT - 100, 50);
    t.db.sql(&format!(
        "UPDATE accounts SET debits_posted = {posted}, debits_pending = {reserved} WHERE id = {}",
        issuer.0
    ));
    let held = testkit::hold(&url, move |tx| {
        tx.query_one(
            "SELECT id FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
            &[&issuer.0],
        )
        .unwrap();
    })
    .await;
    common::pay(&t.store, "to-the-limit", issuer, to, 50)
        .await
        .expect("queued, so not waiting for the held row");
    let store = t.store.clone();
    let past = tokio::spawn(async move { common::pay(&store, "past", issuer, to, 1).await });
    held.commit_once_waited_on(1).await;
    past.await.unwrap().expect("checked once the row is free");
    let row = |column: &str| {
        t.db.sql(&format!(
            "SELECT {column}::text FROM accounts WHERE id = {}",
            issuer.0
        ))
    };
    assert_eq!(row("debits_posted"), [(posted + 1).to_string()]);
    let queued = t.db.sql(&format!(
        "SELECT SUM(debits_posted)::text FROM account_deltas WHERE account_id = {}",
        issuer.0
    ));
    assert_eq!(queued, ["50"]);
    let read = account(&t.store, issuer).await.unwrap();
    assert_eq!(read.balances.debits_posted, posted + 51);
}

/// PostgreSQL: past the limit, a checked debit of an issuing account counts
/// the debits still in its delta rows, queued before it got there and not
/// yet folded: one that fits the row alone but not with them is refused,
/// as it would be once they are folded.
#[tokio::test]
async fn a_checked_debit_counts_debits_not_yet_folded() {
    let t = common::open().await;
    if !t.db.is_postgres() {
        return; // SQLite: nothing is queued to delta rows.
    }
    let (issuer, to) = issuing_pair(&t).await;
    t.db.sql(&format!(
        "UPDATE accounts SET debits_posted = {EDGE} WHERE id = {}",
        issuer.0
    ));
    // A delta row another writer committed: 60 of debits.
    t.db.sql(&format!(
        "INSERT INTO account_deltas (account_id, debits_pending, debits_posted, credits_pending, credits_posted, writer_id)
         VALUES ({}, 0, 60, 0, 0, 424242)",
        issuer.0
    ));
    let refused = common::pay(&t.store, "over", issuer, to, 50).await;
    assert!(
        matches!(
            refused,
            Err(LedgerOpError::Rejected(LedgerError::TotalOverflow(id))) if id == issuer
        ),
        "{refused:?}"
    );
    common::pay(&t.store, "fits", issuer, to, 40).await.unwrap();
    let read = account(&t.store, issuer).await.unwrap();
    assert_eq!(read.balances.debits_posted, i64::MAX);
}
