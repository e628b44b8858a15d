//! Durable transfers through the store API, with many callers at once so that
//! group commit can batch them (each commit is fsynced: synchronous=FULL).
//!
//! `cargo bench -p payrail-store --bench transfer`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use payrail_core::{AccountFlags, AccountId, Currency, Money, SystemClock};
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::{Location, MasterKey, Options, Store};

struct Fixture {
    rt: tokio::runtime::Runtime,
    store: Store,
    accounts: Arc<Vec<AccountId>>,
    _dir: tempfile::TempDir,
}

fn fixture(wallets: usize) -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::new(
        Location::Sqlite(dir.path().join("bench.db")),
        MasterKey::from_bytes([1; 32]),
        Arc::new(SystemClock),
    );
    let store = rt.block_on(Store::open(opts)).unwrap();
    let accounts = rt
        .block_on(store.write(move |tx| {
            let issuer = ledger::open_account(tx, "issuer", Currency::INR, AccountFlags::NONE)?;
            let merchant =
                ledger::open_account(tx, "merchant", Currency::INR, AccountFlags::NEVER_NEGATIVE)?;
            let mut out = vec![issuer, merchant];
            for i in 0..wallets {
                let w = ledger::open_account(
                    tx,
                    &format!("wallet-{i}"),
                    Currency::INR,
                    AccountFlags::NEVER_NEGATIVE,
                )?;
                ledger::transfer(
                    tx,
                    &ledger::single("fund", i.to_string(), issuer, w, Currency::INR, Money::MAX),
                )?;
                out.push(w);
            }
            Ok::<_, LedgerOpError>(out)
        }))
        .unwrap();
    Fixture {
        rt,
        store,
        accounts: Arc::new(accounts),
        _dir: dir,
    }
}

/// `n` transfers from `callers` concurrent tasks; returns the elapsed time.
fn run(f: &Fixture, n: u64, callers: u64, offset: &mut u64) -> Duration {
    let base = *offset;
    *offset += n;
    let started = Instant::now();
    f.rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..callers {
            let (store, accounts) = (f.store.clone(), Arc::clone(&f.accounts));
            tasks.push(tokio::spawn(async move {
                let mut i = c;
                while i < n {
                    let key = base + i;
                    let wallet = accounts[2 + (key as usize % (accounts.len() - 2))];
                    let merchant = accounts[1];
                    store
                        .write(move |tx| {
                            ledger::transfer(
                                tx,
                                &ledger::single(
                                    "bench",
                                    key.to_string(),
                                    wallet,
                                    merchant,
                                    Currency::INR,
                                    Money::from_minor(1),
                                ),
                            )
                        })
                        .await
                        .unwrap();
                    i += callers;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    started.elapsed()
}

fn transfers(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_transfer");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for callers in [1u64, 64, 512] {
        let f = fixture(1_000);
        let mut offset = 0;
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("callers", callers),
            &callers,
            |b, &callers| {
                b.iter_custom(|iters| run(&f, iters, callers.min(iters), &mut offset));
            },
        );
        f.rt.block_on(f.store.close());
    }
    group.finish();
}

criterion_group!(benches, transfers);
criterion_main!(benches);
