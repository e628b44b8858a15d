//! Races, from outside, through the real server: many requests that compete
//! for one order, one refundid, one admin reference or one OTP, released
//! together. Each test says which single outcome is allowed, checks that the
//! money moved exactly that far, and ends with the ledger verifying itself.
//! Run on SQLite, and on PostgreSQL with `PAYRAIL_TEST_BACKEND=postgres`,
//! where the racing requests are spread over three nodes.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use payrail_core::Money;
use payrail_mobikwik::client::{Client, Debit, SignedRequest, WalletResponse};
use payrail_mobikwik::fixtures::MID;
use payrail_mobikwik::wire::signed_fields;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, Db, Server, cell, counts, orderid, tally};
use tokio::sync::Barrier;

/// The servers a test talks to. On PostgreSQL, three nodes over one
/// database, the racing requests spread over them: a node runs all debits
/// of one wallet on one of its writer connections, so debits racing on one
/// node never meet in two open transactions, while across nodes they do
/// (refunds and credits are spread over a node's writers as well). SQLite
/// is served by one process at a time, so there it is one node. It
/// dereferences to the first node, for set-up and checks.
struct Nodes {
    servers: Vec<Server>,
    clients: Vec<Client>,
}

impl Nodes {
    async fn start() -> Nodes {
        let db = Db::fresh();
        let n = if db.inner.is_postgres() { 3 } else { 1 };
        let starts = (0..n).map(|_| Server::start_on(db.clone()));
        let servers = futures::future::join_all(starts).await;
        let clients = servers.iter().map(Server::client).collect();
        Nodes { servers, clients }
    }

    /// The node the `i`th racing request goes to.
    fn node(&self, i: usize) -> &Server {
        &self.servers[i % self.servers.len()]
    }

    /// The sandbox merchant's client for [`Nodes::node`]`(i)`.
    fn client_for(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }
}

impl Deref for Nodes {
    type Target = Server;

    fn deref(&self) -> &Server {
        &self.servers[0]
    }
}

/// Runs `n` futures, each on a task of its own, and releases them together
/// with a barrier, so they reach the server as close to at once as the
/// machine allows. `make(i)` does its preparation (signing, say) before the
/// barrier; the future it returns runs after it. Answers come back in `i`
/// order.
async fn race<T, F, Fut>(n: usize, make: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            let work = make(i);
            tokio::spawn(async move {
                barrier.wait().await;
                work.await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("racing task panicked"));
    }
    out
}

/// Sends `req` once `make`'s barrier lets it; the answer's checksum must
/// verify.
fn send_later(c: &Client, req: SignedRequest) -> impl Future<Output = WalletResponse> + use<> {
    let c = c.clone();
    async move {
        let r = c.send(&req).await.expect("request");
        assert!(r.checksum_ok, "answer checksum does not verify: {r:?}");
        r
    }
}

async fn send(c: &Client, req: &SignedRequest) -> WalletResponse {
    let r = c.send(req).await.expect("request");
    assert!(r.checksum_ok, "answer checksum does not verify: {r:?}");
    r
}

fn money(text: &str) -> Money {
    Money::parse(text).unwrap_or_else(|e| panic!("{text:?} is not an amount: {e:?}"))
}

fn plus(a: &str, b: &str) -> String {
    money(a).checked_add(money(b)).expect("sum").to_string()
}

fn minus(a: &str, b: &str) -> String {
    money(a)
        .checked_sub(money(b))
        .expect("difference")
        .to_string()
}

/// A wallet with `balance` and a token for the sandbox merchant capped at `cap`.
async fn funded(s: &Server, n: u32, balance: &str, cap: &str) -> (String, String) {
    let w = cell(n);
    let token = s.wallet_with_token(&w, balance, cap).await;
    assert_eq!(s.wallet_balance(&w).await, money(balance).to_string());
    (w, token)
}

/// A debit that must succeed; its answer.
async fn debit_ok(c: &Client, d: &Debit<'_>) -> WalletResponse {
    let r = send(c, &c.debit_request(d)).await;
    assert_eq!(r.statuscode(), "0", "{r:?}");
    r
}

/// Refunds racing on one order: `n` refunds, each with a refundid of its
/// own and `each` as amount, half of them naming the order by orderid and
/// half by txnid. Exactly `fits` may be made; the rest must be refused with
/// 45 for exceeding the debit, leave nothing behind (`/checkstatus` does not
/// know their refundids) and move no money. Returns the refids made.
async fn race_refunds(
    s: &Nodes,
    order: &str,
    txnid: &str,
    amount: &str,
    n: usize,
    each: &str,
    fits: usize,
) -> Vec<String> {
    let c = s.client();
    let refundid = |i: usize| format!("{order}_R{i:02}");
    let answers = race(n, |i| {
        let txid = if i % 2 == 0 { order } else { txnid };
        send_later(
            s.client_for(i),
            c.refund_request(txid, &refundid(i), each, true),
        )
    })
    .await;
    assert_eq!(
        tally(answers.iter().map(|r| r.statuscode().to_string())),
        counts(&[("0", fits), ("45", n - fits)]),
        "{answers:#?}"
    );
    let mut refids = BTreeSet::new();
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.get("refundid"), refundid(i), "{r:?}");
        // Asked of another node than the refund was sent to, if any.
        let st = send(
            s.client_for(i + 1),
            &c.check_status_request(order, Some(&refundid(i))),
        )
        .await;
        if r.is_success() {
            assert_eq!(
                (r.get("status"), r.get("amount")),
                ("SUCCESS", money(each).to_string().as_str()),
                "{r:?}"
            );
            assert!(refids.insert(r.get("refid").to_string()), "{r:?}");
            // The status check agrees with the answer.
            assert_eq!(
                (
                    st.statuscode(),
                    st.get("orderid"),
                    st.get("refundid"),
                    st.get("txnamount"),
                    st.get("refundamount"),
                    st.get("refid"),
                ),
                (
                    "0",
                    order,
                    refundid(i).as_str(),
                    money(amount).to_string().as_str(),
                    money(each).to_string().as_str(),
                    r.get("refid"),
                ),
                "{st:?}"
            );
        } else {
            // Refused for exceeding the debit, not as a reused refundid.
            assert_eq!((r.get("status"), r.get("refid")), ("FAILURE", ""), "{r:?}");
            assert!(r.get("statusmessage").contains("exceed"), "{r:?}");
            // A refused refund keeps nothing: its refundid is unknown.
            assert_eq!(st.statuscode(), "101", "{st:?}");
        }
    }
    // The order itself is still the payment it was.
    let st = send(&c, &c.check_status_request(order, None)).await;
    assert_eq!(
        (st.statuscode(), st.get("refid"), st.get("amount")),
        ("0", txnid, money(amount).to_string().as_str()),
        "{st:?}"
    );
    // Nothing more fits, however small.
    let r = send(&c, &c.refund_request(order, "LATE_REFUND", "0.01", true)).await;
    assert_eq!(r.statuscode(), "45", "{r:?}");
    refids.into_iter().collect()
}

/// Many refunds of one order, each with its own refundid, racing: the sum
/// refunded must never pass the debit's amount (README: "refunds past the
/// debit's amount (45)"). Two refunds that each read the order's totals
/// before the other wrote them would both fit; the order's conditional
/// update (and on PostgreSQL its row lock) must let exactly as many through
/// as fit, and return the whole debit to the wallet, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_refunds_of_one_order_never_exceed_the_debit() {
    let s = Nodes::start().await;
    let c = s.client();
    let (w, token) = funded(&s, 101, "250.00", "100").await;
    let merchant_before = s.merchant_balance(MID).await;
    let d = debit_ok(&c, &Debit::new(&w, "100.00", "RACEREFUND_01", &token)).await;
    let txnid = d.get("txnid").to_string();
    assert_eq!(s.wallet_balance(&w).await, "150.00");
    assert_eq!(
        s.merchant_balance(MID).await,
        plus(&merchant_before, "100.00")
    );

    let refids = race_refunds(&s, "RACEREFUND_01", &txnid, "100.00", 16, "25.00", 4).await;
    assert_eq!(refids.len(), 4);

    // Start − 100 + 100: refunded in full, once.
    assert_eq!(s.wallet_balance(&w).await, "250.00");
    assert_eq!(s.merchant_balance(MID).await, merchant_before);
    s.verify_ok().await;
}

/// The same race on an order paid partly by cashback (SAVE20, 20%). README:
/// cashback is `floor(amount × percent)`, and refunds return money to the
/// wallet and to promotions in the proportion they paid. 99.99 gets 19.99
/// of cashback, so the wallet paid 80.00; three refunds of 33.33 return
/// floor(R × 19.99 / 99.99) in total to promotions after R refunded: 6.66,
/// 13.32, 19.99, whatever their order. A refund that split by the totals
/// it read before another refund wrote them would give promotions 3 × 6.66
/// = 19.98 and the wallet a cent more than it paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_refunds_split_cashback_exactly_as_it_was_paid() {
    let s = Nodes::start().await;
    let c = s.client();
    let (w, token) = funded(&s, 102, "200.00", "100").await;
    let merchant_before = s.merchant_balance(MID).await;
    let mut d = Debit::new(&w, "99.99", "RACECASHBK_01", &token);
    d.coupon = Some("SAVE20");
    let r = debit_ok(&c, &d).await;
    assert_eq!(
        (r.get("amount"), r.get("cashback"), r.get("net_debit")),
        ("99.99", "19.99", "80.00"),
        "{r:?}"
    );
    let txnid = r.get("txnid").to_string();
    assert_eq!(s.wallet_balance(&w).await, "120.00");
    assert_eq!(
        s.merchant_balance(MID).await,
        plus(&merchant_before, "99.99")
    );

    let refids = race_refunds(&s, "RACECASHBK_01", &txnid, "99.99", 12, "33.33", 3).await;
    assert_eq!(refids.len(), 3);

    // The wallet got back exactly the 80.00 it paid; the merchant gave back
    // all 99.99, so (the ledger balancing) promotions got back their 19.99.
    assert_eq!(s.wallet_balance(&w).await, "200.00");
    assert_eq!(s.merchant_balance(MID).await, merchant_before);
    s.verify_ok().await;
}

/// Copies of one refund (same refundid, same amount) racing, as a merchant
/// retrying on a timeout does. README: a refundid used before gets "its first
/// answer if it was the same refund". The refund must be made once, and
/// every copy must get that same answer (same refid), never 45 because a
/// copy counted the first against the order's total, nor 99 because two
/// copies collided on the refundid's unique index. The second refund takes
/// what is left of the order, so a copy treated as a new refund would be
/// refused with 45 rather than pass unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_one_refund_racing_refund_once_with_one_answer() {
    const N: usize = 24;
    let s = Nodes::start().await;
    let c = s.client();
    let (w, token) = funded(&s, 103, "300.00", "100").await;
    let merchant_before = s.merchant_balance(MID).await;
    let d = debit_ok(&c, &Debit::new(&w, "100.00", "RACEREPLAY_01", &token)).await;
    let txnid = d.get("txnid").to_string();
    assert_eq!(s.wallet_balance(&w).await, "200.00");

    for (refundid, amount, wallet_after) in [
        ("REPLAY_A", "40.00", "240.00"),
        ("REPLAY_B", "60.00", "300.00"),
    ] {
        let req = c.refund_request("RACEREPLAY_01", refundid, amount, true);
        let answers = race(N, |i| send_later(s.client_for(i), req.clone())).await;
        let first = &answers[0];
        assert_eq!(first.statuscode(), "0", "{first:?}");
        assert_eq!(
            (first.get("refundid"), first.get("amount")),
            (refundid, amount),
            "{first:?}"
        );
        assert!(!first.get("refid").is_empty(), "{first:?}");
        for r in &answers {
            assert_eq!(r.fields, first.fields, "copies got different answers");
        }
        // Moved once.
        assert_eq!(s.wallet_balance(&w).await, wallet_after);
        let st = send(&c, &c.check_status_request("RACEREPLAY_01", Some(refundid))).await;
        assert_eq!(
            (st.statuscode(), st.get("refundamount"), st.get("refid")),
            ("0", amount, first.get("refid")),
            "{st:?}"
        );
        // And a copy sent afterwards still gets the first answer.
        let again = send(&c, &req).await;
        assert_eq!(again.fields, first.fields);
    }
    let r = send(&c, &c.refund_request(&txnid, "REPLAY_C", "0.01", true)).await;
    assert_eq!(r.statuscode(), "45", "{r:?}");
    assert_eq!(s.wallet_balance(&w).await, "300.00");
    assert_eq!(s.merchant_balance(MID).await, merchant_before);
    s.verify_ok().await;
}

/// `POST /admin/v1/wallets/{cell}/credit`, sent by its own task.
fn credit_later(
    s: &Server,
    w: &str,
    amount: &str,
    reference: &str,
) -> impl Future<Output = (StatusCode, Value)> + use<> {
    let req = s
        .http
        .post(s.url(&format!("/admin/v1/wallets/{w}/credit")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "amount": amount, "reference": reference }));
    async move {
        let resp = req.send().await.expect("admin request");
        let status = resp.status();
        let text = resp.text().await.expect("admin body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

/// Admin credits with one reference racing, as an operator's retries would:
/// README says the credit is "idempotent by reference (other amount: 409)".
/// Copies of one credit must raise the balance once and all answer 200 with
/// that balance (exactly one of them not a replay); copies of the reference
/// with different amounts must apply exactly one amount, every request for
/// that amount answering 200 and every other 409. A unique-key collision
/// between two writers must surface as neither a double credit nor a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_credits_racing_on_one_reference_credit_once() {
    let s = Nodes::start().await;
    let w = cell(104);
    let (st, v) = s
        .admin_post("/wallets", json!({ "cell": w, "balance": "10.00" }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    // One reference, one amount, 30 at once.
    let answers = race(30, |i| {
        credit_later(s.node(i), &w, "12.34", "race-credit-1")
    })
    .await;
    let mut fresh = 0;
    for (st, v) in &answers {
        assert_eq!(*st, StatusCode::OK, "{v}");
        assert_eq!(v["balance"], json!("22.34"), "{v}");
        assert_eq!(v["reference"], json!("race-credit-1"), "{v}");
        if v["replayed"] == json!(false) {
            fresh += 1;
        } else {
            assert_eq!(v["replayed"], json!(true), "{v}");
        }
    }
    assert_eq!(fresh, 1, "{answers:#?}");
    assert_eq!(s.wallet_balance(&w).await, "22.34");

    // One reference, three amounts, ten requests each, interleaved.
    let amounts = ["1.00", "2.00", "3.00"];
    let answers = race(30, |i| {
        credit_later(s.node(i), &w, amounts[i % 3], "race-credit-2")
    })
    .await;
    let applied: BTreeSet<&str> = answers
        .iter()
        .enumerate()
        .filter(|(_, (st, _))| *st == StatusCode::OK)
        .map(|(i, _)| amounts[i % 3])
        .collect();
    assert_eq!(applied.len(), 1, "{answers:#?}");
    let applied = *applied.first().unwrap();
    let balance = plus("22.34", applied);
    let mut fresh = 0;
    for (i, (st, v)) in answers.iter().enumerate() {
        if amounts[i % 3] == applied {
            assert_eq!(*st, StatusCode::OK, "{v}");
            assert_eq!(v["balance"], json!(balance), "{v}");
            fresh += usize::from(v["replayed"] == json!(false));
        } else {
            assert_eq!(*st, StatusCode::CONFLICT, "{v}");
        }
    }
    assert_eq!(fresh, 1, "{answers:#?}");
    assert_eq!(s.wallet_balance(&w).await, balance);
    s.verify_ok().await;
}

/// A debit paid with an OTP: `otp` in place of `token`, signed as README says.
fn otp_debit(c: &Client, w: &str, amount: &str, orderid: &str, otp: &str) -> SignedRequest {
    let params = vec![
        ("mid", c.mid.clone()),
        ("merchantname", c.merchantname.clone()),
        ("msgcode", "504".to_string()),
        ("cell", w.to_string()),
        ("amount", amount.to_string()),
        ("orderid", orderid.to_string()),
        ("otp", otp.to_string()),
        ("txntype", "DEBIT".to_string()),
    ];
    c.sign("/debitwallet", signed_fields::DEBIT_WITH_OTP, params, false)
}

/// One OTP presented by concurrent debits with different orderids. README:
/// OTPs are single use. Two debits that both read the OTP open before
/// either marked it used would both pay; exactly one may, and the wallet
/// must be debited once. The others are refused (164) and, a refused debit
/// leaving its orderid free, their orderids stay usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_otp_pays_one_of_many_racing_debits() {
    const N: usize = 8;
    let s = Nodes::start().await;
    let c = s.client();
    let (w, token) = funded(&s, 105, "500.00", "100").await;
    let merchant_before = s.merchant_balance(MID).await;
    let r = send(&c, &c.otp_generate_request(&w, "50.00")).await;
    assert_eq!(r.statuscode(), "0", "{r:?}");
    let otp = s.last_otp(&w).await;

    let answers = race(N, |i| {
        send_later(
            s.client_for(i),
            otp_debit(&c, &w, "50.00", &orderid("OTPRACE", i), &otp),
        )
    })
    .await;
    assert_eq!(
        tally(answers.iter().map(|r| r.statuscode().to_string())),
        counts(&[("0", 1), ("164", N - 1)]),
        "{answers:#?}"
    );
    let winner = answers.iter().position(|r| r.is_success()).unwrap();
    let won = &answers[winner];
    assert_eq!(
        (won.get("orderid"), won.get("amount"), won.get("net_debit")),
        (orderid("OTPRACE", winner).as_str(), "50.00", "50.00"),
        "{won:?}"
    );
    assert_eq!(s.wallet_balance(&w).await, "450.00");
    assert_eq!(
        s.merchant_balance(MID).await,
        plus(&merchant_before, "50.00")
    );
    let st = send(
        &c,
        &c.check_status_request(&orderid("OTPRACE", winner), None),
    )
    .await;
    assert_eq!(
        (st.statuscode(), st.get("refid"), st.get("amount")),
        ("0", won.get("txnid"), "50.00"),
        "{st:?}"
    );
    // The OTP is spent.
    let r = send(&c, &otp_debit(&c, &w, "1.00", "OTPRACE_LATE", &otp)).await;
    assert_eq!(r.statuscode(), "164", "{r:?}");
    // The losers' orderids were left free.
    let loser = orderid("OTPRACE", (winner + 1) % N);
    let st = send(&c, &c.check_status_request(&loser, None)).await;
    assert_eq!(st.statuscode(), "101", "{st:?}");
    debit_ok(&c, &Debit::new(&w, "1.00", &loser, &token)).await;
    assert_eq!(s.wallet_balance(&w).await, "449.00");
    s.verify_ok().await;
}

/// OTP requests for one cell from several merchants, all at once. README:
/// at most 5 OTPs per cell per hour, whichever merchant asks. One merchant's
/// requests are ordered by its single open OTP; different merchants' are
/// not, so on PostgreSQL nodes that each counted 4 issued could each issue
/// a fifth. Exactly 5 may be sent; every other request gets 148, and the
/// sandbox's outbox holds exactly the 5 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_otp_requests_from_many_merchants_stop_at_the_cells_limit() {
    const MERCHANTS: usize = 6;
    const N: usize = 24;
    let s = Nodes::start().await;
    let w = cell(106);
    let (st, v) = s
        .admin_post("/wallets", json!({ "cell": w, "balance": "10.00" }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let mids: Vec<String> = (0..MERCHANTS).map(|m| format!("MBK71{m:02}")).collect();
    for mid in &mids {
        let (st, v) = s
            .admin_post(
                "/mobikwik/merchants",
                json!({ "mid": mid, "name": "Racer", "secret": "racer-secret-123" }),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let answers = race(N, |i| {
        let c = Client::new(
            &s.node(i).url(""),
            &mids[i % MERCHANTS],
            "Racer",
            "racer-secret-123",
        );
        let req = c.otp_generate_request(&w, "5.00");
        send_later(&c, req)
    })
    .await;
    assert_eq!(
        tally(answers.iter().map(|r| r.statuscode().to_string())),
        counts(&[("0", 5), ("148", N - 5)]),
        "{answers:#?}"
    );
    let (st, v) = s.admin_get(&format!("/sandbox/messages?to={w}")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v.as_array().map(Vec::len), Some(5), "{v:#}");
}

/// Debits racing with one orderid but different amounts (the same amount
/// is `one_orderid_racing_debits_once` in mobikwik.rs). README: the orderid
/// must be unused by this merchant (304). Exactly one debit may be made,
/// whichever amount it carried; the others get 304 with their orderid, and
/// the wallet, the merchant and `/checkstatus` all show the winner's amount
/// alone. An implementation keyed on (orderid, amount) would let several
/// through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_orderid_with_different_amounts_racing_debits_once() {
    const N: usize = 20;
    let s = Nodes::start().await;
    let c = s.client();
    let (w, token) = funded(&s, 106, "1000.00", "100").await;
    let merchant_before = s.merchant_balance(MID).await;
    let amount = |i: usize| format!("{}.{:02}", 10 + i, i + 1);

    let answers = race(N, |i| {
        send_later(
            s.client_for(i),
            c.debit_request(&Debit::new(&w, &amount(i), "SAMEORDER_AMT", &token)),
        )
    })
    .await;
    assert_eq!(
        tally(answers.iter().map(|r| r.statuscode().to_string())),
        counts(&[("0", 1), ("304", N - 1)]),
        "{answers:#?}"
    );
    for r in &answers {
        assert_eq!(r.get("orderid"), "SAMEORDER_AMT", "{r:?}");
    }
    let winner = answers.iter().position(|r| r.is_success()).unwrap();
    let won = &answers[winner];
    let paid = amount(winner);
    assert_eq!(won.get("amount"), paid, "{won:?}");
    assert_eq!(s.wallet_balance(&w).await, minus("1000.00", &paid));
    assert_eq!(s.merchant_balance(MID).await, plus(&merchant_before, &paid));
    let st = send(&c, &c.check_status_request("SAMEORDER_AMT", None)).await;
    assert_eq!(
        (st.statuscode(), st.get("refid"), st.get("amount")),
        ("0", won.get("txnid"), paid.as_str()),
        "{st:?}"
    );
    s.verify_ok().await;
}
