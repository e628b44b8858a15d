//! Black-box harness: starts the real `payrail` binary on port 0 against a
//! fresh database and talks to it over HTTP, as a stranger would.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use payrail_mobikwik::client::Client;
use payrail_store::testkit::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const ADMIN_TOKEN: &str = "sandbox-admin-token";

/// A database for one test (SQLite or PostgreSQL, as `PAYRAIL_TEST_BACKEND`
/// says) and a scratch directory; removed when the last handle is dropped.
#[derive(Clone)]
pub struct Db {
    pub url: String,
    pub inner: Arc<TestDb>,
}

impl Db {
    pub fn fresh() -> Db {
        Db::from(TestDb::fresh())
    }

    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }
}

impl From<TestDb> for Db {
    fn from(t: TestDb) -> Db {
        Db {
            url: t.url.clone(),
            inner: Arc::new(t),
        }
    }
}

/// The master key black-box tests run with on PostgreSQL, where it must be
/// configured outside sandbox mode.
pub const TEST_MASTER_KEY: &str =
    "0101010101010101010101010101010101010101010101010101010101010101";

pub struct Server {
    child: Child,
    pub base: String,
    pub db: Db,
    pub log: PathBuf,
    pub http: reqwest::Client,
    token: String,
}

pub struct Start {
    pub sandbox: bool,
    pub admin_token: Option<String>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Default for Start {
    fn default() -> Self {
        Start {
            sandbox: true,
            admin_token: None,
            env: Vec::new(),
            args: Vec::new(),
        }
    }
}

fn command(db: &Db, opts: &Start, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payrail"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--db", &db.url]);
    if opts.sandbox {
        cmd.arg("--sandbox");
    }
    cmd.args(&opts.args);
    cmd.env_remove("PAYRAIL_ADMIN_TOKEN")
        .env_remove("PAYRAIL_SANDBOX")
        .env_remove("PAYRAIL_MASTER_KEY")
        .env("RUST_LOG", "info");
    if let Some(t) = &opts.admin_token {
        cmd.env("PAYRAIL_ADMIN_TOKEN", t);
    }
    if db.inner.is_postgres() {
        cmd.env("PAYRAIL_MASTER_KEY", TEST_MASTER_KEY);
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    cmd.stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true);
    cmd
}

/// A test that fails with servers still running shows what they logged above
/// INFO: a failure on a CI machine is otherwise seen without its cause. Each
/// distinct message once, with its count: an outage logs thousands of the
/// same few lines, which would bury the one that matters.
impl Drop for Server {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = self.log_text();
        let mut seen: Vec<(String, &str, usize)> = Vec::new();
        for line in log.lines() {
            let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            // The message without its time and request span.
            let mut key = &line[at..];
            if let Some(i) = key.find("}: ") {
                key = &key[i + 3..];
            }
            let key = key
                .split(" units=")
                .next()
                .and_then(|k| k.split(" suppressed=").next())
                .unwrap_or(key)
                .to_string();
            match seen.iter_mut().find(|(k, _, _)| *k == key) {
                Some(entry) => entry.2 += 1,
                None => seen.push((key, line, 1)),
            }
        }
        eprintln!(
            "---- {} logged, above INFO (first of each, and how many):",
            self.base
        );
        for (_, first, n) in seen.iter().take(100) {
            eprintln!("{n:>6} × {first}");
        }
    }
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(Db::fresh(), Start::default()).await
    }

    pub async fn start_on(db: Db) -> Server {
        Server::start_with(db, Start::default()).await
    }

    pub async fn start_with(db: Db, opts: Start) -> Server {
        let log = db
            .dir()
            .join(format!("server-{}.log", rand::random::<u32>()));
        let mut child = command(&db, &opts, &log).spawn().expect("spawn payrail");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Waits for the server's own "listening" line; the timeout only turns
        // a hang into a failure.
        let base = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("payrail listening on ") {
                    return url.to_string();
                }
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("payrail exited before listening:\n{log}");
        })
        .await
        .expect("payrail did not start within 60s");
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            child,
            base,
            db,
            log,
            http: reqwest::Client::new(),
            token: opts.admin_token.unwrap_or_else(|| ADMIN_TOKEN.to_string()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn client(&self) -> Client {
        Client::sandbox(&self.base).with_http(self.http.clone())
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(mut self) -> Db {
        self.child.kill().await.expect("kill");
        self.db.clone()
    }

    /// SIGTERM, and the exit status once the server has shut down.
    pub async fn terminate(self) -> (std::process::ExitStatus, Db) {
        self.sigterm();
        self.exited().await
    }

    /// Sends SIGTERM and returns without waiting for the server to act on it.
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself: its status.
    pub async fn exited(mut self) -> (std::process::ExitStatus, Db) {
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("payrail did not stop within 60s after SIGTERM")
            .expect("wait");
        (exit, self.db.clone())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, self.url(&format!("/admin/v1{path}")))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin request");
        let status = resp.status();
        let text = resp.text().await.expect("admin body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        self.admin(reqwest::Method::GET, path, None).await
    }

    pub async fn admin_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.admin(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn verify_ok(&self) -> Value {
        let (status, v) = self.admin_get("/ledger/verify").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["ok"], json!(true), "ledger verification failed: {v}");
        v
    }

    /// A gauge without labels from `/metrics`, as a whole number.
    pub async fn gauge(&self, name: &str) -> u64 {
        self.counter(name).await
    }

    /// A counter without labels from `/metrics`; 0 while nothing counted it.
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().expect("counter value"))
    }

    pub async fn wallet_balance(&self, cell: &str) -> String {
        let (status, v) = self.admin_get(&format!("/wallets/{cell}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["balance"].as_str().expect("balance").to_string()
    }

    pub async fn merchant_balance(&self, mid: &str) -> String {
        let (status, v) = self.admin_get(&format!("/mobikwik/merchants/{mid}")).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["balance"].as_str().expect("balance").to_string()
    }

    /// Creates a wallet with `balance` and a token for it (sandbox merchant).
    pub async fn wallet_with_token(&self, cell: &str, balance: &str, cap: &str) -> String {
        let (s, v) = self
            .admin_post("/wallets", json!({ "cell": cell, "balance": balance }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        self.token(cell, cap).await
    }

    pub async fn token(&self, cell: &str, cap: &str) -> String {
        let (s, v) = self
            .admin_post(
                "/mobikwik/tokens",
                json!({ "mid": "MBK9006", "cell": cell, "amount": cap }),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    /// The newest OTP sent to `cell`.
    pub async fn last_otp(&self, cell: &str) -> String {
        let (s, v) = self
            .admin_get(&format!("/sandbox/messages?to={cell}"))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v[0]["otp"].as_str().expect("an OTP message").to_string()
    }

    pub async fn advance_clock(&self, seconds: i64) {
        let (s, v) = self
            .admin_post("/sandbox/clock", json!({ "advance_seconds": seconds }))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
}

/// A fresh, valid cell number.
pub fn cell(n: u32) -> String {
    format!("98{:08}", n)
}

/// A fresh orderid.
pub fn orderid(prefix: &str, n: usize) -> String {
    format!("{prefix}_{n:08}")
}

/// How many times each status code was answered.
pub fn tally<S: Into<String>>(codes: impl IntoIterator<Item = S>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in codes {
        *counts.entry(c.into()).or_default() += 1;
    }
    counts
}

/// The tally expected: `[("0", 7), ("301", 3)]`.
pub fn counts(expected: &[(&str, usize)]) -> BTreeMap<String, usize> {
    expected.iter().map(|&(c, n)| (c.to_string(), n)).collect()
}

/// SIGKILL by pid, from any thread, at once.
pub fn sigkill(pid: i32) {
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill({pid}, SIGKILL) failed");
}

/// Waits until `done` holds, asking every 50 ms, for the server's background
/// work (a sweep) to happen; after 20 s the test fails with `what`. The
/// bound only turns a hang into a failure.
pub async fn wait_until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
