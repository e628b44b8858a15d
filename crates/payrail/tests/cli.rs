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

/// `payrail bench --wrk` signs debits ahead for wrk: every path must be one the
/// server accepts once (unique orderids, even across the files of different
/// wrk threads) and refuses when sent again.
#[tokio::test]
async fn bench_writes_wrk_debits_the_server_accepts_exactly_once() {
    let s = support::Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("wrk");
    let args: Vec<String> = [
        "bench",
        "--url",
        s.base.as_str(),
        "--wallets",
        "7",
        "--threads",
        "2",
        "--wrk-requests",
        "15",
        "--admin-token",
        support::ADMIN_TOKEN,
        "--wrk",
        out_dir.to_str().unwrap(),
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
    let script = std::fs::read_to_string(out_dir.join("debit.lua")).unwrap();
    let mut paths = Vec::new();
    for t in 0..2 {
        let file = out_dir.join(format!("debits-{t}.paths"));
        assert!(
            script.contains(&format!("\"{}\"", file.canonicalize().unwrap().display())),
            "the script names {}",
            file.display()
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 15);
        paths.extend(text.lines().map(str::to_string));
    }
    let orderid = |p: &str| {
        p.split('&')
            .find_map(|kv| kv.strip_prefix("orderid="))
            .unwrap()
            .to_string()
    };
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
    s.verify_ok().await;
}
