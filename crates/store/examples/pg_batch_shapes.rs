//! How much PostgreSQL work a batch of debits costs in two shapes: one
//! statement per debit per step (what the writer does today), or one
//! statement per step for the whole batch (`= ANY`, `unnest`). It measures
//! the database side of the issue-5 target "PostgreSQL ≥ 2× pgbench -N"
//! without HTTP, so the two shapes can be compared before the writer is
//! rebuilt around the second.
//!
//! It writes balanced transfers straight into the tables (each wallet pays
//! the merchant 1 minor unit per debit; the merchant's credit goes through
//! the writers' delta rows, as the store does), bypassing the rails and
//! their checks. Point it only at a scratch database that `payrail bench
//! --db postgres://…` has filled, never at one that holds real money:
//!
//! ```text
//! cargo run --release -p payrail-store --example pg_batch_shapes -- \
//!     postgres://postgres@127.0.0.1:55441/scratch row 16 2 10
//! ```
//!
//! Arguments: URL, `row` or `set`, debits per batch, writer threads, seconds.
//!
//! The per-debit statements copy the store's own (`mobikwik.rs`,
//! `ledger.rs`), which are private to it: change them together, or the
//! comparison measures something the server no longer does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Statement};

const TOKEN_AND_WALLET: &str =
    "SELECT t.digest, t.mid, t.cell, t.cap, t.lineage, t.state, t.created_at, t.expires_at,
        w.cell, w.account_id, w.email, w.blocked
   FROM mbk_tokens t LEFT JOIN wallets w ON w.cell = t.cell";
/// What account `a` has available, delta rows included (as `apply_delta`).
const AVAILABLE: &str = "a.credits_posted - a.debits_posted - a.debits_pending
      + CAST(COALESCE((SELECT SUM(x.credits_posted - x.debits_posted - x.debits_pending)
                         FROM account_deltas x WHERE x.account_id = a.id), 0) AS BIGINT)";

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Row,
    Set,
}

struct Wallet {
    digest: Vec<u8>,
    account: i64,
    cell: String,
}

struct Setting {
    url: String,
    shape: Shape,
    batch: usize,
    threads: usize,
    merchant: (String, i64),
    currency: String,
    /// Keeps orderids and idempotency keys of separate runs apart.
    run: u128,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, shape, batch, threads, secs] = &args[..] else {
        eprintln!("usage: pg_batch_shapes URL row|set BATCH THREADS SECONDS");
        std::process::exit(2);
    };
    let shape = match shape.as_str() {
        "row" => Shape::Row,
        "set" => Shape::Set,
        other => panic!("shape must be row or set, not {other}"),
    };
    let mut c = Client::connect(url, NoTls).expect("connect");
    let m = c
        .query_one(
            "SELECT m.mid, m.account_id, a.currency FROM mbk_merchants m JOIN accounts a ON a.id = m.account_id ORDER BY m.mid LIMIT 1",
            &[],
        )
        .expect("a merchant (fill the database with payrail bench first)");
    let setting = Arc::new(Setting {
        url: url.clone(),
        shape,
        batch: batch.parse().expect("BATCH"),
        threads: threads.parse().expect("THREADS"),
        merchant: (m.get(0), m.get(1)),
        currency: m.get(2),
        run: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos(),
    });
    let wallets: Arc<Vec<Wallet>> = Arc::new(
        c.query(
            "SELECT t.digest, w.account_id, w.cell FROM mbk_tokens t JOIN wallets w ON w.cell = t.cell
              JOIN accounts a ON a.id = w.account_id
              WHERE t.state = 0 AND t.mid = $1 AND a.currency = $2
                AND a.credits_posted - a.debits_posted - a.debits_pending > 10000",
            &[&setting.merchant.0, &setting.currency],
        )
        .expect("wallets")
        .iter()
        .map(|r| Wallet {
            digest: r.get(0),
            account: r.get(1),
            cell: r.get(2),
        })
        .collect(),
    );
    assert!(
        wallets.len() >= setting.threads * setting.batch,
        "too few funded wallets"
    );
    let debits = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs.parse().expect("SECONDS"));
    let handles: Vec<_> = (0..setting.threads)
        .map(|t| {
            let (setting, wallets, debits) = (setting.clone(), wallets.clone(), debits.clone());
            std::thread::spawn(move || writer(&setting, &wallets, t, until, &debits))
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let shape = if setting.shape == Shape::Row {
        "row"
    } else {
        "set"
    };
    println!(
        "{shape} batch={} threads={}: {:.0} debits/s",
        setting.batch,
        setting.threads,
        debits.load(Ordering::Relaxed) as f64 / secs.parse::<f64>().expect("SECONDS")
    );
}

/// One writer: batches of debits on its own share of the wallets (as
/// `write_keyed` routes them), each batch one transaction.
fn writer(s: &Setting, wallets: &[Wallet], t: usize, until: Instant, debits: &AtomicU64) {
    let mut c = Client::connect(&s.url, NoTls).expect("connect");
    let mine: Vec<&Wallet> = wallets.iter().skip(t).step_by(s.threads).collect();
    let writer_id = -1 - t as i64; // below the store's random positive ids
    c.execute(
        "INSERT INTO payrail_writers (id, last_batch, started_at) VALUES ($1, 0, 0) ON CONFLICT (id) DO NOTHING",
        &[&writer_id],
    )
    .expect("marker row");
    let prep = |c: &mut Client, sql: &str| -> Statement { c.prepare(sql).expect(sql) };
    let clock = prep(&mut c, "SELECT offset_ms FROM sandbox_clock WHERE id = $1");
    let credit = prep(
        &mut c,
        "INSERT INTO account_deltas (account_id, debits_pending, debits_posted, credits_pending, credits_posted, writer_id)
         VALUES ($1, 0, 0, 0, $2, $3) ON CONFLICT (account_id, writer_id) DO UPDATE
            SET credits_posted = account_deltas.credits_posted + excluded.credits_posted",
    );
    let marker = prep(
        &mut c,
        "UPDATE payrail_writers SET last_batch = last_batch + 1 WHERE id = $1",
    );
    let row = [
        prep(&mut c, &format!("{TOKEN_AND_WALLET} WHERE t.digest = $1")),
        prep(
            &mut c,
            "INSERT INTO mbk_orders (mid, orderid, txnid, cell, amount, cashback, coupon, aggregated_id, refunded, refunded_cashback, created_at)
             VALUES ($1, $2, $3, $4, 1, 0, NULL, NULL, 0, 0, 0) ON CONFLICT (mid, orderid) DO NOTHING",
        ),
        prep(
            &mut c,
            "INSERT INTO transfers (scope, idem_key, kind, debit_account, credit_account, currency, amount, pending_id, state, timeout_ms, expires_at, created_at)
             VALUES ('mobikwik', $1, 0, $2, $3, $4, 1, NULL, 0, NULL, NULL, 0)
             ON CONFLICT (scope, idem_key) DO NOTHING RETURNING id",
        ),
        prep(
            &mut c,
            "SELECT id FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
        ),
        prep(
            &mut c,
            &format!(
                "UPDATE accounts a SET debits_posted = a.debits_posted + 1
                  WHERE a.id = $1 AND ((a.flags & 1) = 0 OR {AVAILABLE} - 1 >= 0)"
            ),
        ),
    ];
    let set = [
        prep(&mut c, &format!("{TOKEN_AND_WALLET} WHERE t.digest = ANY($1)")),
        prep(
            &mut c,
            "SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        ),
        prep(
            &mut c,
            "INSERT INTO mbk_orders (mid, orderid, txnid, cell, amount, cashback, coupon, aggregated_id, refunded, refunded_cashback, created_at)
             SELECT $1, o, x, c, 1, 0, NULL, NULL, 0, 0, 0 FROM unnest($2::text[], $3::text[], $4::text[]) AS u(o, x, c)
             ON CONFLICT (mid, orderid) DO NOTHING RETURNING orderid",
        ),
        prep(
            &mut c,
            "INSERT INTO transfers (scope, idem_key, kind, debit_account, credit_account, currency, amount, pending_id, state, timeout_ms, expires_at, created_at)
             SELECT 'mobikwik', k, 0, a, $3, $4, 1, NULL, 0, NULL, NULL, 0 FROM unnest($1::text[], $2::bigint[]) AS u(k, a)
             ON CONFLICT (scope, idem_key) DO NOTHING RETURNING id",
        ),
        prep(
            &mut c,
            &format!(
                "UPDATE accounts a SET debits_posted = a.debits_posted + u.d
                   FROM unnest($1::bigint[], $2::bigint[]) AS u(id, d)
                  WHERE a.id = u.id AND ((a.flags & 1) = 0 OR {AVAILABLE} - u.d >= 0)
                  RETURNING a.id"
            ),
        ),
    ];
    let (mid, merchant) = (s.merchant.0.as_str(), s.merchant.1);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (t as u64 + 1);
    let mut n = 0u64;
    while Instant::now() < until {
        let picks: Vec<&Wallet> = (0..s.batch)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                mine[(seed % mine.len() as u64) as usize]
            })
            .collect();
        let orderids: Vec<String> = picks
            .iter()
            .map(|_| {
                n += 1;
                format!("S{:x}W{t}N{n}", s.run)
            })
            .collect();
        let txnids: Vec<String> = orderids.iter().map(|o| format!("TXN{o}")).collect();
        let keys: Vec<String> = orderids.iter().map(|o| format!("debit:{o}")).collect();
        let mut tx = c.transaction().expect("begin");
        tx.query(&clock, &[&1i64]).expect("clock");
        match s.shape {
            Shape::Row => {
                for (i, w) in picks.iter().enumerate() {
                    tx.query(&row[0], &[&w.digest]).expect("token");
                    let o = tx
                        .execute(&row[1], &[&mid, &orderids[i], &txnids[i], &w.cell])
                        .expect("order");
                    let k = tx
                        .query(&row[2], &[&keys[i], &w.account, &merchant, &s.currency])
                        .expect("transfer");
                    tx.query(&row[3], &[&w.account]).expect("lock");
                    let u = tx.execute(&row[4], &[&w.account]).expect("update");
                    assert_eq!((o, k.len(), u), (1, 1, 1), "a debit did not apply");
                }
            }
            Shape::Set => {
                let digests: Vec<&[u8]> = picks.iter().map(|w| w.digest.as_slice()).collect();
                let accounts: Vec<i64> = picks.iter().map(|w| w.account).collect();
                let cells: Vec<&str> = picks.iter().map(|w| w.cell.as_str()).collect();
                let mut per_account: BTreeMap<i64, i64> = BTreeMap::new();
                for a in &accounts {
                    *per_account.entry(*a).or_default() += 1;
                }
                let (ids, amounts): (Vec<i64>, Vec<i64>) = per_account.into_iter().unzip();
                tx.query(&set[0], &[&digests]).expect("tokens");
                tx.query(&set[1], &[&ids]).expect("locks");
                let o = tx
                    .query(&set[2], &[&mid, &orderids, &txnids, &cells])
                    .expect("orders");
                let k = tx
                    .query(&set[3], &[&keys, &accounts, &merchant, &s.currency])
                    .expect("transfers");
                let u = tx.query(&set[4], &[&ids, &amounts]).expect("updates");
                assert_eq!(
                    (o.len(), k.len(), u.len()),
                    (s.batch, s.batch, ids.len()),
                    "a debit did not apply"
                );
            }
        }
        tx.execute(&credit, &[&merchant, &(s.batch as i64), &writer_id])
            .expect("merchant credit");
        tx.execute(&marker, &[&writer_id]).expect("marker");
        tx.commit().expect("commit");
        debits.fetch_add(s.batch as u64, Ordering::Relaxed);
    }
}
