//! Admin endpoints (under `/admin/v1`) and the operations behind them, which
//! the sandbox fixtures reuse.
//!
//! Every create is idempotent in the TigerBeetle sense: the same request again
//! answers 200 with the existing resource; the same key with different fields
//! is 409.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_core::{AccountId, Money, Percent};
use payrail_railkit::admin::{self, AdminError, AdminJson, AdminPath};
use payrail_store::mobikwik::{self as db, MerchantRow, TokenRow, WalletRow};
use payrail_store::{StoreError, Tx, ledger};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::flows::{self, CURRENCY, Rail, keyed_digest, token_digest};
use crate::merchant::Merchant;
use crate::wire;

/// The admin API's scope for idempotency keys of transfers it makes.
const ADMIN_SCOPE: &str = "admin";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMerchant {
    pub mid: String,
    pub name: String,
    pub secret: String,
    /// A separate secret for `/tokenregenerate`; the main secret by default.
    #[serde(default)]
    pub regen_secret: Option<String>,
    #[serde(default, deserialize_with = "admin::null_as_default")]
    pub aggregated_merchant_ids: Vec<String>,
}

fn secrets_equal(a: &SecretString, b: &SecretString) -> bool {
    a.expose_secret()
        .as_bytes()
        .ct_eq(b.expose_secret().as_bytes())
        .into()
}

fn merchant_json(m: &Merchant, balance: Option<Money>) -> Value {
    let mut v = json!({
        "mid": m.mid,
        "name": m.name,
        "aggregated_merchant_ids": m.aggregated_ids,
        "separate_regen_secret": m.regen_secret.is_some(),
    });
    if let Some(b) = balance {
        v["balance"] = json!(b.to_string());
    }
    v
}

/// Every admin path that takes a mid checks it first: no merchant can have
/// another, and a 404 must not repeat kilobytes of whatever was sent.
fn check_mid(mid: &str) -> Result<(), AdminError> {
    if wire::valid_ident(mid, 32) {
        Ok(())
    } else {
        Err(AdminError::bad_request(
            "mid must be 1 to 32 letters, digits, '_' or '-'",
        ))
    }
}

/// Registers a merchant. `Ok(true)`: created; `Ok(false)`: it already existed
/// exactly so.
pub(crate) async fn create_merchant(
    rail: &Rail,
    req: NewMerchant,
) -> Result<(bool, Arc<Merchant>), AdminError> {
    check_mid(&req.mid)?;
    if !wire::valid_text(&req.name, 64) || req.name.trim().is_empty() {
        return Err(AdminError::bad_request(
            "name must be 1 to 64 bytes of UTF-8, not all spaces, without control characters",
        ));
    }
    for s in std::iter::once(&req.secret).chain(req.regen_secret.as_ref()) {
        if !(8..=256).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AdminError::bad_request(
                "secrets must be 8 to 256 printable ASCII characters",
            ));
        }
    }
    if req.aggregated_merchant_ids.len() > 64
        || !req
            .aggregated_merchant_ids
            .iter()
            .all(|a| wire::valid_ident(a, 32))
    {
        return Err(AdminError::bad_request(
            "aggregated_merchant_ids: at most 64 ids of 1 to 32 letters, digits, '_' or '-'",
        ));
    }
    let mut aggregated = req.aggregated_merchant_ids.clone();
    aggregated.sort();
    aggregated.dedup();
    let wanted = MerchantRow {
        mid: req.mid,
        name: req.name,
        secret: SecretString::from(req.secret),
        regen_secret: req.regen_secret.map(SecretString::from),
        aggregated_ids: aggregated,
        account: AccountId(0),
    };
    let (created, row) = rail
        .store
        .write(move |tx| {
            let account = ledger::open_account(
                tx,
                &format!("mobikwik:merchant:{}", wanted.mid),
                CURRENCY,
                payrail_core::AccountFlags::NEVER_NEGATIVE,
            )?;
            let row = MerchantRow {
                mid: wanted.mid.clone(),
                name: wanted.name.clone(),
                secret: wanted.secret.clone(),
                regen_secret: wanted.regen_secret.clone(),
                aggregated_ids: wanted.aggregated_ids.clone(),
                account,
            };
            if db::insert_merchant(tx, &row)? {
                return Ok((true, row));
            }
            let existing = db::merchant(tx, &row.mid)?
                .ok_or_else(|| StoreError::Internal("merchant vanished".into()))?;
            let differs = if !secrets_equal(&existing.secret, &row.secret) {
                Some("secret")
            } else if existing.regen_secret.is_some() != row.regen_secret.is_some()
                || existing
                    .regen_secret
                    .as_ref()
                    .zip(row.regen_secret.as_ref())
                    .is_some_and(|(a, b)| !secrets_equal(a, b))
            {
                Some("regen_secret")
            } else if existing.name != row.name {
                Some("name")
            } else if existing.aggregated_ids != row.aggregated_ids {
                Some("aggregated_merchant_ids")
            } else {
                None
            };
            match differs {
                Some(field) => Err(AdminError::conflict(format!(
                    "merchant {} already exists with a different {field}",
                    row.mid
                ))),
                None => Ok((false, existing)),
            }
        })
        .await?;
    Ok((created, rail.merchants.insert(Merchant::from_row(row))))
}

/// A wallet as the admin API shows it.
fn wallet_json(tx: &mut Tx<'_>, w: &WalletRow) -> Result<Value, StoreError> {
    let account = ledger::account(tx, w.account)?
        .ok_or_else(|| StoreError::Internal("wallet account missing".into()))?;
    Ok(json!({
        "cell": w.cell,
        "balance": account.balances.balance().to_string(),
        "status": if w.blocked { "blocked" } else { "active" },
    }))
}

fn wallet_view(tx: &mut Tx<'_>, cell: &str) -> Result<Value, AdminError> {
    let w = db::wallet(tx, cell)?
        .ok_or_else(|| AdminError::not_found(format!("no wallet for cell {cell}")))?;
    Ok(wallet_json(tx, &w)?)
}

fn check_cell(cell: &str) -> Result<(), AdminError> {
    if wire::valid_cell(cell) {
        Ok(())
    } else {
        Err(AdminError::bad_request(
            "cell must be 10 digits starting with 7, 8 or 9",
        ))
    }
}

/// Opens a wallet with an opening balance. `Ok(true)`: created.
pub(crate) async fn create_wallet(
    rail: &Rail,
    cell: String,
    balance: Money,
) -> Result<(bool, Value), AdminError> {
    check_cell(&cell)?;
    let issuance = rail.system()?.issuance;
    rail.store
        .write(move |tx| {
            let key = format!("wallet-open:{cell}");
            let created = match db::wallet(tx, &cell)? {
                Some(_) => false,
                None => flows::open_wallet(tx, &cell, None).map_err(halt_to_admin)?,
            };
            if created {
                if balance.is_positive() {
                    let w = db::wallet(tx, &cell)?
                        .ok_or_else(|| StoreError::Internal("wallet vanished".into()))?;
                    ledger::transfer(
                        tx,
                        &ledger::single(ADMIN_SCOPE, key, issuance, w.account, CURRENCY, balance),
                    )?;
                }
            } else {
                let opened_with = ledger::transfer_by_key(tx, ADMIN_SCOPE, &key)?
                    .map_or(Money::ZERO, |t| t.amount);
                if opened_with != balance {
                    return Err(AdminError::conflict(format!(
                        "wallet {cell} already exists with a different opening balance"
                    )));
                }
            }
            Ok((created, wallet_view(tx, &cell)?))
        })
        .await
}

fn halt_to_admin(h: flows::Halt) -> AdminError {
    match h {
        flows::Halt::Store(e) => e.into(),
        flows::Halt::Refuse(a) => AdminError::internal(a),
    }
}

/// Which token an admin request issues.
pub(crate) enum IssuedToken {
    /// A new random one each time: a retry issues another.
    Random,
    /// The caller's reference decides it, so a retry gets the same token
    /// back, and the same reference with another cap is refused.
    Reference(String),
    /// A fixture's published token: kept as it is if it exists (a token
    /// replaced by a regeneration stays replaced).
    Fixed(String),
}

/// Issues a token without the OTP exchange. `Ok((true, _))`: issued now.
pub(crate) async fn create_token(
    rail: &Rail,
    mid: String,
    cell: String,
    cap: Money,
    which: IssuedToken,
) -> Result<(bool, Value), AdminError> {
    check_mid(&mid)?;
    check_cell(&cell)?;
    if !cap.is_positive() {
        return Err(AdminError::bad_request("amount (the cap) must be positive"));
    }
    let by_reference = matches!(which, IssuedToken::Reference(_));
    let token = match which {
        IssuedToken::Random => payrail_railkit::ids::random_hex(16),
        IssuedToken::Fixed(t) => t,
        IssuedToken::Reference(r) => {
            if !wire::valid_ident(&r, 64) {
                return Err(AdminError::bad_request(
                    "reference must be 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            // Keyed, so knowing a reference gives nobody the token; 128 bits
            // like a random one, and stored only as its digest like any.
            let digest = keyed_digest(&rail.admin_token_key, [mid.as_str(), &cell, &r]);
            hex::encode(&digest[..16])
        }
    };
    let ttl = rail.settings.token_ttl;
    rail.store
        .write(move |tx| {
            if db::merchant(tx, &mid)?.is_none() {
                return Err(AdminError::not_found(format!("no merchant {mid}")));
            }
            if db::wallet(tx, &cell)?.is_none() {
                return Err(AdminError::not_found(format!("no wallet for cell {cell}")));
            }
            let digest = token_digest(&token);
            let now = tx.now();
            let row = TokenRow {
                lineage: digest.clone(),
                digest: digest.clone(),
                mid: mid.clone(),
                cell: cell.clone(),
                cap,
                replaced: false,
                created_at: now,
                expires_at: now.plus(ttl),
            };
            // A token that already exists keeps its state: one replaced by a
            // regeneration stays replaced.
            let created = db::insert_token(tx, &row, false)?;
            let stored = db::token(tx, &digest)?
                .ok_or_else(|| StoreError::Internal("token vanished".into()))?;
            if stored.mid != mid || stored.cell != cell {
                return Err(AdminError::conflict(
                    "that token is bound to another merchant or cell",
                ));
            }
            if by_reference && !created && stored.cap != cap {
                return Err(AdminError::conflict(
                    "that reference already issued a token with another cap",
                ));
            }
            Ok((
                created,
                json!({
                    "token": token,
                    "mid": stored.mid,
                    "cell": stored.cell,
                    "cap": stored.cap.to_string(),
                    "expires_at": stored.expires_at.to_rfc3339(),
                    "active": !stored.replaced && stored.expires_at > now,
                }),
            ))
        })
        .await
}

/// Registers a percentage cashback coupon. `Ok(true)`: created.
pub(crate) async fn create_coupon(
    rail: &Rail,
    code: String,
    percent: Percent,
) -> Result<bool, AdminError> {
    if !wire::valid_ident(&code, 32) {
        return Err(AdminError::bad_request(
            "code must be 1 to 32 letters, digits, '_' or '-'",
        ));
    }
    rail.store
        .write(move |tx| {
            if db::insert_coupon(tx, &code, percent.basis_points())? {
                return Ok(true);
            }
            match db::coupon(tx, &code)? {
                Some(bp) if bp == percent.basis_points() => Ok(false),
                _ => Err(AdminError::conflict(format!(
                    "coupon {code} already exists with a different percent"
                ))),
            }
        })
        .await
}

// ------------------------------------------------------------------ handlers

type Shared = State<Arc<Rail>>;

fn created_or_ok(created: bool, body: Value) -> axum::response::Response {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn post_merchant(
    State(rail): Shared,
    AdminJson(req): AdminJson<NewMerchant>,
) -> Result<axum::response::Response, AdminError> {
    let (created, m) = create_merchant(&rail, req).await?;
    Ok(created_or_ok(created, merchant_json(&m, None)))
}

async fn get_merchant(
    State(rail): Shared,
    AdminPath(mid): AdminPath<String>,
) -> Result<Json<Value>, AdminError> {
    check_mid(&mid)?;
    let m = rail
        .merchants
        .get(&rail.store, &mid)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no merchant {mid}")))?;
    let account = m.account;
    let balance = rail
        .store
        .read(move |tx| {
            Ok::<_, StoreError>(ledger::account(tx, account)?.map(|a| a.balances.balance()))
        })
        .await?;
    Ok(Json(merchant_json(&m, balance)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewWallet {
    cell: String,
    /// Left out or `null`: an empty wallet.
    #[serde(deserialize_with = "admin::optional_money", default)]
    balance: Option<Money>,
}

async fn post_wallet(
    State(rail): Shared,
    AdminJson(req): AdminJson<NewWallet>,
) -> Result<axum::response::Response, AdminError> {
    let (created, view) =
        create_wallet(&rail, req.cell, req.balance.unwrap_or(Money::ZERO)).await?;
    Ok(created_or_ok(created, view))
}

async fn get_wallet(
    State(rail): Shared,
    AdminPath(cell): AdminPath<String>,
) -> Result<Json<Value>, AdminError> {
    check_cell(&cell)?;
    Ok(Json(
        rail.store.read(move |tx| wallet_view(tx, &cell)).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    #[serde(deserialize_with = "admin::money")]
    amount: Money,
    reference: String,
}

async fn credit_wallet(
    State(rail): Shared,
    AdminPath(cell): AdminPath<String>,
    AdminJson(req): AdminJson<Credit>,
) -> Result<Json<Value>, AdminError> {
    check_cell(&cell)?;
    if !req.amount.is_positive() {
        return Err(AdminError::bad_request("amount must be positive"));
    }
    if !wire::valid_ident(&req.reference, 64) {
        return Err(AdminError::bad_request(
            "reference must be 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    let issuance = rail.system()?.issuance;
    let view = rail
        .store
        .write(move |tx| {
            let w = db::wallet(tx, &cell)?
                .ok_or_else(|| AdminError::not_found(format!("no wallet for cell {cell}")))?;
            let t = ledger::transfer(
                tx,
                &ledger::single(
                    ADMIN_SCOPE,
                    format!("credit:{}", req.reference),
                    issuance,
                    w.account,
                    CURRENCY,
                    req.amount,
                ),
            )?;
            let mut view = wallet_json(tx, &w)?;
            view["reference"] = json!(req.reference);
            view["replayed"] = json!(t.replayed);
            Ok::<_, AdminError>(view)
        })
        .await?;
    Ok(Json(view))
}

async fn set_blocked(rail: &Rail, cell: String, blocked: bool) -> Result<Json<Value>, AdminError> {
    check_cell(&cell)?;
    let view = rail
        .store
        .write(move |tx| {
            if !db::set_wallet_blocked(tx, &cell, blocked)? {
                return Err(AdminError::not_found(format!("no wallet for cell {cell}")));
            }
            wallet_view(tx, &cell)
        })
        .await?;
    Ok(Json(view))
}

async fn block_wallet(
    State(rail): Shared,
    AdminPath(cell): AdminPath<String>,
) -> Result<Json<Value>, AdminError> {
    set_blocked(&rail, cell, true).await
}

async fn unblock_wallet(
    State(rail): Shared,
    AdminPath(cell): AdminPath<String>,
) -> Result<Json<Value>, AdminError> {
    set_blocked(&rail, cell, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    mid: String,
    cell: String,
    #[serde(deserialize_with = "admin::money")]
    amount: Money,
    /// Makes the request idempotent: see [`IssuedToken::Reference`].
    #[serde(default)]
    reference: Option<String>,
}

async fn post_token(
    State(rail): Shared,
    AdminJson(req): AdminJson<NewToken>,
) -> Result<axum::response::Response, AdminError> {
    let which = req
        .reference
        .map_or(IssuedToken::Random, IssuedToken::Reference);
    let (created, body) = create_token(&rail, req.mid, req.cell, req.amount, which).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCoupon {
    code: String,
    #[serde(deserialize_with = "admin::percent")]
    percent: Percent,
}

async fn post_coupon(
    State(rail): Shared,
    AdminJson(req): AdminJson<NewCoupon>,
) -> Result<axum::response::Response, AdminError> {
    let created = create_coupon(&rail, req.code.clone(), req.percent).await?;
    Ok(created_or_ok(
        created,
        json!({ "code": req.code, "percent": req.percent.to_string() }),
    ))
}

pub(crate) fn routes(rail: Arc<Rail>) -> Router {
    Router::new()
        .route("/mobikwik/merchants", post(post_merchant))
        .route("/mobikwik/merchants/{mid}", get(get_merchant))
        .route("/mobikwik/tokens", post(post_token))
        .route("/mobikwik/coupons", post(post_coupon))
        .route("/wallets", post(post_wallet))
        .route("/wallets/{cell}", get(get_wallet))
        .route("/wallets/{cell}/credit", post(credit_wallet))
        .route("/wallets/{cell}/block", post(block_wallet))
        .route("/wallets/{cell}/unblock", post(unblock_wallet))
        .with_state(rail)
}
