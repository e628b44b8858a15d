//! The Mobikwik-style wallet rail.
//!
//! | Module | What it holds |
//! |---|---|
//! | [`checksum`] | the quoted-value HMAC-SHA256 scheme, request and response |
//! | [`wire`] | parameters in, JSON/XML answers out, status codes, field syntax |
//! | [`flows`] | what each endpoint does, as units of work on the store |
//! | `admin` | admin endpoints and the idempotent operations behind them |
//! | [`fixtures`] | the sandbox's merchant, wallets, token and coupon |
//! | [`client`] | the client side: signed requests, verified answers |
//!
//! Every endpoint answers GET (query string) and POST (form body) alike.

mod admin;
pub mod checksum;
pub mod client;
pub mod fixtures;
pub mod flows;
mod merchant;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{MethodRouter, get};
use axum::{Extension, Router};
use futures::future::BoxFuture;
use payrail_railkit::{Rail, RailContext};
use serde::Deserialize;

pub use flows::Settings;
use wire::WireRequest;

/// `[mobikwik]` in the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MobikwikConfig {
    /// Days a wallet token lives.
    pub token_ttl_days: u64,
    /// Regenerations allowed per token lineage within the window...
    pub regen_limit: u32,
    /// ...of this many hours.
    pub regen_window_hours: u64,
    /// Minutes an OTP stays valid.
    pub otp_ttl_minutes: u64,
    /// Wrong tries after which an OTP stops working.
    pub otp_max_failures: u32,
    /// OTPs a cell may be sent per hour.
    pub otp_per_hour: u32,
}

impl Default for MobikwikConfig {
    fn default() -> Self {
        MobikwikConfig {
            token_ttl_days: 30,
            regen_limit: 5,
            regen_window_hours: 24,
            otp_ttl_minutes: 10,
            otp_max_failures: 3,
            otp_per_hour: 5,
        }
    }
}

impl MobikwikConfig {
    /// Refuses settings that would break a rule silently: a TTL whose
    /// seconds overflow, or OTP limits that let a 6-digit code be guessed
    /// (wrong tries per OTP times OTPs per hour is what a guesser gets).
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, u64, std::ops::RangeInclusive<u64>); 6] = [
            ("token_ttl_days", self.token_ttl_days, 1..=3_650),
            ("regen_limit", u64::from(self.regen_limit), 0..=1_000),
            ("regen_window_hours", self.regen_window_hours, 1..=8_760),
            ("otp_ttl_minutes", self.otp_ttl_minutes, 1..=1_440),
            ("otp_max_failures", u64::from(self.otp_max_failures), 1..=10),
            ("otp_per_hour", u64::from(self.otp_per_hour), 1..=1_000),
        ];
        for (key, value, range) in checks {
            if !range.contains(&value) {
                return Err(format!(
                    "mobikwik.{key} must be from {} to {} (it is {value})",
                    range.start(),
                    range.end()
                ));
            }
        }
        Ok(())
    }

    pub fn settings(&self) -> Settings {
        Settings {
            token_ttl: Duration::from_secs(self.token_ttl_days * 86_400),
            regen_limit: i64::from(self.regen_limit),
            regen_window: Duration::from_secs(self.regen_window_hours * 3_600),
            otp_ttl: Duration::from_secs(self.otp_ttl_minutes * 60),
            otp_max_failures: i64::from(self.otp_max_failures),
            otp_per_hour: i64::from(self.otp_per_hour),
        }
    }
}

/// The rail, as the server composes it.
pub struct MobikwikRail {
    inner: Arc<flows::Rail>,
}

impl MobikwikRail {
    pub fn new(ctx: RailContext, cfg: MobikwikConfig) -> MobikwikRail {
        MobikwikRail {
            inner: Arc::new(flows::Rail {
                store: ctx.store,
                settings: cfg.settings(),
                merchants: merchant::MerchantCache::default(),
                otp_key: ctx.master_key.derive("mobikwik-otp"),
                admin_token_key: ctx.master_key.derive("mobikwik-admin-token"),
                system: std::sync::OnceLock::new(),
            }),
        }
    }
}

macro_rules! endpoint {
    ($name:ident => $flow:ident) => {
        async fn $name(State(rail): State<Arc<flows::Rail>>, req: WireRequest) -> Response {
            rail.$flow(&req.params).await.render(req.format)
        }
    };
}

endpoint!(otpgenerate => otp_generate);
endpoint!(tokengenerate => token_generate);
endpoint!(tokenregenerate => token_regenerate);
endpoint!(debitwallet => debit);
endpoint!(checkstatus => check_status);
endpoint!(walletrefund => refund);
endpoint!(userbalance => balance);
endpoint!(querywallet => query_wallet);
endpoint!(createwalletuser => create_wallet_user);

/// Any method but GET and POST: 405 in the endpoint's failure shape.
///
/// HEAD included, although axum would run the GET handler for it: every
/// endpoint acts on a signed request (a debit moves money), and a HEAD answer
/// has no body, so the caller would never learn what was done.
async fn method_not_allowed(req: Request) -> Response {
    let mut answer = wire::refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        wire::Shape::of(&req),
        req.uri().query(),
        wire::Format::of(req.headers()),
    );
    // Set here, so axum does not add its own list (which would name HEAD).
    answer
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    answer
}

/// An endpoint: GET and POST take the same parameters; HEAD and any other
/// method are refused. `shape` is its failure answer's, for refusals made
/// before it runs.
fn signed<H, T>(handler: H, shape: wire::Shape) -> MethodRouter<Arc<flows::Rail>>
where
    H: Handler<T, Arc<flows::Rail>>,
    T: 'static,
{
    get(handler.clone())
        .post(handler)
        .head(method_not_allowed)
        .fallback(method_not_allowed)
        .layer(Extension(shape))
}

impl Rail for MobikwikRail {
    fn name(&self) -> &'static str {
        "mobikwik"
    }

    fn routes(&self) -> Router {
        use wire::Shape::{Debit, Msgcode, Refund, Status};
        Router::new()
            .route("/otpgenerate", signed(otpgenerate, Msgcode))
            .route("/tokengenerate", signed(tokengenerate, Msgcode))
            .route("/tokenregenerate", signed(tokenregenerate, Msgcode))
            .route("/debitwallet", signed(debitwallet, Debit))
            .route("/checkstatus", signed(checkstatus, Status))
            .route("/walletrefund", signed(walletrefund, Refund))
            .route("/userbalance", signed(userbalance, Msgcode))
            .route("/querywallet", signed(querywallet, Msgcode))
            .route("/createwalletuser", signed(createwalletuser, Msgcode))
            .with_state(Arc::clone(&self.inner))
    }

    fn admin_routes(&self) -> Router {
        admin::routes(Arc::clone(&self.inner))
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.inner
                .prepare()
                .await
                .map_err(|e| format!("{e} ({e:?})"))
        })
    }

    fn load_sandbox_fixtures(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { fixtures::load(&self.inner).await.map_err(|e| e.message) })
    }

    fn sweep(&self, limit: i64) -> BoxFuture<'_, Result<bool, String>> {
        // SQLite reads a negative LIMIT as none at all.
        let limit = limit.max(1);
        Box::pin(async move {
            let pruned = self.inner.sweep(limit).await.map_err(|e| e.to_string())?;
            Ok(payrail_railkit::unit_full(pruned, limit))
        })
    }
}
