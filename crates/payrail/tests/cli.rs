//! The `payrail mobikwik` commands.

mod support;

use std::process::Command;

fn payrail(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn sign_reproduces_the_published_vectors() {
    let secret = payrail_mobikwik::fixtures::SECRET;
    let (ok, out, err) = payrail(&[
        "mobikwik",
        "sign",
        "--secret",
        secret,
        "--show",
        "1",
        "9910057241",
        "TestMerchant",
        "MBK9006",
        "504",
        "1",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "abb25243ec1d608e10612c6dfa11e0e05a4591c4544acf18d604cd31ea23607d"
    );
    assert!(
        err.contains("'1''9910057241''TestMerchant''MBK9006''504''1'"),
        "{err}"
    );
    // By endpoint, in any argument order: the endpoint's order is applied.
    let (ok, out, _) = payrail(&[
        "mobikwik",
        "sign",
        "--secret",
        secret,
        "--endpoint",
        "debitwallet",
        "txntype=debit",
        "token=320322754e14428ea85d80d7c732d772",
        "orderid=INFO1111100003",
        "msgcode=503",
        "mid=MBK9006",
        "merchantname=Test Merchant",
        "comment=comment",
        "cell=9910057241",
        "amount=1",
    ]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "00f7c462b92e038653865f1f656ec1cea4f50745032e5bd9e73b7c62ec204712"
    );
}

#[tokio::test]
async fn commands_call_a_server_and_verify_its_answers() {
    let s = support::Server::start().await;
    let url = s.base.clone();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            payrail(&refs)
        })
    };
    let args = |cmd: &str, rest: &[&str]| -> Vec<String> {
        ["mobikwik", cmd, "--url", url.as_str()]
            .iter()
            .chain(rest)
            .map(|s| s.to_string())
            .collect()
    };
    let (ok, out, err) = run(args(
        "debit",
        &[
            "--cell",
            "9311032820",
            "--amount",
            "12.34",
            "--orderid",
            "CLI_ORDER_01",
            "--token",
            "MBK_TOKEN_123456789",
        ],
    ))
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["statuscode"], "0");
    assert!(err.contains("checksum: verified"), "{err}");
    let (ok, out, _) = run(args("status", &["--orderid", "CLI_ORDER_01"]))
        .await
        .unwrap();
    assert!(ok);
    assert!(out.contains("\"12.34\""));
    let (ok, out, _) = run(args(
        "balance",
        &["--cell", "9311032820", "--token", "MBK_TOKEN_123456789"],
    ))
    .await
    .unwrap();
    assert!(ok);
    assert!(out.contains("\"9987.66\""), "{out}");
    // A refused answer exits non-zero.
    let (ok, out, _) = run(args(
        "debit",
        &[
            "--cell",
            "9311032820",
            "--amount",
            "12.34",
            "--orderid",
            "CLI_ORDER_01",
            "--token",
            "MBK_TOKEN_123456789",
        ],
    ))
    .await
    .unwrap();
    assert!(!ok);
    assert!(out.contains("\"304\""));
}

/// Is `bin` an executable on `PATH`?
fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// `payrail bench --wrk` into `dir` against `base`: the script and the paths
/// of its two files.
async fn write_wrk_set(base: &str, dir: &std::path::Path) -> (String, Vec<String>) {
    let args: Vec<String> = [
        "bench",
        "--url",
        base,
        "--wallets",
        "7",
        "--threads",
        "2",
        "--wrk-requests",
        "15",
        "--admin-token",
        support::ADMIN_TOKEN,
        "--wrk",
        dir.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        payrail(&refs)
    })
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let script = std::fs::read_to_string(dir.join("debit.lua")).unwrap();
    let mut paths = Vec::new();
    for t in 0..2 {
        let file = dir.join(format!("debits-{t}.paths"));
        assert!(
            script.contains(&format!("\"{}\"", file.canonicalize().unwrap().display())),
            "the script names {}",
            file.display()
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 15);
        paths.extend(text.lines().map(str::to_string));
    }
    (script, paths)
}

fn orderid(path: &str) -> String {
    path.split('&')
        .find_map(|kv| kv.strip_prefix("orderid="))
        .unwrap()
        .to_string()
}

/// `payrail bench --wrk` signs debits ahead for wrk: every path must be one the
/// server accepts once (unique orderids, across the files of different wrk
/// threads and across sets) and refuses when sent again; and the script must
/// send each once and count everything else as not SUCCESS.
#[tokio::test]
async fn bench_writes_wrk_debits_the_server_accepts_exactly_once() {
    let s = support::Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, paths) = write_wrk_set(&s.base, &dir.path().join("one")).await;
    let unique: std::collections::HashSet<String> = paths.iter().map(|p| orderid(p)).collect();
    assert_eq!(unique.len(), paths.len(), "orderids repeat");
    let get = |path: &str| {
        let url = s.url(path);
        let http = s.http.clone();
        async move {
            let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
            v["statuscode"].as_str().unwrap().to_string()
        }
    };
    for p in &paths {
        assert_eq!(get(p).await, "0", "{p}");
    }
    assert_eq!(get(&paths[0]).await, "304");

    // A second set against the same server shares no orderid with the first.
    let second_dir = dir.path().join("two");
    let (script, second) = write_wrk_set(&s.base, &second_dir).await;
    assert!(second.iter().all(|p| !unique.contains(&orderid(p))));

    // The script, sent by wrk (`scripts/test` installs it and sets
    // PAYRAIL_REQUIRE_WRK=1). Two connections for two seconds send far more
    // than the 30 paths, so the files wrap: the 30 succeed, the repeats are
    // refused and counted.
    if on_path("wrk") {
        let (url, script_path) = (s.base.clone(), second_dir.join("debit.lua"));
        let out = tokio::task::spawn_blocking(move || {
            Command::new("wrk")
                .args(["-t2", "-c2", "-d2s", "-s"])
                .arg(&script_path)
                .arg(&url)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let counts: Vec<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("debits not SUCCESS: "))
            .unwrap_or_else(|| panic!("no count from the script:\n{text}\n{script}"))
            .split(" of ")
            .map(|n| n.trim().parse().unwrap())
            .collect();
        let (refused, sent) = (counts[0], counts[1]);
        assert_eq!(sent - refused, sent.min(30), "{text}");
        // Once all 30 were sent, every one is spent.
        if sent >= 30 {
            for p in &second {
                assert_eq!(get(p).await, "304", "wrk never sent {p}");
            }
        }
    } else {
        assert_ne!(
            std::env::var("PAYRAIL_REQUIRE_WRK").as_deref(),
            Ok("1"),
            "PAYRAIL_REQUIRE_WRK=1 but wrk is not on PATH"
        );
        eprintln!("wrk is not installed: the script itself was not run");
    }
    s.verify_ok().await;
}

/// Runs `payrail bench` with `args`; its exit code, stdout and stderr.
async fn bench(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_payrail"))
            .arg("bench")
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// One second of load on two connections, and the JSON report's one run.
fn short_run(extra: &[&str], json: &std::path::Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--connections",
        "2",
        "--duration",
        "1",
        "--healthz-duration",
        "1",
        "--warmup",
        "0",
        "--admin-token",
        support::ADMIN_TOKEN,
        "--json",
        json.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_of(json: &std::path::Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    v["runs"][0].clone()
}

/// The harness's debits all deserve SUCCESS; a run where they were refused
/// reports the refusals and fails, rather than passing with the refusals
/// counted as throughput.
#[tokio::test]
async fn bench_fails_a_run_whose_debits_were_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = support::Server::start().await;
    let json = dir.path().join("ok.json");
    let (code, out, err) = bench(short_run(&["--url", &s.base, "--wallets", "2"], &json)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let run = run_of(&json);
    assert!(run["debit"]["requests"].as_u64().unwrap() > 0, "{run}");
    assert_eq!(run["debit"]["not_success"], 0, "{run}");
    assert!(run["healthz"]["requests"].as_u64().unwrap() > 0, "{run}");

    // The one wallet of a one-wallet run, opened as the harness would and
    // blocked: every debit is refused (305).
    let s = support::Server::start().await;
    let cell = "7000000000";
    let (st, v) = s
        .admin_post(
            "/wallets",
            serde_json::json!({ "cell": cell, "balance": "9999999999.99" }),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let (st, v) = s
        .admin_post(&format!("/wallets/{cell}/block"), serde_json::json!({}))
        .await;
    assert!(st.is_success(), "{v}");
    let json = dir.path().join("refused.json");
    let (code, out, err) = bench(short_run(&["--url", &s.base, "--wallets", "1"], &json)).await;
    assert_eq!(code, Some(1), "{out}{err}");
    let run = run_of(&json);
    let sent = run["debit"]["requests"].as_u64().unwrap();
    assert!(sent > 0, "{run}");
    assert_eq!(run["debit"]["not_success"].as_u64(), Some(sent), "{run}");
    assert!(err.contains("refused"), "{err}");
}

/// Tokens kept beside a database from an earlier run are checked before they
/// are used: stale ones (expired, or from another database) stop the run
/// with the reason instead of making every debit a refusal.
#[tokio::test]
async fn bench_refuses_kept_tokens_that_no_longer_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("b.db");
    let db_arg = db.to_str().unwrap().to_string();
    let json = dir.path().join("first.json");
    let (code, out, err) = bench(short_run(&["--db", &db_arg, "--wallets", "2"], &json)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let kept = dir.path().join("b.db.bench-tokens");
    let text = std::fs::read_to_string(&kept).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");

    // The same run again reuses them.
    let json = dir.path().join("again.json");
    let (code, out, err) = bench(short_run(&["--db", &db_arg, "--wallets", "2"], &json)).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("reusing 2 wallets"), "{err}");

    // Tokens the server never issued, for the same wallets.
    let stale: String = text
        .lines()
        .map(|l| format!("{} {}\n", l.split_once(' ').unwrap().0, "ab".repeat(16)))
        .collect();
    std::fs::write(&kept, stale).unwrap();
    let json = dir.path().join("stale.json");
    let (code, out, err) = bench(short_run(&["--db", &db_arg, "--wallets", "2"], &json)).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("no longer work"), "{err}");
    assert!(!json.exists(), "a run was made with stale tokens");
}
