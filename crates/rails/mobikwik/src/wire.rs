//! The wire format: parameters in (query string or form body), answers out
//! (JSON, or XML on request), status codes, and the syntax of each field.

use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use payrail_core::Money;

use crate::checksum;

/// Each endpoint's checksum fields, in signing order. The server verifies and
/// the client signs with these same lists. `aggregatedMerchantId`, when sent,
/// is appended after them.
pub mod signed_fields {
    pub const OTP_GENERATE: &[&str] = &[
        "amount",
        "cell",
        "merchantname",
        "mid",
        "msgcode",
        "tokentype",
    ];
    pub const TOKEN_FROM_OTP: &[&str] = &[
        "amount",
        "cell",
        "merchantname",
        "mid",
        "msgcode",
        "otp",
        "tokentype",
    ];
    pub const TOKEN_FROM_TOKEN: &[&str] = &[
        "amount",
        "cell",
        "merchantname",
        "mid",
        "msgcode",
        "token",
        "tokentype",
    ];
    pub const TOKEN_REGENERATE: &[&str] = &[
        "cell",
        "merchantname",
        "mid",
        "msgcode",
        "token",
        "tokentype",
    ];
    pub const DEBIT_WITH_TOKEN: &[&str] = &[
        "amount",
        "cell",
        "comment",
        "merchantname",
        "mid",
        "msgcode",
        "orderid",
        "token",
        "txntype",
    ];
    pub const DEBIT_WITH_OTP: &[&str] = &[
        "amount",
        "cell",
        "comment",
        "merchantname",
        "mid",
        "msgcode",
        "orderid",
        "otp",
        "txntype",
    ];
    pub const USER_BALANCE: &[&str] = &["cell", "merchantname", "mid", "msgcode", "token"];
    pub const QUERY_WALLET: &[&str] = &["action", "cell", "merchantname", "mid", "msgcode"];
    pub const CREATE_WALLET_USER: &[&str] =
        &["cell", "email", "merchantname", "mid", "msgcode", "otp"];
    pub const CHECK_STATUS: &[&str] = &["mid", "orderid"];
    pub const CHECK_REFUND_STATUS: &[&str] = &["mid", "orderid", "refundid"];
    pub const WALLET_REFUND: &[&str] = &["mid", "txid", "refundid", "amount"];

    /// `/checkstatus` answers are signed over these fields, in this order.
    pub const STATUS_ANSWER: &[&str] = &[
        "statuscode",
        "orderid",
        "refid",
        "amount",
        "statusmessage",
        "ordertype",
    ];
    pub const REFUND_STATUS_ANSWER: &[&str] = &[
        "statuscode",
        "orderid",
        "refundid",
        "txnamount",
        "refundamount",
        "refid",
    ];
}

/// More parameters than any endpoint takes, with room for extras clients add.
const MAX_PARAMS: usize = 40;
/// Longer than any legitimate value (the longest are tokens and comments).
const MAX_VALUE_LEN: usize = 512;

/// A request's parameters: the query string and, for POST, the form body,
/// decoded once. Values are kept exactly as received, since they are signed.
#[derive(Clone, Debug, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
    /// Set when the input could not be read unambiguously; the endpoint then
    /// answers 151 after the merchant and checksum checks.
    pub malformed: Option<&'static str>,
}

/// Whether every name and value decodes to UTF-8. The parser replaces
/// what does not with U+FFFD, so two different byte strings would read, and
/// verify, as one value; such a request is malformed. Only looked at when a
/// U+FFFD shows up, which a client may also have sent as itself.
fn all_utf8(query: Option<&str>, body: &[u8]) -> bool {
    let sources = query.map(str::as_bytes).into_iter().chain(Some(body));
    sources
        .flat_map(|s| s.split(|b| *b == b'&'))
        .all(|pair| percent_encoding::percent_decode(pair).decode_utf8().is_ok())
}

impl Params {
    pub fn from_parts(query: Option<&str>, body: &[u8]) -> Params {
        let mut p = Params::default();
        let mut utf8_checked = false;
        let sources = query.map(str::as_bytes).into_iter().chain(Some(body));
        for (k, v) in sources.flat_map(form_urlencoded::parse) {
            if p.pairs.len() == MAX_PARAMS {
                p.malformed = Some("too many parameters");
                break;
            }
            // A name that long is no field's: dropped. A value over the
            // bound is kept, though, since it is part of what was signed: a
            // correctly signed request then verifies and is told 151, not 80.
            // The request as a whole is bounded by the body and header limits.
            if k.len() > 64 {
                p.malformed = Some("parameter too long");
                continue;
            }
            if v.len() > MAX_VALUE_LEN {
                p.malformed = Some("parameter too long");
            }
            if !utf8_checked
                && (k.contains(char::REPLACEMENT_CHARACTER)
                    || v.contains(char::REPLACEMENT_CHARACTER))
            {
                utf8_checked = true;
                if !all_utf8(query, body) {
                    p.malformed = Some("not UTF-8");
                }
            }
            match p.pairs.iter().find(|(name, _)| *name == k) {
                // The same name twice with two values: which one was signed?
                Some((_, existing)) if *existing != v => {
                    p.malformed = Some("parameter given twice")
                }
                Some(_) => {}
                None => p.pairs.push((k.into_owned(), v.into_owned())),
            }
        }
        p
    }

    /// The value, or `""` if absent (as the checksum treats it).
    pub fn get(&self, name: &str) -> &str {
        self.opt(name).unwrap_or("")
    }

    /// The value if present and not empty.
    pub fn opt(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// How the answer is encoded: JSON by default; XML (as the provider's
/// original clients expect) with the request header `payloadtype: xml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
}

/// A parsed wire request.
pub struct WireRequest {
    pub params: Params,
    pub format: Format,
}

impl Format {
    /// From the request header `payloadtype`.
    pub fn of(headers: &HeaderMap) -> Format {
        match headers.get("payloadtype").and_then(|v| v.to_str().ok()) {
            Some(v) if v.trim().eq_ignore_ascii_case("xml") => Format::Xml,
            _ => Format::Json,
        }
    }
}

impl<S: Send + Sync> FromRequest<S> for WireRequest {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let format = Format::of(req.headers());
        let shape = Shape::of(&req);
        let query = req.uri().query().map(str::to_owned);
        let body = match bytes::Bytes::from_request(req, state).await {
            Ok(body) => body,
            // Too large (413), or it stalled or broke off (400).
            Err(e) => return Err(refusal(e.status(), shape, query.as_deref(), format)),
        };
        Ok(WireRequest {
            params: Params::from_parts(query.as_deref(), &body),
            format,
        })
    }
}

/// Which failure answer an endpoint gives. Set on each route (see
/// `signed` in the crate root), so that a request refused before its
/// endpoint runs is answered in that endpoint's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shape {
    /// The msgcode APIs' head: `messagecode`, `status`, `statuscode`,
    /// `statusdescription`.
    #[default]
    Msgcode,
    /// `/debitwallet`: [`Answer::debit_failure`].
    Debit,
    /// `/checkstatus`: [`Answer::check_status_failure`].
    Status,
    /// `/walletrefund`: [`Answer::refund`].
    Refund,
}

impl Shape {
    /// The route's shape, from the request's extensions.
    pub fn of(req: &Request) -> Shape {
        req.extensions().get::<Shape>().copied().unwrap_or_default()
    }
}

/// The answer to a request that never reached its endpoint: a body over the
/// size limit or not received in time, or a method other than GET and
/// POST. It is 151 in the endpoint's own shape, so that a client that reads
/// only the body still gets a FAILURE it knows, with the HTTP status saying
/// which. It is unsigned, because nothing was authenticated. Of the query it
/// repeats what the endpoint's failures repeat: the msgcode only when that
/// is one, the orderid, txid and refundid as sent (the query is bounded by
/// the header limit).
pub fn refusal(status: StatusCode, shape: Shape, query: Option<&str>, format: Format) -> Response {
    let p = Params::from_parts(query, b"");
    let code = Code::ParamsInvalid;
    let msgcode = || {
        p.opt("msgcode")
            .filter(|m| m.len() <= 4 && m.bytes().all(|b| b.is_ascii_digit()))
            .unwrap_or("")
    };
    let answer = match shape {
        Shape::Msgcode => Answer::status(msgcode(), code),
        Shape::Debit => Answer::debit_failure(msgcode(), code, p.get("orderid")),
        Shape::Status => Answer::check_status_failure(code, p.get("orderid"), p.opt("refundid")),
        Shape::Refund => Answer::refund(
            code,
            code.description(),
            p.get("txid"),
            p.get("refundid"),
            "",
            "",
        ),
    };
    let mut resp = answer.render(None, format);
    *resp.status_mut() = status;
    resp
}

/// Declares the status codes once: the enum, its numbers, descriptions and
/// the list of all of them (the README's table is checked against it).
macro_rules! status_codes {
    ($($name:ident = $number:literal, $description:literal;)*) => {
        /// The status codes this rail answers with. Descriptions follow the
        /// seed documents where they give one, the provider's published table
        /// elsewhere.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Code {
            $($name,)*
        }

        impl Code {
            /// Every code, for the README's table and the tests.
            pub const ALL: &'static [Code] = &[$(Code::$name,)*];

            pub fn number(self) -> u16 {
                match self {
                    $(Code::$name => $number,)*
                }
            }

            /// The answer's `status`: SUCCESS for 0 only.
            pub fn status(self) -> &'static str {
                if matches!(self, Code::Ok) {
                    "SUCCESS"
                } else {
                    "FAILURE"
                }
            }

            pub fn description(self) -> &'static str {
                match self {
                    $(Code::$name => $description,)*
                }
            }
        }
    };
}

status_codes! {
    Ok = 0, "Transaction completed successfully";
    RefundMerchantFunds = 7, "Failed to debit from merchant";
    MerchantNotFound = 22, "Merchant does not Exist";
    RefundRefused = 45, "General error";
    OrderIdLength = 51, "Length of parameter orderid must be between 8 to 30 characters";
    OrderIdChars = 52, "Parameter orderid must be alphanumeric only";
    EmailInvalid = 53, "Parameter email is invalid";
    AmountInvalid = 54, "Parameter amount must be numeric with max 2 decimal places only";
    CellInvalid = 55, "Parameter cell is invalid. It must be numeric, have 10 digits and start with 7,8 or 9";
    MerchantNameInvalid = 56, "Parameter merchantname is invalid. It must be alphanumeric and its length must be between 1 to 30 characters";
    ChecksumMismatch = 80, "Checksum Mismatch";
    Unexpected = 99, "Unexpected Error";
    NoOrder = 101, "No orderid found";
    InvalidAction = 110, "Invalid action parameter";
    UserNotFound = 120, "User does not exist";
    TooManyOtps = 148, "Exceeded maximum number of OTP request attempts";
    MsgcodeInvalid = 150, "Invalid Message code specified in Input";
    ParamsInvalid = 151, "Invalid Request Parameters";
    CellRegistered = 153, "User with the input cell is already registered";
    OtpMissingOrInvalid = 155, "EIther OTP missing or Invalid OTP";
    OtpInvalid = 164, "Either Invalid OTP (Expiry or OTP mismatch) or OTP mismatched due to mismatch in order id or transaction amount";
    TokenOrOtpMissing = 190, "Token Or OTP missing";
    BadToken = 198, "Either Token missing or Invalid Token or Token Expired";
    OtpAndToken = 200, "Provide Either OTP or Token";
    RegenTokenInvalid = 201, "Invalid or expired token provided";
    RegenLimit = 202, "Token regeneration limit exceeded";
    InsufficientBalance = 301, "Insufficient wallet balance";
    TokenInvalid = 302, "Invalid or expired token";
    LimitExceeded = 303, "Transaction limit exceeded";
    DuplicateOrder = 304, "Duplicate order ID";
    WalletBlocked = 305, "Wallet temporarily blocked";
}

/// Which fields a response checksum covers.
#[derive(Clone, Copy, Debug)]
pub enum Signed {
    /// Every field, sorted by name, empty values skipped (msgcode APIs).
    Sorted,
    /// These fields in this order (`/checkstatus`, as real clients verify it).
    Fixed(&'static [&'static str]),
    /// Nothing: the answer is never sent (see [`Answer::withheld`]).
    Withheld,
}

/// An answer, before it is signed and encoded.
#[derive(Clone, Debug)]
pub struct Answer {
    pub fields: Vec<(&'static str, String)>,
    pub signed: Signed,
}

impl Answer {
    /// No answer: the request's outcome is unknown, and the connection is
    /// closed instead (see `payrail_railkit::Unanswered`).
    pub fn withheld() -> Answer {
        Answer {
            fields: Vec::new(),
            signed: Signed::Withheld,
        }
    }

    /// A `/checkstatus` failure, with the signed fields present (empty) so
    /// that the answer has one shape whatever the outcome.
    pub fn check_status_failure(code: Code, orderid: &str, refundid: Option<&str>) -> Answer {
        let message = code.description().to_string();
        match refundid {
            None => Answer {
                fields: vec![
                    ("statuscode", code.number().to_string()),
                    ("orderid", orderid.to_string()),
                    ("refid", String::new()),
                    ("amount", String::new()),
                    ("statusmessage", message),
                    ("ordertype", String::new()),
                    ("status", "FAILURE".into()),
                ],
                signed: Signed::Fixed(signed_fields::STATUS_ANSWER),
            },
            Some(refundid) => Answer {
                fields: vec![
                    ("statuscode", code.number().to_string()),
                    ("orderid", orderid.to_string()),
                    ("refundid", refundid.to_string()),
                    ("txnamount", String::new()),
                    ("refundamount", String::new()),
                    ("refid", String::new()),
                    ("statusmessage", message),
                    ("status", "FAILURE".into()),
                ],
                signed: Signed::Fixed(signed_fields::REFUND_STATUS_ANSWER),
            },
        }
    }

    /// A `/walletrefund` answer.
    pub fn refund(
        code: Code,
        message: &str,
        txid: &str,
        refundid: &str,
        amount: &str,
        refid: &str,
    ) -> Answer {
        Answer {
            fields: vec![
                ("txid", txid.to_string()),
                ("refundid", refundid.to_string()),
                ("amount", amount.to_string()),
                ("refid", refid.to_string()),
                ("status", code.status().into()),
                ("statuscode", code.number().to_string()),
                ("statusmessage", message.to_string()),
            ],
            signed: Signed::Sorted,
        }
    }

    /// The standard head of a msgcode API answer.
    pub fn status(msgcode: &str, code: Code) -> Answer {
        Answer::status_with(msgcode, code, code.description())
    }

    /// A `/debitwallet` failure: the head, and the orderid when one was sent.
    pub fn debit_failure(msgcode: &str, code: Code, orderid: &str) -> Answer {
        let a = Answer::status(msgcode, code);
        if orderid.is_empty() {
            a
        } else {
            a.with("orderid", orderid)
        }
    }

    pub fn status_with(msgcode: &str, code: Code, description: impl Into<String>) -> Answer {
        Answer {
            fields: vec![
                ("messagecode", msgcode.to_string()),
                ("status", code.status().into()),
                ("statuscode", code.number().to_string()),
                ("statusdescription", description.into()),
            ],
            signed: Signed::Sorted,
        }
    }

    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Answer {
        self.fields.push((name, value.into()));
        self
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> Option<&str> {
        self.get("statuscode")
    }

    /// Signs (with the merchant's secret; an empty checksum when the merchant
    /// is unknown) and encodes: the body and its content type.
    fn encode(mut self, secret: Option<&[u8]>, format: Format) -> (String, &'static str) {
        if format == Format::Xml {
            for (_, v) in &mut self.fields {
                if !v.chars().all(xml_char) {
                    v.retain(xml_char);
                }
            }
        }
        let checksum = match secret {
            None => String::new(),
            Some(secret) => {
                let pairs: Vec<(&str, &str)> =
                    self.fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                match self.signed {
                    Signed::Sorted => checksum::sign_sorted(secret, &pairs),
                    Signed::Withheld => String::new(),
                    Signed::Fixed(order) => checksum::sign(
                        secret,
                        order.iter().map(|name| {
                            pairs
                                .iter()
                                .find(|(k, _)| k == name)
                                .map_or("", |(_, v)| *v)
                        }),
                    ),
                }
            }
        };
        let (body, content_type) = match format {
            Format::Json => (encode_json(&self.fields, &checksum), "application/json"),
            Format::Xml => (
                encode_xml(&self.fields, &checksum),
                "text/xml; charset=UTF-8",
            ),
        };
        (body, content_type)
    }

    /// Signs, encodes and wraps in a response.
    pub fn render(self, secret: Option<&[u8]>, format: Format) -> Response {
        if matches!(self.signed, Signed::Withheld) {
            return payrail_railkit::Unanswered::response();
        }
        let (body, content_type) = self.encode(secret, format);
        let mut resp = (StatusCode::OK, body).into_response();
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }
}

fn encode_json(fields: &[(&'static str, String)], checksum: &str) -> String {
    let mut out = String::with_capacity(64 + fields.len() * 32);
    out.push('{');
    for (k, v) in fields
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("checksum", checksum)])
    {
        if out.len() > 1 {
            out.push(',');
        }
        out.push('"');
        out.push_str(k);
        out.push_str("\":");
        // Field names are ours; values are escaped by serde_json.
        out.push_str(&serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into()));
    }
    out.push('}');
    out
}

/// Whether XML 1.0 can carry `c` in element content. Most control
/// characters it cannot, not even as character references, and a refused
/// request's answer repeats the field it refused. The XML answer drops them
/// before it is signed, so that its checksum verifies over the text a
/// client reads.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn encode_xml(fields: &[(&'static str, String)], checksum: &str) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<wallet>");
    for (k, v) in fields
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("checksum", checksum)])
    {
        out.push('<');
        out.push_str(k);
        out.push('>');
        for c in v.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                // A parser reads a literal CR as LF.
                '\r' => out.push_str("&#13;"),
                c => out.push(c),
            }
        }
        out.push_str("</");
        out.push_str(k);
        out.push('>');
    }
    out.push_str("</wallet>\n");
    out
}

// ------------------------------------------------------------- field syntax

/// A mobile number: 10 digits starting with 7, 8 or 9.
pub fn valid_cell(cell: &str) -> bool {
    cell.len() == 10
        && cell.bytes().all(|b| b.is_ascii_digit())
        && matches!(cell.as_bytes()[0], b'7'..=b'9')
}

/// An orderid: 8 to 30 characters (51) of letters, digits, `_` and `-` (52).
pub fn check_orderid(orderid: &str) -> Result<(), Code> {
    if !(8..=30).contains(&orderid.len()) {
        return Err(Code::OrderIdLength);
    }
    if !orderid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Code::OrderIdChars);
    }
    Ok(())
}

/// A merchant alias: 1 to 30 letters, digits and spaces (real clients send
/// `Test Merchant`), plus `.`, `_`, `-` and `&`.
pub fn valid_merchantname(name: &str) -> bool {
    (1..=30).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'.' | b'_' | b'-' | b'&'))
}

/// An identifier chosen by a client (refund ids, coupon codes, mids):
/// 1 to `max` letters, digits, `_` and `-`.
pub fn valid_ident(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A plausible email address (the provider's rule is not published).
pub fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.bytes().all(|b| b.is_ascii_graphic())
        && !domain.contains('@')
}

/// A wire amount; `positive` for amounts that move money or cap it.
pub fn parse_amount(text: &str, positive: bool) -> Result<Money, Code> {
    match Money::parse(text) {
        Ok(m) if positive && !m.is_positive() => Err(Code::AmountInvalid),
        Ok(m) => Ok(m),
        Err(_) => Err(Code::AmountInvalid),
    }
}

/// Text without control characters, at most `max` bytes.
pub fn valid_text(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fields() {
        assert!(valid_cell("9311032820"));
        for bad in [
            "6311032820",
            "931103282",
            "93110328200",
            "931103282a",
            "+919311032",
        ] {
            assert!(!valid_cell(bad), "{bad}");
        }
        assert_eq!(check_orderid("ORDER_123456"), Ok(()));
        assert_eq!(check_orderid("SHORT"), Err(Code::OrderIdLength));
        assert_eq!(check_orderid(&"A".repeat(31)), Err(Code::OrderIdLength));
        assert_eq!(check_orderid("ORDER 123456"), Err(Code::OrderIdChars));
        assert!(valid_merchantname("Test Merchant"));
        assert!(!valid_merchantname(""));
        assert!(!valid_merchantname("It's"));
        assert!(valid_email("a.b@example.com"));
        for bad in ["a@b", "@b.com", "a@@b.com", "a b@c.com", "a@.com"] {
            assert!(!valid_email(bad), "{bad}");
        }
        assert_eq!(parse_amount("0", true), Err(Code::AmountInvalid));
        assert_eq!(parse_amount("0", false), Ok(Money::ZERO));
    }

    #[test]
    fn params_from_query_and_body() {
        let p = Params::from_parts(
            Some("mid=MBK9006&merchantname=Test%20Merchant"),
            b"amount=1&merchantname=Test+Merchant",
        );
        assert_eq!(p.get("mid"), "MBK9006");
        assert_eq!(p.get("merchantname"), "Test Merchant");
        assert_eq!(p.get("amount"), "1");
        assert_eq!(p.get("absent"), "");
        assert!(p.malformed.is_none());
        let twice = Params::from_parts(Some("amount=1&amount=2"), b"");
        assert_eq!(twice.malformed, Some("parameter given twice"));
        let long = Params::from_parts(Some(&format!("comment={}", "x".repeat(600))), b"");
        assert_eq!(long.malformed, Some("parameter too long"));
    }

    /// Bytes that are not UTF-8 would otherwise read as U+FFFD, so that
    /// `%FF` and `%FE` were one value under one checksum.
    #[test]
    fn values_that_are_not_utf8_are_malformed() {
        for (query, body) in [
            ("comment=%FF", &b""[..]),
            ("comment=a%C3", b""),
            ("c%FEomment=a", b""),
            ("mid=MBK9006", b"comment=\xff"),
            ("mid=MBK9006", b"comment=%E2%82"),
        ] {
            let p = Params::from_parts(Some(query), body);
            assert_eq!(p.malformed, Some("not UTF-8"), "{query} {body:?}");
        }
        // U+FFFD itself, and other characters, sent as UTF-8 are fine.
        let p = Params::from_parts(Some("comment=%EF%BF%BD&x=%C3%A9"), "y=\u{fffd}€".as_bytes());
        assert!(p.malformed.is_none(), "{:?}", p.malformed);
        assert_eq!(p.get("comment"), "\u{fffd}");
    }

    #[test]
    fn encodings_escape_values() {
        let a = Answer::status("504", Code::Ok).with("comment", "<a & \"b\">");
        let fields = a.fields.clone();
        let json = encode_json(&fields, "abc");
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["comment"], "<a & \"b\">");
        assert_eq!(parsed["checksum"], "abc");
        let xml = encode_xml(&fields, "abc");
        assert!(xml.contains("<comment>&lt;a &amp; &quot;b&quot;&gt;</comment>"));
        assert!(xml.starts_with("<?xml") && xml.contains("<wallet><messagecode>504</messagecode>"));
    }

    #[test]
    fn codes_are_distinct() {
        let mut numbers: Vec<u16> = Code::ALL.iter().map(|c| c.number()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), Code::ALL.len());
    }

    /// Encodes a signed XML answer carrying `orderid`, reads it back as a
    /// client does, and checks its checksum over what was read.
    fn xml_round_trip(orderid: &str) -> (String, String) {
        let secret = b"secret";
        let answer = Answer::status("504", Code::OrderIdChars).with("orderid", orderid);
        let (body, _) = answer.encode(Some(secret), Format::Xml);
        let fields = crate::client::parse_xml(&body).expect("the answer parses");
        let (signed, checksum): (Vec<_>, Vec<_>) =
            fields.iter().partition(|(k, _)| k != "checksum");
        let pairs: Vec<(&str, &str)> = signed
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(checksum[0].1, checksum::sign_sorted(secret, &pairs));
        let read = pairs.iter().find(|(k, _)| *k == "orderid").unwrap().1;
        (body, read.to_string())
    }

    #[test]
    fn xml_answers_carry_only_what_xml_can() {
        let (body, read) = xml_round_trip("ORDER\u{1}_\r\n\u{FFFF}<1>");
        assert!(body.chars().all(xml_char), "{body:?}");
        assert!(
            body.contains("<orderid>ORDER_&#13;\n&lt;1&gt;</orderid>"),
            "{body}"
        );
        assert_eq!(read, "ORDER_\r\n<1>");
    }

    proptest! {
        #[test]
        fn xml_answers_read_back_as_signed(orderid in "\\PC{0,40}|[\\x00-\\x20&<>#;]{0,20}") {
            let (body, read) = xml_round_trip(&orderid);
            prop_assert!(body.chars().all(xml_char));
            let kept: String = orderid.chars().filter(|&c| xml_char(c)).collect();
            prop_assert_eq!(read, kept);
        }

        #[test]
        fn params_never_panic(query in "\\PC{0,200}", body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let p = Params::from_parts(Some(&query), &body);
            prop_assert!(p.pairs.len() <= MAX_PARAMS);
        }

        #[test]
        fn params_round_trip(pairs in proptest::collection::btree_map("[a-z]{1,8}", "\\PC{0,20}", 0..10)) {
            let encoded: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
            let p = Params::from_parts(Some(&encoded), b"");
            for (k, v) in &pairs {
                prop_assert_eq!(p.get(k), v.as_str());
            }
        }
    }
}
