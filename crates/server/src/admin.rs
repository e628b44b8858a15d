//! The admin API's own endpoints (rails add theirs) and its authentication.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_railkit::admin::{AdminError, AdminJson};
use payrail_store::{Store, StoreError, ledger, outbox, sandbox};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The configured admin token, kept only as a digest.
#[derive(Clone)]
pub struct AdminAuth {
    digest: Arc<[u8; 32]>,
}

impl AdminAuth {
    pub fn new(token: &SecretString) -> AdminAuth {
        AdminAuth {
            digest: Arc::new(Sha256::digest(token.expose_secret().as_bytes()).into()),
        }
    }

    /// Compares digests in constant time, so neither the token's length nor
    /// its content leaks through timing.
    fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.ct_eq(&*self.digest).into()
    }
}

pub async fn require_token(State(auth): State<AdminAuth>, req: Request, next: Next) -> Response {
    // Exactly one header: with two, which one a proxy or this server reads
    // first is a guess.
    let mut headers = req.headers().get_all(AUTHORIZATION).iter();
    let presented = headers
        .next()
        .filter(|_| headers.next().is_none())
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match presented {
        Some(token) if auth.accepts(token) => next.run(req).await,
        _ => AdminError::unauthorized().into_response(),
    }
}

/// `GET /ledger/verify`.
async fn verify(State(store): State<Store>) -> Result<Json<serde_json::Value>, AdminError> {
    let v = store.read_alone(ledger::verify).await?;
    Ok(Json(if v.ok() {
        json!({ "ok": true, "accounts": v.accounts, "transfers": v.transfers })
    } else {
        json!({ "ok": false, "problems": v.problems })
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceClock {
    advance_seconds: i64,
}

/// Ten years: further than any expiry rule reaches.
const MAX_ADVANCE_SECONDS: i64 = 10 * 366 * 24 * 3600;

/// `POST /sandbox/clock`: moves time forward for every rule, then expires
/// whatever that made due, in the same unit of work, before answering.
async fn advance_clock(
    State(store): State<Store>,
    AdminJson(body): AdminJson<AdvanceClock>,
) -> Result<Json<serde_json::Value>, AdminError> {
    if !(0..=MAX_ADVANCE_SECONDS).contains(&body.advance_seconds) {
        return Err(AdminError::bad_request(format!(
            "advance_seconds must be between 0 and {MAX_ADVANCE_SECONDS}; the clock only moves forward"
        )));
    }
    let secs = body.advance_seconds;
    let now = store
        .write(move |tx| {
            let Some(now) = sandbox::advance_clock(tx, secs)? else {
                return Ok(None);
            };
            let mut after = None;
            loop {
                let pass = ledger::expire_due(tx, 1_000, ledger::Held::Wait, after)?;
                if pass.scanned < 1_000 {
                    break;
                }
                after = pass.last_due;
            }
            Ok::<_, StoreError>(Some(now))
        })
        .await?;
    let Some(now) = now else {
        return Err(AdminError::bad_request(format!(
            "advance_seconds would take the sandbox clock past {}, where it stops",
            sandbox::LATEST.to_rfc3339()
        )));
    };
    Ok(Json(json!({ "now": now.to_rfc3339() })))
}

/// `GET /sandbox/clock`.
async fn read_clock(State(store): State<Store>) -> Result<Json<serde_json::Value>, AdminError> {
    let now = store.read(|tx| Ok::<_, StoreError>(tx.now())).await?;
    Ok(Json(json!({ "now": now.to_rfc3339() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    to: Option<String>,
    limit: Option<i64>,
}

/// `GET /sandbox/messages?to=…`: newest first.
async fn messages(
    State(store): State<Store>,
    query: Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, AdminError> {
    let Query(q) = query.map_err(|e| AdminError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AdminError::bad_request("limit must be between 1 and 1000"));
    }
    if q.to.as_ref().is_some_and(|t| t.len() > 64) {
        return Err(AdminError::bad_request("to is at most 64 characters"));
    }
    let list = store
        .read(move |tx| outbox::list(tx, q.to.as_deref(), limit))
        .await?;
    Ok(Json(serde_json::Value::Array(
        list.into_iter()
            .map(|m| json!({ "to": m.to, "text": m.text, "otp": m.otp, "sent_at": m.sent_at.to_rfc3339() }))
            .collect(),
    )))
}

/// The platform's admin routes. Sandbox endpoints exist only in sandbox mode;
/// elsewhere they are 404 like any unknown path.
pub fn routes(store: Store, sandbox_mode: bool) -> Router {
    let mut r = Router::new().route("/ledger/verify", get(verify));
    if sandbox_mode {
        r = r
            .route("/sandbox/clock", post(advance_clock).get(read_clock))
            .route("/sandbox/messages", get(messages));
    }
    r.with_state(store)
}
