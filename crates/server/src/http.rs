//! The HTTP/1.1 accept loop. axum's own `serve` cannot bound the request
//! head, so payrail drives hyper directly: heads over the limit get 431
//! without being buffered, slow heads and bodies time out, so do answers a
//! client stops reading, connections are capped, and shutdown is graceful.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::{Full, Limited};
use hyper::body::{Bytes, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_io_timeout::TimeoutStream;

use payrail_railkit::Unanswered;

use crate::config::Limits;

/// How long in-flight requests get to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The connections the process can hold: `max_connections`, once the
/// open-file limit is raised to fit them and `reserve` more descriptors (the
/// database's files, sockets and temporary files), or fewer if the limit
/// cannot be raised that far.
///
/// Many systems start a process with a soft limit of 1,024 and a far higher
/// hard one. Left there, a thousand clients would exhaust it: accepts would
/// fail, and so would the database's next file. Raising the soft limit up to
/// the hard one is what any server may do; below what is wanted, the cap
/// shrinks instead, so that clients wait in the listen backlog and the
/// database keeps its descriptors.
pub fn connection_cap(max_connections: usize, reserve: usize) -> usize {
    let wanted = max_connections.saturating_add(reserve);
    let limit = rlimit::increase_nofile_limit(wanted as u64);
    let cap = cap_within(max_connections, reserve, limit.as_ref().ok().copied());
    match limit {
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
        Ok(limit) if cap < max_connections => tracing::warn!(
            limit,
            max_connections,
            cap,
            "the open-file limit is below limits.max_connections plus what the database \
             needs; connections are capped lower (raise the hard limit, e.g. LimitNOFILE)"
        ),
        Ok(_) => {}
    }
    cap
}

/// `max_connections`, or what an open-file `limit` leaves of it after the
/// `reserve` (at least a few connections, however low the limit).
fn cap_within(max_connections: usize, reserve: usize, limit: Option<u64>) -> usize {
    match limit {
        None => max_connections,
        Some(limit) => {
            let room = usize::try_from(limit).unwrap_or(usize::MAX);
            max_connections.min(room.saturating_sub(reserve).max(16))
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &Limits,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let write_timeout = Duration::from_secs(limits.write_timeout_secs);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(100)
        .keep_alive(true)
        // A client may shut its side once it has sent its request (`nc -N`,
        // some HTTP/1.0 clients) and still expect the answer. Without this
        // hyper drops the connection at that EOF, unanswered, while the debit
        // it carried may still be made. With it, hyper stops watching for
        // EOF during a request, so a request that arrived whole is always
        // run to its end, whoever is left to read the answer. The price: a
        // client that gives up no longer cancels its request, which keeps
        // its connection slot until then. Every wait a request can make is
        // bounded (`store.max_wait_ms`, the self-check's turn included).
        .half_close(true);
    let graceful = GracefulShutdown::new();
    // Each connection holds a slot: past the cap, new ones wait in the
    // listen backlog instead of taking file descriptors the database needs.
    let slots = Arc::new(tokio::sync::Semaphore::new(
        max_connections.min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // hyper times out a slow head, `guard_body` a slow body;
                // nothing else would end a connection whose client sends
                // requests (pipelined, say) and never reads the answers: it
                // would keep its slot, and the answers, for ever.
                let mut stream = TimeoutStream::new(stream);
                stream.set_write_timeout(Some(write_timeout));
                let service = Withholding(app.clone());
                let io = TokioIo::new(Box::pin(stream));
                let conn = graceful.watch(builder.serve_connection(io, service));
                tokio::spawn(async move {
                    // Client resets and timeouts end up here; nothing to do.
                    let _ = conn.await;
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within {DRAIN_TIMEOUT:?}");
    }
}

/// The app as hyper serves it: its answers are sent, except one marked
/// [`Unanswered`], for which hyper closes the connection having written
/// nothing (a service error ends an HTTP/1 connection that way).
#[derive(Clone)]
struct Withholding(Router);

/// The service error that closes a connection unanswered.
#[derive(Debug)]
struct Withheld;

impl std::fmt::Display for Withheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer withheld: the request's outcome is unknown")
    }
}

impl std::error::Error for Withheld {}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Withholding {
    type Response = Response;
    type Error = Withheld;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Withheld>> + Send>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let app = self.0.clone();
        Box::pin(async move {
            let resp = match tower::ServiceExt::oneshot(app, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if resp.extensions().get::<Unanswered>().is_some() {
                Err(Withheld)
            } else {
                Ok(resp)
            }
        })
    }
}

/// What every request body is held to: at most `max_bytes`, whole within
/// `deadline` of the handler first waiting for it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub deadline: Duration,
}

/// Bounds every request's body, in size and in time. hyper bounds only the
/// head; without the deadline a client could send a head and then stall or
/// trickle its body, holding a connection and a task for as long as it
/// liked.
///
/// Over either bound the body fails; this middleware never answers itself.
/// The refusal belongs to whoever reads the body, because its shape does: a
/// provider's wire endpoint answers in that provider's error format, the
/// admin API in its JSON. A body declared larger than the limit fails at its
/// first read, before any of it is taken from the socket; a chunked one as
/// soon as it passes the limit. Extractors see a `LengthLimitError` (413) or
/// an unknown body error (400), and the connection closes after the answer.
pub async fn guard_body(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        // Fails at its first read with http-body-util's own error, which
        // axum maps to 413 (that error cannot be built outside its crate).
        // The socket's body is never read.
        Body::new(Limited::new(Full::new(Bytes::from_static(b"!")), 0))
    } else {
        let timed = DeadlineBody {
            inner: body,
            limit: limits.deadline,
            deadline: None,
        };
        Body::new(Limited::new(timed, limits.max_bytes))
    };
    next.run(Request::from_parts(parts, body)).await
}

struct DeadlineBody {
    inner: Body,
    limit: Duration,
    /// Set on the first poll that has to wait, so a body that is already
    /// here (most of them) costs no timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
struct BodyTimeout(Duration);

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let limit = this.limit;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTimeout(limit))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::cap_within;
    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a client reads on a fresh connection after sending `GET path`.
    async fn read_after(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // Ends at the server's close; a reset counts as the end too.
        let _ = c.read_to_end(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_response_marked_unanswered_closes_the_connection_with_nothing_sent() {
        let app = Router::new()
            .route(
                "/withheld",
                get(|| async { payrail_railkit::Unanswered::response() }),
            )
            .route("/ok", get(|| async { "fine" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let limits = crate::config::Limits::default();
            super::serve(listener, app, &limits, 16, async {
                let _ = stopped.await;
            })
            .await;
        });
        assert_eq!(read_after(addr, "/withheld").await, b"");
        let ok = String::from_utf8(read_after(addr, "/ok").await).unwrap();
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("fine"),
            "{ok}"
        );
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn the_cap_leaves_the_reserve_within_the_open_file_limit() {
        // A limit that fits everything, or none known: the configured cap.
        assert_eq!(cap_within(10_000, 160, Some(1_048_576)), 10_000);
        assert_eq!(cap_within(10_000, 160, Some(10_160)), 10_000);
        assert_eq!(cap_within(10_000, 160, None), 10_000);
        // A limit below it: what is left after the reserve.
        assert_eq!(cap_within(10_000, 160, Some(1_024)), 864);
        // However low the limit, a few connections.
        assert_eq!(cap_within(10_000, 160, Some(100)), 16);
        assert_eq!(cap_within(8, 160, Some(100)), 8);
        assert_eq!(cap_within(10_000, 160, Some(u64::MAX)), 10_000);
    }
}
