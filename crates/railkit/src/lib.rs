//! What every rail shares.
//!
//! A rail is one provider's API: wire types, signature scheme, routes and
//! client side, in its own crate. It plugs into the server through [`Rail`]
//! and reaches the database only through `payrail-store`.

pub mod admin;
pub mod ids;

use axum::Router;
use futures::future::BoxFuture;
use payrail_store::{MasterKey, Store};

/// Marks a response that must not be sent: the server closes the connection
/// instead, unanswered (see the server's `http.rs`).
///
/// For work whose outcome is unknown (`StoreError::OutcomeUnknown`): every
/// answer the providers document says the work was done or was not, and
/// either could be false here. No answer is what a client gets from a
/// provider that timed out, and its integration already knows to ask the
/// status API (`/checkstatus`) then.
#[derive(Clone, Copy, Debug)]
pub struct Unanswered;

impl Unanswered {
    /// A placeholder response carrying the mark; its status is never sent.
    pub fn response() -> axum::response::Response {
        use axum::response::IntoResponse;
        let mut r = axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
        r.extensions_mut().insert(Unanswered);
        r
    }
}

/// Whether a housekeeping unit that did `done` rows, at most `limit`, was
/// full, so that more may be left; a count past `i64` counts as full.
pub fn unit_full(done: impl TryInto<i64>, limit: i64) -> bool {
    done.try_into().map_or(true, |n| n >= limit)
}

/// What a rail is given when the server builds it.
#[derive(Clone)]
pub struct RailContext {
    pub store: Store,
    /// Sandbox mode: fixtures are loaded and sandbox-only behaviour is on.
    pub sandbox: bool,
    /// For deriving the rail's own keys (e.g. keyed digests of OTPs).
    pub master_key: MasterKey,
}

/// One provider's API, as the server composes it.
pub trait Rail: Send + Sync {
    /// Short, stable name, used in logs and metrics.
    fn name(&self) -> &'static str;

    /// The provider's wire endpoints, at the provider's own paths.
    fn routes(&self) -> Router;

    /// Admin endpoints, mounted under `/admin/v1` behind the admin token.
    fn admin_routes(&self) -> Router;

    /// Prepares what the rail needs before it serves (its system accounts);
    /// idempotent, run at every start.
    fn prepare(&self) -> BoxFuture<'_, Result<(), String>>;

    /// Loads the rail's sandbox fixtures. Must be idempotent: a restart never
    /// duplicates anything.
    fn load_sandbox_fixtures(&self) -> BoxFuture<'_, Result<(), String>>;

    /// Housekeeping, run about once a second by the server: one unit of work
    /// that deletes at most `limit` rows (positive) the rail no longer
    /// needs. Returns whether it was full; the server then runs it again at
    /// once.
    fn sweep(&self, limit: i64) -> BoxFuture<'_, Result<bool, String>> {
        let _ = limit;
        Box::pin(async { Ok(false) })
    }
}
