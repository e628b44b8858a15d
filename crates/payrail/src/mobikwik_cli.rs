//! `payrail mobikwik …`: sign parameters, or call a server as a merchant.

use clap::{Args, Subcommand};
use payrail_mobikwik::checksum;
use payrail_mobikwik::client::{Client, Debit, Payload, SignedRequest};
use payrail_mobikwik::fixtures;
use payrail_mobikwik::wire::signed_fields;

#[derive(Args)]
pub struct MobikwikArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Merchant {
    /// Base URL of payrail (or of the provider).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "MOBIKWIK_URL")]
    url: String,
    #[arg(long, default_value = fixtures::MID, env = "MOBIKWIK_MID")]
    mid: String,
    #[arg(long, default_value = fixtures::MERCHANT_NAME)]
    merchantname: String,
    /// The merchant's secret [default: the sandbox merchant's]. Prefer the
    /// environment variable for a real one: a flag shows in the process list.
    #[arg(long, env = "MOBIKWIK_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Secret for /tokenregenerate, if the merchant has a separate one
    /// (like --secret, better in the environment).
    #[arg(long, env = "MOBIKWIK_REGEN_SECRET", hide_env_values = true)]
    regen_secret: Option<String>,
    /// Sign as an aggregator for this merchant id.
    #[arg(long)]
    aggregator: Option<String>,
    /// POST a form body instead of a GET query string.
    #[arg(long)]
    post: bool,
    /// Ask for XML (`payloadtype: xml`).
    #[arg(long)]
    xml: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Print the checksum of values, in order; or, with --endpoint, of
    /// name=value pairs put in that endpoint's signing order.
    Sign {
        /// The merchant's secret; better in the environment, since a flag
        /// shows in the process list.
        #[arg(long, env = "MOBIKWIK_SECRET", hide_env_values = true)]
        secret: String,
        /// otpgenerate, tokengenerate-otp, tokengenerate-token,
        /// tokenregenerate, debitwallet, userbalance, querywallet,
        /// createwalletuser, checkstatus, walletrefund.
        #[arg(long)]
        endpoint: Option<String>,
        /// Also print the signed string.
        #[arg(long)]
        show: bool,
        values: Vec<String>,
    },
    /// Send an OTP to a cell.
    Otp {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        cell: String,
        #[arg(long, default_value = "1")]
        amount: String,
    },
    /// Exchange an OTP for a wallet token with a cap.
    Token {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        cell: String,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        otp: String,
    },
    /// Regenerate a token: /tokenregenerate (cap kept), or with --amount the
    /// seed's /tokengenerate variant (new cap).
    Regenerate {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        cell: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        amount: Option<String>,
    },
    /// Debit a wallet.
    Debit {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        cell: String,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        orderid: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        coupon: Option<String>,
        #[arg(long, default_value = "504")]
        msgcode: String,
    },
    /// An order's status (or a refund's, with --refundid).
    Status {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        orderid: String,
        #[arg(long)]
        refundid: Option<String>,
    },
    /// Refund (part of) a debit, by orderid or txnid.
    Refund {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        txid: String,
        #[arg(long)]
        refundid: String,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        partial: bool,
    },
    /// A wallet's balance.
    Balance {
        #[command(flatten)]
        m: Merchant,
        #[arg(long)]
        cell: String,
        #[arg(long)]
        token: String,
    },
}

fn client(m: &Merchant) -> Client {
    let secret = m.secret.as_deref().unwrap_or(fixtures::SECRET);
    let mut c = Client::new(&m.url, &m.mid, &m.merchantname, secret);
    if let Some(r) = &m.regen_secret {
        c = c.with_regen_secret(r);
    }
    if let Some(a) = &m.aggregator {
        c = c.with_aggregator(a);
    }
    c.post = m.post;
    c.payload = if m.xml { Payload::Xml } else { Payload::Json };
    c
}

fn endpoint_fields(name: &str) -> Option<&'static [&'static str]> {
    Some(match name {
        "otpgenerate" => signed_fields::OTP_GENERATE,
        "tokengenerate-otp" => signed_fields::TOKEN_FROM_OTP,
        "tokengenerate-token" => signed_fields::TOKEN_FROM_TOKEN,
        "tokenregenerate" => signed_fields::TOKEN_REGENERATE,
        "debitwallet" => signed_fields::DEBIT_WITH_TOKEN,
        "userbalance" => signed_fields::USER_BALANCE,
        "querywallet" => signed_fields::QUERY_WALLET,
        "createwalletuser" => signed_fields::CREATE_WALLET_USER,
        "checkstatus" => signed_fields::CHECK_STATUS,
        "walletrefund" => signed_fields::WALLET_REFUND,
        _ => return None,
    })
}

fn sign(
    secret: &str,
    endpoint: Option<&str>,
    show: bool,
    values: &[String],
) -> Result<bool, String> {
    let ordered: Vec<String> = match endpoint {
        None => values.to_vec(),
        Some(name) => {
            let fields =
                endpoint_fields(name).ok_or_else(|| format!("unknown endpoint {name:?}"))?;
            let mut pairs = Vec::new();
            for v in values {
                let (k, v) = v
                    .split_once('=')
                    .ok_or_else(|| format!("with --endpoint, give name=value pairs (got {v:?})"))?;
                pairs.push((k.to_string(), v.to_string()));
            }
            let mut out: Vec<String> = fields
                .iter()
                .map(|f| {
                    pairs
                        .iter()
                        .find(|(k, _)| k == f)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect();
            if let Some((_, a)) = pairs.iter().find(|(k, _)| k == "aggregatedMerchantId") {
                out.push(a.clone());
            }
            out
        }
    };
    if show {
        eprintln!(
            "{}",
            checksum::signing_string(ordered.iter().map(String::as_str))
        );
    }
    println!(
        "{}",
        checksum::sign(secret.as_bytes(), ordered.iter().map(String::as_str))
    );
    Ok(true)
}

async fn call(c: &Client, req: &SignedRequest) -> Result<bool, String> {
    let r = c.send(req).await.map_err(|e| e.to_string())?;
    let object: serde_json::Map<String, serde_json::Value> = r
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&object).unwrap_or_default()
    );
    eprintln!(
        "checksum: {}",
        if r.checksum_ok {
            "verified"
        } else {
            "DOES NOT VERIFY"
        }
    );
    Ok(r.is_success() && r.checksum_ok)
}

/// Runs the command; `Ok(false)` when the answer was not a success.
pub async fn run(args: MobikwikArgs) -> Result<bool, String> {
    match args.command {
        Command::Sign {
            secret,
            endpoint,
            show,
            values,
        } => sign(&secret, endpoint.as_deref(), show, &values),
        Command::Otp { m, cell, amount } => {
            let c = client(&m);
            call(&c, &c.otp_generate_request(&cell, &amount)).await
        }
        Command::Token {
            m,
            cell,
            amount,
            otp,
        } => {
            let c = client(&m);
            call(&c, &c.token_from_otp_request(&cell, &amount, &otp)).await
        }
        Command::Regenerate {
            m,
            cell,
            token,
            amount,
        } => {
            let c = client(&m);
            let req = match amount {
                Some(a) => c.regenerate_with_cap_request(&cell, &a, &token),
                None => c.regenerate_request(&cell, &token),
            };
            call(&c, &req).await
        }
        Command::Debit {
            m,
            cell,
            amount,
            orderid,
            token,
            comment,
            coupon,
            msgcode,
        } => {
            let c = client(&m);
            let d = Debit {
                cell: &cell,
                amount: &amount,
                orderid: &orderid,
                token: &token,
                comment: comment.as_deref(),
                coupon: coupon.as_deref(),
                msgcode: &msgcode,
            };
            call(&c, &c.debit_request(&d)).await
        }
        Command::Status {
            m,
            orderid,
            refundid,
        } => {
            let c = client(&m);
            call(&c, &c.check_status_request(&orderid, refundid.as_deref())).await
        }
        Command::Refund {
            m,
            txid,
            refundid,
            amount,
            partial,
        } => {
            let c = client(&m);
            call(&c, &c.refund_request(&txid, &refundid, &amount, partial)).await
        }
        Command::Balance { m, cell, token } => {
            let c = client(&m);
            call(&c, &c.balance_request(&cell, &token)).await
        }
    }
}
