//! The reader pool's edges: [`Store::read_alone`] (its own connection, one
//! at a time) and the bound on waiting for a pooled reader.

use std::sync::mpsc;
use std::time::Duration;

use payrail_core::SystemClock;

use crate::testkit::TestDb;
use crate::{MasterKey, Options, Store, StoreError, ledger};

fn options(db: &TestDb, readers: usize) -> Options {
    let mut o = Options::new(
        db.location.clone(),
        MasterKey::from_bytes([7; 32]),
        std::sync::Arc::new(SystemClock),
    );
    o.readers = readers;
    o
}

async fn open(db: &TestDb, readers: usize) -> Store {
    Store::open(options(db, readers)).await.expect("open store")
}

/// Holds a pooled reader in a read of its own until the sender is used.
async fn hold_reader(
    store: &Store,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    mpsc::Sender<()>,
) {
    hold(store, false).await
}

/// Holds a read until the sender is used: on a pooled reader, or (`alone`)
/// a [`Store::read_alone`], which holds the long reads' turn.
async fn hold(
    store: &Store,
    alone: bool,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    mpsc::Sender<()>,
) {
    let (entered, is_entered) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let holder = tokio::spawn({
        let store = store.clone();
        async move {
            let read = move |_tx: &mut crate::Tx<'_>| {
                entered.send(()).unwrap();
                released.recv().unwrap();
                Ok::<_, StoreError>(())
            };
            if alone {
                store.read_alone(read).await
            } else {
                store.read(read).await
            }
        }
    });
    tokio::task::spawn_blocking(move || is_entered.recv().unwrap())
        .await
        .unwrap();
    (holder, release)
}

/// A bound that turns a hang into a failure; the tests never wait it out
/// when they pass.
const HANG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_runs_while_every_reader_is_taken() {
    let db = TestDb::fresh();
    let store = open(&db, 1).await;
    let (holder, release) = hold_reader(&store).await;
    let verified = tokio::time::timeout(HANG, store.read_alone(ledger::verify))
        .await
        .expect("the self-check waited for the only reader")
        .unwrap();
    assert!(verified.ok(), "{:?}", verified.problems);
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    store.close().await;
}

/// A read that waited past `max_wait` for a reader is refused, having run
/// nothing; reads go on once a reader is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_waits_too_long_for_a_reader_is_refused() {
    let db = TestDb::fresh();
    let mut o = options(&db, 1);
    o.max_wait = Duration::from_millis(100);
    let store = Store::open(o).await.expect("open store");
    let (holder, release) = hold_reader(&store).await;
    let refused = tokio::time::timeout(HANG, store.ping())
        .await
        .expect("the read waited for the held reader without a bound");
    assert!(
        matches!(refused, Err(StoreError::Overloaded)),
        "{refused:?}"
    );
    release.send(()).unwrap();
    holder.await.unwrap().unwrap();
    store.ping().await.unwrap();
    store.close().await;
}

/// Long reads run one at a time: one that waits past `max_wait` for the one
/// before it is refused, having run nothing (had it run beside the first, it
/// would have answered); the next one runs once the first is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_read_that_waits_too_long_for_its_turn_is_refused() {
    let db = TestDb::fresh();
    let mut o = options(&db, 2);
    o.max_wait = Duration::from_millis(100);
    let store = Store::open(o).await.expect("open store");
    let (first, release) = hold(&store, true).await;
    let refused = tokio::time::timeout(HANG, store.read_alone(|_tx| Ok::<_, StoreError>(())))
        .await
        .expect("the long read waited for its turn without a bound");
    assert!(
        matches!(refused, Err(StoreError::Overloaded)),
        "{refused:?}"
    );
    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    let verified = store.read_alone(ledger::verify).await.unwrap();
    assert!(verified.ok(), "{:?}", verified.problems);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_long_read_has_a_longer_statement_timeout() {
    let db = TestDb::fresh();
    if !db.is_postgres() {
        return; // SQLite has no statement timeout.
    }
    // One reader: had the long read's connection joined the pool, the last
    // read would be on it.
    let store = open(&db, 1).await;
    let show = |tx: &mut crate::Tx<'_>| {
        tx.query_one("SHOW statement_timeout", &[])?
            .text(0)
            .map_err(StoreError::from)
    };
    assert_eq!(store.read(show).await.unwrap(), "5s");
    assert_eq!(store.read_alone(show).await.unwrap(), "1h");
    assert_eq!(store.read(show).await.unwrap(), "5s");
    store.close().await;
}
