//! SIGKILL during a debit load: after a restart, every debit that was
//! answered SUCCESS is there, no debit exists that was not sent, and wallet
//! and merchant balances agree with the debits that exist. The second test
//! does the same for a mixed load of cashback debits, refunds and admin
//! credits.
//!
//! Over HTTP an answer takes longer to arrive than the store takes to write
//! its batch to the WAL, so this test cannot see an answer sent a few
//! microseconds before its commit; `payrail-store`'s own crash test, whose
//! acknowledgements travel over a pipe, does (it fails if the writer answers
//! before committing).

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use payrail_core::Money;
use payrail_mobikwik::client::Debit;
use support::{Db, Server, cell};
use tokio::sync::Notify;

#[derive(Debug, Clone)]
enum Outcome {
    Success,
    Refused(String),
    /// No answer: killed mid-flight. Either outcome is allowed.
    Unknown,
}

struct Sent {
    orderid: String,
    wallet: String,
    amount: Money,
    outcome: Outcome,
}

const WALLETS: usize = 6;
const START_BALANCE: &str = "300.00";
const WORKERS: usize = 24;

/// Loads `s` from `WORKERS` tasks, each calling `step(worker, n)` for n = 0,
/// 1, …; a step returns what it sent and whether it was answered. The task
/// that sees the `kill_after`th answer SIGKILLs the server at once, so no
/// scheduling hop lies between an answer and the kill; a step without an
/// answer ends its task. Returns every step's record and the database.
async fn load_until_killed<T, F, Fut>(s: Server, kill_after: usize, step: F) -> (Vec<T>, Db)
where
    T: Send + 'static,
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (T, bool)> + Send + 'static,
{
    let step = Arc::new(step);
    let answers = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let pid = s.pid() as i32;
    let tasks: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (step, answers, reached, stop) = (
                Arc::clone(&step),
                Arc::clone(&answers),
                Arc::clone(&reached),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut records = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (record, answered) = step(worker, n).await;
                    records.push(record);
                    if !answered {
                        break; // the server is gone
                    }
                    if answers.fetch_add(1, Ordering::SeqCst) + 1 == kill_after {
                        support::sigkill(pid);
                        reached.notify_one();
                    }
                }
                records
            })
        })
        .collect();
    // The bound only turns a server that died on its own into a failure.
    tokio::time::timeout(Duration::from_secs(120), reached.notified())
        .await
        .expect("the load never reached the kill: did the server die?");
    let db = s.kill().await;
    stop.store(true, Ordering::SeqCst);
    let mut records = Vec::new();
    for t in tasks {
        records.extend(t.await.unwrap());
    }
    (records, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_debits_survive_sigkill_and_none_are_invented() {
    for round in 0..3 {
        let s = Server::start().await;
        let mut wallets = Vec::new();
        for i in 0..WALLETS {
            let w = cell(100 + i as u32);
            let token = s.wallet_with_token(&w, START_BALANCE, "9.99").await;
            wallets.push((w, token));
        }
        let wallets = Arc::new(wallets);
        let merchant_before = Money::parse(&s.merchant_balance("MBK9006").await).unwrap();
        // The moment of the kill: after a random number of answers. Wallets
        // run dry after about 330 debits, so later answers are mostly 301s.
        let kill_after = rand::random_range(20..600usize);
        let (client, load_wallets) = (s.client(), Arc::clone(&wallets));
        let step = move |worker: usize, n: usize| {
            let (c, wallets) = (client.clone(), Arc::clone(&load_wallets));
            async move {
                let (w, token) = &wallets[(worker + n) % WALLETS];
                let orderid = format!("K{round}W{worker:02}N{n:06}");
                // Amounts up to 9.99, so wallets also run dry (301s).
                let amount = Money::from_minor(100 + ((worker * 37 + n * 11) % 900) as i64);
                let amount_text = amount.to_string();
                let outcome = match c.debit(&Debit::new(w, &amount_text, &orderid, token)).await {
                    Ok(r) if r.is_success() => Outcome::Success,
                    Ok(r) => Outcome::Refused(r.statuscode().to_string()),
                    Err(_) => Outcome::Unknown,
                };
                let answered = !matches!(outcome, Outcome::Unknown);
                let sent = Sent {
                    orderid,
                    wallet: w.clone(),
                    amount,
                    outcome,
                };
                (sent, answered)
            }
        };
        let (sent, db) = load_until_killed(s, kill_after, step).await;

        let s = Server::start_on(db).await;
        let c = s.client();
        let mut committed: HashMap<String, Money> = HashMap::new();
        let mut merchant_total = merchant_before;
        for x in &sent {
            let st = c.check_status(&x.orderid).await.unwrap();
            assert!(st.checksum_ok);
            let present = st.statuscode() == "0";
            match (&x.outcome, present) {
                (Outcome::Success, false) => panic!(
                    "round {round}: {} was answered SUCCESS but is gone",
                    x.orderid
                ),
                (Outcome::Refused(code), true) => panic!(
                    "round {round}: {} was refused ({code}) but exists",
                    x.orderid
                ),
                _ => {}
            }
            if present {
                assert_eq!(Money::parse(st.get("amount")).unwrap(), x.amount);
                *committed.entry(x.wallet.clone()).or_default() = committed
                    .get(&x.wallet)
                    .copied()
                    .unwrap_or_default()
                    .checked_add(x.amount)
                    .unwrap();
                merchant_total = merchant_total.checked_add(x.amount).unwrap();
            }
        }
        let start = Money::parse(START_BALANCE).unwrap();
        for (w, _) in wallets.iter() {
            let spent = committed.get(w).copied().unwrap_or_default();
            assert_eq!(
                s.wallet_balance(w).await,
                start.checked_sub(spent).unwrap().to_string(),
                "round {round}: wallet {w} disagrees with its debits"
            );
        }
        // Nothing was invented: the merchant holds exactly the debits we sent.
        assert_eq!(
            s.merchant_balance("MBK9006").await,
            merchant_total.to_string(),
            "round {round}"
        );
        assert!(
            sent.iter().any(|x| matches!(x.outcome, Outcome::Success)),
            "round {round}: no debit succeeded"
        );
        s.verify_ok().await;
    }
}

/// What a worker of the mixed load sent.
#[derive(Debug, Clone)]
enum Op {
    /// A debit; `coupon` pays 20% cashback.
    Debit {
        orderid: String,
        wallet: usize,
        amount: Money,
        coupon: bool,
    },
    /// A refund of `ORDERS[order]`, paid with cashback before the load.
    Refund {
        order: usize,
        refundid: String,
        amount: Money,
    },
    /// An admin credit.
    Credit {
        wallet: usize,
        reference: String,
        amount: Money,
    },
}

struct Done {
    op: Op,
    outcome: Outcome,
    /// The answer's fields (wallet rail) or body (admin), when answered.
    answer: Option<serde_json::Value>,
}

/// The pre-load orders: each wallet paid one of 99.99 with SAVE20, so each
/// carries 19.99 of cashback and a wallet part of 80.00.
const ORDER_AMOUNT: i64 = 9_999;
const ORDER_CASHBACK: i64 = 1_999;
const ORDERS_PER_WALLET: usize = 1;

/// Refunds, cashback debits and admin credits under a SIGKILL: the same
/// promise as the plain debits above, for every other way money moves over
/// the wire. After a restart each answered refund and debit is there and
/// each refused one is not; answered credits are still known by their
/// reference (sent again, they replay rather than credit twice); and every
/// wallet holds exactly what the operations that exist add up to, cashback
/// and the refunds' return of it included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_refunds_credits_and_cashback_survive_sigkill() {
    use serde_json::{Value, json};

    for round in 0..3 {
        let s = Server::start().await;
        let c = s.client();
        let mut wallets = Vec::new();
        for i in 0..WALLETS {
            let w = cell(200 + i as u32);
            let token = s.wallet_with_token(&w, "1000.00", "100.00").await;
            wallets.push((w, token));
        }
        let mut orders = Vec::new();
        for (i, (w, token)) in wallets.iter().enumerate() {
            for k in 0..ORDERS_PER_WALLET {
                let orderid = format!("PREPAID{round}W{i}K{k}");
                let mut d = Debit::new(w, "99.99", &orderid, token);
                d.coupon = Some("SAVE20");
                let r = c.debit(&d).await.unwrap();
                assert_eq!(
                    (r.statuscode(), r.get("cashback"), r.get("net_debit")),
                    ("0", "19.99", "80.00"),
                    "{r:?}"
                );
                orders.push((orderid, i));
            }
        }
        let wallets = Arc::new(wallets);
        let orders = Arc::new(orders);
        let merchant_before = Money::parse(&s.merchant_balance("MBK9006").await).unwrap();
        // Refunds of 1.00 to 12.99 against orders of 99.99: an order takes
        // about 14, so kills after about 250 answers come after some refunds
        // were refused for exceeding their order. Round 0 always goes that
        // far.
        let kill_after = rand::random_range(if round == 0 { 450 } else { 20 }..600usize);
        let (client, http, credit_url) = (s.client(), s.http.clone(), s.url("/admin/v1/wallets"));
        let (load_wallets, load_orders) = (Arc::clone(&wallets), Arc::clone(&orders));
        let step = move |worker: usize, n: usize| {
            let (c, http, credit_url) = (client.clone(), http.clone(), credit_url.clone());
            let (wallets, orders) = (Arc::clone(&load_wallets), Arc::clone(&load_orders));
            async move {
                let wallet = (worker + n) % WALLETS;
                let tag = format!("{round}W{worker:02}N{n:05}");
                let op = match (worker + n) % 3 {
                    0 => Op::Debit {
                        orderid: format!("D{tag}"),
                        wallet,
                        amount: Money::from_minor(100 + ((worker * 37 + n * 11) % 900) as i64),
                        coupon: n.is_multiple_of(2),
                    },
                    1 => Op::Refund {
                        order: (worker * 5 + n) % orders.len(),
                        refundid: format!("R{tag}"),
                        amount: Money::from_minor(100 + ((worker * 53 + n * 17) % 1200) as i64),
                    },
                    _ => Op::Credit {
                        wallet,
                        reference: format!("C{tag}"),
                        amount: Money::from_minor(1 + ((worker * 29 + n * 13) % 500) as i64),
                    },
                };
                let answer = match &op {
                    Op::Debit {
                        orderid,
                        wallet,
                        amount,
                        coupon,
                    } => {
                        let (w, token) = &wallets[*wallet];
                        let amount = amount.to_string();
                        let mut d = Debit::new(w, &amount, orderid, token);
                        d.coupon = coupon.then_some("SAVE20");
                        answered(c.debit(&d).await)
                    }
                    Op::Refund {
                        order,
                        refundid,
                        amount,
                    } => answered(
                        c.refund(&orders[*order].0, refundid, &amount.to_string(), true)
                            .await,
                    ),
                    Op::Credit {
                        wallet,
                        reference,
                        amount,
                    } => {
                        let req = http
                            .post(format!("{credit_url}/{}/credit", wallets[*wallet].0))
                            .bearer_auth(support::ADMIN_TOKEN)
                            .json(&json!({ "amount": amount.to_string(), "reference": reference }));
                        match req.send().await {
                            Ok(resp) => {
                                let status = resp.status();
                                match resp.json::<Value>().await {
                                    Ok(v) => Some((status.is_success(), status.to_string(), v)),
                                    Err(_) => None, // killed mid-body
                                }
                            }
                            Err(_) => None,
                        }
                    }
                };
                let (outcome, answer) = match answer {
                    Some((true, _, answer)) => (Outcome::Success, Some(answer)),
                    Some((false, code, answer)) => (Outcome::Refused(code), Some(answer)),
                    None => (Outcome::Unknown, None),
                };
                let answered = answer.is_some();
                (
                    Done {
                        op,
                        outcome,
                        answer,
                    },
                    answered,
                )
            }
        };
        let (done, db) = load_until_killed(s, kill_after, step).await;

        let s = Server::start_on(db).await;
        let c = s.client();
        // What the wallets and the merchant must hold, in minor units, from
        // the operations found to exist.
        let mut wallet_minor = [100_000 - ORDERS_PER_WALLET as i64 * 8_000; WALLETS];
        let mut merchant_minor = merchant_before.minor();
        let mut refunded = vec![0i64; orders.len()];
        let mut refused_refunds = 0;
        for d in &done {
            let unexpected = |present: bool| match (&d.outcome, present) {
                (Outcome::Success, false) => {
                    panic!("round {round}: {:?} was answered SUCCESS but is gone", d.op)
                }
                (Outcome::Refused(code), true) => {
                    panic!("round {round}: {:?} was refused ({code}) but exists", d.op)
                }
                _ => {}
            };
            match &d.op {
                Op::Debit {
                    orderid,
                    wallet,
                    amount,
                    coupon,
                } => {
                    let st = c.check_status(orderid).await.unwrap();
                    assert!(st.checksum_ok);
                    let present = st.statuscode() == "0";
                    unexpected(present);
                    if present {
                        assert_eq!(st.get("amount"), amount.to_string(), "{st:?}");
                        let cashback = if *coupon {
                            amount.minor() * 20 / 100
                        } else {
                            0
                        };
                        wallet_minor[*wallet] -= amount.minor() - cashback;
                        merchant_minor += amount.minor();
                    }
                }
                Op::Refund {
                    order,
                    refundid,
                    amount,
                } => {
                    let st = c
                        .check_refund_status(&orders[*order].0, refundid)
                        .await
                        .unwrap();
                    assert!(st.checksum_ok);
                    let present = st.statuscode() == "0";
                    assert!(present || st.statuscode() == "101", "{st:?}");
                    unexpected(present);
                    if present {
                        assert_eq!(st.get("refundamount"), amount.to_string(), "{st:?}");
                        refunded[*order] += amount.minor();
                    }
                    if let (Outcome::Success, Some(first)) = (&d.outcome, &d.answer) {
                        // A retry after the restart gets the first answer.
                        let again = c
                            .refund(&orders[*order].0, refundid, &amount.to_string(), true)
                            .await
                            .unwrap();
                        assert_eq!(&fields(&again.fields), first, "round {round}");
                    }
                    if let Outcome::Refused(code) = &d.outcome {
                        assert_eq!(code, "45", "{:?}", d.answer);
                        refused_refunds += 1;
                    }
                }
                Op::Credit {
                    wallet,
                    reference,
                    amount,
                } => {
                    // Sent again: an answered credit must replay, an
                    // unanswered one may either replay or be made now.
                    let (status, v) = s
                        .admin_post(
                            &format!("/wallets/{}/credit", wallets[*wallet].0),
                            json!({ "amount": amount.to_string(), "reference": reference }),
                        )
                        .await;
                    assert_eq!(status, reqwest::StatusCode::OK, "{v}");
                    match (&d.outcome, &d.answer) {
                        (Outcome::Success, Some(first)) => {
                            // Its reference is its own: made by that answer.
                            assert_eq!(first["replayed"], json!(false), "{first}");
                            // The answer shows the wallet as it is now, so
                            // only the replay is compared.
                            assert_eq!(v["replayed"], json!(true), "round {round}: {v}");
                        }
                        (Outcome::Unknown, _) => {}
                        _ => panic!("round {round}: a credit was refused: {:?}", d.answer),
                    }
                    wallet_minor[*wallet] += amount.minor();
                }
            }
        }
        // Each order's refunds return cashback on their running total:
        // promotions get floor(refunded × 19.99 / 99.99), the wallet the rest.
        for (i, (_, wallet)) in orders.iter().enumerate() {
            assert!(
                refunded[i] <= ORDER_AMOUNT,
                "round {round}: order {i} over-refunded"
            );
            let promotions = refunded[i] * ORDER_CASHBACK / ORDER_AMOUNT;
            wallet_minor[*wallet] += refunded[i] - promotions;
            merchant_minor -= refunded[i];
        }
        for (i, (w, _)) in wallets.iter().enumerate() {
            assert_eq!(
                s.wallet_balance(w).await,
                Money::from_minor(wallet_minor[i]).to_string(),
                "round {round}: wallet {w} disagrees with what exists"
            );
        }
        assert_eq!(
            s.merchant_balance("MBK9006").await,
            Money::from_minor(merchant_minor).to_string(),
            "round {round}"
        );
        let answered = done
            .iter()
            .filter(|d| !matches!(d.outcome, Outcome::Unknown))
            .count();
        if round == 0 {
            assert!(refused_refunds > 0, "round 0 never refused a refund");
        }
        for kind in 0..3 {
            assert!(
                done.iter().any(|d| matches!(d.outcome, Outcome::Success)
                    && kind
                        == match d.op {
                            Op::Debit { .. } => 0,
                            Op::Refund { .. } => 1,
                            Op::Credit { .. } => 2,
                        }),
                "round {round}: no operation of kind {kind} succeeded"
            );
        }
        eprintln!("round {round}: {answered} answered, {refused_refunds} refunds refused");
        s.verify_ok().await;
    }
}

/// A wallet rail answer as (SUCCESS?, status code, fields); `None` when
/// there was none (the server is gone).
fn answered(
    r: Result<payrail_mobikwik::client::WalletResponse, payrail_mobikwik::client::ClientError>,
) -> Option<(bool, String, serde_json::Value)> {
    let r = r.ok()?;
    assert!(r.checksum_ok, "{r:?}");
    Some((
        r.is_success(),
        r.statuscode().to_string(),
        fields(&r.fields),
    ))
}

/// A wallet answer's fields as a JSON object, to compare answers.
fn fields(f: &[(String, String)]) -> serde_json::Value {
    f.iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
