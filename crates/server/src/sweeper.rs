//! Housekeeping, about once a second: voids reservations as they expire,
//! folds accounts' delta rows into the accounts (PostgreSQL), prunes sent
//! messages older than `outbox_retention` (by the store's clock, so the
//! sandbox clock moves it), and lets each rail sweep its own tables.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use payrail_railkit::Rail;
use payrail_store::{Store, StoreError, Tx, ledger, outbox};

/// Rows (accounts, for the fold) one housekeeping unit of work takes at
/// most. Small, because the unit shares a commit with the debits queued
/// beside it, and they wait for it: 250 voids cost the writer about what
/// 250 debits do, a few milliseconds. A full unit is followed at once by the next (see
/// [`round`]), so a backlog still drains at the writer's pace, not at one
/// unit a second; on PostgreSQL a fold also holds its accounts' row locks,
/// which debits of those wallets wait for, only as long as its unit.
pub const CHUNK: i64 = 250;

/// One kind of housekeeping: a unit of work that answers whether it was
/// full, so that more may be left.
pub struct Step {
    pub name: &'static str,
    pub run: Box<dyn Fn() -> BoxFuture<'static, Result<bool, String>> + Send + Sync>,
}

/// The server's steps: the ledger's and the outbox's, then each rail's.
pub fn steps(store: &Store, outbox_retention: Duration, rails: &[Arc<dyn Rail>]) -> Vec<Step> {
    fn full(n: impl TryInto<i64>) -> bool {
        n.try_into().map_or(true, |n| n >= CHUNK)
    }
    let unit = |name, work: fn(&mut Tx<'_>, Duration) -> Result<bool, StoreError>| {
        let store = store.clone();
        Step {
            name,
            run: Box::new(move || {
                let store = store.clone();
                Box::pin(async move {
                    store
                        .write_unbounded(move |tx| work(tx, outbox_retention))
                        .await
                        .map_err(|e| format!("{e:?}"))
                })
            }),
        }
    };
    let mut steps = vec![
        unit("expiry", |tx, _| ledger::expire_due(tx, CHUNK).map(full)),
        unit("fold", |tx, _| ledger::fold_deltas(tx, CHUNK).map(full)),
        unit("outbox", |tx, retention| {
            let before = tx.now().minus(retention);
            outbox::prune(tx, before, CHUNK).map(full)
        }),
    ];
    for rail in rails {
        let rail = rail.clone();
        steps.push(Step {
            name: rail.name(),
            run: Box::new(move || {
                let rail = rail.clone();
                Box::pin(async move { rail.sweep(CHUNK).await })
            }),
        });
    }
    steps
}

/// Runs every step once, then again each whose unit was full, until none
/// is or `until` has passed. Each unit is its own unit of work, so one
/// failing does not hold up the others (it is logged and tried again next
/// round). The deadline is for a step that stays full (credits arriving
/// faster than one fold takes them): the next round starts every step
/// again, so it cannot keep the others waiting. Returns how many units ran.
pub async fn round(steps: &[Step], until: Instant) -> usize {
    let mut due: Vec<&Step> = steps.iter().collect();
    let mut units = 0;
    while !due.is_empty() {
        let mut again = Vec::new();
        for step in due {
            units += 1;
            let outcome = match (step.run)().await {
                Ok(true) => {
                    again.push(step);
                    "full"
                }
                Ok(false) => "done",
                Err(e) => {
                    tracing::warn!(sweep = step.name, error = %e, "housekeeping failed");
                    "failed"
                }
            };
            metrics::counter!("payrail_sweep_units_total", "sweep" => step.name, "outcome" => outcome)
                .increment(1);
        }
        due = again;
        if Instant::now() >= until {
            break;
        }
    }
    units
}

/// A round each second (or at once after a round that took longer).
pub fn spawn(steps: Vec<Step>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            round(&steps, Instant::now() + Duration::from_secs(1)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A step whose units are full `full` times, then not; it records each
    /// call in `log`.
    fn step(name: &'static str, full: usize, log: &Arc<Mutex<Vec<&'static str>>>) -> Step {
        let (left, log) = (Arc::new(Mutex::new(full)), log.clone());
        Step {
            name,
            run: Box::new(move || {
                log.lock().unwrap().push(name);
                let mut left = left.lock().unwrap();
                let more = *left > 0;
                *left = left.saturating_sub(1);
                Box::pin(async move {
                    if name == "failing" {
                        Err("no".to_string())
                    } else {
                        Ok(more)
                    }
                })
            }),
        }
    }

    #[tokio::test]
    async fn a_round_runs_full_steps_again_until_none_is_full() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let steps = [
            step("expiry", 2, &log),
            step("fold", 0, &log),
            step("failing", 5, &log),
            step("outbox", 1, &log),
        ];
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(round(&steps, later).await, 7);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "expiry", "fold", "failing", "outbox", "expiry", "outbox", "expiry"
            ],
            "interleaved, each again only while full; a failure waits for the next round"
        );
        // The next round starts with every step again.
        log.lock().unwrap().clear();
        assert_eq!(round(&steps, later).await, 4);
    }

    /// The real steps: a backlog of three units' worth of sent messages is
    /// gone after one round, which ran the outbox's unit three times.
    #[tokio::test]
    async fn one_round_drains_a_backlog_larger_than_a_unit() {
        use payrail_core::{Clock, Timestamp};
        use payrail_store::testkit::TestDb;
        use payrail_store::{MasterKey, Options};
        use std::sync::atomic::{AtomicI64, Ordering};

        struct Manual(AtomicI64);
        impl Clock for Manual {
            fn now(&self) -> Timestamp {
                Timestamp::from_millis(self.0.load(Ordering::SeqCst))
            }
        }
        const T0: i64 = 1_700_000_000_000;
        let clock = Arc::new(Manual(AtomicI64::new(T0)));
        let db = TestDb::fresh();
        let options = Options::new(
            db.location.clone(),
            MasterKey::from_bytes([7; 32]),
            clock.clone(),
        );
        let store = Store::open(options).await.unwrap();
        let backlog = 2 * CHUNK + 100;
        store
            .write(move |tx| {
                (0..backlog).try_for_each(|i| outbox::send(tx, &format!("98{i:08}"), "text", None))
            })
            .await
            .unwrap();
        let retention = Duration::from_secs(24 * 3600);
        clock.0.store(T0 + 25 * 3_600_000, Ordering::SeqCst);
        let steps = steps(&store, retention, &[]);
        let later = Instant::now() + Duration::from_secs(3600);
        // Expiry and fold once each (nothing to do), the outbox 250, 250, 100.
        assert_eq!(round(&steps, later).await, 5);
        let left = store
            .read(|tx| outbox::list(tx, None, 1_000))
            .await
            .unwrap();
        assert!(left.is_empty(), "{} messages left", left.len());
        store.close().await;
    }

    #[tokio::test]
    async fn a_step_that_stays_full_ends_its_round_at_the_deadline() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let steps = [step("fold", usize::MAX, &log), step("expiry", 0, &log)];
        assert_eq!(round(&steps, Instant::now()).await, 2);
        assert_eq!(*log.lock().unwrap(), ["fold", "expiry"]);
    }
}
