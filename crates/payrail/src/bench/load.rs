//! The load itself: C keep-alive connections, each sending one request after
//! another for a fixed time, timing every one.
//!
//! The HTTP/1.1 client is minimal on purpose: on a 2-core machine the load
//! generator competes with the server for CPU, as wrk does, so it must cost as
//! little as possible per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one connection (or a whole run) saw.
#[derive(Default)]
pub struct Tally {
    /// Latency of every answered request, microseconds.
    pub latencies_us: Vec<u32>,
    /// Answers that were not what the request hoped for (e.g. a debit refused).
    pub not_ok: u64,
    /// Transport errors and non-200 statuses.
    pub errors: u64,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.not_ok += other.not_ok;
        self.errors += other.errors;
    }
}

/// Builds request `n` of connection `conn` (the raw bytes) and says how to
/// judge its answer's body.
pub trait Workload: Send + Sync + 'static {
    /// Called once before each run, so a workload can keep its requests of
    /// different runs apart (orderids must never repeat).
    fn begin(&self) {}
    fn request(&self, conn: usize, n: u64, out: &mut Vec<u8>);
    /// Is `body` the answer `request` hoped for?
    fn ok(&self, request: &[u8], body: &[u8]) -> bool;
}

/// Runs `connections` connections against `addr` for `duration`.
pub async fn run<W: Workload>(
    addr: SocketAddr,
    workload: std::sync::Arc<W>,
    connections: usize,
    duration: Duration,
) -> (Tally, Duration) {
    workload.begin();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|conn| {
            let w = std::sync::Arc::clone(&workload);
            tokio::spawn(async move { connection(addr, &*w, conn, deadline).await })
        })
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        match t.await {
            Ok(t) => total.merge(t),
            // A connection that panicked lost its count: never report that as
            // a clean run.
            Err(_) => total.errors += 1,
        }
    }
    (total, started.elapsed())
}

/// How long past the run's end one answer may take before it counts as an
/// error: a server that stops answering must not hold the harness for ever.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

async fn connection<W: Workload>(addr: SocketAddr, w: &W, conn: usize, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut req = Vec::with_capacity(1024);
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut n = 0u64;
    // One error per outage, not per retry: a server down for a second is one
    // failure of this connection, not a hundred.
    let mut unreachable = false;
    while Instant::now() < deadline {
        if stream.is_none() {
            let connected =
                tokio::time::timeout_at((deadline + ANSWER_GRACE).into(), TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            match connected {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    buf.clear();
                    stream = Some(s);
                    unreachable = false;
                }
                Err(_) => {
                    if !std::mem::replace(&mut unreachable, true) {
                        tally.errors += 1;
                    }
                    // Retry pacing while the server is down, not a wait for
                    // an event: there is none to wait on.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let s = stream.as_mut().expect("connected above");
        req.clear();
        w.request(conn, n, &mut req);
        n += 1;
        let t0 = Instant::now();
        let answer = tokio::time::timeout_at((deadline + ANSWER_GRACE).into(), async {
            s.write_all(&req).await?;
            read_response(s, &mut buf).await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match answer {
            Ok((200, body)) => {
                tally
                    .latencies_us
                    .push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !w.ok(&req, &body) {
                    tally.not_ok += 1;
                }
            }
            Ok(_) => tally.errors += 1,
            Err(_) => {
                tally.errors += 1;
                stream = None;
            }
        }
    }
    tally
}

/// Reads one response; returns its status and body. `buf` keeps any bytes
/// read beyond it (there are none with one request in flight, but be exact).
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("non-UTF-8 head"))?;
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad status line"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .ok_or_else(|| bad("no content-length"))?;
            let total = end + 4 + length;
            while buf.len() < total {
                read_more(s, buf).await?;
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return Ok((status, body));
        }
        read_more(s, buf).await?;
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = s.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `GET /healthz`.
pub struct Healthz {
    pub host: String,
}

impl Workload for Healthz {
    fn request(&self, _: usize, _: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: ");
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
    }

    fn ok(&self, _: &[u8], body: &[u8]) -> bool {
        body == b"ok"
    }
}

/// Summary statistics of a tally.
pub struct Summary {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub not_ok: u64,
    pub errors: u64,
}

pub fn summarize(mut t: Tally, elapsed: Duration) -> Summary {
    t.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.latencies_us.is_empty() {
            return 0.0;
        }
        let i =
            ((t.latencies_us.len() as f64 * p).ceil() as usize).clamp(1, t.latencies_us.len()) - 1;
        f64::from(t.latencies_us[i]) / 1000.0
    };
    Summary {
        requests: t.latencies_us.len() as u64,
        rps: t.latencies_us.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_ms: pct(1.0),
        not_ok: t.not_ok,
        errors: t.errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections to a server that is not there: one error each for the
    /// outage, however many times they retried during it.
    #[tokio::test]
    async fn an_outage_is_one_error_per_connection_not_one_per_retry() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let healthz = std::sync::Arc::new(Healthz {
            host: addr.to_string(),
        });
        let (tally, _) = run(addr, healthz, 3, Duration::from_millis(300)).await;
        assert_eq!(tally.errors, 3);
        assert!(tally.latencies_us.is_empty());
    }
}
