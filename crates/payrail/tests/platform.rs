//! The platform, from outside: health, admin authentication, ledger
//! verification, the sandbox clock and outbox, limits, start-up refusals,
//! graceful shutdown and idempotent fixtures.

mod support;

use std::time::Duration;

use payrail_mobikwik::fixtures::MID;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Db, Server, Start};

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = Server::start().await;
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A caller's request id is carried through; a fresh one is made otherwise.
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    // A wallet debit, so the ledger metrics have something to show.
    let resp = s
        .client()
        .debit(&payrail_mobikwik::client::Debit::new(
            "9311032820",
            "1.00",
            "METRICS_0001",
            "MBK_TOKEN_123456789",
        ))
        .await
        .unwrap();
    assert!(resp.is_success(), "{resp:?}");
    let scrape = || async {
        s.http
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = scrape().await;
    for needle in [
        "payrail_http_requests_total{route=\"/debitwallet\",status=\"200\"}",
        "payrail_http_request_duration_seconds_bucket",
        "payrail_ledger_commits_total",
        "payrail_group_commit_batch_size_bucket",
        "payrail_group_commit_queue_seconds_bucket",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    // The sweeper's first round runs at start; each kind's unit is counted.
    let swept = || async {
        let text = scrape().await;
        ["expiry", "fold", "outbox", "mobikwik"].iter().all(|kind| {
            text.contains(&format!(
                "payrail_sweep_units_total{{sweep=\"{kind}\",outcome=\"done\"}}"
            ))
        })
    };
    support::wait_until("every sweep's unit is counted", swept).await;
}

#[tokio::test]
async fn admin_requires_the_token() {
    let s = Server::start().await;
    let url = s.url("/admin/v1/ledger/verify");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic c2FuZGJveA=="),
        Some("Bearer "),
    ] {
        let mut req = s.http.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"payrail admin\""
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // The scheme's name in any case.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = s
            .http
            .get(&url)
            .header(
                "authorization",
                format!("{scheme} {}", support::ADMIN_TOKEN),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    // The right token beside another, in either order, is not enough.
    let right = format!("Bearer {}", support::ADMIN_TOKEN);
    for pair in [
        [right.as_str(), "Bearer wrong"],
        ["Bearer wrong", right.as_str()],
    ] {
        let r = s
            .http
            .get(&url)
            .header("authorization", pair[0])
            .header("authorization", pair[1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{pair:?}");
    }
    // Also for paths that do not exist: nothing is revealed without a token.
    let r = s.http.get(s.url("/admin/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, body) = s.admin_get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn verify_counts_accounts_and_transfers() {
    let s = Server::start().await;
    let v = s.verify_ok().await;
    // Fixtures: issuance, promotions, the merchant and two funded wallets.
    assert_eq!(v, json!({ "ok": true, "accounts": 5, "transfers": 2 }));
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["ok", "accounts", "transfers"]);
}

#[tokio::test]
async fn sandbox_clock_moves_forward_only() {
    let s = Server::start().await;
    let (status, before) = s.admin_get("/sandbox/clock").await;
    assert_eq!(status, StatusCode::OK);
    let (status, after) = s
        .admin_post("/sandbox/clock", json!({ "advance_seconds": 86_400 }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let parse = |v: &Value| {
        let t = v["now"].as_str().expect("now");
        assert!(t.ends_with('Z') && t.contains('T'), "not RFC 3339: {t}");
        t.to_string()
    };
    let (b, a) = (parse(&before), parse(&after));
    // One day later, give or take the milliseconds the request took.
    assert!(a[..10] > b[..10], "{b} -> {a}");
    for bad in [
        json!({ "advance_seconds": -1 }),
        json!({ "advance_seconds": "10" }),
        json!({}),
        json!({ "advance_seconds": 1e20 }),
        json!([60]),
    ] {
        let (status, body) = s.admin_post("/sandbox/clock", bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
    }
}

/// However often it is moved, the sandbox clock stops at 9000-01-01: past
/// that the moves are refused, and every time the admin API shows (the
/// clock, a token's expiry 30 days on) is still RFC 3339.
#[tokio::test]
async fn sandbox_clock_stops_where_its_times_can_still_be_written() {
    use futures::StreamExt;
    const MOST: i64 = 10 * 366 * 24 * 3600;
    let s = Server::start().await;
    // About 700 moves of ten years reach it; sent 16 at a time, each is a
    // unit of its own, and the writer takes them one after another.
    let answers: Vec<(StatusCode, Value)> = futures::stream::iter(0..800)
        .map(|_| s.admin_post("/sandbox/clock", json!({ "advance_seconds": MOST })))
        .buffer_unordered(16)
        .collect()
        .await;
    let mut moved = 0;
    for (status, body) in &answers {
        if *status == StatusCode::OK {
            moved += 1;
            let now = body["now"].as_str().unwrap();
            assert!(now < "9000-01-01T00:00:00.001Z", "{body}");
            assert!(now.as_bytes()[4] == b'-' && now.ends_with('Z'), "{body}");
        } else {
            assert_eq!(*status, StatusCode::BAD_REQUEST, "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("9000-01-01T00:00:00.000Z"), "{body}");
        }
    }
    assert!((600..800).contains(&moved), "{moved} moves taken");
    let (_, clock) = s.admin_get("/sandbox/clock").await;
    let now = clock["now"].as_str().unwrap().to_string();
    assert!(now.starts_with("89") && now.ends_with('Z'), "{clock}");
    // Ten more years never fit from there.
    let (status, _) = s
        .admin_post("/sandbox/clock", json!({ "advance_seconds": MOST }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, token) = s
        .admin_post(
            "/mobikwik/tokens",
            json!({ "mid": MID, "cell": "9311032820", "amount": "100" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let expires = token["expires_at"].as_str().unwrap();
    assert!(expires > now.as_str() && expires.ends_with('Z'), "{token}");
    s.verify_ok().await;
}

#[tokio::test]
async fn sandbox_messages_list_otps_newest_first() {
    let s = Server::start().await;
    let c = s.client();
    for _ in 0..2 {
        assert!(
            c.otp_generate("9910057241", "1")
                .await
                .unwrap()
                .is_success()
        );
    }
    let (status, v) = s.admin_get("/sandbox/messages?to=9910057241").await;
    assert_eq!(status, StatusCode::OK);
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for m in list {
        assert_eq!(m["to"], "9910057241");
        let otp = m["otp"].as_str().unwrap();
        assert_eq!(otp.len(), 6);
        assert!(m["text"].as_str().unwrap().contains(otp));
        assert!(m["sent_at"].as_str().unwrap().ends_with('Z'));
    }
    assert!(list[0]["sent_at"].as_str() >= list[1]["sent_at"].as_str());
    let (_, none) = s.admin_get("/sandbox/messages?to=9311032820").await;
    assert_eq!(none, json!([]));
}

/// Asks the sandbox to text `cell` an OTP; it must be sent.
async fn send_otp(c: &payrail_mobikwik::client::Client, cell: &str) {
    let r = c.otp_generate(cell, "1").await.unwrap();
    assert!(r.is_success(), "{r:?}");
}

/// Sent messages are pruned once older than `store.outbox_retention_hours`
/// (24) by the store's clock, so moving the sandbox clock ahead lets the
/// server's once-a-second sweep take them, and only them.
#[tokio::test]
async fn sent_messages_are_pruned_after_the_retention() {
    let s = Server::start().await;
    let c = s.client();
    let path = "/sandbox/messages?to=9910057241";
    let advance = |hours: i64| {
        let s = &s;
        async move {
            let body = json!({ "advance_seconds": hours * 3600 });
            let (status, _) = s.admin_post("/sandbox/clock", body).await;
            assert_eq!(status, StatusCode::OK);
        }
    };
    let otps = || async {
        let (_, v) = s.admin_get(path).await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["otp"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    send_otp(&c, "9910057241").await;
    let first = otps().await;
    advance(23).await;
    send_otp(&c, "9910057241").await;
    let both = otps().await;
    assert_eq!(both.len(), 2);
    assert_eq!(both[1], first[0]);
    // The first is now 25 hours old, the second 2.
    advance(2).await;
    let pruned = || async { otps().await.len() == 1 };
    support::wait_until("a message older than the retention is still there", pruned).await;
    assert_eq!(otps().await, [both[0].clone()], "the newer one was pruned");
}

/// An OTP row is deleted once it is past its life (10 minutes) and the
/// hourly request count (an hour): the sweep takes it, and not a newer one.
#[tokio::test]
async fn otps_nothing_reads_any_more_are_pruned() {
    let s = Server::start().await;
    let c = s.client();
    let cells = || s.db.inner.sql("SELECT cell FROM mbk_otps ORDER BY cell");
    send_otp(&c, "9910057241").await;
    let body = json!({ "advance_seconds": 3600 + 1 });
    assert_eq!(s.admin_post("/sandbox/clock", body).await.0, StatusCode::OK);
    send_otp(&c, "9311032820").await;
    let pruned = || async { cells().len() < 2 };
    support::wait_until("an OTP past its hour is still there", pruned).await;
    assert_eq!(cells(), ["9311032820"], "the newer one was pruned");
}

/// An OTP issued under a longer `otp_ttl` (before a restart with a shorter
/// one) is pruned by its own expiry, not the new setting: it keeps working
/// to its end.
#[tokio::test]
async fn an_otp_is_kept_to_its_own_expiry_across_a_shorter_ttl() {
    let db = Db::fresh();
    let file = db.dir().join("long-otps.toml");
    std::fs::write(&file, "[mobikwik]\notp_ttl_minutes = 180\n").unwrap();
    let long = Start {
        args: vec!["--config".into(), file.display().to_string()],
        ..Start::default()
    };
    let s = Server::start_with(db, long).await;
    let c = s.client();
    send_otp(&c, "9910057241").await;
    let (_, db) = s.terminate().await;
    let s = Server::start_on(db).await;
    let c = s.client();
    send_otp(&c, "9311032820").await;
    let body = json!({ "advance_seconds": 2 * 3600 });
    assert_eq!(s.admin_post("/sandbox/clock", body).await.0, StatusCode::OK);
    // Both are two hours old; only the 10-minute one has expired.
    let cells = || s.db.inner.sql("SELECT cell FROM mbk_otps ORDER BY cell");
    let pruned = || async { cells().len() < 2 };
    support::wait_until("the expired OTP is still there", pruned).await;
    assert_eq!(cells(), ["9910057241"]);
}

#[tokio::test]
async fn sandbox_endpoints_are_404_outside_sandbox() {
    let start = Start {
        sandbox: false,
        admin_token: Some("t0p-secret-admin".into()),
        ..Start::default()
    };
    let s = Server::start_with(Db::fresh(), start).await;
    let (status, body) = s
        .admin_post("/sandbox/clock", json!({ "advance_seconds": 1 }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = s.admin_get("/sandbox/messages?to=9311032820").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The platform itself works, without fixtures.
    let v = s.verify_ok().await;
    assert_eq!(v["transfers"], 0);
    let (status, _) = s.admin_get("/mobikwik/merchants/MBK9006").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The sandbox token means nothing here.
    let r = s
        .http
        .get(s.url("/admin/v1/ledger/verify"))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// Runs `payrail serve` that must refuse to start, and returns its stderr.
/// Should it start instead, it is killed and the test fails (rather than
/// waiting for a server that never exits).
fn refusal_at_start(mut cmd: std::process::Command, what: &str) -> String {
    use std::io::{BufRead, Read};
    let mut child = cmd
        .env_remove("PAYRAIL_ADMIN_TOKEN")
        .env_remove("PAYRAIL_SANDBOX")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server prints its address once listening; a refusal prints nothing
    // there and exits, which ends stdout.
    let first = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next();
    if let Some(line) = first {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} was accepted: {line:?}");
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{what}: exited 0\n{stderr}");
    stderr
}

/// A zero that would disable a bound (or prune every message at once), a
/// timeout so long its deadline would overflow, and
/// rail settings that would overflow or let an OTP be guessed, are refused
/// at start, with the key named.
#[test]
fn unsafe_bounds_are_refused_at_start() {
    let db = Db::fresh();
    let file = db.dir().join("zero.toml");
    for (section, key, value) in [
        ("limits", "body_timeout_secs", "0"),
        ("limits", "write_timeout_secs", "0"),
        ("limits", "write_timeout_secs", "9223372036854775807"),
        ("limits", "body_timeout_secs", "86401"),
        ("limits", "max_connections", "0"),
        ("store", "outbox_retention_hours", "0"),
        ("store", "max_wait_ms", "99"),
        ("store", "max_wait_ms", "3600001"),
        ("mobikwik", "token_ttl_days", "300000000000000"),
        ("mobikwik", "otp_max_failures", "1000000"),
        ("mobikwik", "otp_per_hour", "0"),
    ] {
        std::fs::write(&file, format!("[{section}]\n{key} = {value}\n")).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"));
        cmd.args([
            "serve",
            "--sandbox",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db.url,
        ])
        .arg("--config")
        .arg(&file);
        let stderr = refusal_at_start(cmd, &format!("{key} = {value}"));
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

/// A PostgreSQL URL typed without its `//` would otherwise name a local
/// SQLite file; a misspelt scheme is refused too, and neither error shows
/// the password.
#[test]
fn a_mistyped_database_url_is_refused_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "postgres:/app:S3cret@db/pay",
        "postgress://app:S3cret@db/pay",
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"));
        cmd.current_dir(dir.path()).args([
            "serve",
            "--sandbox",
            "--listen",
            "127.0.0.1:0",
            "--db",
            url,
        ]);
        let stderr = refusal_at_start(cmd, url);
        assert!(stderr.contains("database URL"), "{stderr}");
        assert!(!stderr.contains("S3cret"), "{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files were created: {left:?}");
    // Nor does the help text, which shows the environment's values.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(["serve", "--help"])
        .env("PAYRAIL_DB", "postgres://app:S3cret@db/pay")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("PAYRAIL_DB") && !help.contains("S3cret"),
        "{help}"
    );
}

/// An address that cannot be listened on (taken, or not an address) stops
/// the start before the database is touched: a fresh SQLite file is not
/// even created, let alone claimed for sandbox mode.
#[test]
fn an_address_it_cannot_listen_on_is_refused_before_the_database_is_opened() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("never.db");
    let url = format!("sqlite://{}", file.display());
    for listen in [taken.as_str(), "127.0.0.1:99999", "no-port-here"] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"));
        cmd.args(["serve", "--sandbox", "--listen", listen, "--db", &url]);
        let stderr = refusal_at_start(cmd, listen);
        assert!(stderr.contains("cannot listen on"), "{listen}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{listen}: files were created: {left:?}");
    }
}

#[tokio::test]
async fn refuses_to_start_without_an_admin_token() {
    let db = Db::fresh();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &db.url])
        .env_remove("PAYRAIL_ADMIN_TOKEN")
        .env_remove("PAYRAIL_SANDBOX")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it must not have started listening");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let reason: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("payrail:"))
        .collect();
    assert_eq!(reason.len(), 1, "{stderr}");
    assert!(
        reason[0].contains("admin token") && reason[0].contains("PAYRAIL_ADMIN_TOKEN"),
        "{stderr}"
    );
}

/// Outside sandbox mode, the published sandbox token and short tokens are
/// warned about at start (without printing them); a long one is not.
#[tokio::test]
async fn a_weak_admin_token_is_warned_about_outside_sandbox() {
    let long = "k7Qm2Xw9Lp4Vt8Rz1Nc6Hb3Jd5Fg0Ys2";
    for (token, warning) in [
        (support::ADMIN_TOKEN, Some("published sandbox one")),
        ("letmein", Some("admin token is short")),
        (long, None),
    ] {
        let s = Server::start_with(
            Db::fresh(),
            Start {
                sandbox: false,
                admin_token: Some(token.to_string()),
                ..Start::default()
            },
        )
        .await;
        let (st, _) = s.admin_get("/ledger/verify").await;
        let log = s.log_text();
        match warning {
            Some(w) => assert!(log.contains(w), "{token}: {log}"),
            None => assert!(!log.contains("admin token is"), "{log}"),
        }
        assert!(!log.contains(token), "the token was printed: {log}");
        // Warned, and still served with it.
        assert_eq!(st, StatusCode::OK);
    }
}

/// Flags, then environment, then the file: either can turn off the file's
/// sandbox mode. An empty token in the file is none.
#[tokio::test]
async fn flags_and_environment_override_the_config_file() {
    let db = Db::fresh();
    let file = db.dir().join("payrail.toml");
    std::fs::write(&file, "sandbox = true\nadmin_token = \"\"\n").unwrap();
    let start = |flag: Option<&'static str>, env: Option<&'static str>, token: Option<&str>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_payrail"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db.url,
            "--config",
        ])
        .arg(&file)
        .args(flag)
        .env_remove("PAYRAIL_ADMIN_TOKEN")
        .env_remove("PAYRAIL_SANDBOX")
        .kill_on_drop(true);
        if let Some(v) = env {
            cmd.env("PAYRAIL_SANDBOX", v);
        }
        if let Some(t) = token {
            cmd.env("PAYRAIL_ADMIN_TOKEN", t);
        }
        // One that starts runs for ever: the timeout turns that into a
        // failure.
        async move {
            tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
                .await
                .expect("it started instead of refusing")
                .unwrap()
        }
    };
    for (flag, env) in [
        (None, Some("false")),
        (Some("--sandbox=false"), Some("true")),
    ] {
        let out = start(flag, env, None).await;
        assert!(
            !out.status.success(),
            "{flag:?} {env:?} started in sandbox mode"
        );
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("no admin token"), "{stderr}");
    }
    // Blank is none, in the file or the environment; padded would never
    // match the trimmed token presented, nor would one that no header can
    // carry as text. (Rust's escaping of these is TOML's too.)
    for (token, why) in [
        ("  ", "no admin token"),
        (" tok ", "whitespace"),
        ("tok\u{e9}n-0123456789abcdef0123456789", "printable ASCII"),
        ("tok\nen-0123456789abcdef0123456789", "printable ASCII"),
    ] {
        std::fs::write(&file, format!("admin_token = {token:?}\n")).unwrap();
        let out = start(None, None, None).await;
        assert!(!out.status.success(), "{token:?} was accepted");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(why), "{stderr}");
        std::fs::write(&file, "").unwrap();
        let out = start(None, None, Some(token)).await;
        assert!(!out.status.success(), "{token:?} was accepted");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains(why),
            "PAYRAIL_ADMIN_TOKEN={token:?}: {stderr}"
        );
    }
    // A secret of the wrong type is refused without being printed.
    for key in ["admin_token", "master_key"] {
        std::fs::write(&file, format!("\n{key} = 73190462855017\n")).unwrap();
        let out = start(None, None, None).await;
        assert!(!out.status.success(), "a numeric {key} was accepted");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("line 2: admin_token and master_key must be quoted strings"),
            "{stderr}"
        );
        assert!(!stderr.contains("73190462855017"), "{key}: {stderr}");
    }
}

/// Sends `head` (the request line and headers, without the blank line that
/// ends them) and then `body`, and returns the answer: the head, and the
/// body of its `content-length`. A server that leaves the connection without
/// a whole answer fails the test; one that never answers, after 20 s.
async fn raw_exchange(s: &Server, head: &str, body: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("{head}\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The server may answer and close before taking all of it.
    let _ = conn.write_all(body).await;
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if rest.len() >= len {
                    return (head.to_string(), rest[..len].to_string());
                }
            }
            let n = conn.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "connection closed before a whole answer: {text:?}");
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no answer")
}

/// A chunked body of `total` bytes of `fill`, 8 KiB to a chunk.
fn chunked(total: usize, fill: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(8192);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend(std::iter::repeat_n(fill, n));
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Starts `payrail serve` on `db`, which must refuse to start; its stderr.
async fn refused_start(db: &support::Db, sandbox: bool) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_payrail"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--db", &db.url])
        .env("PAYRAIL_ADMIN_TOKEN", "a-production-token")
        .env_remove("PAYRAIL_MASTER_KEY")
        .env_remove("PAYRAIL_SANDBOX")
        .kill_on_drop(true);
    if sandbox {
        cmd.arg("--sandbox");
    }
    if db.inner.is_postgres() {
        cmd.env("PAYRAIL_MASTER_KEY", support::TEST_MASTER_KEY);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("it started instead of refusing")
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it must not have started listening");
    String::from_utf8(out.stderr).unwrap()
}

async fn healthy(server: &Server) -> bool {
    server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

fn production() -> Start {
    Start {
        sandbox: false,
        admin_token: Some("a-production-token".into()),
        ..Default::default()
    }
}

/// Sandbox fixtures stay in the database, among them a merchant whose
/// secret is published: that database is not served outside sandbox mode.
#[tokio::test]
async fn a_sandbox_database_is_not_served_outside_sandbox_mode() {
    let sandbox = Server::start_on(Db::fresh()).await;
    let (_, db) = sandbox.terminate().await;
    let stderr = refused_start(&db, false).await;
    assert!(
        stderr.contains("sandbox mode has served this database"),
        "{stderr}"
    );
    // In sandbox mode it still starts.
    let again = Server::start_on(db).await;
    assert!(healthy(&again).await);
}

/// The other way round: sandbox mode would write its fixtures into a live
/// ledger, and show the OTPs in its outbox to the published admin token.
#[tokio::test]
async fn a_production_database_is_not_served_in_sandbox_mode() {
    let live = Server::start_with(Db::fresh(), production()).await;
    let (_, db) = live.terminate().await;
    let stderr = refused_start(&db, true).await;
    assert!(
        stderr.contains("a server outside sandbox mode has served this database"),
        "{stderr}"
    );
    // Outside sandbox mode it still starts, with no sandbox merchant in it.
    let again = Server::start_with(db, production()).await;
    assert!(healthy(&again).await);
    let merchant = again
        .http
        .get(again.url("/admin/v1/mobikwik/merchants/MBK9006"))
        .bearer_auth("a-production-token")
        .send()
        .await
        .unwrap();
    assert_eq!(merchant.status(), 404);
}

/// Two servers on one SQLite file would each sync only the WAL frames they
/// wrote, while either's checkpoint moves the other's: the second refuses.
/// (PostgreSQL is the backend for several nodes.)
#[tokio::test]
async fn a_second_server_on_one_sqlite_file_refuses_to_start() {
    let db = Db::fresh();
    if db.inner.is_postgres() {
        return;
    }
    let first = Server::start_on(db.clone()).await;
    let stderr = refused_start(&db, true).await;
    assert!(
        stderr.contains("another payrail process has this database open"),
        "{stderr}"
    );
    assert!(healthy(&first).await);
    let (_, db) = first.terminate().await;
    let again = Server::start_on(db).await;
    assert!(healthy(&again).await);
}

/// A server whose limits come from a config file.
async fn start_with_limits(limits: &str) -> Server {
    let db = Db::fresh();
    let file = db.dir().join("limits.toml");
    std::fs::write(&file, format!("[limits]\n{limits}\n")).unwrap();
    let args = vec!["--config".to_string(), file.display().to_string()];
    Server::start_with(
        db,
        support::Start {
            args,
            ..Default::default()
        },
    )
    .await
}

/// A body that stops coming is answered once its time is up, and its
/// connection closed; without that one client could hold connections open
/// for as long as it liked.
#[tokio::test]
async fn a_stalled_body_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start_with_limits("body_timeout_secs = 1").await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let auth = format!(
        "Authorization: Bearer {}\r\nContent-Type: application/json\r\n",
        support::ADMIN_TOKEN
    );
    for (target, extra, start, wants) in [
        ("POST /debitwallet", "", "mid=", "\"statuscode\":\"151\""),
        (
            "POST /admin/v1/wallets",
            auth.as_str(),
            "{\"cell\"",
            "\"code\":\"invalid_request\"",
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "{target} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 100\r\n\r\n{start}"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // The timeout only turns a hang into a failure.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{target}: no answer, connection still open"))
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains(wants), "{target}: {answer}");
    }
    // The server still answers.
    assert!(
        s.http
            .get(s.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
}

/// A client that sends requests and never reads the answers loses its
/// connection once an answer has waited `write_timeout_secs` for it. With a
/// cap of one connection, the next client is served only after that.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let s = start_with_limits("write_timeout_secs = 1\nmax_connections = 1").await;
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    // Pipelined: far more answer bytes than the two sockets' buffers hold.
    // Written from a task, since the server stops reading once it is stuck.
    let writer = tokio::spawn(async move {
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        for _ in 0..4000 {
            if stalled.write_all(request.as_bytes()).await.is_err() {
                break;
            }
        }
        stalled // kept open, never read
    });
    let status = tokio::time::timeout(
        Duration::from_secs(25),
        s.http.get(s.url("/healthz")).send(),
    )
    .await
    .expect("the stalled connection still holds the only slot")
    .unwrap()
    .status();
    assert!(status.is_success());
    writer.abort();
}

/// Past the connection cap, a new connection waits until one closes.
#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let s = start_with_limits("max_connections = 2").await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let idle_a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _idle_b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut healthz = tokio::spawn({
        let (http, url) = (s.http.clone(), s.url("/healthz"));
        async move { http.get(url).send().await.unwrap().status() }
    });
    // Not answered while both slots are held (a bounded look: a server
    // without the cap answers in well under a millisecond).
    let early = tokio::time::timeout(Duration::from_millis(300), &mut healthz).await;
    assert!(early.is_err(), "answered past the cap");
    drop(idle_a);
    let status = tokio::time::timeout(Duration::from_secs(20), healthz)
        .await
        .expect("still waiting after a slot was freed")
        .unwrap();
    assert!(status.is_success());
}

/// Over the body limit, each family answers in its own shape: a wire
/// endpoint with 151 in its own failure shape (in XML if asked), the admin
/// API with its JSON error. A declared length alone is refused, before a byte of the
/// body is sent; a chunked body is cut off at the limit.
#[tokio::test]
async fn oversized_bodies_and_headers_are_refused_in_each_shape() {
    let s = Server::start().await;
    let admin = format!(
        "Authorization: Bearer {}\r\nContent-Type: application/json",
        support::ADMIN_TOKEN
    );
    let big = 200 * 1024;
    for framing in ["declared", "chunked"] {
        for (target, extra, wants) in [
            (
                "POST /admin/v1/wallets",
                admin.as_str(),
                "\"code\":\"payload_too_large\"",
            ),
            (
                "POST /debitwallet?msgcode=504",
                "Content-Type: application/x-www-form-urlencoded",
                "\"messagecode\":\"504\",\"status\":\"FAILURE\",\"statuscode\":\"151\"",
            ),
            (
                "POST /debitwallet",
                "payloadtype: xml",
                "<status>FAILURE</status><statuscode>151</statuscode>",
            ),
            (
                "POST /checkstatus?orderid=BIG_0001",
                "Content-Type: application/x-www-form-urlencoded",
                "{\"statuscode\":\"151\",\"orderid\":\"BIG_0001\",\"refid\":\"\",\"amount\":\"\",\"statusmessage\":\"Invalid Request Parameters\"",
            ),
            (
                "POST /walletrefund?txid=BIG_0002",
                "Content-Type: application/x-www-form-urlencoded",
                "\"statuscode\":\"151\",\"statusmessage\":\"Invalid Request Parameters\"",
            ),
        ] {
            let (head, body) = match framing {
                "declared" => {
                    raw_exchange(
                        &s,
                        &format!("{target} HTTP/1.1\r\n{extra}\r\nContent-Length: {big}"),
                        b"",
                    )
                    .await
                }
                _ => {
                    raw_exchange(
                        &s,
                        &format!("{target} HTTP/1.1\r\n{extra}\r\nTransfer-Encoding: chunked"),
                        &chunked(big, b'a'),
                    )
                    .await
                }
            };
            assert!(
                head.starts_with("HTTP/1.1 413"),
                "{framing} {target}: {head}"
            );
            assert!(body.contains(wants), "{framing} {target}: {body}");
        }
    }
    // Just under the limit is read and answered as usual (an unknown mid).
    let config_limit = 64 * 1024;
    let filler = format!(
        "mid=NOPE&msgcode=504&comment={}",
        "x".repeat(config_limit - 60)
    );
    let (head, body) = raw_exchange(
        &s,
        &format!(
            "POST /debitwallet HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}",
            filler.len()
        ),
        filler.as_bytes(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"statuscode\":\"22\""), "{body}");
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-filler", "y".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Still serving.
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_admin_input_gets_a_typed_4xx() {
    let s = Server::start().await;
    let url = s.url("/admin/v1/wallets");
    let send = |body: &'static str, ct: &'static str| {
        s.http
            .post(&url)
            .bearer_auth(support::ADMIN_TOKEN)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let cases = [
        ("{", "application/json", StatusCode::BAD_REQUEST),
        (
            "{\"cell\":\"9800000001\",\"balance\":\"1.001\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "{\"cell\":\"9800000001\",\"balance\":\"-5\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "{\"cell\":\"12345\",\"balance\":\"5\"}",
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "{\"cell\":\"9800000001\",\"balance\":\"5\",\"extra\":1}",
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "cell=9800000001",
            "application/x-www-form-urlencoded",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (body, ct, expected) in cases {
        let r = send(body, ct).await.unwrap();
        assert_eq!(r.status(), expected, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{v}"
        );
    }
    let r = s.http.get(s.url("/no/such/path")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // A refused value is not repeated: it may be a secret in the wrong shape.
    let (st, v) = s
        .admin_post(
            "/mobikwik/merchants",
            json!({ "mid": "MBK4242", "name": "Shop", "secret": 918273645546372819u64 }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("secret"),
        "{v}"
    );
    assert!(!v.to_string().contains("918273645546372819"), "{v}");
    let (st, v) = s
        .admin_post(
            "/wallets",
            json!({ "cell": "9800000001", "balance": "9182736455.4637281" }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(!v.to_string().contains("4637281"), "{v}");
    // A mid that no merchant can have is refused before any lookup, and not
    // repeated.
    let long = "M".repeat(4000);
    for (st, v) in [
        s.admin_get(&format!("/mobikwik/merchants/{long}")).await,
        s.admin_post(
            "/mobikwik/tokens",
            json!({ "mid": long, "cell": "9800000001", "amount": "1" }),
        )
        .await,
    ] {
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(!v.to_string().contains(&long), "{v}");
    }

    // A path segment that is not UTF-8, and a method the endpoint does not
    // take: the same JSON errors, and 405 keeps its Allow header.
    let r = s
        .http
        .get(s.url("/admin/v1/wallets/%FF"))
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    let r = s
        .http
        .delete(&url)
        .bearer_auth(support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers().contains_key("allow"), "{:?}", r.headers());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
}

#[tokio::test]
async fn graceful_shutdown_keeps_every_answered_write_and_restart_duplicates_nothing() {
    let s = Server::start().await;
    let before = s.verify_ok().await;
    let (status, _) = s
        .admin_post(
            "/wallets/9910057241/credit",
            json!({ "amount": "5.00", "reference": "topup-1" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (exit, db) = s.terminate().await;
    assert!(exit.success(), "{exit:?}");

    let s = Server::start_on(db).await;
    assert_eq!(s.wallet_balance("9910057241").await, "1005.00");
    assert_eq!(s.wallet_balance("9311032820").await, "10000.00");
    let after = s.verify_ok().await;
    assert_eq!(after["accounts"], before["accounts"]);
    assert_eq!(
        after["transfers"].as_i64().unwrap(),
        before["transfers"].as_i64().unwrap() + 1
    );
}

/// Requests the server has begun to read when SIGTERM arrives are finished,
/// answered and kept: shutdown stops accepting connections, then drains
/// those in flight before closing the store. Each request here has sent its
/// head and half its body before the signal and the rest only once the
/// server has said it stopped accepting, so it is in flight for certain.
#[tokio::test]
async fn requests_in_flight_at_sigterm_are_answered_and_kept() {
    use payrail_mobikwik::client::Debit;
    use payrail_mobikwik::fixtures::{TOKEN, TOKEN_CELL};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const N: usize = 4;
    let s = Server::start().await;
    let c = s.client();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conns = Vec::new();
    for i in 0..N {
        let orderid = format!("DRAIN_ORDER_{i:02}");
        let body = c
            .debit_request(&Debit::new(TOKEN_CELL, "10.00", &orderid, TOKEN))
            .encoded();
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (first, rest) = body.split_at(body.len() / 2);
        let head = format!(
            "POST /debitwallet HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(first.as_bytes()).await.unwrap();
        conns.push((orderid, conn, rest.to_string()));
    }
    // Wait until the server has read all N heads and is waiting for their
    // bodies (the scrape counts itself).
    let reading = || async { s.gauge("payrail_http_requests_in_flight").await == N as u64 + 1 };
    support::wait_until("the server never read the requests' heads", reading).await;

    s.sigterm();
    let stopped = || async { s.log_text().contains("stopped accepting") };
    support::wait_until("the server never stopped accepting", stopped).await;
    // The listener is closed before that line is logged: nothing new gets in.
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "a new connection was accepted after shutdown began"
    );

    let mut answered = Vec::new();
    for (orderid, mut conn, rest) in conns {
        conn.write_all(rest.as_bytes()).await.unwrap();
        let mut answer = String::new();
        // The server closes the connection after the answer, as it shuts down.
        tokio::time::timeout(Duration::from_secs(20), conn.read_to_string(&mut answer))
            .await
            .expect("no answer")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(
            answer.contains("\"status\":\"SUCCESS\"") && answer.contains(&orderid),
            "{answer:?}"
        );
        answered.push(orderid);
    }
    let (exit, db) = s.exited().await;
    assert!(exit.success(), "{exit:?}");

    let s = Server::start_on(db).await;
    let c = s.client();
    for orderid in &answered {
        let st = c.check_status(orderid).await.unwrap();
        assert_eq!(
            (st.statuscode(), st.get("amount")),
            ("0", "10.00"),
            "{st:?}"
        );
    }
    assert_eq!(s.wallet_balance(TOKEN_CELL).await, "9960.00");
    s.verify_ok().await;
}

#[tokio::test]
async fn no_secret_reaches_the_log_or_the_database() {
    let s = Server::start().await;
    let c = s.client();
    send_otp(&c, "9910057241").await;
    let otp = s.last_otp("9910057241").await;
    let token = c.token_from_otp("9910057241", "100", &otp).await.unwrap();
    assert!(token.is_success(), "{token:?}");
    let token = token.get("token").to_string();
    let log = s.log_text();
    for secret in [
        otp.as_str(),
        token.as_str(),
        payrail_mobikwik::fixtures::SECRET,
        "MBK_TOKEN_123456789",
    ] {
        assert!(
            !log.contains(secret),
            "log contains a secret: {secret}\n{log}"
        );
    }
    // And at rest: the database holds neither the secret nor tokens nor OTPs.
    let (_, db) = s.terminate().await;
    let bytes = db.inner.dump();
    assert!(bytes.len() > 1000, "the dump is suspiciously small");
    for secret in [
        otp.as_str(),
        token.as_str(),
        payrail_mobikwik::fixtures::SECRET,
        "MBK_TOKEN_123456789",
    ] {
        let hexed = hex::encode(secret);
        for needle in [secret.as_bytes(), hexed.as_bytes()] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "the database holds {secret} in plain text"
            );
        }
    }
}
