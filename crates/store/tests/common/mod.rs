//! Shared set-up for the store's tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use payrail_core::{Clock, Timestamp};
use payrail_store::{Location, MasterKey, Options, Store};

/// A clock that only moves when told to.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(ms)))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.load(Ordering::SeqCst))
    }
}

pub struct TestStore {
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub fn options(dir: &std::path::Path, clock: Arc<dyn Clock>) -> Options {
    let mut o = Options::new(
        Location::Sqlite(dir.join("test.db")),
        MasterKey::from_bytes([7; 32]),
        clock,
    );
    o.sandbox_clock = true;
    o
}

pub async fn open_in(dir: &std::path::Path, clock: Arc<dyn Clock>) -> Store {
    Store::open(options(dir, clock)).await.expect("open store")
}

pub async fn open() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_in(dir.path(), ManualClock::at(1_700_000_000_000)).await;
    TestStore { store, dir }
}
