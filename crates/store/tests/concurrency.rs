//! Many tasks racing on one account through the real writer.

mod common;

use std::sync::Arc;

use payrail_core::{
    AccountFlags, AccountId, Currency, LedgerError, Money, TransferId, TransferOp, TransferRequest,
};
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::testkit;
use payrail_store::{Store, StoreError};

async fn accounts(store: &Store, n: usize) -> Vec<AccountId> {
    store
        .write(move |tx| {
            (0..n)
                .map(|i| {
                    let flags = if i == 0 {
                        AccountFlags::NONE
                    } else {
                        AccountFlags::NEVER_NEGATIVE
                    };
                    ledger::open_account(tx, &format!("acct-{i}"), Currency::INR, flags)
                })
                .collect::<Result<Vec<_>, LedgerOpError>>()
        })
        .await
        .unwrap()
}

async fn fund(store: &Store, from: AccountId, to: AccountId, minor: i64) {
    common::pay(store, "fund", from, to, minor)
        .await
        .expect("fund");
}

async fn verify_ok(store: &Store) -> ledger::Verification {
    let v = store.read(ledger::verify).await.unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_k_of_n_debits_succeed_on_a_never_negative_account() {
    const K: usize = 37;
    const N: usize = 400;
    let t = common::open().await;
    let store = t.store.clone();
    let a = accounts(&store, 3).await;
    let (issuer, hot, merchant) = (a[0], a[1], a[2]);
    fund(&store, issuer, hot, 250 * K as i64).await;

    let mut tasks = Vec::new();
    for i in 0..N {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .write(move |tx| {
                    ledger::transfer(
                        tx,
                        &ledger::single(
                            "test",
                            format!("debit-{i}"),
                            hot,
                            merchant,
                            Currency::INR,
                            Money::from_minor(250),
                        ),
                    )
                })
                .await
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(tr) => {
                assert!(!tr.replayed);
                ok += 1;
            }
            Err(LedgerOpError::Rejected(LedgerError::InsufficientFunds(acct))) => {
                assert_eq!(acct, hot);
                refused += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((ok, refused), (K, N - K));
    let (hot_acct, merchant_acct) = store
        .read(move |tx| {
            Ok::<_, StoreError>((
                ledger::account(tx, hot)?.unwrap(),
                ledger::account(tx, merchant)?.unwrap(),
            ))
        })
        .await
        .unwrap();
    assert_eq!(hot_acct.balances.balance(), Money::ZERO);
    assert_eq!(
        merchant_acct.balances.balance(),
        Money::from_minor(250 * K as i64)
    );
    let v = verify_ok(&store).await;
    // funding + K debits; refused debits left nothing behind
    assert_eq!(v.transfers, 1 + K as i64);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_replays_create_nothing_twice() {
    const KEYS: usize = 20;
    const COPIES: usize = 25;
    let t = common::open().await;
    let store = t.store.clone();
    let a = accounts(&store, 3).await;
    let (issuer, wallet, merchant) = (a[0], a[1], a[2]);
    fund(&store, issuer, wallet, 1_000_000).await;

    let mut tasks = Vec::new();
    for copy in 0..COPIES {
        for k in 0..KEYS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // One copy per key changes the amount: it must be refused,
                // whichever copy happens to arrive first.
                let amount = if copy == 7 { 101 } else { 100 };
                let r = store
                    .write(move |tx| {
                        ledger::transfer(
                            tx,
                            &ledger::single(
                                "test",
                                format!("order-{k}"),
                                wallet,
                                merchant,
                                Currency::INR,
                                Money::from_minor(amount),
                            ),
                        )
                    })
                    .await;
                (k, amount, r)
            }));
        }
    }
    let mut ids = std::collections::HashMap::new();
    let mut fresh = std::collections::HashMap::<usize, usize>::new();
    let mut conflicts = 0;
    for t in tasks {
        let (k, amount, r) = t.await.unwrap();
        match r {
            Ok(tr) => {
                let id = *ids.entry(k).or_insert(tr.record.id);
                assert_eq!(
                    id, tr.record.id,
                    "key {k} answered with two different transfers"
                );
                assert_eq!(tr.record.amount, Money::from_minor(amount));
                if !tr.replayed {
                    *fresh.entry(k).or_default() += 1;
                }
            }
            Err(LedgerOpError::Rejected(LedgerError::IdempotencyConflict { field: "amount" })) => {
                conflicts += 1
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(
        fresh.values().all(|n| *n == 1) && fresh.len() == KEYS,
        "{fresh:?}"
    );
    // Each key: either the odd copy came first (and the 24 others conflict) or
    // it conflicts alone. Either way every key has exactly one transfer.
    assert!(conflicts >= KEYS);
    let v = verify_ok(&store).await;
    assert_eq!(v.transfers, 1 + KEYS as i64);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_transfer_inside_a_committed_unit_leaves_nothing() {
    let t = common::open().await;
    let store = t.store.clone();
    let a: [AccountId; 3] = accounts(&store, 3).await.try_into().unwrap();
    // The unit carries on after the refusal and commits other work.
    let outcome = store
        .write(move |tx| {
            let refused = ledger::transfer(
                tx,
                &ledger::single(
                    "test",
                    "too-much",
                    a[1],
                    a[2],
                    Currency::INR,
                    Money::from_minor(1),
                ),
            );
            let ok = ledger::transfer(
                tx,
                &ledger::single(
                    "test",
                    "fine",
                    a[0],
                    a[2],
                    Currency::INR,
                    Money::from_minor(5),
                ),
            )?;
            Ok::<_, LedgerOpError>((refused.err(), ok.replayed))
        })
        .await
        .unwrap();
    assert!(matches!(
        outcome.0,
        Some(LedgerOpError::Rejected(LedgerError::InsufficientFunds(_)))
    ));
    let (gone, v) = store
        .read(|tx| {
            Ok::<_, StoreError>((
                ledger::transfer_by_key(tx, "test", "too-much")?,
                ledger::verify(tx)?,
            ))
        })
        .await
        .unwrap();
    assert!(gone.is_none());
    assert_eq!(v.transfers, 1);
    assert!(v.ok());
    // And the key stays free for a later, fundable attempt.
    fund(&store, a[0], a[1], 10).await;
    store
        .write(move |tx| {
            ledger::transfer(
                tx,
                &ledger::single(
                    "test",
                    "too-much",
                    a[1],
                    a[2],
                    Currency::INR,
                    Money::from_minor(1),
                ),
            )
        })
        .await
        .unwrap();
    store.close().await;
}

#[tokio::test]
async fn currencies_do_not_mix_and_unknown_accounts_are_refused() {
    let t = common::open().await;
    let store = t.store.clone();
    let a: [AccountId; 2] = accounts(&store, 2).await.try_into().unwrap();
    let ngn = store
        .write(|tx| ledger::open_account(tx, "naira", Currency::NGN, AccountFlags::NONE))
        .await
        .unwrap();
    let cross = store
        .write(move |tx| {
            ledger::transfer(
                tx,
                &ledger::single("test", "x", a[0], ngn, Currency::INR, Money::from_minor(1)),
            )
        })
        .await;
    assert!(
        matches!(
            cross,
            Err(LedgerOpError::Rejected(LedgerError::AccountNotFound))
        ),
        "{cross:?}"
    );
    let ghost = store
        .write(move |tx| {
            ledger::transfer(
                tx,
                &ledger::single(
                    "test",
                    "y",
                    a[0],
                    AccountId(999_999),
                    Currency::INR,
                    Money::from_minor(1),
                ),
            )
        })
        .await;
    assert!(
        matches!(
            ghost,
            Err(LedgerOpError::Rejected(LedgerError::AccountNotFound))
        ),
        "{ghost:?}"
    );
    // Re-opening an account with other flags is a conflict, not a second account.
    let reopened = store
        .write(|tx| ledger::open_account(tx, "naira", Currency::NGN, AccountFlags::NEVER_NEGATIVE))
        .await;
    assert!(matches!(
        reopened,
        Err(LedgerOpError::Rejected(LedgerError::IdempotencyConflict {
            field: "flags"
        }))
    ));
    verify_ok(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn units_that_refuse_after_writing_leave_nothing_and_spoil_no_batch() {
    let t = common::open().await;
    let store = t.store.clone();
    let a: [AccountId; 3] = accounts(&store, 3).await.try_into().unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .write(move |tx| {
                    ledger::transfer(
                        tx,
                        &ledger::single(
                            "test",
                            format!("t{i}"),
                            a[0],
                            a[1 + i % 2],
                            Currency::INR,
                            Money::from_minor(1),
                        ),
                    )?;
                    // Every third unit changes its mind after writing.
                    if i % 3 == 0 {
                        return Err(LedgerOpError::Rejected(LedgerError::Invalid(
                            "changed its mind",
                        )));
                    }
                    Ok(i)
                })
                .await
        }));
    }
    let mut kept = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, i);
                assert_ne!(i % 3, 0);
                kept += 1;
            }
            Err(LedgerOpError::Rejected(LedgerError::Invalid(_))) => assert_eq!(i % 3, 0),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    let (v, refused_left) = store
        .read(|tx| {
            let mut left = 0;
            for i in (0..200).step_by(3) {
                left +=
                    usize::from(ledger::transfer_by_key(tx, "test", &format!("t{i}"))?.is_some());
            }
            Ok::<_, StoreError>((ledger::verify(tx)?, left))
        })
        .await
        .unwrap();
    assert_eq!(refused_left, 0, "a refused unit's transfer survived");
    assert_eq!(v.transfers, kept as i64);
    assert!(v.ok(), "{:?}", v.problems);
    store.close().await;
}

/// PostgreSQL: another node's writer folds an account's delta rows into its
/// row and spends the money, while this node's debit of the same account
/// waits for the row. The debit must see the fold whole: the delta rows gone
/// as well as the row grown, or it counts the money twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debit_waiting_on_a_fold_sees_the_money_once() {
    let t = common::open().await;
    let payrail_store::Location::Postgres(url) = t.db.location.clone() else {
        return; // SQLite: one writer, no delta rows, nothing to race.
    };
    let store = t.store.clone();
    let a = accounts(&store, 3).await;
    let (issuer, wallet, merchant) = (a[0], a[1], a[2]);
    fund(&store, issuer, wallet, 10_000).await;

    // The other node: fold the wallet's delta rows, then debit all of it,
    // and hold the row until told to commit.
    let other = testkit::hold(&url, move |tx| {
        let moved = tx
            .execute(
                "WITH gone AS (DELETE FROM account_deltas WHERE account_id = $1 RETURNING credits_posted)
                 UPDATE accounts SET credits_posted = credits_posted + (SELECT SUM(credits_posted) FROM gone),
                                     debits_posted = debits_posted + 10000
                  WHERE id = $1",
                &[&wallet.0],
            )
            .unwrap();
        assert_eq!(moved, 1, "the funding left a delta row");
    })
    .await;

    let store2 = store.clone();
    let debit = tokio::spawn(async move {
        store2
            .write(move |tx| {
                ledger::transfer(
                    tx,
                    &ledger::single(
                        "test",
                        "racer",
                        wallet,
                        merchant,
                        Currency::INR,
                        Money::from_minor(10_000),
                    ),
                )
            })
            .await
    });
    // Commit the other node's work once the debit waits for the row.
    other.commit_once_waited_on(1).await;

    match debit.await.unwrap() {
        Err(LedgerOpError::Rejected(LedgerError::InsufficientFunds(acct))) => {
            assert_eq!(acct, wallet)
        }
        other => panic!("the wallet's 100.00 was spent twice: {other:?}"),
    }
    let w = store
        .read(move |tx| ledger::account(tx, wallet))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w.balances.balance(), Money::ZERO);
    store.close().await;
}

/// PostgreSQL: one Post sent to two nodes at once, both waiting for the
/// reservation's row. The second to get it finds the reservation posted, by
/// the same request: it answers the first one's result, not "already posted".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_post_on_two_nodes_answers_the_same() {
    let t = common::open().await;
    let location = t.db.location.clone();
    let payrail_store::Location::Postgres(url) = location.clone() else {
        return; // SQLite: one writer, so no two posts wait on each other.
    };
    let node1 = t.store.clone();
    let node2 = common::open_at(location, common::ManualClock::at(1_700_000_000_000)).await;
    let a = accounts(&node1, 3).await;
    let (issuer, wallet, merchant) = (a[0], a[1], a[2]);
    fund(&node1, issuer, wallet, 10_000).await;
    let pending = common::reserve(&node1, wallet, merchant, 5_000).await;

    // Hold the reservation's row while both nodes reach it.
    let holder = testkit::hold(&url, move |tx| {
        tx.query_one(
            "SELECT id FROM transfers WHERE id = $1 FOR UPDATE",
            &[&pending.0],
        )
        .unwrap();
    })
    .await;
    let post = |node: Store| tokio::spawn(async move { common::post(&node, pending, 4_000).await });
    let (p1, p2) = (post(node1.clone()), post(node2.clone()));
    holder.commit_once_waited_on(2).await;

    let (r1, r2) = (p1.await.unwrap(), p2.await.unwrap());
    let (r1, r2) = match (r1, r2) {
        (Ok(r1), Ok(r2)) => (r1, r2),
        other => panic!("both must answer the post: {other:?}"),
    };
    assert_eq!(r1.record, r2.record);
    assert!(r1.replayed != r2.replayed, "exactly one did the work");
    let w = node1
        .read(move |tx| ledger::account(tx, wallet))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w.balances.balance(), Money::from_minor(6_000));
    verify_ok(&node1).await;
    node2.close().await;
    node1.close().await;
}

/// PostgreSQL: the fold walks past accounts it must skip. An account whose
/// row, or whose every delta row, another node holds is taken up but not
/// folded, and not counted as folded; a pass from after it goes on to the
/// rest; once free, it is folded whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folding_walks_past_accounts_it_must_skip() {
    let t = common::open().await;
    let payrail_store::Location::Postgres(url) = t.db.location.clone() else {
        return; // SQLite: one writer, no delta rows.
    };
    let store = t.store.clone();
    let a = accounts(&store, 4).await;
    let (issuer, wallets) = (a[0], a[1..].to_vec());
    for (i, &to) in wallets.iter().enumerate() {
        common::pay(&store, &format!("fund-{i}"), issuer, to, 100)
            .await
            .unwrap();
    }
    let (row_held, deltas_held) = (wallets[0].0, wallets[2].0);
    let other = testkit::hold(&url, move |tx| {
        tx.execute(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&row_held],
        )
        .unwrap();
        let held = tx
            .execute(
                "SELECT 1 FROM account_deltas WHERE account_id = $1 FOR UPDATE",
                &[&deltas_held],
            )
            .unwrap();
        assert!(held > 0, "the funding left no delta row");
    })
    .await;
    // One account a pass, each from after the last; the timeout only turns
    // a wait for a held row into a failure.
    let walk = |after: Option<i64>| {
        let store = store.clone();
        async move {
            let pass = store.write(move |tx| ledger::fold_deltas(tx, after, 1));
            tokio::time::timeout(std::time::Duration::from_secs(20), pass)
                .await
                .expect("the fold waited for a row another node holds")
                .unwrap()
        }
    };
    let mut folded = Vec::new();
    let mut after = None;
    loop {
        let pass = walk(after).await;
        if pass.scanned == 0 {
            break;
        }
        assert_eq!(pass.scanned, 1);
        let account = pass.last.expect("a pass that took up an account names it");
        assert!(after.is_none_or(|a| account > a), "the walk went back");
        if pass.done == 1 {
            folded.push(account);
        }
        after = Some(account);
    }
    assert!(folded.contains(&wallets[1].0), "{folded:?}");
    assert!(!folded.contains(&row_held), "a held account row was folded");
    assert!(
        !folded.contains(&deltas_held),
        "an account with every delta row held was counted as folded"
    );
    let deltas = |id: i64| {
        t.db.sql(&format!(
            "SELECT count(*) FROM account_deltas WHERE account_id = {id}"
        ))
    };
    assert_eq!(deltas(wallets[1].0), ["0"]);
    assert_ne!(deltas(row_held), ["0"]);
    assert_ne!(deltas(deltas_held), ["0"]);

    other.commit_once_waited_on(0).await;
    let pass = walk_all(&store).await;
    assert!(pass.done >= 2, "{pass:?}");
    for w in wallets {
        assert_eq!(deltas(w.0), ["0"]);
        let balance = store
            .read(move |tx| ledger::account(tx, w))
            .await
            .unwrap()
            .unwrap()
            .balances
            .balance();
        assert_eq!(balance, Money::from_minor(100));
    }
    verify_ok(&store).await;
    store.close().await;
}

async fn walk_all(store: &Store) -> ledger::Pass {
    store
        .write(|tx| ledger::fold_deltas(tx, None, 1_000))
        .await
        .unwrap()
}

/// The expiry tests' set-up (PostgreSQL only): a wallet funded with 10.00
/// by the issuer, on a clock at `T0`.
struct Expiry {
    _db: testkit::TestDb,
    url: String,
    clock: Arc<common::ManualClock>,
    store: Store,
    issuer: AccountId,
    wallet: AccountId,
}

impl Expiry {
    const T0: i64 = 1_700_000_000_000;

    async fn set_up() -> Option<Expiry> {
        let db = testkit::TestDb::fresh();
        let payrail_store::Location::Postgres(url) = db.location.clone() else {
            return None;
        };
        let clock = common::ManualClock::at(Self::T0);
        let store = common::open_at(db.location.clone(), clock.clone()).await;
        let a = accounts(&store, 2).await;
        let (issuer, wallet) = (a[0], a[1]);
        fund(&store, issuer, wallet, 1_000).await;
        Some(Expiry {
            _db: db,
            url,
            clock,
            store,
            issuer,
            wallet,
        })
    }
}

/// PostgreSQL: the sweep's expiry skips a due reservation another
/// transaction holds (another node's sweep, or a client posting it) instead
/// of waiting for that batch, and voids the others. The sandbox clock's
/// expiry waits for it, and voids it once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_skips_reservations_another_node_holds() {
    let Some(Expiry {
        _db,
        url,
        clock,
        store,
        issuer,
        wallet,
    }) = Expiry::set_up().await
    else {
        return; // SQLite: one writer, no row locks.
    };
    let mut holds = Vec::new();
    for i in 0..3 {
        holds.push(reserve(&store, wallet, issuer, 60 + i).await);
    }
    clock.set(Expiry::T0 + 120_000);
    let first = holds[0].0;
    let other = hold_transfer(
        &url,
        "SELECT 1 FROM transfers WHERE id = $1 FOR UPDATE",
        first,
    )
    .await;
    let expire = || {
        let pass = store.write(|tx| ledger::expire_due(tx, 1_000, ledger::Held::Skip, None));
        tokio::time::timeout(std::time::Duration::from_secs(20), pass)
    };
    let pass = expire()
        .await
        .expect("expiry waited for a reservation another node holds")
        .unwrap();
    assert_eq!((pass.scanned, pass.done), (2, 2));
    let pass = expire_waiting_for(&store, other).await;
    assert_eq!((pass.scanned, pass.done), (1, 1));
    let w = store
        .read(move |tx| ledger::account(tx, wallet))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w.balances.balance(), Money::from_minor(1_000));
    verify_ok(&store).await;
    store.close().await;
}

/// PostgreSQL: a due reservation that another transaction changes while the
/// expiry waits for its lock is judged as that commit left it. Here it is
/// given more time, so it is no longer due, and is left out. (A void would
/// be refused by `settle_pending`'s own guard anyway; a change of time is
/// not, so only the locking scan keeps this one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_leaves_out_a_reservation_changed_while_it_waited() {
    let Some(Expiry {
        _db,
        url,
        clock,
        store,
        issuer,
        wallet,
    }) = Expiry::set_up().await
    else {
        return; // SQLite: one writer, no row locks.
    };
    let id = reserve(&store, wallet, issuer, 60).await.0;
    clock.set(Expiry::T0 + 120_000);
    let sql = "UPDATE transfers SET expires_at = expires_at + 3600000 WHERE id = $1";
    let other = hold_transfer(&url, sql, id).await;
    let pass = expire_waiting_for(&store, other).await;
    assert_eq!((pass.scanned, pass.done), (0, 0));
    let w = store
        .read(move |tx| ledger::account(tx, wallet))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(w.balances.debits_pending, 100);
    verify_ok(&store).await;
    store.close().await;
}

/// Another transaction that runs `sql` on transfer `id` (one row) and
/// holds its locks.
async fn hold_transfer(url: &str, sql: &'static str, id: i64) -> testkit::Held {
    testkit::hold(url, move |tx| {
        assert_eq!(tx.execute(sql, &[&id]).unwrap(), 1);
    })
    .await
}

/// Runs the sandbox clock's expiry (`Held::Wait`) while `other` holds its
/// locks, and lets `other` commit once the expiry waits for it.
async fn expire_waiting_for(store: &Store, other: testkit::Held) -> ledger::Pass {
    let waiting = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .write(|tx| ledger::expire_due(tx, 1_000, ledger::Held::Wait, None))
                .await
        }
    });
    other.commit_once_waited_on(1).await;
    waiting.await.unwrap().unwrap()
}

/// Reserves 1.00 from `debit` for `secs` seconds.
async fn reserve(store: &Store, debit: AccountId, credit: AccountId, secs: u64) -> TransferId {
    store
        .write(move |tx| {
            ledger::transfer(
                tx,
                &TransferRequest {
                    scope: "test".into(),
                    key: format!("hold-{secs}"),
                    op: TransferOp::Reserve {
                        debit,
                        credit,
                        currency: Currency::INR,
                        amount: Money::from_minor(100),
                        timeout: Some(std::time::Duration::from_secs(secs)),
                    },
                },
            )
        })
        .await
        .unwrap()
        .record
        .id
}

/// PostgreSQL: a debit of an account that issues money (no never-negative
/// rule) is queued like a credit, so it does not wait for another node
/// whose open batch holds that account's row; nor does a reservation on it.
/// A never-negative account's debit still waits for its row: its balance
/// must be checked against the newest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debits_of_an_issuing_account_do_not_wait_for_its_row() {
    let t = common::open().await;
    let payrail_store::Location::Postgres(url) = t.db.location.clone() else {
        return; // SQLite: one writer, no row locks.
    };
    let store = t.store.clone();
    let a = accounts(&store, 3).await;
    let (issuer, wallet, merchant) = (a[0], a[1], a[2]);
    fund(&store, issuer, wallet, 10_000).await;

    let row_of = |id: AccountId| {
        let url = url.clone();
        async move {
            testkit::hold(&url, move |tx| {
                tx.query_one(
                    "SELECT id FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                    &[&id.0],
                )
                .unwrap();
            })
            .await
        }
    };
    let held = row_of(issuer).await;
    common::pay(&store, "issue-while-held", issuer, merchant, 700)
        .await
        .expect("a debit of the issuing account, its row held elsewhere");
    let pending = common::reserve(&store, issuer, merchant, 300).await;
    held.commit_once_waited_on(0).await;
    // The queued reservation is posted in part, and everything folded.
    common::post(&store, pending, 200).await.unwrap();
    store
        .write(|tx| ledger::fold_deltas(tx, None, 1_000))
        .await
        .unwrap();
    let read = |id: AccountId| {
        let store = store.clone();
        async move {
            store
                .read(move |tx| ledger::account(tx, id))
                .await
                .unwrap()
                .unwrap()
                .balances
        }
    };
    let issued = read(issuer).await;
    assert_eq!((issued.debits_posted, issued.debits_pending), (10_900, 0));
    let deltas = t.db.sql(&format!(
        "SELECT count(*) FROM account_deltas WHERE account_id = {}",
        issuer.0
    ));
    assert_eq!(deltas, ["0"], "all folded");

    let held = row_of(wallet).await;
    let debit = tokio::spawn({
        let store = store.clone();
        async move { common::pay(&store, "spend-while-held", wallet, merchant, 400).await }
    });
    // Commits only once the debit waits on it; a debit that did not wait
    // would leave this to time out.
    held.commit_once_waited_on(1).await;
    debit
        .await
        .unwrap()
        .expect("the wallet's debit, once its row is free");
    assert_eq!(read(wallet).await.balance(), Money::from_minor(9_600));
    verify_ok(&store).await;
    store.close().await;
}
