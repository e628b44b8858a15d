//! The open-file limit a server is started with. In a file of its own, and
//! it must stay the only test here: it lowers this process's limit while it
//! starts the server, which inherits it, and no other test may run meanwhile
//! (cargo runs test binaries one at a time). Linux: it reads `/proc`.
#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use rlimit::Resource;
use support::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Started with a soft limit of 256 open files (as many systems start a
/// process with 1,024), the server raises it toward its hard limit, so that
/// 600 clients at once are all answered, rather than accepts failing.
#[tokio::test]
async fn a_low_open_file_limit_is_raised_to_fit_the_connections() {
    const LOW: u64 = 256;
    const CLIENTS: usize = 600;
    let (_, hard) = Resource::NOFILE.get().unwrap();
    if hard < 2_048 {
        eprintln!("skipped: the hard open-file limit here is {hard}, below 2048");
        return;
    }
    Resource::NOFILE.set(LOW, hard).unwrap();
    let s = Server::start().await;
    // This side holds the 600 clients.
    Resource::NOFILE.set(hard.min(4_096), hard).unwrap();

    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let open_files: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no soft open-file limit in {limits}"));
    assert!(open_files > CLIENTS as u64 + LOW, "soft limit {open_files}");

    let addr = s.base.trim_start_matches("http://").to_string();
    let mut held = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: payrail\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 64];
        // The timeout only turns a connection nobody accepted into a failure.
        let n = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not answered"))
            .unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&answer[..n])
        );
        held.push(conn);
    }
}
