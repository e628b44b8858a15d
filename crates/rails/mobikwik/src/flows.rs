//! What each wire endpoint does, in the order of checks the provider uses:
//! merchant (22), checksum (80), msgcode (150), parameters (151 and the
//! per-field codes), then the endpoint's own rules inside one unit of work.
//!
//! A unit of work that refuses (`Halt::Refuse`) is rolled back whole: a debit
//! refused for insufficient balance leaves no order behind. A unit that must
//! keep something while answering FAILURE (a wrong OTP counts as an attempt)
//! returns the failure as `Ok`.

use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use payrail_core::{AccountFlags, AccountId, Currency, LedgerError, Money, Percent, Throttle};
use payrail_railkit::ids;
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::mobikwik::{self as db, OrderRow, OtpState, RefundRow, TokenRow};
use payrail_store::{Store, StoreError, Tx, outbox};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::checksum;
use crate::merchant::{Merchant, MerchantCache};
use crate::wire::{self, Answer, Code, Format, Params, Signed, signed_fields};

pub(crate) const SCOPE: &str = "mobikwik";
pub(crate) const CURRENCY: Currency = Currency::INR;
pub(crate) const ISSUANCE_ACCOUNT: &str = "mobikwik:issuance";
pub(crate) const PROMOTIONS_ACCOUNT: &str = "mobikwik:promotions";

/// The window of `otp_per_hour`.
const OTP_RATE_WINDOW: Duration = Duration::from_secs(3600);

/// The rules' tunables, from `[mobikwik]` in the config file.
#[derive(Clone, Debug)]
pub struct Settings {
    pub token_ttl: Duration,
    pub regen_limit: i64,
    pub regen_window: Duration,
    pub otp_ttl: Duration,
    pub otp_max_failures: i64,
    pub otp_per_hour: i64,
}

/// Accounts the rail itself owns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SystemAccounts {
    /// Source of money put into wallets (top-ups); runs negative.
    pub issuance: AccountId,
    /// Source of cashback; runs negative.
    pub promotions: AccountId,
}

/// The rail's state, shared by its handlers.
pub struct Rail {
    pub(crate) store: Store,
    pub(crate) settings: Settings,
    pub(crate) merchants: MerchantCache,
    pub(crate) otp_key: [u8; 32],
    /// Derives the tokens the admin API issues for a caller's reference.
    pub(crate) admin_token_key: [u8; 32],
    pub(crate) system: std::sync::OnceLock<SystemAccounts>,
}

/// Builds an endpoint's failure answer for a status code.
type Head<'a> = &'a (dyn Fn(Code) -> Answer + Sync);

/// An answer with what it is signed with.
pub struct Reply {
    pub answer: Answer,
    merchant: Option<Arc<Merchant>>,
    regen: bool,
}

impl Reply {
    fn unsigned(answer: Answer) -> Reply {
        Reply {
            answer,
            merchant: None,
            regen: false,
        }
    }

    fn signed(answer: Answer, merchant: &Arc<Merchant>, regen: bool) -> Reply {
        Reply {
            answer,
            merchant: Some(Arc::clone(merchant)),
            regen,
        }
    }

    pub fn render(self, format: Format) -> axum::response::Response {
        let secret = self.merchant.as_ref().map(|m| m.secret_bytes(self.regen));
        self.answer.render(secret, format)
    }
}

/// Why a unit of work stopped.
pub(crate) enum Halt {
    /// Roll back and answer this.
    Refuse(Answer),
    Store(StoreError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Halt {
        Halt::Store(e)
    }
}

impl From<LedgerOpError> for Halt {
    fn from(e: LedgerOpError) -> Halt {
        match e {
            LedgerOpError::Store(e) => Halt::Store(e),
            // Expected refusals are matched where they can happen; any other
            // one is a bug, reported as an unexpected error.
            LedgerOpError::Rejected(r) => {
                Halt::Store(StoreError::Internal(format!("ledger refused: {r}")))
            }
        }
    }
}

/// An endpoint's checksum fields (in signing order) and accepted msgcodes.
struct Endpoint {
    fields: &'static [&'static str],
    msgcodes: &'static [&'static str],
    /// Signed with the merchant's token-regeneration secret.
    regen_secret: bool,
}

const OTP_GENERATE: Endpoint = Endpoint {
    fields: signed_fields::OTP_GENERATE,
    msgcodes: &["504"],
    regen_secret: false,
};
const TOKEN_FROM_OTP: Endpoint = Endpoint {
    fields: signed_fields::TOKEN_FROM_OTP,
    msgcodes: &["507", "504"],
    regen_secret: false,
};
const TOKEN_FROM_TOKEN: Endpoint = Endpoint {
    fields: signed_fields::TOKEN_FROM_TOKEN,
    msgcodes: &["507", "504"],
    regen_secret: false,
};
const TOKEN_REGENERATE: Endpoint = Endpoint {
    fields: signed_fields::TOKEN_REGENERATE,
    msgcodes: &["507", "504"],
    regen_secret: true,
};
const DEBIT_WITH_TOKEN: Endpoint = Endpoint {
    fields: signed_fields::DEBIT_WITH_TOKEN,
    msgcodes: &["504", "503"],
    regen_secret: false,
};
const DEBIT_WITH_OTP: Endpoint = Endpoint {
    fields: signed_fields::DEBIT_WITH_OTP,
    msgcodes: &["504", "503"],
    regen_secret: false,
};
const USER_BALANCE: Endpoint = Endpoint {
    fields: signed_fields::USER_BALANCE,
    msgcodes: &["501"],
    regen_secret: false,
};
const QUERY_WALLET: Endpoint = Endpoint {
    fields: signed_fields::QUERY_WALLET,
    msgcodes: &["500"],
    regen_secret: false,
};
const CREATE_WALLET_USER: Endpoint = Endpoint {
    fields: signed_fields::CREATE_WALLET_USER,
    msgcodes: &["502"],
    regen_secret: false,
};
const CHECK_STATUS: Endpoint = Endpoint {
    fields: signed_fields::CHECK_STATUS,
    msgcodes: &[],
    regen_secret: false,
};
const CHECK_REFUND_STATUS: Endpoint = Endpoint {
    fields: signed_fields::CHECK_REFUND_STATUS,
    msgcodes: &[],
    regen_secret: false,
};
const WALLET_REFUND: Endpoint = Endpoint {
    fields: signed_fields::WALLET_REFUND,
    msgcodes: &[],
    regen_secret: false,
};

/// HMAC-SHA256 of the parts, each ended by a NUL so that no two lists of
/// parts give the same text.
pub(crate) fn keyed_digest<'a>(key: &[u8], parts: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for part in parts {
        m.update(part.as_bytes());
        m.update(&[0]);
    }
    m.finalize().into_bytes().to_vec()
}

pub(crate) fn token_digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn new_token() -> String {
    ids::random_hex(16)
}

/// The SMS that carries an OTP, its life in whole minutes.
fn otp_text(otp: &str, ttl: Duration) -> String {
    let life = match ttl.as_secs() / 60 {
        1 => "1 minute".to_string(),
        n => format!("{n} minutes"),
    };
    format!("{otp} is your Mobikwik OTP. It is valid for {life}. Do not share it with anyone.")
}

impl Rail {
    pub(crate) fn system(&self) -> Result<SystemAccounts, StoreError> {
        self.system
            .get()
            .copied()
            .ok_or_else(|| StoreError::Internal("mobikwik rail used before it was prepared".into()))
    }

    /// Opens the rail's own accounts; idempotent.
    pub(crate) async fn prepare(&self) -> Result<(), StoreError> {
        let accounts = self
            .store
            .write_unbounded(|tx| {
                Ok::<_, LedgerOpError>(SystemAccounts {
                    issuance: ledger::open_account(
                        tx,
                        ISSUANCE_ACCOUNT,
                        CURRENCY,
                        AccountFlags::NONE,
                    )?,
                    promotions: ledger::open_account(
                        tx,
                        PROMOTIONS_ACCOUNT,
                        CURRENCY,
                        AccountFlags::NONE,
                    )?,
                })
            })
            .await
            .map_err(|e| match e {
                LedgerOpError::Store(s) => s,
                LedgerOpError::Rejected(r) => StoreError::Internal(r.to_string()),
            })?;
        let _ = self.system.set(accounts);
        Ok(())
    }

    /// A keyed digest of an OTP, bound to the merchant and cell it was sent
    /// for. Six digits are few, so a plain hash would be reversible; the key
    /// (derived from the master key) is not in the database.
    fn otp_digest(&self, mid: &str, cell: &str, otp: &str) -> Vec<u8> {
        keyed_digest(&self.otp_key, [mid, cell, otp])
    }

    /// Logs an internal error (the request's span carries its id) and answers 99.
    fn unexpected(e: &StoreError, head: Head<'_>) -> Answer {
        match e {
            StoreError::OutcomeUnknown => {
                tracing::error!("the request's outcome is unknown; it is left unanswered");
                return Answer::withheld();
            }
            StoreError::Unavailable(_)
            | StoreError::Closed
            | StoreError::Busy(_)
            | StoreError::Overloaded => {
                // Apart, so that an outage's lines do not hide overload's.
                static OUTAGE: Throttle = Throttle::per_second();
                static OVERLOAD: Throttle = Throttle::per_second();
                let throttle = match e {
                    StoreError::Busy(_) | StoreError::Overloaded => &OVERLOAD,
                    _ => &OUTAGE,
                };
                if let Some(suppressed) = throttle.admit() {
                    tracing::warn!(error = ?e, suppressed, "store unavailable")
                }
            }
            _ => tracing::error!(error = ?e, "request failed"),
        }
        head(Code::Unexpected)
    }

    async fn write<F>(&self, head: Head<'_>, unit: F) -> Answer
    where
        F: FnMut(&mut Tx<'_>) -> Result<Answer, Halt> + Send + 'static,
    {
        match self.store.write(unit).await {
            Ok(a) | Err(Halt::Refuse(a)) => a,
            Err(Halt::Store(e)) => Rail::unexpected(&e, head),
        }
    }

    async fn read<F>(&self, head: Head<'_>, unit: F) -> Answer
    where
        F: FnOnce(&mut Tx<'_>) -> Result<Answer, Halt> + Send + 'static,
    {
        match self.store.read(unit).await {
            Ok(a) | Err(Halt::Refuse(a)) => a,
            Err(Halt::Store(e)) => Rail::unexpected(&e, head),
        }
    }

    /// The merchant named by `mid` (22 if unknown).
    async fn merchant(&self, p: &Params, head: Head<'_>) -> Result<Arc<Merchant>, Reply> {
        let mid = p.get("mid");
        if !wire::valid_ident(mid, 64) {
            return Err(Reply::unsigned(head(Code::MerchantNotFound)));
        }
        match self.merchants.get(&self.store, mid).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Reply::unsigned(head(Code::MerchantNotFound))),
            Err(e) => Err(Reply::unsigned(Rail::unexpected(&e, head))),
        }
    }

    /// Checksum (80), msgcode (150) and the shape of the input (151).
    fn verify(
        &self,
        p: &Params,
        m: &Arc<Merchant>,
        ep: &Endpoint,
        head: Head<'_>,
    ) -> Result<(), Reply> {
        let mut values: Vec<&str> = ep.fields.iter().map(|f| p.get(f)).collect();
        let aggregated = p.opt("aggregatedMerchantId");
        if let Some(a) = aggregated {
            values.push(a);
        }
        let fail = |code| Err(Reply::signed(head(code), m, ep.regen_secret));
        if !checksum::verify_request(m.secret_bytes(ep.regen_secret), &values, p.get("checksum")) {
            // Unsigned: requests and answers are signed with the same key and
            // the same quoting, and this answer repeats fields the caller
            // chose (msgcode, orderid, txid...). Signing it would give anyone
            // who knows a mid the merchant's HMAC over text of their choosing,
            // which can be a valid request checksum.
            return Err(Reply::unsigned(head(Code::ChecksumMismatch)));
        }
        if !ep.msgcodes.is_empty() && !ep.msgcodes.contains(&p.get("msgcode")) {
            return fail(Code::MsgcodeInvalid);
        }
        if p.malformed.is_some() {
            return fail(Code::ParamsInvalid);
        }
        if aggregated.is_some_and(|a| !m.aggregated_ids.iter().any(|known| known == a)) {
            return fail(Code::ParamsInvalid);
        }
        Ok(())
    }

    async fn authenticate(
        &self,
        p: &Params,
        ep: &Endpoint,
        head: Head<'_>,
    ) -> Result<Arc<Merchant>, Reply> {
        let m = self.merchant(p, head).await?;
        self.verify(p, &m, ep, head)?;
        Ok(m)
    }

    /// Common parameter checks of the msgcode APIs; the first failing code.
    fn check_common(p: &Params, required: &[&str]) -> Result<(), Code> {
        if required.iter().any(|f| p.opt(f).is_none()) {
            return Err(Code::ParamsInvalid);
        }
        if p.opt("cell").is_some_and(|c| !wire::valid_cell(c)) {
            return Err(Code::CellInvalid);
        }
        if p.opt("merchantname")
            .is_some_and(|n| !wire::valid_merchantname(n))
        {
            return Err(Code::MerchantNameInvalid);
        }
        if p.opt("tokentype").is_some_and(|t| t != "0" && t != "1") {
            return Err(Code::ParamsInvalid);
        }
        if p.opt("token").is_some_and(|t| t.len() > 128)
            || p.opt("otp").is_some_and(|o| o.len() > 16)
        {
            return Err(Code::ParamsInvalid);
        }
        Ok(())
    }

    /// Deletes OTPs nothing reads any more: expired, and older than the
    /// hourly request count looks back; at most `limit`, in one unit.
    pub async fn sweep(&self, limit: i64) -> Result<u64, StoreError> {
        let age = self.settings.otp_ttl.max(OTP_RATE_WINDOW);
        self.store
            .write_unbounded(move |tx| {
                let before = tx.now().minus(age);
                db::prune_otps(tx, before, limit)
            })
            .await
    }

    // ------------------------------------------------------------ /otpgenerate

    pub async fn otp_generate(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.authenticate(p, &OTP_GENERATE, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        let amount = match Rail::check_common(p, &["amount", "cell", "merchantname", "tokentype"])
            .and_then(|()| wire::parse_amount(p.get("amount"), false))
        {
            Ok(a) => a,
            Err(c) => return reply(head(c)),
        };
        let (mid, cell) = (m.mid.clone(), p.get("cell").to_string());
        let otp = ids::random_digits(6);
        let digest = self.otp_digest(&mid, &cell, &otp);
        let s = self.settings.clone();
        let sent = Answer::status_with(
            &msgcode,
            Code::Ok,
            format!("Message Sent to xxxxxx{}", &cell[6..]),
        );
        let too_many = head(Code::TooManyOtps);
        let answer = self
            .write(&head, move |tx| {
                let now = tx.now();
                if db::otps_issued_since(tx, &cell, now.minus(OTP_RATE_WINDOW))? >= s.otp_per_hour {
                    return Ok(too_many.clone());
                }
                db::issue_otp(tx, &mid, &cell, &digest, amount, now.plus(s.otp_ttl))?;
                outbox::send(tx, &cell, &otp_text(&otp, s.otp_ttl), Some(&otp))?;
                Ok(sent.clone())
            })
            .await;
        reply(answer)
    }

    /// Checks a presented OTP against the open one for (mid, cell) and uses
    /// it up if it matches. A mismatch counts; enough of them lock it.
    /// `debit`: the amount of a debit the OTP is to authorise. One larger
    /// than the OTP was requested for is refused before the OTP is compared,
    /// so it neither uses the OTP nor counts as a wrong guess (and tells
    /// nothing about the OTP).
    fn check_otp(
        tx: &mut Tx<'_>,
        mid: &str,
        cell: &str,
        presented: &[u8],
        max_failures: i64,
        debit: Option<Money>,
    ) -> Result<bool, StoreError> {
        let Some(otp) = db::open_otp(tx, mid, cell)? else {
            return Ok(false);
        };
        if let Some(amount) = debit
            && otp.amount.is_none_or(|allowed| amount > allowed)
        {
            return Ok(false);
        }
        if otp.expires_at <= tx.now() {
            db::set_otp_state(tx, otp.id, OtpState::Superseded)?;
            return Ok(false);
        }
        if bool::from(otp.digest.ct_eq(presented)) {
            db::set_otp_state(tx, otp.id, OtpState::Used)?;
            return Ok(true);
        }
        if db::fail_otp(tx, otp.id)? >= max_failures {
            db::set_otp_state(tx, otp.id, OtpState::Locked)?;
        }
        Ok(false)
    }

    // ------------------------------------------------------------ /tokengenerate

    /// `/tokengenerate`: with `otp`, issues a token; with `token`, regenerates
    /// it (the seed's variant).
    pub async fn token_generate(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.merchant(p, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        // Which checksum to verify depends on otp/token; without exactly one
        // of them nothing is verified, so the answer is not signed (see
        // `verify`).
        let endpoint = match (p.opt("otp").is_some(), p.opt("token").is_some()) {
            (true, true) => return Reply::unsigned(head(Code::OtpAndToken)),
            (false, false) => return Reply::unsigned(head(Code::TokenOrOtpMissing)),
            (true, false) => &TOKEN_FROM_OTP,
            (false, true) => &TOKEN_FROM_TOKEN,
        };
        if let Err(r) = self.verify(p, &m, endpoint, &head) {
            return r;
        }
        let checked = Rail::check_common(p, &["amount", "cell", "merchantname", "tokentype"])
            .and_then(|()| wire::parse_amount(p.get("amount"), true));
        let cap = match checked {
            Ok(cap) => cap,
            Err(c) => return reply(head(c)),
        };
        if let Some(old) = p.opt("token") {
            return reply(self.regenerate(&m, p, old, Some(cap), &head).await);
        }
        let (mid, cell) = (m.mid.clone(), p.get("cell").to_string());
        let presented = self.otp_digest(&mid, &cell, p.get("otp"));
        let token = new_token();
        let s = self.settings.clone();
        let issued = Answer::status_with(&msgcode, Code::Ok, "Token generated successfully")
            .with("token", token.clone());
        // The seed's table for this endpoint has 155 for a wrong OTP, not the
        // 164 that `/debitwallet` and `/createwalletuser` answer.
        let (no_user, bad_otp) = (head(Code::UserNotFound), head(Code::OtpMissingOrInvalid));
        let answer = self
            .write(&head, move |tx| {
                if db::wallet(tx, &cell)?.is_none() {
                    return Err(Halt::Refuse(no_user.clone()));
                }
                if !Rail::check_otp(tx, &mid, &cell, &presented, s.otp_max_failures, None)? {
                    return Ok(bad_otp.clone()); // keep the failed attempt
                }
                let digest = token_digest(&token);
                let now = tx.now();
                db::insert_token(
                    tx,
                    &TokenRow {
                        lineage: digest.clone(),
                        digest,
                        mid: mid.clone(),
                        cell: cell.clone(),
                        cap,
                        replaced: false,
                        created_at: now,
                        expires_at: now.plus(s.token_ttl),
                    },
                    false,
                )?;
                Ok(issued.clone())
            })
            .await;
        reply(answer)
    }

    /// Replaces `old` with a new token (cap `cap`, or the old one's).
    async fn regenerate(
        &self,
        m: &Arc<Merchant>,
        p: &Params,
        old: &str,
        cap: Option<Money>,
        head: Head<'_>,
    ) -> Answer {
        let (mid, cell) = (m.mid.clone(), p.get("cell").to_string());
        let old_digest = token_digest(old);
        let token = new_token();
        let s = self.settings.clone();
        let done =
            Answer::status_with(p.get("msgcode"), Code::Ok, "Token regenerated successfully")
                .with("token", token.clone());
        let (invalid, limit) = (head(Code::RegenTokenInvalid), head(Code::RegenLimit));
        self.write(head, move |tx| {
            let now = tx.now();
            let old = match db::token(tx, &old_digest)? {
                Some(t) if t.mid == mid && t.cell == cell && !t.replaced && t.expires_at > now => t,
                _ => return Err(Halt::Refuse(invalid.clone())),
            };
            if db::regenerations_since(tx, &old.lineage, now.minus(s.regen_window))?
                >= s.regen_limit
            {
                return Err(Halt::Refuse(limit.clone()));
            }
            // Conditional: of two racing regenerations only one replaces it.
            if !db::replace_token(tx, &old.digest)? {
                return Err(Halt::Refuse(invalid.clone()));
            }
            db::insert_token(
                tx,
                &TokenRow {
                    digest: token_digest(&token),
                    mid: mid.clone(),
                    cell: cell.clone(),
                    cap: cap.unwrap_or(old.cap),
                    lineage: old.lineage,
                    replaced: false,
                    created_at: now,
                    expires_at: now.plus(s.token_ttl),
                },
                true,
            )?;
            Ok(done.clone())
        })
        .await
    }

    // ------------------------------------------------------------ /tokenregenerate

    /// The real clients' regeneration: no amount, the cap is kept.
    pub async fn token_regenerate(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.authenticate(p, &TOKEN_REGENERATE, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, true);
        if let Err(c) = Rail::check_common(p, &["cell", "merchantname", "token", "tokentype"]) {
            return reply(head(c));
        }
        reply(self.regenerate(&m, p, p.get("token"), None, &head).await)
    }

    // ------------------------------------------------------------ /debitwallet

    pub async fn debit(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let orderid = p.get("orderid").to_string();
        let head = |c| Answer::debit_failure(&msgcode, c, &orderid);
        // The token flow is the seed's; real clients may debit with an OTP.
        let with_otp = p.opt("token").is_none() && p.opt("otp").is_some();
        let endpoint = if with_otp {
            &DEBIT_WITH_OTP
        } else {
            &DEBIT_WITH_TOKEN
        };
        let m = match self.authenticate(p, endpoint, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        let credential = if with_otp { "otp" } else { "token" };
        let checked = Rail::check_common(
            p,
            &[
                "amount",
                "cell",
                "merchantname",
                "orderid",
                credential,
                "txntype",
            ],
        )
        .and_then(|()| {
            if !p.get("txntype").eq_ignore_ascii_case("debit")
                || !wire::valid_text(p.get("comment"), 255)
            {
                return Err(Code::ParamsInvalid);
            }
            let amount = wire::parse_amount(p.get("amount"), true)?;
            wire::check_orderid(&orderid)?;
            Ok(amount)
        });
        let amount = match checked {
            Ok(a) => a,
            Err(c) => return reply(head(c)),
        };
        let system = match self.system() {
            Ok(s) => s,
            Err(e) => return reply(Rail::unexpected(&e, &head)),
        };
        let d = Debit {
            mid: m.mid.clone(),
            merchant_account: m.account,
            cell: p.get("cell").to_string(),
            orderid: orderid.clone(),
            amount,
            credential: if with_otp {
                Credential::Otp(self.otp_digest(&m.mid, p.get("cell"), p.get("otp")))
            } else {
                Credential::Token(token_digest(p.get("token")))
            },
            coupon: p
                .opt("couponcode")
                .filter(|c| wire::valid_ident(c, 32))
                .map(str::to_string),
            aggregated_id: p.opt("aggregatedMerchantId").map(str::to_string),
            txnid: format!("MBK_TXN_{}", ids::time_ordered_hex()),
            promotions: system.promotions,
            otp_max_failures: self.settings.otp_max_failures,
            msgcode: msgcode.clone(),
        };
        // Debits of one wallet go to one writer (see `Store::write_keyed`).
        let key = d.cell.clone().into_bytes();
        let answer = match self.store.write_keyed(&key, move |tx| d.run(tx)).await {
            Ok(a) | Err(Halt::Refuse(a)) => a,
            Err(Halt::Store(e)) => Rail::unexpected(&e, &head),
        };
        reply(answer)
    }

    // ------------------------------------------------------------ /userbalance

    pub async fn balance(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.authenticate(p, &USER_BALANCE, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        if let Err(c) = Rail::check_common(p, &["cell", "merchantname", "token"]) {
            return reply(head(c));
        }
        let (mid, cell, digest) = (
            m.mid.clone(),
            p.get("cell").to_string(),
            token_digest(p.get("token")),
        );
        let (ok, bad) = (
            Answer::status_with(&msgcode, Code::Ok, "Balance retrieved successfully"),
            head(Code::BadToken),
        );
        let answer = self
            .read(&head, move |tx| {
                let now = tx.now();
                match db::token(tx, &digest)? {
                    Some(t)
                        if t.mid == mid && t.cell == cell && !t.replaced && t.expires_at > now => {}
                    _ => return Ok(bad),
                }
                let Some(w) = db::wallet(tx, &cell)? else {
                    return Ok(bad);
                };
                let account = ledger::account(tx, w.account)?
                    .ok_or_else(|| StoreError::Internal("wallet account missing".into()))?;
                Ok(ok.with("balanceamount", account.balances.available().to_string()))
            })
            .await;
        reply(answer)
    }

    // ------------------------------------------------------------ /querywallet

    pub async fn query_wallet(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.authenticate(p, &QUERY_WALLET, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        if let Err(c) = Rail::check_common(p, &["action", "cell", "merchantname"]) {
            return reply(head(c));
        }
        if p.get("action") != "existingusercheck" {
            return reply(head(Code::InvalidAction));
        }
        let cell = p.get("cell").to_string();
        let (exists, missing) = (
            Answer::status_with(&msgcode, Code::Ok, "User Exists"),
            head(Code::UserNotFound),
        );
        let answer = self
            .read(&head, move |tx| {
                let Some(w) = db::wallet(tx, &cell)? else {
                    return Ok(missing);
                };
                let account = ledger::account(tx, w.account)?
                    .ok_or_else(|| StoreError::Internal("wallet account missing".into()))?;
                let nonzero = if account.balances.balance().is_positive() {
                    "y"
                } else {
                    "n"
                };
                Ok(exists
                    .with("emailaddress", w.email.unwrap_or_default())
                    .with("nonzeroflag", nonzero))
            })
            .await;
        reply(answer)
    }

    // ------------------------------------------------------------ /createwalletuser

    pub async fn create_wallet_user(&self, p: &Params) -> Reply {
        let msgcode = p.get("msgcode").to_string();
        let head = |c| Answer::status(&msgcode, c);
        let m = match self.authenticate(p, &CREATE_WALLET_USER, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        if let Err(c) = Rail::check_common(p, &["cell", "email", "merchantname", "otp"]) {
            return reply(head(c));
        }
        if !wire::valid_email(p.get("email")) {
            return reply(head(Code::EmailInvalid));
        }
        let (mid, cell, email) = (
            m.mid.clone(),
            p.get("cell").to_string(),
            p.get("email").to_string(),
        );
        let presented = self.otp_digest(&mid, &cell, p.get("otp"));
        let max_failures = self.settings.otp_max_failures;
        let (created, registered, bad_otp) = (
            Answer::status_with(&msgcode, Code::Ok, "User Created"),
            head(Code::CellRegistered),
            head(Code::OtpInvalid),
        );
        let answer = self
            .write(&head, move |tx| {
                if db::wallet(tx, &cell)?.is_some() {
                    return Err(Halt::Refuse(registered.clone()));
                }
                if !Rail::check_otp(tx, &mid, &cell, &presented, max_failures, None)? {
                    return Ok(bad_otp.clone());
                }
                // Opened meanwhile (PostgreSQL: by another writer or the
                // admin API): the OTP is not spent on it.
                if !open_wallet(tx, &cell, Some(&email))? {
                    return Err(Halt::Refuse(registered.clone()));
                }
                Ok(created.clone())
            })
            .await;
        reply(answer)
    }

    // ------------------------------------------------------------ /checkstatus

    pub async fn check_status(&self, p: &Params) -> Reply {
        let orderid = p.get("orderid").to_string();
        let refundid = p.opt("refundid").map(str::to_string);
        let head = |c: Code| Answer::check_status_failure(c, &orderid, refundid.as_deref());
        let endpoint = if refundid.is_some() {
            &CHECK_REFUND_STATUS
        } else {
            &CHECK_STATUS
        };
        let m = match self.authenticate(p, endpoint, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        if p.opt("orderid").is_none()
            || !wire::valid_ident(&orderid, 64)
            || refundid.as_ref().is_some_and(|r| !wire::valid_ident(r, 64))
        {
            return reply(head(Code::ParamsInvalid));
        }
        let mid = m.mid.clone();
        let not_found = head(Code::NoOrder);
        let (oid, rid) = (orderid.clone(), refundid.clone());
        let answer = self
            .read(&head, move |tx| {
                let Some(order) = db::order(tx, &mid, &oid)? else {
                    return Ok(not_found);
                };
                let Some(rid) = rid else {
                    return Ok(Answer {
                        fields: vec![
                            ("statuscode", "0".into()),
                            ("orderid", order.orderid),
                            ("refid", order.txnid),
                            ("amount", order.amount.to_string()),
                            ("statusmessage", "success".into()),
                            ("ordertype", "payment".into()),
                            ("status", "SUCCESS".into()),
                        ],
                        signed: Signed::Fixed(signed_fields::STATUS_ANSWER),
                    });
                };
                match db::refund(tx, &mid, &rid)? {
                    Some(r) if r.orderid == order.orderid => Ok(Answer {
                        fields: vec![
                            ("statuscode", "0".into()),
                            ("orderid", order.orderid),
                            ("refundid", r.refundid),
                            ("txnamount", order.amount.to_string()),
                            ("refundamount", r.amount.to_string()),
                            ("refid", r.refid),
                            ("statusmessage", "Refund".into()),
                            ("status", "SUCCESS".into()),
                        ],
                        signed: Signed::Fixed(signed_fields::REFUND_STATUS_ANSWER),
                    }),
                    _ => Ok(not_found),
                }
            })
            .await;
        reply(answer)
    }

    // ------------------------------------------------------------ /walletrefund

    pub async fn refund(&self, p: &Params) -> Reply {
        let txid = p.get("txid").to_string();
        let refundid = p.get("refundid").to_string();
        let head = |c: Code| Answer::refund(c, c.description(), &txid, &refundid, "", "");
        let m = match self.authenticate(p, &WALLET_REFUND, &head).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let reply = |a| Reply::signed(a, &m, false);
        if !wire::valid_ident(&txid, 64) || !wire::valid_ident(&refundid, 64) {
            return reply(head(Code::ParamsInvalid));
        }
        if p.opt("ispartial")
            .is_some_and(|v| !v.eq_ignore_ascii_case("yes") && !v.eq_ignore_ascii_case("no"))
        {
            return reply(head(Code::ParamsInvalid));
        }
        let amount = match wire::parse_amount(p.get("amount"), true) {
            Ok(a) => a,
            Err(c) => return reply(head(c)),
        };
        let system = match self.system() {
            Ok(s) => s,
            Err(e) => return reply(Rail::unexpected(&e, &head)),
        };
        let r = Refund {
            mid: m.mid.clone(),
            merchant_account: m.account,
            txid: txid.clone(),
            refundid: refundid.clone(),
            amount,
            refid: format!("MBK_RFD_{}", ids::time_ordered_hex()),
            promotions: system.promotions,
        };
        let answer = self.write(&head, move |tx| r.run(tx)).await;
        reply(answer)
    }
}

/// Opens a wallet: its never-negative ledger account and its row.
/// Returns `false` if the cell already has one.
pub(crate) fn open_wallet(tx: &mut Tx<'_>, cell: &str, email: Option<&str>) -> Result<bool, Halt> {
    let account = ledger::open_account(
        tx,
        &format!("wallet:{cell}"),
        CURRENCY,
        AccountFlags::NEVER_NEGATIVE,
    )?;
    Ok(db::insert_wallet(tx, cell, account, email)?)
}

enum Credential {
    Token(Vec<u8>),
    Otp(Vec<u8>),
}

/// One debit, as a unit of work.
struct Debit {
    mid: String,
    merchant_account: AccountId,
    cell: String,
    orderid: String,
    amount: Money,
    credential: Credential,
    coupon: Option<String>,
    aggregated_id: Option<String>,
    /// Drawn before the unit runs so that a retried unit keeps it.
    txnid: String,
    promotions: AccountId,
    otp_max_failures: i64,
    msgcode: String,
}

impl Debit {
    fn fail(&self, code: Code) -> Answer {
        Answer::status(&self.msgcode, code).with("orderid", self.orderid.clone())
    }

    /// token (302) and cap (303), or with an OTP a wallet (120) and the OTP
    /// (164); wallet blocked (305), orderid used (304), balance (301); then
    /// the money moves.
    fn run(&self, tx: &mut Tx<'_>) -> Result<Answer, Halt> {
        let refuse = |code| Err(Halt::Refuse(self.fail(code)));
        let now = tx.now();
        let wallet = match &self.credential {
            Credential::Token(digest) => {
                let (token, wallet) = match db::token_with_wallet(tx, digest)? {
                    Some((t, w))
                        if t.mid == self.mid
                            && t.cell == self.cell
                            && !t.replaced
                            && t.expires_at > now =>
                    {
                        (t, w)
                    }
                    _ => return refuse(Code::TokenInvalid),
                };
                if self.amount > token.cap {
                    return refuse(Code::LimitExceeded);
                }
                wallet
            }
            Credential::Otp(digest) => {
                // As at `/tokengenerate`: no wallet, no user (120), whatever
                // the OTP; and the OTP is neither used nor counted a try.
                let Some(wallet) = db::wallet(tx, &self.cell)? else {
                    return refuse(Code::UserNotFound);
                };
                let (max, amount) = (self.otp_max_failures, Some(self.amount));
                if !Rail::check_otp(tx, &self.mid, &self.cell, digest, max, amount)? {
                    return Ok(self.fail(Code::OtpInvalid)); // keep the failed attempt
                }
                let available = ledger::available(tx, wallet.account)?
                    .ok_or_else(|| StoreError::Internal("wallet account missing".into()))?;
                Some((wallet, available))
            }
        };
        let Some((wallet, available)) = wallet else {
            return refuse(Code::TokenInvalid);
        };
        if wallet.blocked {
            return refuse(Code::WalletBlocked);
        }
        let cashback = match &self.coupon {
            Some(code) => db::coupon(tx, code)?
                .and_then(Percent::from_basis_points)
                .map_or(Money::ZERO, |p| self.amount.percent_floor(p)),
            None => Money::ZERO,
        };
        // 301 is decided before anything is written, from the balance read
        // with the token: a refusal that writes nothing costs its batch
        // nothing, while one after a write makes the writer roll the batch
        // back and run it again with savepoints, every other caller's unit
        // with it (see the store's writer). 304 outranks it, so a short
        // balance looks the orderid up; otherwise the order's insert is the
        // unit's first write and refuses a used orderid by writing nothing.
        // With several writers (PostgreSQL) the read is only a snapshot: the
        // insert and the transfer below still refuse, atomically, whatever
        // raced it.
        let net = self.amount.checked_sub(cashback).unwrap_or(Money::ZERO);
        if net.is_positive() && available < net {
            return refuse(if db::order(tx, &self.mid, &self.orderid)?.is_some() {
                Code::DuplicateOrder
            } else {
                Code::InsufficientBalance
            });
        }
        let inserted = db::insert_order(
            tx,
            &OrderRow {
                mid: self.mid.clone(),
                orderid: self.orderid.clone(),
                txnid: self.txnid.clone(),
                cell: self.cell.clone(),
                amount: self.amount,
                cashback,
                coupon: self.coupon.clone().filter(|_| cashback.is_positive()),
                aggregated_id: self.aggregated_id.clone(),
                refunded: Money::ZERO,
                refunded_cashback: Money::ZERO,
                created_at: now,
            },
        )?;
        if !inserted {
            return refuse(Code::DuplicateOrder);
        }
        // The wallet pays the amount less cashback, promotions pay the
        // cashback, the merchant receives the full amount. The transfers'
        // idempotency keys follow the txnid: the order row above is what
        // refuses a second debit of the orderid, and a time-ordered key keeps
        // the transfers' key index appending instead of writing random pages.
        let legs = [
            ("debit", wallet.account, net),
            ("cashback", self.promotions, cashback),
        ];
        for (leg, from, amount) in legs {
            if !amount.is_positive() {
                continue;
            }
            let req = ledger::single(
                SCOPE,
                format!("{leg}:{}", self.txnid),
                from,
                self.merchant_account,
                CURRENCY,
                amount,
            );
            match ledger::transfer(tx, &req) {
                Ok(_) => {}
                Err(LedgerOpError::Rejected(LedgerError::InsufficientFunds(_))) => {
                    return refuse(Code::InsufficientBalance);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Answer::status(&self.msgcode, Code::Ok)
            .with("orderid", self.orderid.clone())
            .with("txnid", self.txnid.clone())
            .with("amount", self.amount.to_string())
            .with("cashback", cashback.to_string())
            .with("net_debit", net.to_string()))
    }
}

const EXCEEDS: &str = "General error: refunds would exceed the transaction amount";

/// One refund, as a unit of work.
struct Refund {
    mid: String,
    merchant_account: AccountId,
    /// The debit's orderid (as Razorpay sends it) or its txnid.
    txid: String,
    refundid: String,
    amount: Money,
    refid: String,
    promotions: AccountId,
}

impl Refund {
    fn answer(&self, code: Code, message: &str, refid: &str) -> Answer {
        let amount = if code == Code::Ok {
            self.amount.to_string()
        } else {
            String::new()
        };
        Answer::refund(code, message, &self.txid, &self.refundid, &amount, refid)
    }

    /// The refundid was used before: the first answer if it was this same
    /// refund, a refusal otherwise.
    fn replay(&self, done: &RefundRow, order: &OrderRow) -> Result<Answer, Halt> {
        if done.orderid == order.orderid && done.amount == self.amount {
            return Ok(self.answer(Code::Ok, "Refund completed successfully", &done.refid));
        }
        Err(Halt::Refuse(self.answer(
            Code::RefundRefused,
            "General error: refundid already used for a different refund",
            "",
        )))
    }

    fn run(&self, tx: &mut Tx<'_>) -> Result<Answer, Halt> {
        let refuse = |code: Code, message: &str| Err(Halt::Refuse(self.answer(code, message, "")));
        let order = match db::order(tx, &self.mid, &self.txid)? {
            Some(o) => o,
            None => match db::order_by_txnid(tx, &self.mid, &self.txid)? {
                Some(o) => o,
                None => return refuse(Code::NoOrder, Code::NoOrder.description()),
            },
        };
        // Refusals decided here write nothing, so they cost the batch nothing;
        // after the claim below, each would roll the batch back and run it
        // again with savepoints (see the store's writer), which a merchant
        // could repeat at will. A refund already made must still get its
        // first answer, so its refundid is looked up before the totals.
        // Refunds only ever add to an order's totals, so one that does not
        // fit now cannot fit later, on any engine: refusing it early agrees
        // with the check under the row's lock below.
        if let Some(done) = db::refund(tx, &self.mid, &self.refundid)? {
            return self.replay(&done, &order);
        }
        if order
            .refunded
            .checked_add(self.amount)
            .unwrap_or(Money::MAX)
            > order.amount
        {
            return refuse(Code::RefundRefused, EXCEEDS);
        }
        // Claim the refundid first: a concurrent request with the same one
        // (on any node) waits here for this unit and then sees its row.
        let claimed = db::insert_refund(
            tx,
            &RefundRow {
                mid: self.mid.clone(),
                refundid: self.refundid.clone(),
                orderid: order.orderid.clone(),
                amount: self.amount,
                refid: self.refid.clone(),
                created_at: tx.now(),
            },
        )?;
        if !claimed {
            let done = db::refund(tx, &self.mid, &self.refundid)?
                .ok_or_else(|| StoreError::Internal("claimed refundid vanished".into()))?;
            return self.replay(&done, &order);
        }
        // The split below follows the order's totals; a refund of the same
        // order committing on another writer must be counted, so they are
        // read again under the row's lock.
        let order = db::lock_order(tx, &self.mid, &order.orderid)?
            .ok_or_else(|| StoreError::Internal("refunded order vanished".into()))?;
        let Some(RefundSplit {
            wallet: wallet_part,
            promotions: promo_part,
        }) = refund_split(&order, self.amount)
        else {
            return refuse(Code::RefundRefused, EXCEEDS);
        };
        // Conditional on the totals so far: two racing refunds cannot both fit.
        if !db::add_refund_to_order(tx, &self.mid, &order.orderid, self.amount, promo_part)? {
            return refuse(Code::RefundRefused, EXCEEDS);
        }
        let wallet = db::wallet(tx, &order.cell)?
            .ok_or_else(|| StoreError::Internal("refunded order's wallet missing".into()))?;
        for (leg, to, amount) in [
            ("wallet", wallet.account, wallet_part),
            ("promotions", self.promotions, promo_part),
        ] {
            if !amount.is_positive() {
                continue;
            }
            let req = ledger::single(
                SCOPE,
                format!("refund:{}:{}:{leg}", self.mid, self.refundid),
                self.merchant_account,
                to,
                CURRENCY,
                amount,
            );
            match ledger::transfer(tx, &req) {
                Ok(_) => {}
                Err(LedgerOpError::Rejected(LedgerError::InsufficientFunds(_))) => {
                    return refuse(
                        Code::RefundMerchantFunds,
                        Code::RefundMerchantFunds.description(),
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.answer(Code::Ok, "Refund completed successfully", &self.refid))
    }
}

/// Where a refund's money goes back to: the wallet, and promotions for the
/// cashback it paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefundSplit {
    wallet: Money,
    promotions: Money,
}

/// Splits a refund of `amount` given the order's totals before it; `None`
/// when it does not fit in what is left of the order.
///
/// Cashback is returned in proportion, on the running total rather than on
/// each refund: after any refund, promotions have had back exactly
/// floor(refunded × cashback / amount). So partial refunds round the same as
/// one whole refund would, and a full refund returns all the cashback.
fn refund_split(order: &OrderRow, amount: Money) -> Option<RefundSplit> {
    let refunded = order.refunded.checked_add(amount)?;
    if refunded > order.amount {
        return None;
    }
    let promotions = refunded
        .mul_div_floor(order.cashback, order.amount)
        .checked_sub(order.refunded_cashback)
        .unwrap_or(Money::ZERO)
        .clamp(Money::ZERO, amount);
    let wallet = amount.checked_sub(promotions).unwrap_or(Money::ZERO);
    Some(RefundSplit { wallet, promotions })
}

#[cfg(test)]
mod tests {
    use payrail_core::Timestamp;
    use proptest::prelude::*;

    use super::*;

    /// A refusal says the work was not done; an unknown outcome gets no
    /// answer at all, while the database's other failures are 99.
    #[test]
    fn an_unknown_outcome_is_left_unanswered_and_other_store_failures_are_99() {
        let head = |c| Answer::debit_failure("504", c, "ORDER_0001");
        let marked = |e: StoreError| {
            Rail::unexpected(&e, &head)
                .render(Some(b"secret"), Format::Json)
                .extensions()
                .get::<payrail_railkit::Unanswered>()
                .is_some()
        };
        assert!(marked(StoreError::OutcomeUnknown));
        for e in [
            StoreError::Unavailable("down".into()),
            StoreError::Closed,
            StoreError::Overloaded,
            StoreError::Internal("x".into()),
        ] {
            assert!(!marked(e.clone()), "{e:?}");
            let a = Rail::unexpected(&e, &head);
            assert!(
                a.fields.contains(&("statuscode", "99".to_string())),
                "{e:?}: {a:?}"
            );
        }
    }

    #[test]
    fn the_otp_text_counts_its_minutes() {
        let text = |secs| otp_text("123456", Duration::from_secs(secs));
        assert_eq!(
            text(600),
            "123456 is your Mobikwik OTP. It is valid for 10 minutes. Do not share it with anyone."
        );
        assert!(text(60).contains("valid for 1 minute."), "{}", text(60));
        assert!(text(120).contains("valid for 2 minutes."), "{}", text(120));
    }

    fn order(amount: i64, cashback: i64) -> OrderRow {
        OrderRow {
            mid: "MBK9006".into(),
            orderid: "O1".into(),
            txnid: "T1".into(),
            cell: "9311032820".into(),
            amount: Money::from_minor(amount),
            cashback: Money::from_minor(cashback),
            coupon: None,
            aggregated_id: None,
            refunded: Money::ZERO,
            refunded_cashback: Money::ZERO,
            created_at: Timestamp::from_millis(0),
        }
    }

    proptest! {
        /// Any series of partial refunds: each splits into parts that are
        /// never negative and add up to it; promotions' running total is
        /// always floor(refunded × cashback / amount); a refund past what is
        /// left is refused; refunded in full, the wallet has back what it
        /// paid and promotions the whole cashback.
        #[test]
        fn refunds_return_cashback_in_proportion(
            amount in 1i64..10_000_000,
            cashback_share in 0u32..=100,
            cuts in proptest::collection::vec(1i64..=1_000, 1..12),
        ) {
            // A debit's cashback is a percentage of its amount, at most all of it.
            let cashback = amount * i64::from(cashback_share) / 100;
            let mut o = order(amount, cashback);
            let total: i64 = cuts.iter().sum();
            // The cuts as refunds in proportion, the last one taking the rest.
            let mut left = amount;
            for (i, cut) in cuts.iter().enumerate() {
                let part = if i + 1 == cuts.len() { left } else { (amount * cut / total).min(left) };
                if part == 0 {
                    continue;
                }
                let refund = Money::from_minor(part);
                let split = refund_split(&o, refund).expect("a refund within the order fits");
                prop_assert!(split.wallet >= Money::ZERO && split.promotions >= Money::ZERO);
                prop_assert_eq!(split.wallet.checked_add(split.promotions), Some(refund));
                o.refunded = o.refunded.checked_add(refund).unwrap();
                o.refunded_cashback = o.refunded_cashback.checked_add(split.promotions).unwrap();
                prop_assert_eq!(
                    o.refunded_cashback,
                    o.refunded.mul_div_floor(o.cashback, o.amount)
                );
                left -= part;
            }
            prop_assert_eq!(o.refunded, o.amount);
            prop_assert_eq!(o.refunded_cashback, o.cashback);
            prop_assert_eq!(refund_split(&o, Money::from_minor(1)), None);
        }
    }

    #[test]
    fn a_refund_past_what_is_left_does_not_fit() {
        let mut o = order(10_000, 2_000);
        o.refunded = Money::from_minor(7_500);
        o.refunded_cashback = Money::from_minor(1_500);
        assert_eq!(refund_split(&o, Money::from_minor(2_501)), None);
        assert_eq!(
            refund_split(&o, Money::from_minor(2_500)),
            Some(RefundSplit {
                wallet: Money::from_minor(2_000),
                promotions: Money::from_minor(500),
            })
        );
    }
}
