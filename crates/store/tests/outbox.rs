//! The outbox keeps what was sent, sealed, until it is pruned by age.

mod common;

use payrail_core::Timestamp;
use payrail_store::Store;
use payrail_store::outbox;
use payrail_store::testkit::TestDb;

const T0: i64 = 1_700_000_000_000;
const HOUR: i64 = 3_600_000;

async fn send(store: &Store, to: &'static str, otp: &'static str) {
    store
        .write(move |tx| outbox::send(tx, to, &format!("Your OTP is {otp}"), Some(otp)))
        .await
        .unwrap();
}

async fn otps(store: &Store) -> Vec<String> {
    store
        .read(|tx| outbox::list(tx, None, 100))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.otp.unwrap())
        .collect()
}

async fn prune(store: &Store, before: i64, limit: i64) -> u64 {
    store
        .write(move |tx| outbox::prune(tx, Timestamp::from_millis(before), limit))
        .await
        .unwrap()
}

#[tokio::test]
async fn pruning_takes_the_oldest_first_strictly_before_the_cut_and_at_most_the_limit() {
    let db = TestDb::fresh();
    let clock = common::ManualClock::at(T0);
    let store = common::open_at(db.location.clone(), clock.clone()).await;
    for (hour, otp) in [(0, "100000"), (0, "100001"), (1, "110000"), (2, "120000")] {
        clock.set(T0 + hour * HOUR);
        send(&store, "9810000001", otp).await;
    }
    // Nothing is older than the first message.
    assert_eq!(prune(&store, T0, 1_000).await, 0);
    // Two are older than an hour after it; the limit takes one at a time.
    assert_eq!(prune(&store, T0 + HOUR, 1).await, 1);
    assert_eq!(prune(&store, T0 + HOUR, 1_000).await, 1);
    assert_eq!(prune(&store, T0 + HOUR, 1_000).await, 0);
    // What is left is whole: still opens with the key, newest first.
    assert_eq!(otps(&store).await, ["120000", "110000"]);
    assert_eq!(prune(&store, T0 + 2 * HOUR + 1, 1_000).await, 2);
    assert!(otps(&store).await.is_empty());
    store.close().await;
}

/// PostgreSQL: every node prunes. One never waits for the rows another is
/// deleting; it takes the others and leaves those.
#[tokio::test]
async fn pruning_skips_rows_another_node_holds() {
    let db = TestDb::fresh();
    let payrail_store::Location::Postgres(url) = db.location.clone() else {
        return; // SQLite: one writer, no row locks.
    };
    let clock = common::ManualClock::at(T0);
    let store = common::open_at(db.location.clone(), clock.clone()).await;
    for otp in ["100000", "100001", "100002"] {
        send(&store, "9810000001", otp).await;
    }
    let other = payrail_store::testkit::hold(&url, |tx| {
        tx.query_one(
            "SELECT id FROM outbox_messages ORDER BY id LIMIT 1 FOR UPDATE",
            &[],
        )
        .unwrap();
    })
    .await;
    // The timeout only turns a wait (or a retry loop) into a failure.
    let pruned = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        prune(&store, T0 + HOUR, 1_000),
    )
    .await
    .expect("pruning waited for the other node's row");
    assert_eq!(pruned, 2);
    other.commit_once_waited_on(0).await;
    assert_eq!(otps(&store).await, ["100000"]);
    assert_eq!(prune(&store, T0 + HOUR, 1_000).await, 1);
    store.close().await;
}
