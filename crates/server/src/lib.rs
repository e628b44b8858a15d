//! payrail's composition root: it reads the configuration, opens the store,
//! builds the rails and the router, and serves.

pub mod admin;
pub mod config;
pub mod http;
mod keys;
pub mod sweeper;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use payrail_core::SystemClock;
use payrail_railkit::admin::AdminError;
use payrail_railkit::{Rail, RailContext};
use payrail_store::sandbox::{self, Mode};
use payrail_store::{Options, Store};

pub use config::{Config, ConfigError, ServeArgs};

/// Why the server could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Startup(String),
}

/// A built application: the router and what must outlive it.
pub struct App {
    pub router: Router,
    pub store: Store,
    pub rails: Vec<Arc<dyn Rail>>,
}

/// Opens the store, builds every rail, loads sandbox fixtures, and assembles
/// the router.
pub async fn build(cfg: &Config) -> Result<App, ServeError> {
    let Some(admin_token) = &cfg.admin_token else {
        return Err(ServeError::Startup(
            "refusing to start: no admin token; set PAYRAIL_ADMIN_TOKEN (or admin_token in the config file), or use --sandbox"
                .into(),
        ));
    };
    if !cfg.sandbox {
        use secrecy::ExposeSecret;
        let token = admin_token.expose_secret();
        // Warned, not refused: a start that fails would take a working
        // deployment down on upgrade. The token itself is never printed.
        if token == config::SANDBOX_ADMIN_TOKEN {
            tracing::warn!(
                "the admin token is the published sandbox one: anyone can move money through the admin API; set PAYRAIL_ADMIN_TOKEN to a long random value"
            );
        } else if token.chars().count() < 32 {
            tracing::warn!(
                chars = token.chars().count(),
                "the admin token is short; use at least 32 random characters"
            );
        }
    }
    let master_key = keys::resolve(cfg).map_err(ServeError::Startup)?;
    let mut opts = Options::new(cfg.db.clone(), master_key.clone(), Arc::new(SystemClock));
    opts.sandbox_clock = cfg.sandbox;
    opts.max_batch = cfg.store.max_batch;
    opts.readers = cfg.store.readers;
    opts.max_wait = Duration::from_millis(cfg.store.max_wait_ms);
    opts.postgres = cfg.postgres.tuning();
    let store = Store::open(opts)
        .await
        .map_err(|e| ServeError::Startup(format!("cannot open the database: {e} ({e:?})")))?;

    // A database serves one mode for good (see `sandbox::claim`).
    let mode = if cfg.sandbox {
        Mode::Sandbox
    } else {
        Mode::Production
    };
    let refusal = match store
        .write_unbounded(move |tx| sandbox::claim(tx, mode))
        .await
    {
        Ok(None) => None,
        Ok(Some(Mode::Sandbox)) => Some(
            "refusing to start: sandbox mode has served this database, and its fixtures \
             (a merchant with a published secret, a token, a coupon) are in it; \
             serve it with --sandbox, or use another database",
        ),
        Ok(Some(Mode::Production)) => Some(
            "refusing to start in sandbox mode: a server outside sandbox mode has served \
             this database; sandbox mode would add its fixtures (a merchant with a \
             published secret) to its ledger and show its OTPs to the sandbox admin \
             token; give the sandbox a database of its own",
        ),
        Err(e) => {
            return Err(ServeError::Startup(format!(
                "cannot write to the database: {e} ({e:?})"
            )));
        }
    };
    if let Some(why) = refusal {
        store.close().await;
        return Err(ServeError::Startup(why.into()));
    }

    let ctx = RailContext {
        store: store.clone(),
        sandbox: cfg.sandbox,
        master_key,
    };
    let rails: Vec<Arc<dyn Rail>> = vec![Arc::new(payrail_mobikwik::MobikwikRail::new(
        ctx.clone(),
        cfg.mobikwik.clone(),
    ))];

    for rail in &rails {
        rail.prepare()
            .await
            .map_err(|e| ServeError::Startup(format!("preparing the {} rail: {e}", rail.name())))?;
    }
    if cfg.sandbox {
        for rail in &rails {
            rail.load_sandbox_fixtures().await.map_err(|e| {
                ServeError::Startup(format!("loading {} sandbox fixtures: {e}", rail.name()))
            })?;
        }
        tracing::info!("sandbox fixtures loaded");
        if cfg.admin_token_is_sandbox_default {
            tracing::info!(
                "sandbox mode: admin token is '{}' (set PAYRAIL_ADMIN_TOKEN to change it)",
                config::SANDBOX_ADMIN_TOKEN
            );
        }
    }

    let mut admin = admin::routes(store.clone(), cfg.sandbox);
    for rail in &rails {
        admin = admin.merge(rail.admin_routes());
    }
    let admin = admin
        .fallback(|| async { AdminError::not_found("no such admin endpoint") })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            admin::AdminAuth::new(admin_token),
            admin::require_token,
        ));

    let metrics = telemetry::init_metrics();
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(store.clone()))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .nest("/admin/v1", admin);
    // Each rail answers a wrong method on its own paths in its own shape.
    for rail in &rails {
        router = router.merge(rail.routes());
    }
    let router = router
        .fallback(|| async { AdminError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            http::BodyLimits {
                max_bytes: cfg.limits.max_body_bytes,
                deadline: Duration::from_secs(cfg.limits.body_timeout_secs),
            },
            http::guard_body,
        ))
        // The guard above is the bound; this only keeps axum's own 2 MiB
        // default from being a second, different one.
        .layer(DefaultBodyLimit::disable())
        // Outermost, so that every answer carries a request id and is counted.
        .layer(axum::middleware::from_fn(telemetry::observe));
    Ok(App {
        router,
        store,
        rails,
    })
}

/// 405 for payrail's own endpoints (admin, health, metrics); axum adds the
/// Allow header.
async fn method_not_allowed() -> AdminError {
    AdminError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see the Allow header",
    )
}

async fn readyz(State(store): State<Store>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database unreachable",
        ),
    }
}

/// What tokio's `TcpListener::bind` asks for.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the address without listening on it, before the database is
/// opened. A mistyped or taken address then stops the start before it has
/// created, migrated or claimed a database (a fresh one would be claimed
/// for the mode asked, for good), and until the app is built a client is
/// refused instead of waiting in a backlog no one reads. Each address the
/// name resolves to is tried in turn, as `TcpListener::bind` does.
async fn bind_unlistened(listen: &str) -> std::io::Result<tokio::net::TcpSocket> {
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restart need not wait out TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the name resolved to no address",
        )
    }))
}

/// `payrail serve`: runs until SIGINT/SIGTERM, then drains and flushes.
pub async fn serve(args: ServeArgs) -> Result<(), ServeError> {
    let cfg = Config::resolve(&args)?;
    // Before the store opens its files. Beside the clients' sockets: SQLite's
    // three files per connection (or a PostgreSQL socket), the readers'
    // temporary files, logs, the listener.
    let connections = cfg.store.readers.saturating_add(cfg.postgres.writers);
    let reserve = connections.saturating_mul(4).saturating_add(128);
    let max_connections = http::connection_cap(cfg.limits.max_connections, reserve);
    let socket = bind_unlistened(&cfg.listen)
        .await
        .map_err(|e| ServeError::Startup(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let app = build(&cfg).await?;
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| ServeError::Startup(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Startup(e.to_string()))?;
    telemetry::spawn_metrics_upkeep(telemetry::init_metrics());
    let retention = Duration::from_secs(u64::from(cfg.store.outbox_retention_hours) * 3600);
    sweeper::spawn(sweeper::steps(&app.store, retention, &app.rails));
    tracing::info!(%addr, sandbox = cfg.sandbox, db = ?cfg.db, "payrail listening");
    // One machine-readable line on stdout, for scripts and tests that start
    // the server on port 0.
    println!("payrail listening on http://{addr}");
    http::serve(
        listener,
        app.router,
        &cfg.limits,
        max_connections,
        http::shutdown_signal(),
    )
    .await;
    app.store.close().await;
    tracing::info!("stopped; all acknowledged work is on disk");
    Ok(())
}
