//! PostgreSQL: nodes that start at once wait for the one that migrates, for
//! as long as its migration takes, whatever their request timeouts.
//! SQLite: one store at a time has the file.

mod common;

use std::time::Duration;

use payrail_store::sandbox::{self, Mode};
use payrail_store::testkit::TestDb;
use payrail_store::{Location, MIGRATION_LOCK, Store, StoreError, testkit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_out_another_nodes_migration() {
    let db = TestDb::fresh();
    let Location::Postgres(url) = db.location.clone() else {
        return; // SQLite: one process owns the file; nothing to wait for.
    };
    // Another node is migrating: it holds the lock.
    let (holder, url_for_node) = (url.clone(), url);
    let holder = tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&holder, postgres::NoTls).unwrap();
        c.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
            .unwrap();
        c
    })
    .await
    .unwrap();

    // A node whose request timeouts are far shorter than the migration.
    let mut o = common::options(
        Location::Postgres(url_for_node),
        common::ManualClock::at(1_700_000_000_000),
    );
    o.postgres.lock_timeout = Duration::from_millis(10);
    o.postgres.statement_timeout = Duration::from_millis(50);
    let opening = tokio::spawn(Store::open(o));

    // Once it is waiting for the lock, the migration still takes a while,
    // then ends. (A node that gave
    // up at once is never seen waiting; the deadline turns that into a
    // failure below instead of a hang.)
    tokio::task::spawn_blocking(move || {
        let mut holder = holder;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let waiting: i64 = holder
                .query_one(
                    "SELECT count(*) FROM pg_locks
                      WHERE locktype = 'advisory' AND NOT granted
                        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            std::thread::yield_now();
        }
        // The migration goes on well past both of the node's timeouts.
        std::thread::sleep(Duration::from_millis(300));
        holder
            .batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
            .unwrap();
    })
    .await
    .unwrap();

    let store = opening.await.unwrap();
    assert!(store.is_ok(), "{:?}", store.err());
    store.unwrap().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_has_one_store_at_a_time() {
    let db = TestDb::sqlite();
    let clock = common::ManualClock::at(1_700_000_000_000);
    let first = common::open_at(db.location.clone(), clock.clone()).await;
    let second = Store::open(common::options(db.location.clone(), clock.clone())).await;
    assert!(
        matches!(&second, Err(StoreError::InUse(p)) if p.ends_with("payrail.db-lock")),
        "{:?}",
        second.err()
    );
    first.close().await;
    // Once closed, the database is free at once, with the closed store's
    // handle still held: every time, not only when the store's threads
    // happen to have ended first.
    let mut closed = vec![first];
    for round in 0..20 {
        let again = Store::open(common::options(db.location.clone(), clock.clone()))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        again.ping().await.unwrap();
        again.close().await;
        closed.push(again);
    }
}

/// PostgreSQL: a sandbox node and a production node starting at once on one
/// database. Both reach their claim while another transaction holds the
/// row; once it ends, exactly one of them may have the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_in_two_modes_at_once_cannot_both_claim_the_database() {
    let db = TestDb::fresh();
    let Location::Postgres(url) = db.location.clone() else {
        return; // SQLite: one process has the file.
    };
    let clock = common::ManualClock::at(1_700_000_000_000);
    let open = |clock| {
        let mut o = common::options(db.location.clone(), clock);
        o.postgres.lock_timeout = Duration::from_secs(30);
        Store::open(o)
    };
    let (a, b) = (
        open(clock.clone()).await.unwrap(),
        open(clock).await.unwrap(),
    );
    let held = testkit::hold(&url, |tx| {
        tx.batch_execute("SELECT 1 FROM sandbox_clock WHERE id = 1 FOR UPDATE")
            .unwrap();
    })
    .await;
    let claim = |store: &Store, mode| {
        let store = store.clone();
        tokio::spawn(async move { store.write(move |tx| sandbox::claim(tx, mode)).await })
    };
    let (sandboxed, live) = (claim(&a, Mode::Sandbox), claim(&b, Mode::Production));
    held.commit_once_waited_on(2).await;
    let outcomes = [
        sandboxed.await.unwrap().unwrap(),
        live.await.unwrap().unwrap(),
    ];
    assert!(
        matches!(
            outcomes,
            [None, Some(Mode::Sandbox)] | [Some(Mode::Production), None]
        ),
        "{outcomes:?}"
    );
    a.close().await;
    b.close().await;
}
