//! `payrail bench`: the load harness.
//!
//! Starts a server (or targets one by URL), creates W wallets and W tokens
//! through the admin API, then, for each connection count, drives `/healthz`
//! (the ceiling of the HTTP stack on this machine) and signed `/debitwallet`
//! requests with unique orderids over C keep-alive connections, and reports
//! throughput, latency percentiles and failures as a table, JSON and an SVG
//! chart.

mod load;
mod report;
mod wrk;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use payrail_mobikwik::{checksum, fixtures};

use load::Workload;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// 10,000 wallets, debits spread over all of them.
    Spread,
    /// Every debit on one wallet.
    Hot,
    /// 1,000,000 wallets.
    Large,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Target a running server (in sandbox mode) instead of starting one.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, value_enum, default_value = "spread")]
    mode: Mode,
    /// Wallets (overrides the mode's count).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    wallets: Option<u32>,
    /// Connection counts, comma-separated; several make a sweep (and a chart).
    #[arg(long, default_value = "64", value_delimiter = ',')]
    connections: Vec<usize>,
    /// Seconds of debits per connection count.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Seconds of /healthz per connection count.
    #[arg(long, default_value_t = 15)]
    healthz_duration: u64,
    /// Seconds of unmeasured debits before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Load generator threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Database for the server the harness starts [default: a temporary SQLite file].
    /// The wallets' tokens are kept beside a SQLite database and reused by
    /// later runs on it, which skips the set-up.
    #[arg(long)]
    db: Option<String>,
    /// Admin token of the target server.
    #[arg(
        long,
        env = "PAYRAIL_ADMIN_TOKEN",
        default_value = "sandbox-admin-token",
        hide_env_values = true
    )]
    admin_token: String,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a chart of throughput and p99 across connection counts.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Instead of sending the load, set up the wallets on `--url` and write
    /// a wrk script with signed debits to this directory, one file per
    /// `--threads` (run wrk with that many threads). The settings of the
    /// harness's own runs (connections, durations, JSON, SVG) do not apply.
    #[arg(long, value_name = "DIR", requires = "url")]
    wrk: Option<PathBuf>,
    /// Signed debits per file with `--wrk`.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    wrk_requests: u64,
}

/// A server the harness started, as a child process.
struct OwnServer {
    child: Child,
    base: String,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl OwnServer {
    fn start(
        args: Vec<String>,
        tmp: Option<tempfile::TempDir>,
    ) -> Result<(OwnServer, Duration), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut child = Command::new(exe)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("payrail listening on ") {
                        break url.to_string();
                    }
                }
                _ => return Err("the server exited before listening".into()),
            }
        };
        let startup = started.elapsed();
        std::thread::spawn(move || for _ in lines {});
        Ok((
            OwnServer {
                child,
                base,
                args,
                _tmp: tmp,
            },
            startup,
        ))
    }

    /// Peak resident memory so far, MiB (Linux `VmHWM`).
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM, so the server shuts down as in production (drains and
            // checkpoints); if the signal cannot be sent, kill it outright.
            let sent = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !sent {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }

    /// Stops and starts again on the same database; returns the start-up time.
    fn restart(&mut self) -> Result<Duration, String> {
        self.stop();
        let tmp = self._tmp.take();
        let (fresh, startup) = OwnServer::start(self.args.clone(), tmp)?;
        *self = fresh;
        Ok(startup)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Signed `/debitwallet` requests with unique orderids, spread over wallets.
struct DebitLoad {
    host: String,
    /// Random, part of each orderid: keeps runs against one server apart
    /// (40 bits: two runs share orderids about once in 10^12).
    run: u64,
    /// Bumped before every run: part of each orderid.
    epoch: std::sync::atomic::AtomicU32,
    wallets: Vec<(String, String)>,
    secret: &'static [u8],
    /// Answers judged so far (picks the ones whose checksum is checked).
    seen: std::sync::atomic::AtomicU64,
}

impl DebitLoad {
    /// The signed path of debit `n` of connection `conn` in run `epoch`.
    fn path(&self, epoch: u32, conn: usize, n: u64) -> String {
        // Different connections walk the wallets at different strides, so
        // concurrent debits rarely meet on one wallet unless there is one.
        let i = (conn as u64 * 7919 + n * 104_729) as usize % self.wallets.len();
        let (cell, token) = &self.wallets[i];
        // 28 characters, and no more than 30 (the limit) with up to 9,999
        // connections, 999 runs and 10^9 debits per connection.
        let orderid = format!("B{:010x}E{epoch:02}C{conn:03}N{n:09}", self.run);
        let (amount, merchantname, mid, msgcode, txntype) = (
            "1.00",
            fixtures::MERCHANT_NAME,
            fixtures::MID,
            "504",
            "debit",
        );
        let sum = checksum::sign(
            self.secret,
            [
                amount,
                cell.as_str(),
                "",
                merchantname,
                mid,
                msgcode,
                &orderid,
                token.as_str(),
                txntype,
            ],
        );
        format!(
            "/debitwallet?mid={mid}&cell={cell}&amount={amount}&orderid={orderid}&token={token}&merchantname={merchantname}&msgcode={msgcode}&txntype={txntype}&checksum={sum}"
        )
    }
}

impl Workload for DebitLoad {
    fn begin(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn request(&self, conn: usize, n: u64, out: &mut Vec<u8>) {
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        let path = self.path(epoch, conn, n);
        use std::io::Write;
        let _ = write!(out, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
    }

    fn ok(&self, request: &[u8], body: &[u8]) -> bool {
        if !contains(body, b"\"statuscode\":\"0\"") {
            return false;
        }
        // The answer is for this debit: it names the request's orderid.
        let Some(orderid) = query_value(request, b"orderid=") else {
            return false;
        };
        let mut named = Vec::with_capacity(orderid.len() + 13);
        named.extend_from_slice(b"\"orderid\":\"");
        named.extend_from_slice(orderid);
        named.push(b'"');
        if !contains(body, &named) {
            return false;
        }
        // One answer in 64 is also checked the way a client checks every
        // one: its checksum. All of them would cost the load generator CPU
        // the server needs on a 2-core machine.
        if self
            .seen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(64)
        {
            return signed_by(self.secret, body);
        }
        true
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The value of `key` (`"name="`) in the request line's query string.
fn query_value<'a>(request: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let line = request.split(|&b| b == b'\r').next()?;
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &line[at..];
    let end = rest
        .iter()
        .position(|&b| b == b'&' || b == b' ')
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Does the JSON answer carry the checksum the merchant's secret gives its
/// other fields (sorted by name, empty ones left out)?
fn signed_by(secret: &[u8], body: &[u8]) -> bool {
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) else {
        return false;
    };
    let mut provided = None;
    let mut pairs = Vec::with_capacity(map.len());
    for (k, v) in &map {
        let Some(v) = v.as_str() else {
            return false;
        };
        if k == "checksum" {
            provided = Some(v);
        } else {
            pairs.push((k.as_str(), v));
        }
    }
    provided.is_some_and(|p| checksum::verify(secret, checksum::sorted_values(&pairs), p))
}

fn addr_of(base: &str) -> Result<(SocketAddr, String), String> {
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs: {base}"))?
        .trim_end_matches('/')
        .to_string();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((addr, host))
}

/// Creates the wallets and a token for each, through the admin API.
async fn setup(
    base: &str,
    token: &str,
    wallets: usize,
    balance: &str,
) -> Result<Vec<(String, String)>, String> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let out: Vec<(String, String)> = futures::stream::iter(0..wallets)
        .map(|i| {
            let http = http.clone();
            let cell = format!("7{i:09}");
            async move {
                let post = |path: String, body: serde_json::Value| {
                    http.post(format!("{base}/admin/v1{path}"))
                        .bearer_auth(token)
                        .json(&body)
                        .send()
                };
                let r = post(
                    "/wallets".into(),
                    serde_json::json!({ "cell": cell, "balance": balance }),
                )
                .await
                .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!(
                        "creating wallet {cell}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                let r = post(
                    "/mobikwik/tokens".into(),
                    serde_json::json!({ "mid": fixtures::MID, "cell": cell, "amount": "1000.00" }),
                )
                .await
                .map_err(|e| e.to_string())?;
                let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
                let t = v["token"]
                    .as_str()
                    .ok_or_else(|| format!("no token for {cell}: {v}"))?;
                Ok((cell, t.to_string()))
            }
        })
        .buffered(64)
        .try_collect()
        .await?;
    eprintln!(
        "set up {wallets} wallets and tokens in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Tokens expire, and the file may outlive its database: a cached token that
/// no longer works would turn every debit into a refusal. The first and the
/// last are asked for their wallet's balance.
async fn check_cached(
    base: &str,
    list: &[(String, String)],
    file: Option<&std::path::Path>,
) -> Result<(), String> {
    let client = payrail_mobikwik::client::Client::sandbox(base);
    for (cell, token) in [list.first(), list.last()].into_iter().flatten() {
        let r = client
            .balance(cell, token)
            .await
            .map_err(|e| e.to_string())?;
        if !r.is_success() {
            return Err(format!(
                "the tokens kept in {} no longer work on this server (statuscode {} for {cell}): \
                 delete that file, or use a fresh database",
                file.map_or_else(String::new, |f| f.display().to_string()),
                r.statuscode()
            ));
        }
    }
    Ok(())
}

pub async fn run(args: BenchArgs) -> Result<bool, String> {
    let wallets = args.wallets.map_or(
        match args.mode {
            Mode::Spread => 10_000,
            Mode::Hot => 1,
            Mode::Large => 1_000_000,
        },
        |w| w as usize,
    );
    // Enough for every debit of the run at 1.00 each.
    let balance = if wallets == 1 {
        "9999999999.99"
    } else {
        "10000000.00"
    };
    let mut own = None;
    let base = match &args.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let (db, tmp) = match &args.db {
                Some(db) => (db.clone(), None),
                None => {
                    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
                    (
                        format!("sqlite://{}", tmp.path().join("bench.db").display()),
                        Some(tmp),
                    )
                }
            };
            let server_args = ["serve", "--sandbox", "--listen", "127.0.0.1:0", "--db", &db]
                .map(String::from)
                .to_vec();
            let (s, _) = OwnServer::start(server_args, tmp)?;
            let base = s.base.clone();
            own = Some(s);
            base
        }
    };
    // Refuse a URL the load cannot use before spending minutes on set-up.
    addr_of(&base)?;
    // Tokens of an earlier run on the same SQLite database, if any.
    let token_file = match args.db.as_deref().map(payrail_store::Location::parse) {
        Some(Ok(payrail_store::Location::Sqlite(path))) => {
            let mut file = path.into_os_string();
            file.push(".bench-tokens");
            Some(PathBuf::from(file))
        }
        _ => None,
    };
    let cached: Option<Vec<(String, String)>> = token_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    l.split_once(' ')
                        .map(|(c, t)| (c.to_string(), t.to_string()))
                })
                .collect()
        })
        .filter(|list: &Vec<(String, String)>| list.len() == wallets);
    let wallet_list = match cached {
        Some(list) => {
            check_cached(&base, &list, token_file.as_deref()).await?;
            eprintln!(
                "reusing {} wallets and tokens from an earlier run",
                list.len()
            );
            list
        }
        None => {
            let list = setup(&base, &args.admin_token, wallets, balance).await?;
            if let Some(f) = &token_file {
                let text: String = list.iter().map(|(c, t)| format!("{c} {t}\n")).collect();
                let _ = std::fs::write(f, text);
            }
            list
        }
    };
    // Start-up time on the database just filled, by restarting the server.
    let mut startup_ms = None;
    let base = match own.as_mut() {
        Some(s) => {
            startup_ms = Some(s.restart()?.as_secs_f64() * 1000.0);
            s.base.clone()
        }
        None => base,
    };
    let (addr, host) = addr_of(&base)?;
    let debit = Arc::new(DebitLoad {
        host: host.clone(),
        run: rand::random::<u64>() & 0xff_ffff_ffff,
        epoch: Default::default(),
        wallets: wallet_list,
        secret: fixtures::SECRET.as_bytes(),
        seen: Default::default(),
    });
    if let Some(dir) = &args.wrk {
        let threads = args.threads.max(1);
        let script = wrk::write(dir, &debit, threads, args.wrk_requests)?;
        println!(
            "wrote {threads} × {} signed debits; run for example:\n  wrk -t{threads} -c64 -d10s -s {} {base}\n  wrk -t{threads} -c64 -d10s {base}/healthz",
            args.wrk_requests,
            script.display()
        );
        return Ok(true);
    }

    let load_rt = LoadRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.max(1))
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?,
    ));
    let healthz = Arc::new(load::Healthz { host });
    let mut rows = Vec::new();
    for &c in &args.connections {
        let (h, d) = {
            let (debit, healthz) = (Arc::clone(&debit), Arc::clone(&healthz));
            let (hd, dd, wu) = (args.healthz_duration, args.duration, args.warmup);
            load_rt
                .handle()
                .spawn(async move {
                    let h = load::run(addr, healthz, c, Duration::from_secs(hd)).await;
                    if wu > 0 {
                        load::run(addr, Arc::clone(&debit), c, Duration::from_secs(wu)).await;
                    }
                    let d = load::run(addr, debit, c, Duration::from_secs(dd)).await;
                    (h, d)
                })
                .await
                .map_err(|e| e.to_string())?
        };
        let row = report::Row {
            connections: c,
            healthz: load::summarize(h.0, h.1),
            debit: load::summarize(d.0, d.1),
        };
        report::print_row(&row);
        rows.push(row);
    }
    let peak_rss_mib = own.as_ref().and_then(OwnServer::peak_rss_mib);
    let result = report::Report {
        mode: args.mode,
        wallets,
        duration_s: args.duration,
        threads: args.threads,
        target: if own.is_some() {
            "own server".into()
        } else {
            base.clone()
        },
        startup_ms,
        peak_rss_mib,
        rows,
    };
    report::print_table(&result);
    if let Some(path) = &args.json {
        std::fs::write(path, report::json(&result))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report::svg(&result))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    drop(load_rt);
    // Every debit of the harness has a fresh orderid, a valid token and the
    // balance to pay: any other answer is a fault, not a result.
    let clean = result.rows.iter().all(|r| {
        r.debit.errors == 0 && r.debit.not_ok == 0 && r.healthz.errors == 0 && r.healthz.not_ok == 0
    });
    if !clean {
        eprintln!("payrail bench: some requests failed or were refused (see the table)");
    }
    Ok(clean)
}

/// The load generator's own runtime. Dropped inside the caller's runtime
/// (on any early return too), a tokio runtime would panic; this one shuts
/// down in the background instead.
struct LoadRuntime(Option<tokio::runtime::Runtime>);

impl LoadRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for LoadRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> DebitLoad {
        DebitLoad {
            host: "h".into(),
            run: 1,
            epoch: Default::default(),
            wallets: vec![("7000000000".into(), "ab".repeat(16))],
            secret: fixtures::SECRET.as_bytes(),
            seen: Default::default(),
        }
    }

    fn answer(secret: &[u8], orderid: &str) -> Vec<u8> {
        let fields = [
            ("statuscode", "0"),
            ("status", "SUCCESS"),
            ("orderid", orderid),
            ("debitedamount", "1.00"),
        ];
        let sum = checksum::sign_sorted(secret, &fields);
        let mut map = serde_json::Map::new();
        for (k, v) in fields.iter().chain([&("checksum", sum.as_str())]) {
            map.insert((*k).into(), (*v).into());
        }
        serde_json::to_vec(&map).unwrap()
    }

    /// A SUCCESS is counted only for its own debit, and the answers whose
    /// checksum is checked must carry the merchant's.
    #[test]
    fn an_answer_counts_only_for_its_debit_and_with_its_checksum() {
        let l = load();
        let mut req = Vec::new();
        l.request(0, 0, &mut req);
        let orderid = std::str::from_utf8(query_value(&req, b"orderid=").unwrap()).unwrap();
        assert!(orderid.starts_with('B') && orderid.len() == 28, "{orderid}");
        let secret = fixtures::SECRET.as_bytes();

        // The first answer is one whose checksum is checked.
        assert!(l.ok(&req, &answer(secret, orderid)));
        let other = load();
        assert!(!other.ok(&req, &answer(b"another secret", orderid)));
        assert!(!l.ok(&req, &answer(secret, "B0000000001E01C000N000000009")));
        let refused = String::from_utf8(answer(secret, orderid))
            .unwrap()
            .replace("\"statuscode\":\"0\"", "\"statuscode\":\"304\"");
        assert!(!l.ok(&req, refused.as_bytes()));
        // The next 63 are taken on their statuscode and orderid alone.
        let unchecked = load();
        unchecked
            .seen
            .store(1, std::sync::atomic::Ordering::Relaxed);
        assert!(unchecked.ok(&req, &answer(b"another secret", orderid)));
    }
}
