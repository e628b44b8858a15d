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
/// beside it, and they wait for it: a void costs the writer about what a
/// debit does. On PostgreSQL the rows it locks (the fold's accounts, the
/// voided reservations) stay locked until that commit, and debits of those
/// wallets wait for them. A full unit is followed at once by the next (see
/// [`round`]), so a backlog drains in a series of short units rather than
/// at one unit a second.
pub const CHUNK: i64 = 250;

/// One kind of housekeeping: a unit of work that answers whether it was
/// full, so that more may be left.
pub struct Step {
    pub name: &'static str,
    pub run: Box<dyn Fn() -> BoxFuture<'static, Result<bool, String>> + Send + Sync>,
}

impl Step {
    /// A step whose unit is one write; `work` answers whether it was full.
    fn write<W>(name: &'static str, store: &Store, work: W) -> Step
    where
        W: Fn(&mut Tx<'_>) -> Result<bool, StoreError> + Clone + Send + Sync + 'static,
    {
        let store = store.clone();
        Step {
            name,
            run: Box::new(move || {
                let (store, work) = (store.clone(), work.clone());
                Box::pin(async move {
                    store
                        .write_unbounded(work)
                        .await
                        .map_err(|e| format!("{e:?}"))
                })
            }),
        }
    }
}

/// Whether a unit that did `n` was full.
fn full(n: impl TryInto<i64>) -> bool {
    payrail_railkit::unit_full(n, CHUNK)
}

/// The server's steps: the ledger's and the outbox's, then each rail's.
pub fn steps(store: &Store, outbox_retention: Duration, rails: &[Arc<dyn Rail>]) -> Vec<Step> {
    let mut steps = vec![
        expiry(store),
        fold(store),
        Step::write("outbox", store, move |tx| {
            let before = tx.now().minus(outbox_retention);
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

/// Expiry and the fold walk their rows in order (due reservations by
/// expiry time, accounts with delta rows by id), each unit from where the
/// last full one stopped, so rows they must pass over (a reservation that
/// cannot be voided; on PostgreSQL one another transaction holds, or an
/// account locked by a writer or too large to fold) cannot keep them from
/// the rest. Full when it took up a whole unit of rows, done or passed
/// over; the walk starts again from the first after a unit that was not.
fn expiry(store: &Store) -> Step {
    walk(
        "expiry",
        store,
        |tx, after| ledger::expire_due(tx, CHUNK, ledger::Held::Skip, after),
        |pass| pass.last_due,
    )
}

/// See [`expiry`].
fn fold(store: &Store) -> Step {
    walk(
        "fold",
        store,
        |tx, after| ledger::fold_deltas(tx, after, CHUNK),
        |pass| pass.last,
    )
}

/// A step that walks its rows from a cursor kept between its units.
fn walk<C, W>(
    name: &'static str,
    store: &Store,
    work: W,
    last: fn(&ledger::Pass) -> Option<C>,
) -> Step
where
    C: Copy + Send + 'static,
    W: Fn(&mut Tx<'_>, Option<C>) -> Result<ledger::Pass, StoreError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let store = store.clone();
    let cursor = Arc::new(std::sync::Mutex::new(None::<C>));
    Step {
        name,
        run: Box::new(move || {
            let (store, cursor, work) = (store.clone(), cursor.clone(), work.clone());
            Box::pin(async move {
                let after = *cursor.lock().unwrap_or_else(|e| e.into_inner());
                let pass = store
                    .write_unbounded(move |tx| work(tx, after))
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let more = full(pass.scanned);
                *cursor.lock().unwrap_or_else(|e| e.into_inner()) = last(&pass).filter(|_| more);
                Ok(more)
            })
        }),
    }
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

    /// The real steps: backlogs of three units' worth each (sent messages,
    /// reservations run out, and on PostgreSQL wallets with delta rows) are
    /// gone after one round, which ran each of those steps three times.
    #[tokio::test]
    async fn one_round_drains_backlogs_larger_than_a_unit() {
        use payrail_core::{
            AccountFlags, Clock, Currency, Money, Timestamp, TransferOp, TransferRequest,
        };
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
        let issuer = store
            .write(move |tx| {
                let issuer = ledger::open_account(tx, "issuer", Currency::INR, AccountFlags::NONE)?;
                for i in 0..backlog {
                    outbox::send(tx, &format!("98{i:08}"), "text", None)?;
                    let wallet = ledger::open_account(
                        tx,
                        &format!("wallet-{i}"),
                        Currency::INR,
                        AccountFlags::NEVER_NEGATIVE,
                    )?;
                    let hold = TransferRequest {
                        scope: "test".into(),
                        key: format!("hold-{i}"),
                        op: TransferOp::Reserve {
                            debit: issuer,
                            credit: wallet,
                            currency: Currency::INR,
                            amount: Money::from_minor(100),
                            timeout: Some(Duration::from_secs(60)),
                        },
                    };
                    ledger::transfer(tx, &hold)?;
                }
                Ok::<_, ledger::LedgerOpError>(issuer)
            })
            .await
            .unwrap();
        let retention = Duration::from_secs(24 * 3600);
        clock.0.store(T0 + 25 * 3_600_000, Ordering::SeqCst);
        let steps = steps(&store, retention, &[]);
        let later = Instant::now() + Duration::from_secs(3600);
        // Each backlog takes units of 250, 250 and 100 (the fold's, 601
        // accounts with the issuer's); SQLite has no delta rows to fold.
        let units = if db.is_postgres() { 9 } else { 7 };
        assert_eq!(round(&steps, later).await, units);
        let left = store
            .read(|tx| outbox::list(tx, None, 1_000))
            .await
            .unwrap();
        assert!(left.is_empty(), "{} messages left", left.len());
        let pending = db.sql("SELECT count(*) FROM transfers WHERE kind = 1 AND state = 0");
        assert_eq!(pending, ["0"], "reservations left unvoided");
        // Each wallet's void came before the fold's walk reached it; the
        // issuer's later ones wait for the next round.
        let unfolded = db.sql(&format!(
            "SELECT count(*) FROM account_deltas WHERE account_id <> {}",
            issuer.0
        ));
        assert_eq!(unfolded, ["0"], "wallets' delta rows left unfolded");
        let verified = store.read(ledger::verify).await.unwrap();
        assert!(verified.ok(), "{:?}", verified.problems);
        store.close().await;
    }

    #[tokio::test]
    async fn a_step_that_stays_full_ends_its_round_at_the_deadline() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let steps = [step("fold", usize::MAX, &log), step("expiry", 0, &log)];
        // The timeout turns a round that ignores its deadline into a failure.
        let units = tokio::time::timeout(Duration::from_secs(20), round(&steps, Instant::now()));
        assert_eq!(units.await.expect("the round ran past its deadline"), 2);
        assert_eq!(*log.lock().unwrap(), ["fold", "expiry"]);
    }
}
