//! Durability under SIGKILL: a child process writes units of work as fast as
//! it can and prints each one's number once the store has acknowledged it.
//! A unit funds a wallet and reserves the same amount for the merchant; two
//! units in three then resolve the reservation in the same unit, by a
//! partial post or a void. The parent kills the child at a random moment,
//! reopens the database and checks that every acknowledged unit is there,
//! that no unit is there by part, that each reservation stands where its
//! unit left it, and that the ledger verifies.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use payrail_core::{
    AccountFlags, Currency, Money, PendingState, SystemClock, TransferOp, TransferRequest,
};
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::testkit::TestDb;
use payrail_store::{Location, Store, StoreError};

/// Carries the database URL to the child.
const CHILD_ENV: &str = "PAYRAIL_CRASH_CHILD_DB";
const WALLETS: usize = 16;

/// The child's body; runs only when the parent starts this binary with
/// `CHILD_ENV` set.
#[test]
#[ignore = "started by acknowledged_work_survives_sigkill"]
fn crash_child() {
    let Ok(url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let store = common::open_at(Location::parse(&url).unwrap(), Arc::new(SystemClock)).await;
        let accounts = store
            .write(|tx| {
                let issuer = ledger::open_account(tx, "issuer", Currency::INR, AccountFlags::NONE)?;
                let merchant = ledger::open_account(
                    tx,
                    "merchant",
                    Currency::INR,
                    AccountFlags::NEVER_NEGATIVE,
                )?;
                let wallets = (0..WALLETS)
                    .map(|i| {
                        ledger::open_account(
                            tx,
                            &format!("wallet-{i}"),
                            Currency::INR,
                            AccountFlags::NEVER_NEGATIVE,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, LedgerOpError>((issuer, merchant, wallets))
            })
            .await
            .unwrap();
        let accounts = Arc::new(accounts);
        println!("ready");
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut workers = Vec::new();
        for _ in 0..48 {
            let (store, accounts, next) = (store.clone(), Arc::clone(&accounts), Arc::clone(&next));
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let a = Arc::clone(&accounts);
                    store
                        .write(move |tx| {
                            let (issuer, merchant, wallets) = &*a;
                            let w = wallets[i as usize % WALLETS];
                            let amt = Money::from_minor(100 + (i % 7) as i64);
                            ledger::transfer(
                                tx,
                                &ledger::single(
                                    "crash",
                                    format!("u{i}:a"),
                                    *issuer,
                                    w,
                                    Currency::INR,
                                    amt,
                                ),
                            )?;
                            let reserved = ledger::transfer(
                                tx,
                                &TransferRequest {
                                    scope: "crash".into(),
                                    key: format!("u{i}:b"),
                                    op: TransferOp::Reserve {
                                        debit: w,
                                        credit: *merchant,
                                        currency: Currency::INR,
                                        amount: amt,
                                        timeout: None,
                                    },
                                },
                            )?;
                            let pending = reserved.record.id;
                            let resolve = match resolution(i) {
                                PendingState::Posted => TransferOp::Post {
                                    pending,
                                    amount: amt.checked_sub(Money::from_minor(1)).unwrap(),
                                },
                                PendingState::Voided => TransferOp::Void { pending },
                                _ => return Ok(()),
                            };
                            ledger::transfer(
                                tx,
                                &TransferRequest {
                                    scope: "crash".into(),
                                    key: format!("u{i}:c"),
                                    op: resolve,
                                },
                            )?;
                            Ok::<_, LedgerOpError>(())
                        })
                        .await
                        .expect("unit of work");
                    // Printed only after the store said the unit is durable.
                    println!("ack {i}");
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    });
}

/// Where unit `i` leaves its reservation.
fn resolution(i: u64) -> PendingState {
    match i % 3 {
        0 => PendingState::Pending,
        1 => PendingState::Posted,
        _ => PendingState::Voided,
    }
}

/// The keys of unit `i`'s transfers.
fn keys(i: u64) -> Vec<String> {
    let mut keys = vec![format!("u{i}:a"), format!("u{i}:b")];
    if resolution(i) != PendingState::Pending {
        keys.push(format!("u{i}:c"));
    }
    keys
}

#[test]
fn acknowledged_work_survives_sigkill() {
    for round in 0..6 {
        let db = TestDb::fresh();
        let kill_after: usize = if round == 0 {
            0
        } else {
            rand::random_range(1..4_000)
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start child");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = Vec::new();
        let mut ready = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            // libtest prints "test crash_child ... " without a newline first.
            if line.ends_with("ready") {
                ready = true;
            } else if let Some(i) = line.strip_prefix("ack ") {
                acked.push(i.parse::<u64>().unwrap());
            }
            if ready && acked.len() >= kill_after {
                break;
            }
        }
        assert!(ready, "child never became ready");
        child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        // Acknowledgements already printed before the kill count too.
        for line in lines {
            if let Some(i) = line.unwrap().strip_prefix("ack ") {
                acked.push(i.parse().unwrap());
            }
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "child ended on its own");

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store: Store = common::open_at(db.location.clone(), Arc::new(SystemClock)).await;
            let acked_count = acked.len();
            let (missing, partial, misplaced, transfers, verification) = store
                .read(move |tx| {
                    let mut missing = Vec::new();
                    for i in &acked {
                        for key in keys(*i) {
                            if ledger::transfer_by_key(tx, "crash", &key)?.is_none() {
                                missing.push(key);
                            }
                        }
                    }
                    let v = ledger::verify(tx)?;
                    // Every unit present is present whole, its reservation
                    // where the unit left it; the units present account for
                    // every transfer there is.
                    let (mut partial, mut misplaced, mut transfers) = (Vec::new(), Vec::new(), 0);
                    for i in 0..(v.transfers as u64 + 64) {
                        let mut present = Vec::new();
                        for key in keys(i) {
                            present.push(ledger::transfer_by_key(tx, "crash", &key)?);
                        }
                        if present.iter().all(Option::is_none) {
                            continue;
                        }
                        if present.iter().any(Option::is_none) {
                            partial.push(i);
                            continue;
                        }
                        transfers += present.len() as i64;
                        let reservation = present[1].as_ref().unwrap();
                        // A post takes all but a cent of what was reserved.
                        let posted_right = resolution(i) != PendingState::Posted
                            || present[2].as_ref().unwrap().amount
                                == present[0].as_ref().unwrap().amount.checked_sub(Money::from_minor(1)).unwrap();
                        if reservation.state != resolution(i) || !posted_right {
                            misplaced.push((i, reservation.state));
                        }
                    }
                    Ok::<_, StoreError>((missing, partial, misplaced, transfers, v))
                })
                .await
                .unwrap();
            assert!(
                missing.is_empty(),
                "round {round}: acknowledged but lost: {missing:?}"
            );
            assert!(
                partial.is_empty(),
                "round {round}: partly written units {partial:?}"
            );
            assert!(
                misplaced.is_empty(),
                "round {round}: {} reservations not where (or not for what) their unit left them, first {:?}",
                misplaced.len(),
                &misplaced[..misplaced.len().min(10)]
            );
            assert_eq!(
                transfers, verification.transfers,
                "round {round}: transfers no unit accounts for"
            );
            assert!(transfers as usize >= 2 * acked_count, "round {round}");
            assert!(
                verification.ok(),
                "round {round}: {:?}",
                verification.problems
            );
            store.close().await;
        });
    }
}
