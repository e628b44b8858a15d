//! Several payrail nodes over one PostgreSQL, and PostgreSQL failing under
//! load. These need a PostgreSQL server (`PAYRAIL_TEST_PG_URL`; `scripts/test`
//! starts one) and are skipped, loudly, without one.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use payrail_core::Money;
use payrail_mobikwik::client::{Client, Debit};
use payrail_store::testkit::{self, TestDb, postgres_admin_url};
use reqwest::StatusCode;
use support::{Db, Server, Start, cell, counts, orderid, tally};

fn admin_url() -> Option<String> {
    let url = postgres_admin_url();
    if url.is_none() {
        eprintln!("SKIPPED: no PostgreSQL (set PAYRAIL_TEST_PG_URL, or run ./scripts/test)");
    }
    url
}

async fn nodes(db: &Db, n: usize) -> Vec<Server> {
    let starts = (0..n).map(|_| Server::start_with(db.clone(), Start::default()));
    futures::future::join_all(starts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_debit_a_hot_wallet_exactly_k_times() {
    let Some(admin) = admin_url() else { return };
    const K: usize = 40;
    const N: usize = 150;
    let db = Db::from(TestDb::postgres(&admin));
    let nodes = nodes(&db, 3).await;
    let w = cell(20);
    let token = nodes[0]
        .wallet_with_token(&w, &format!("{}.00", 3 * K), "3")
        .await;
    let clients: Vec<Client> = nodes.iter().map(Server::client).collect();
    let mut tasks = Vec::new();
    for i in 0..N {
        let (c, w, token) = (clients[i % 3].clone(), w.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            c.debit(&Debit::new(&w, "3", &orderid("HOT", i), &token))
                .await
                .expect("debit")
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().statuscode().to_string());
    }
    let codes = tally(answers);
    assert_eq!(codes, counts(&[("0", K), ("301", N - K)]));
    for n in &nodes {
        assert_eq!(n.wallet_balance(&w).await, "0.00");
    }
    nodes[2].verify_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_orderid_sent_to_every_node_at_once_debits_once() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let nodes = nodes(&db, 3).await;
    let clients: Vec<Client> = nodes.iter().map(Server::client).collect();
    let mut tasks = Vec::new();
    for copy in 0..30 {
        let c = clients[copy % 3].clone();
        tasks.push(tokio::spawn(async move {
            c.debit(&Debit::new(
                "9311032820",
                "17.00",
                "EVERYWHERE_01",
                "MBK_TOKEN_123456789",
            ))
            .await
            .expect("debit")
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().statuscode().to_string());
    }
    let codes = tally(answers);
    assert_eq!(codes, counts(&[("0", 1), ("304", 29)]));
    assert_eq!(nodes[1].wallet_balance("9311032820").await, "9983.00");
    nodes[0].verify_ok().await;
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Success,
    Refused(String),
    NoAnswer,
}

struct Sent {
    orderid: String,
    wallet: usize,
    amount: Money,
    outcome: Outcome,
}

/// How far a load has got, and its stop switch.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    answered: AtomicUsize,
    succeeded: AtomicUsize,
}

/// Debits from `workers` tasks over `clients` until `progress.stop`; every
/// request and what it was answered.
fn load(
    clients: Vec<Client>,
    wallets: Arc<Vec<(String, String)>>,
    workers: usize,
    tag: &'static str,
) -> (Arc<Progress>, Vec<tokio::task::JoinHandle<Vec<Sent>>>) {
    let progress = Arc::new(Progress::default());
    let tasks = (0..workers)
        .map(|worker| {
            let (clients, wallets, progress) =
                (clients.clone(), Arc::clone(&wallets), Arc::clone(&progress));
            tokio::spawn(async move {
                let mut sent = Vec::new();
                let mut n = 0usize;
                while !progress.stop.load(Ordering::SeqCst) {
                    let c = &clients[(worker + n) % clients.len()];
                    let wi = (worker * 7 + n) % wallets.len();
                    let (w, token) = &wallets[wi];
                    let orderid = format!("{tag}{worker:02}N{n:06}");
                    let amount = Money::from_minor(100 + ((worker * 13 + n * 7) % 200) as i64);
                    let outcome = match c
                        .debit(&Debit::new(w, &amount.to_string(), &orderid, token))
                        .await
                    {
                        Ok(r) => {
                            assert!(r.checksum_ok, "{r:?}");
                            if r.is_success() {
                                progress.succeeded.fetch_add(1, Ordering::SeqCst);
                                Outcome::Success
                            } else {
                                Outcome::Refused(r.statuscode().to_string())
                            }
                        }
                        // A killed node: no answer.
                        Err(_) => Outcome::NoAnswer,
                    };
                    progress.answered.fetch_add(1, Ordering::SeqCst);
                    sent.push(Sent {
                        orderid,
                        wallet: wi,
                        amount,
                        outcome,
                    });
                    n += 1;
                }
                sent
            })
        })
        .collect();
    (progress, tasks)
}

/// After the dust settles: every SUCCESS is there, every refusal is not,
/// and each wallet's balance is its start less the debits that exist.
async fn reconcile(node: &Server, wallets: &[(String, String)], start: Money, sent: &[Sent]) {
    let c = node.client();
    let mut spent: HashMap<usize, Money> = HashMap::new();
    let mut successes = 0;
    for x in sent {
        let st = c.check_status(&x.orderid).await.expect("checkstatus");
        assert!(st.checksum_ok);
        let present = st.statuscode() == "0";
        match (&x.outcome, present) {
            (Outcome::Success, false) => panic!("{} was answered SUCCESS but is gone", x.orderid),
            (Outcome::Refused(code), true) => {
                panic!("{} was refused ({code}) but was debited", x.orderid)
            }
            _ => {}
        }
        if present {
            assert_eq!(Money::parse(st.get("amount")).unwrap(), x.amount);
            let e = spent.entry(x.wallet).or_default();
            *e = e.checked_add(x.amount).unwrap();
        }
        successes += usize::from(x.outcome == Outcome::Success);
    }
    assert!(successes > 0, "nothing succeeded");
    for (i, (w, _)) in wallets.iter().enumerate() {
        let expected = start
            .checked_sub(spent.get(&i).copied().unwrap_or_default())
            .unwrap();
        assert_eq!(
            node.wallet_balance(w).await,
            expected.to_string(),
            "wallet {w}"
        );
    }
    node.verify_ok().await;
}

async fn funded_wallets(
    node: &Server,
    first_cell: u32,
    count: u32,
    balance: &str,
) -> Arc<Vec<(String, String)>> {
    let mut wallets = Vec::new();
    for i in 0..count {
        let w = cell(first_cell + i);
        let token = node.wallet_with_token(&w, balance, "2.99").await;
        wallets.push((w, token));
    }
    Arc::new(wallets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_load_loses_no_answered_debit() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let mut nodes = nodes(&db, 3).await;
    let start = Money::parse("150.00").unwrap();
    let wallets = funded_wallets(&nodes[0], 40, 5, "150.00").await;
    let clients: Vec<Client> = nodes.iter().map(Server::client).collect();
    let (progress, tasks) = load(clients, Arc::clone(&wallets), 18, "NODEKILL");
    let kill_at = rand::random_range(50..400usize);
    while progress.answered.load(Ordering::SeqCst) < kill_at {
        tokio::task::yield_now().await;
    }
    let victim = nodes.remove(1);
    support::sigkill(victim.pid() as i32);
    // Keep the survivors under load a little longer.
    let resume_at = progress.answered.load(Ordering::SeqCst) + 200;
    while progress.answered.load(Ordering::SeqCst) < resume_at {
        tokio::task::yield_now().await;
    }
    progress.stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    drop(victim);
    reconcile(&nodes[0], &wallets, start, &sent).await;
}

/// A throwaway cluster of our own, which this test may stop and start.
struct OwnCluster {
    dir: tempfile::TempDir,
    port: u16,
    script: PathBuf,
}

impl OwnCluster {
    fn start() -> OwnCluster {
        let dir = tempfile::Builder::new()
            .prefix("payrail-pgfault")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-cluster");
        let c = OwnCluster { dir, port, script };
        c.run("start");
        c
    }

    fn run(&self, what: &str) {
        let mut cmd = std::process::Command::new(&self.script);
        cmd.arg(what).arg(self.dir.path());
        if what == "start" {
            cmd.arg(self.port.to_string());
        }
        let status = cmd.status().expect("pg-test-cluster");
        assert!(status.success(), "pg-test-cluster {what} failed");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast: sessions are ended), off the runtime, whose
    /// threads the nodes' answers need meanwhile.
    async fn stop(&self) {
        let (script, dir) = (self.script.clone(), self.dir.path().to_path_buf());
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new(script)
                .arg("stop")
                .arg(dir)
                .status()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(status.success(), "pg-test-cluster stop failed");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.run("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarting_under_load_loses_and_duplicates_nothing() {
    if admin_url().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let db = Db::from(TestDb::postgres(&cluster.url()));
    let nodes = nodes(&db, 2).await;
    let start = Money::parse("400.00").unwrap();
    let wallets = funded_wallets(&nodes[0], 60, 4, "400.00").await;
    let clients: Vec<Client> = nodes.iter().map(Server::client).collect();
    let (progress, tasks) = load(clients, Arc::clone(&wallets), 12, "PGRESTART");
    while progress.answered.load(Ordering::SeqCst) < 150 {
        tokio::task::yield_now().await;
    }

    cluster.stop().await;
    // While it is down: fast, documented failures, and not ready.
    let http = reqwest::Client::new();
    let r = http.get(nodes[0].url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let during = progress.answered.load(Ordering::SeqCst);
    while progress.answered.load(Ordering::SeqCst) < during + 100 {
        tokio::task::yield_now().await;
    }

    cluster.run("start");
    // Service resumes by itself: readiness returns and debits succeed again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for n in &nodes {
        loop {
            let ready = http
                .get(n.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK);
            if ready {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node not ready again within 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Writes resume too: wait (bounded) until debits succeed again, then a little more.
    let before = progress.succeeded.load(Ordering::SeqCst);
    while progress.succeeded.load(Ordering::SeqCst) < before + 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "debits did not succeed again within 30s"
        );
        tokio::task::yield_now().await;
    }
    progress.stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    // Every answer was a documented one; the outage gave 99s, then successes came back.
    let codes = tally(sent.iter().map(|x| match &x.outcome {
        Outcome::Success => "0".to_string(),
        Outcome::Refused(c) => c.clone(),
        Outcome::NoAnswer => "no answer".to_string(),
    }));
    assert!(
        codes
            .keys()
            .all(|c| ["0", "99", "301"].contains(&c.as_str())),
        "{codes:?}"
    );
    assert!(
        codes.get("99").is_some_and(|n| *n > 0),
        "the outage was not seen: {codes:?}"
    );
    let resumed = sent
        .iter()
        .rev()
        .take(50)
        .filter(|x| x.outcome == Outcome::Success)
        .count();
    assert!(
        resumed > 0,
        "no debit succeeded after the restart: {codes:?}"
    );
    let log = nodes[0].log_text();
    assert!(!log.contains("panicked"), "{log}");
    reconcile(&nodes[1], &wallets, start, &sent).await;
    drop(nodes);
    drop(db);
}

/// Runs `sql` on the test cluster's `postgres` database (the test database
/// itself may be refusing connections), off the runtime.
async fn admin_sql(sql: &str, db: &Db) {
    let admin = admin_url().unwrap();
    let name = db.url.rsplit_once('/').unwrap().1.to_string();
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        c.batch_execute(&sql.replace("{db}", &name)).unwrap();
    })
    .await
    .unwrap();
}

/// A debit whose `COMMIT` is cut off with nobody able to learn its outcome:
/// a deferred trigger holds the COMMIT on an advisory lock this test owns,
/// the database is closed to new connections, and the backend running the
/// COMMIT is ended (so the batch surely did not commit, but the node cannot
/// know: it cannot reconnect to read its marker). Returns the debit's task,
/// and the lock's holder (drop it to release the lock).
async fn debit_cut_off(
    node: &Server,
    orderid: &'static str,
) -> (
    tokio::task::JoinHandle<
        Result<payrail_mobikwik::client::WalletResponse, payrail_mobikwik::client::ClientError>,
    >,
    std::sync::mpsc::Sender<()>,
) {
    let w = cell(70);
    let token = node.wallet_with_token(&w, "50", "5").await;
    node.db.inner.sql(
        "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql \
           SET lock_timeout = 0 SET statement_timeout = 0 AS $$ \
         BEGIN PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); \
           RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON mbk_orders \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()",
    );
    let (locked, is_locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let url = node.db.url.clone();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.simple_query("SELECT pg_advisory_lock(4242)").unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
    });
    tokio::task::spawn_blocking(move || is_locked.recv().unwrap())
        .await
        .unwrap();

    let c = node.client();
    let debit =
        tokio::spawn(async move { c.debit(&Debit::new(&w, "1.00", orderid, &token)).await });
    let held = "FROM pg_stat_activity WHERE query = 'COMMIT' \
                AND wait_event_type = 'Lock' AND wait_event = 'advisory'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // pg_stat_activity shows the whole cluster, and tests run side by side.
    let mine = format!("SELECT count(*) {held} AND datname = current_database()");
    while node.db.inner.sql(&mine) != ["1"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the debit's COMMIT never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut = format!(
        "ALTER DATABASE {{db}} ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) {held} AND datname = '{{db}}'"
    );
    admin_sql(&cut, &node.db).await;
    while !node
        .log_text()
        .contains("cannot reconnect to learn a COMMIT's outcome yet")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never tried to learn the COMMIT's outcome:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (debit, release)
}

/// A COMMIT cut off with its connection, on a real server: the caller hears
/// nothing while the outcome cannot be known, and once the database can be
/// reached the node reads its marker row, learns the batch was not kept, and
/// runs it again: the debit is answered once it is done, and done once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_cut_off_and_not_kept_is_run_again_once_that_is_known() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let node = Server::start_on(db.clone()).await;
    let (debit, release) = debit_cut_off(&node, "HELD_COMMIT_0001").await;
    assert!(
        !debit.is_finished(),
        "answered while the outcome was unknown"
    );

    // The rerun's COMMIT must not be held in its turn.
    drop(release);
    admin_sql("ALTER DATABASE {db} ALLOW_CONNECTIONS true", &db).await;
    let r = debit
        .await
        .unwrap()
        .expect("an answer once the outcome is known");
    assert!(r.checksum_ok, "{r:?}");
    assert_eq!(r.statuscode(), "0", "{r:?}");
    assert!(
        node.log_text()
            .contains("learned a lost COMMIT's outcome from the writer's marker committed=false"),
        "not the case under test:\n{}",
        node.log_text()
    );
    let st = node
        .client()
        .check_status("HELD_COMMIT_0001")
        .await
        .unwrap();
    assert_eq!(st.statuscode(), "0", "{st:?}");
    assert_eq!(node.wallet_balance(&cell(70)).await, "49.00");
    node.verify_ok().await;
}

/// The node is stopped before it can learn the outcome: the caller gets no
/// answer at all (the connection closes), not a 99 that would say nothing
/// was debited. (Here nothing was, as a new node sees.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_outcome_is_never_learned_is_left_unanswered() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let node = Server::start_on(db.clone()).await;
    let (debit, release) = debit_cut_off(&node, "HELD_COMMIT_0002").await;
    let first_log = node.log.clone();
    node.sigterm();
    // No answer: the connection closed, not an HTTP status of any kind.
    let answer = debit.await.unwrap();
    assert!(
        matches!(answer, Err(payrail_mobikwik::client::ClientError::Http(_))),
        "answered {answer:?} without knowing"
    );
    let (status, db) = node.exited().await;
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert!(
        log.contains("a COMMIT's outcome is unknown"),
        "not the case under test:\n{log}"
    );

    admin_sql("ALTER DATABASE {db} ALLOW_CONNECTIONS true", &db).await;
    drop(release);
    let node = Server::start_on(db).await;
    assert_not_debited(&node, "HELD_COMMIT_0002").await;
}

/// The held debit (see `debit_cut_off`) left no order and no money moved.
async fn assert_not_debited(node: &Server, orderid: &str) {
    let st = node.client().check_status(orderid).await.unwrap();
    assert_ne!(st.statuscode(), "0", "{st:?}");
    assert_eq!(node.wallet_balance(&cell(70)).await, "50.00");
    node.verify_ok().await;
}

/// A refund returns cashback in proportion to the order's totals, so it must
/// read them after any refund still committing elsewhere. Another node's
/// refund of 0.04 holds the order row while this one (also 0.04) arrives:
/// 0.08 of a 3.00 order with 0.60 cashback gives back floor(0.016) = 0.01 of
/// cashback in total, not what each refund saw alone (0.00).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_splits_cashback_from_the_order_as_committed() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let s = Server::start_on(db.clone()).await;
    let c = s.client();
    let w = cell(31);
    let token = s.wallet_with_token(&w, "10", "10").await;
    let mut d = Debit::new(&w, "3", "SPLIT_000001", &token);
    d.coupon = Some("SAVE20");
    let r = c.debit(&d).await.unwrap();
    assert_eq!((r.statuscode(), r.get("cashback")), ("0", "0.60"), "{r:?}");

    // Another node's refund of 0.04, committing once this one waits for it.
    let other = testkit::hold(&db.url, |tx| {
        let n = tx
            .execute(
                "UPDATE mbk_orders SET refunded = refunded + 4 WHERE orderid = 'SPLIT_000001'",
                &[],
            )
            .unwrap();
        assert_eq!(n, 1);
    })
    .await;
    let refund =
        tokio::spawn(async move { c.refund("SPLIT_000001", "RF_SPLIT_1", "0.04", true).await });
    other.commit_once_waited_on(1).await;
    let r = refund.await.unwrap().unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");
    let url = db.url.clone();
    let after = tokio::task::spawn_blocking(move || {
        let row = postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .query_one(
                "SELECT refunded, refunded_cashback FROM mbk_orders WHERE orderid = 'SPLIT_000001'",
                &[],
            )
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    })
    .await
    .unwrap();
    assert_eq!(after, (8, 1), "refunded, refunded cashback (paise)");
}

/// Another node's refund of the same order has claimed its refundid and not
/// committed yet: its insert holds a KEY SHARE lock on the order row, for
/// the refunds' foreign key. This refund then locks the order to read its
/// totals. `FOR UPDATE` would wait for that KEY SHARE, and two such refunds
/// would each wait for the other until the lock timeout, then again on
/// every retry. The lock taken is one that a KEY SHARE does not block.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_does_not_wait_for_another_nodes_claim_on_the_same_order() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let s = Server::start_on(db.clone()).await;
    let c = s.client();
    let w = cell(32);
    let token = s.wallet_with_token(&w, "10", "10").await;
    let r = c
        .debit(&Debit::new(&w, "3", "CLAIM_000001", &token))
        .await
        .unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");

    let other = testkit::hold(&db.url, |tx| {
        let n = tx
            .execute(
                "INSERT INTO mbk_refunds (mid, refundid, orderid, amount, refid, created_at)
                 SELECT mid, 'RF_OTHER_NODE', orderid, 100, 'REFID_OTHER_NODE', 0
                   FROM mbk_orders WHERE orderid = 'CLAIM_000001'",
                &[],
            )
            .unwrap();
        assert_eq!(n, 1);
    })
    .await;
    // Answered while the other node's claim is still open.
    let r = c
        .refund("CLAIM_000001", "RF_THIS_NODE", "0.50", true)
        .await
        .unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");
    other.commit_once_waited_on(0).await;
    assert_eq!(s.wallet_balance(&w).await, "7.50");
}

/// Two OTPs for one cell issued at once on two nodes: another node has
/// closed the open OTP and inserted its own, not yet committed, when this
/// node's request arrives. This one must not leave both open (the older one
/// would work again once the newer is used or locked): it runs again after
/// the other commits, and only its OTP stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otps_issued_at_once_on_two_nodes_leave_one_open() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let s = Server::start_on(db.clone()).await;
    let c = s.client();
    let w = cell(33);
    let r = c.otp_generate(&w, "5.00").await.unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");

    let other_cell = w.clone();
    let other = testkit::hold(&db.url, move |tx| {
        let closed = tx
            .execute(
                "UPDATE mbk_otps SET state = 2 WHERE cell = $1 AND state = 0",
                &[&other_cell],
            )
            .unwrap();
        assert_eq!(closed, 1);
        tx.execute(
            "INSERT INTO mbk_otps (mid, cell, digest, failed_attempts, state, created_at, expires_at, amount)
             SELECT mid, cell, digest, 0, 0, created_at, expires_at, amount FROM mbk_otps WHERE cell = $1",
            &[&other_cell],
        )
        .unwrap();
    })
    .await;
    let issuing = tokio::spawn(async move { c.otp_generate(&w, "5.00").await });
    // This node's UPDATE waits for the other's lock on the first OTP.
    other.commit_once_waited_on(1).await;
    let r = issuing.await.unwrap().unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");

    assert_eq!(
        column(&db, "SELECT id FROM mbk_otps WHERE state = 0").await,
        column(&db, "SELECT max(id) FROM mbk_otps").await,
        "open OTPs, and the newest"
    );
}

/// The first column of `sql`'s rows, read straight from the database.
async fn column(db: &Db, sql: &'static str) -> Vec<i64> {
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    })
    .await
    .unwrap()
}

/// `/createwalletuser` while another node opens the same wallet (the admin
/// API, say) and has not committed: this one waits for it, then finds the
/// cell taken. It answers 153, not "User Created", and its OTP is not spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wallet_opened_meanwhile_by_another_node_is_not_created_twice() {
    let Some(admin) = admin_url() else { return };
    let db = Db::from(TestDb::postgres(&admin));
    let s = Server::start_on(db.clone()).await;
    let c = s.client();
    let w = cell(34);
    let r = c.otp_generate(&w, "0").await.unwrap();
    assert_eq!(r.statuscode(), "0", "{r:?}");
    let otp = s.last_otp(&w).await;

    let other_cell = w.clone();
    let other = testkit::hold(&db.url, move |tx| {
        tx.execute(
            "WITH a AS (
                 INSERT INTO accounts (code, currency, flags, created_at)
                 VALUES ('wallet:' || $1, 'INR', 1, 0) RETURNING id
             )
             INSERT INTO wallets (cell, account_id, email, blocked, created_at)
             SELECT $1, id, NULL, 0, 0 FROM a",
            &[&other_cell],
        )
        .unwrap();
    })
    .await;
    let (c2, w2, otp2) = (c.clone(), w.clone(), otp.clone());
    let creating =
        tokio::spawn(async move { c2.create_wallet_user(&w2, "new@example.com", &otp2).await });
    // This node's account insert waits for the other's.
    other.commit_once_waited_on(1).await;
    let r = creating.await.unwrap().unwrap();
    assert_eq!(r.statuscode(), "153", "{r:?}");

    assert_eq!(
        column(&db, "SELECT count(*) FROM mbk_otps WHERE state = 0").await,
        [1],
        "the OTP is still open"
    );
}
