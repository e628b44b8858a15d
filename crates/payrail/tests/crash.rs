//! SIGKILL during a debit load: after a restart, every debit that was
//! answered SUCCESS is there, no debit exists that was not sent, and wallet
//! and merchant balances agree with the debits that exist.
//!
//! Over HTTP an answer takes longer to arrive than the store takes to write
//! its batch to the WAL, so this test cannot see an answer sent a few
//! microseconds before its commit; `payrail-store`'s own crash test, whose
//! acknowledgements travel over a pipe, does (it fails if the writer answers
//! before committing).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use payrail_core::Money;
use payrail_mobikwik::client::Debit;
use support::{Server, cell};
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
        let answers = Arc::new(AtomicUsize::new(0));
        let reached = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let client = s.client();
        let pid = s.pid() as i32;

        let mut tasks = Vec::new();
        for worker in 0..24usize {
            let (c, wallets, answers, reached, stop) = (
                client.clone(),
                Arc::clone(&wallets),
                Arc::clone(&answers),
                Arc::clone(&reached),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                let mut sent = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (w, token) = &wallets[(worker + n) % WALLETS];
                    let orderid = format!("K{round}W{worker:02}N{n:06}");
                    // Amounts up to 9.99, so wallets also run dry (301s).
                    let amount = Money::from_minor(100 + ((worker * 37 + n * 11) % 900) as i64);
                    let amount_text = amount.to_string();
                    let outcome = match c.debit(&Debit::new(w, &amount_text, &orderid, token)).await
                    {
                        Ok(r) if r.is_success() => Outcome::Success,
                        Ok(r) => Outcome::Refused(r.statuscode().to_string()),
                        Err(_) => {
                            sent.push(Sent {
                                orderid,
                                wallet: w.clone(),
                                amount,
                                outcome: Outcome::Unknown,
                            });
                            break; // the server is gone
                        }
                    };
                    if answers.fetch_add(1, Ordering::SeqCst) + 1 == kill_after {
                        // Killed right here, by the worker that saw the
                        // answer: no scheduling hop between answer and kill.
                        support::sigkill(pid);
                        reached.notify_one();
                    }
                    sent.push(Sent {
                        orderid,
                        wallet: w.clone(),
                        amount,
                        outcome,
                    });
                }
                sent
            }));
        }
        reached.notified().await;
        let db = s.kill().await;
        stop.store(true, Ordering::SeqCst);
        let mut sent = Vec::new();
        for t in tasks {
            sent.extend(t.await.unwrap());
        }

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
        let answered = sent
            .iter()
            .filter(|x| !matches!(x.outcome, Outcome::Unknown))
            .count();
        assert!(
            answered >= kill_after,
            "round {round}: {answered} < {kill_after}"
        );
        assert!(
            sent.iter().any(|x| matches!(x.outcome, Outcome::Success)),
            "round {round}: no debit succeeded"
        );
        s.verify_ok().await;
    }
}
