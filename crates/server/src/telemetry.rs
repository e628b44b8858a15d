//! Logs, request ids and Prometheus metrics.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use payrail_railkit::Unanswered;
use tracing::Instrument;

/// Installs the global tracing subscriber (stderr; `RUST_LOG` filters,
/// default `info`). Idempotent.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Installs the global metrics recorder, once per process.
pub fn init_metrics() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ];
            let batch = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("payrail_group_commit_batch_size".into()),
                        &batch,
                    )
                })
                .and_then(PrometheusBuilder::install_recorder)
                .expect("installing the metrics recorder")
        })
        .clone()
}

/// Keeps histograms bounded in memory.
pub fn spawn_metrics_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The request id: the caller's `x-request-id` when it is short and plain,
/// otherwise a fresh random one.
fn request_id(req: &Request) -> String {
    if let Some(v) = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return v.to_string();
    }
    payrail_railkit::ids::random_hex(8)
}

fn status_label(s: StatusCode) -> &'static str {
    // Labels must be `'static` to avoid an allocation per request; codes
    // outside this list are grouped by class.
    match s.as_u16() {
        200 => "200",
        201 => "201",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        500 => "500",
        503 => "503",
        c if c < 300 => "2xx",
        c if c < 400 => "3xx",
        c if c < 500 => "4xx",
        _ => "5xx",
    }
}

/// Takes a request off `payrail_http_requests_in_flight` however it ends:
/// answered, or unwound by a panic. (A client closing its connection does
/// not cancel a request, and a drain that times out aborts nothing.)
struct InFlight(&'static metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Per request: an id (echoed as `x-request-id`, and on every log line the
/// request causes), a count by route and status, a latency observation, and
/// a gauge of requests in flight (what a shutdown's drain waits for; a
/// scrape of `/metrics` counts itself).
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    // Looked up once, not per request: `init_metrics` installs the recorder
    // before the first request is served.
    static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
    let in_flight =
        InFlight(GAUGE.get_or_init(|| metrics::gauge!("payrail_http_requests_in_flight")));
    in_flight.0.increment(1.0);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let id = request_id(&req);
    let span = tracing::info_span!("request", id = %id, method = %req.method(), route = %route);
    let mut resp = next.run(req).instrument(span).await;
    // A withheld answer's placeholder status is never sent: counted as what it is.
    let status = if resp.extensions().get::<Unanswered>().is_some() {
        "unanswered"
    } else {
        status_label(resp.status())
    };
    metrics::counter!("payrail_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("payrail_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    drop(in_flight);
    resp
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    /// A request left unanswered (see `http::Withholding`) is counted as
    /// such, not by the placeholder status its response carries.
    #[tokio::test]
    async fn an_unanswered_request_is_counted_as_unanswered() {
        let metrics = super::init_metrics();
        let app = Router::new()
            .route(
                "/withheld-for-metrics",
                get(|| async { payrail_railkit::Unanswered::response() }),
            )
            .layer(axum::middleware::from_fn(super::observe));
        let req = axum::http::Request::get("/withheld-for-metrics")
            .body(axum::body::Body::empty())
            .unwrap();
        app.oneshot(req).await.unwrap();
        let text = metrics.render();
        let counted = |status: &str| {
            text.lines().any(|l| {
                l.starts_with(&format!(
                    "payrail_http_requests_total{{route=\"/withheld-for-metrics\",status=\"{status}\"}}"
                ))
            })
        };
        assert!(counted("unanswered"), "{text}");
        assert!(!counted("503"), "{text}");
    }
}
