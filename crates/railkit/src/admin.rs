//! The admin API's conventions, shared by the server and every rail: JSON in,
//! JSON out, errors as `{"error":{"code":"…","message":"…"}}` with a 4xx that
//! fits, amounts as decimal strings.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use payrail_core::LedgerError;
use payrail_core::{Money, Percent};
use payrail_store::{LedgerOpError, StoreError};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// An admin API error. The message is for the caller: it never carries
/// internals, which are logged instead.
#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Logged when the answer is made, not when the error is: an error made
    /// inside a unit of work is made on a writer thread, outside the
    /// request's span, and its log line would lack the request's id.
    log: Option<Log>,
}

#[derive(Debug)]
enum Log {
    Internal(String),
    Unavailable(String),
    /// No answer at all: see [`crate::Unanswered`].
    OutcomeUnknown,
}

impl AdminError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            code,
            message: message.into(),
            log: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn unauthorized() -> AdminError {
        AdminError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid 'Authorization: Bearer <admin token>' header is required",
        )
    }

    /// Answers without `detail`, which is logged with the answer (inside
    /// the request's span, which carries its id).
    pub fn internal(detail: impl std::fmt::Debug) -> AdminError {
        AdminError {
            log: Some(Log::Internal(format!("{detail:?}"))),
            ..AdminError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; see the server log for this request id",
            )
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> AdminError {
        match e {
            StoreError::Unavailable(_)
            | StoreError::Closed
            | StoreError::Busy(_)
            | StoreError::Overloaded => AdminError {
                log: Some(Log::Unavailable(format!("{e:?}"))),
                ..AdminError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is unavailable; retry",
                )
            },
            StoreError::OutcomeUnknown => AdminError {
                log: Some(Log::OutcomeUnknown),
                ..AdminError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    "never sent",
                )
            },
            other => AdminError::internal(other),
        }
    }
}

impl From<LedgerOpError> for AdminError {
    fn from(e: LedgerOpError) -> AdminError {
        match e {
            LedgerOpError::Store(s) => s.into(),
            LedgerOpError::Rejected(LedgerError::IdempotencyConflict { field }) => {
                AdminError::conflict(format!(
                    "that reference was already used for a different operation (its {field} differs)"
                ))
            }
            LedgerOpError::Rejected(r @ LedgerError::InsufficientFunds(_)) => AdminError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "insufficient_funds",
                r.to_string(),
            ),
            LedgerOpError::Rejected(r @ LedgerError::TotalOverflow(_)) => AdminError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "account_total_overflow",
                r.to_string(),
            ),
            LedgerOpError::Rejected(r) => AdminError::bad_request(r.to_string()),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match &self.log {
            Some(Log::Internal(detail)) => tracing::error!(error = %detail, "admin request failed"),
            Some(Log::Unavailable(detail)) => tracing::warn!(error = %detail, "store unavailable"),
            Some(Log::OutcomeUnknown) => {
                tracing::error!("the request's outcome is unknown; it is left unanswered");
                return crate::Unanswered::response();
            }
            None => {}
        }
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, axum::Json(body)).into_response();
        // RFC 9110, 15.5.2: a 401 says which scheme would do.
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"payrail admin\""),
            );
        }
        response
    }
}

/// `Json<T>` whose rejections are admin errors: 415 without a JSON content
/// type, 413 over the size limit, 400 for malformed or invalid bodies.
pub struct AdminJson<T>(pub T);

impl<S, T> FromRequest<S> for AdminJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AdminError;

    /// Every admin body is a JSON object, and anything else is refused
    /// before `T` sees it: serde's derive would read an array as the
    /// struct's fields in order (`["9000000001"]` made a wallet, `[60]`
    /// moved the sandbox clock), and for a string, number or null its
    /// message names the Rust type instead of what to send.
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(raw) = axum::Json::<Box<RawValue>>::from_request(req, state)
            .await
            .map_err(json_rejection)?;
        if !raw.get().starts_with('{') {
            return Err(AdminError::bad_request("the body must be a JSON object"));
        }
        match axum::Json::<T>::from_bytes(raw.get().as_bytes()) {
            Ok(axum::Json(v)) => Ok(AdminJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// `Path<T>` whose rejections (a segment that is not UTF-8 after decoding,
/// or not a `T`) are admin errors.
pub struct AdminPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for AdminPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(AdminPath(v)),
            Err(r) => Err(AdminError::bad_request(r.body_text())),
        }
    }
}

fn json_rejection(r: JsonRejection) -> AdminError {
    let status = r.status();
    match r {
        JsonRejection::MissingJsonContentType(_) => AdminError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON with 'Content-Type: application/json'",
        ),
        JsonRejection::JsonDataError(e) => AdminError::bad_request(without_values(&e.body_text())),
        JsonRejection::JsonSyntaxError(e) => {
            AdminError::bad_request(without_values(&e.body_text()))
        }
        other if status == StatusCode::PAYLOAD_TOO_LARGE => {
            AdminError::new(status, "payload_too_large", other.body_text())
        }
        other => AdminError::new(status, "invalid_request", other.body_text()),
    }
}

/// serde names the field and the kind of a value it refused, and quotes the
/// value itself ("invalid type: integer `123…`"). The value may be a secret
/// sent in the wrong shape, so it is cut out; field names (also in
/// backticks, after "field") stay, as they say what to fix.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = ["invalid type: ", "invalid value: ", "invalid length "]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| i + p.len()))
        .min()
    {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        // The kind ("integer", "string", "floating point", ...) stays; the
        // quoted value after it goes.
        let Some(open) = rest.find(['`', '"', ',']) else {
            break;
        };
        out.push_str(&rest[..open]);
        let quote = rest.as_bytes()[open];
        if quote == b',' {
            rest = &rest[open..];
            continue;
        }
        let mut close = None;
        let mut escaped = false;
        for (i, c) in rest[open + 1..].char_indices() {
            match c {
                '\\' if quote == b'"' && !escaped => escaped = true,
                c if c == char::from(quote) && !escaped => {
                    close = Some(open + 1 + i);
                    break;
                }
                _ => escaped = false,
            }
        }
        out.push('…');
        rest = match close {
            Some(c) => &rest[c + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Reads a JSON string or number token as text, without ever going through a
/// float.
fn decimal_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw: Box<RawValue> = Deserialize::deserialize(d)?;
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(D::Error::custom)
    } else if text.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        Ok(text.to_string())
    } else {
        Err(D::Error::custom(
            "expected a decimal string such as \"100.00\"",
        ))
    }
}

/// Deserializes an amount: `"150.50"` (preferred) or `150.50`.
pub fn money<'de, D: Deserializer<'de>>(d: D) -> Result<Money, D::Error> {
    let text = decimal_text(d)?;
    // The text is not repeated: whatever was sent in its place is not echoed.
    Money::parse(&text).map_err(|e| D::Error::custom(format!("invalid amount: {e}")))
}

/// Deserializes an amount that may be left out or sent as `null`, both of
/// which mean "none" (`#[serde(default)]` covers the field left out).
pub fn optional_money<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Money>, D::Error> {
    let raw: Option<Box<RawValue>> = Deserialize::deserialize(d)?;
    match raw {
        None => Ok(None),
        Some(raw) => money(raw.as_ref()).map(Some).map_err(D::Error::custom),
    }
}

/// For an optional field whose absence is its default (an empty list):
/// `null` means the same.
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Deserializes a percentage with up to two decimals: `"20"`, `12.5`.
pub fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<Percent, D::Error> {
    let text = decimal_text(d)?;
    Percent::parse(&text).map_err(|e| D::Error::custom(format!("invalid percent: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A log writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Work whose outcome is unknown, from the store directly or through a
    /// ledger operation, gets no answer: the response is only a placeholder
    /// marked for the HTTP loop to close the connection on. Other
    /// unavailability is an ordinary 503 with its body.
    #[test]
    fn an_unknown_outcome_is_left_unanswered_and_other_store_failures_are_503() {
        let unanswered = |r: &Response| r.extensions().get::<crate::Unanswered>().is_some();
        let direct = AdminError::from(StoreError::OutcomeUnknown).into_response();
        assert!(unanswered(&direct));
        let via_ledger =
            AdminError::from(LedgerOpError::Store(StoreError::OutcomeUnknown)).into_response();
        assert!(unanswered(&via_ledger));
        for e in [
            StoreError::Unavailable("down".into()),
            StoreError::Closed,
            StoreError::Overloaded,
        ] {
            let r = AdminError::from(e).into_response();
            assert!(!unanswered(&r));
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    }

    /// Errors made inside a unit of work are made on a writer thread; their
    /// log lines must still carry the request's id, so they are logged when
    /// the answer is made, inside the request's span.
    #[test]
    fn errors_made_off_the_request_are_logged_in_its_span() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let out = out.clone();
                move || out.clone()
            })
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let (internal, busy) = std::thread::spawn(|| {
                (
                    AdminError::internal("the disk is on fire"),
                    AdminError::from(StoreError::Overloaded),
                )
            })
            .join()
            .unwrap();
            let span = tracing::info_span!("request", id = "req-7f3a");
            let _in = span.enter();
            assert_eq!(
                internal.into_response().status(),
                StatusCode::INTERNAL_SERVER_ERROR
            );
            assert_eq!(
                busy.into_response().status(),
                StatusCode::SERVICE_UNAVAILABLE
            );
        });
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains("the disk is on fire"),
            "{log}"
        );
        assert!(
            lines[1].contains("WARN") && lines[1].contains("Overloaded"),
            "{log}"
        );
        assert!(lines.iter().all(|l| l.contains("req-7f3a")), "{log}");
    }

    #[derive(Deserialize, Debug)]
    struct Body {
        #[serde(deserialize_with = "money")]
        amount: Money,
    }

    #[test]
    fn refused_values_are_not_repeated() {
        for (message, kept) in [
            (
                "secret: invalid type: integer `123456789012`, expected a string at line 1 column 40",
                "secret: invalid type: integer …, expected a string at line 1 column 40",
            ),
            (
                r#"cell: invalid type: string "S3cret\"x`y", expected u32"#,
                "cell: invalid type: string …, expected u32",
            ),
            (
                "invalid value: floating point `1.5`, expected u8",
                "invalid value: floating point …, expected u8",
            ),
            (
                "unknown field `secrett`, expected one of `mid`, `secret`",
                "unknown field `secrett`, expected one of `mid`, `secret`",
            ),
            (
                "invalid type: map, expected a string",
                "invalid type: map, expected a string",
            ),
            (
                "invalid type: string \"unterminated",
                "invalid type: string …",
            ),
        ] {
            assert_eq!(without_values(message), kept);
        }
    }

    #[test]
    fn amounts_as_strings_or_numbers_never_floats() {
        let b: Body = serde_json::from_str(r#"{"amount":"150.50"}"#).unwrap();
        assert_eq!(b.amount, Money::from_minor(15050));
        let b: Body = serde_json::from_str(r#"{"amount":150.5}"#).unwrap();
        assert_eq!(b.amount, Money::from_minor(15050));
        for bad in [
            r#"{"amount":"1.234"}"#,
            r#"{"amount":-1}"#,
            r#"{"amount":1e3}"#,
            r#"{"amount":true}"#,
            r#"{"amount":null}"#,
        ] {
            assert!(serde_json::from_str::<Body>(bad).is_err(), "{bad}");
        }
    }

    #[derive(Deserialize, Debug)]
    #[expect(dead_code, reason = "only deserialized, to make serde's messages")]
    struct Typed {
        cell: u32,
        secret: String,
    }

    /// `kept` is `head` and then serde's " at line 1 column N", nothing else.
    fn only_the_position_follows(kept: &str, head: &str) -> bool {
        kept.strip_prefix(head)
            .and_then(|rest| rest.strip_prefix(" at line 1 column "))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// `digits[.d[d]]`: the only amount text there is.
    fn amount_grammar(text: &str) -> bool {
        let (int, frac) = text
            .split_once('.')
            .map_or((text, None), |(i, f)| (i, Some(f)));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        digits(int) && frac.is_none_or(|f| digits(f) && f.len() <= 2)
    }

    #[test]
    fn texts_only_a_float_would_take_are_refused() {
        // Each is the same number as an accepted amount once read into an
        // f64; read as text they have too many decimals.
        for text in ["1.000", "0.070", "1.0000000000000001", "150.500"] {
            for json in [
                format!(r#"{{"amount":"{text}"}}"#),
                format!(r#"{{"amount":{text}}}"#),
            ] {
                assert!(serde_json::from_str::<Body>(&json).is_err(), "{json}");
            }
        }
    }

    proptest! {
        /// Every amount, as a string or as a bare JSON number, with two, one
        /// or no decimals, arrives as exactly that many hundredths. Small
        /// amounts, where the cents are most of the value, are drawn as
        /// often as large ones.
        #[test]
        fn every_amount_arrives_exact_as_string_or_number(
            units in prop_oneof![0..=100i64, 0..=Money::MAX.minor() / 100],
            cents in 0..100i64,
        ) {
            let minor = units * 100 + cents;
            let mut forms = vec![format!("{units}.{cents:02}")];
            if cents % 10 == 0 {
                forms.push(format!("{units}.{}", cents / 10));
            }
            if cents == 0 {
                forms.push(units.to_string());
            }
            for text in forms {
                for json in [format!(r#"{{"amount":"{text}"}}"#), format!(r#"{{"amount":{text}}}"#)] {
                    let b: Body = serde_json::from_str(&json)
                        .map_err(|e| TestCaseError::fail(format!("{json}: {e}")))?;
                    prop_assert_eq!(b.amount, Money::from_minor(minor), "{}", json);
                }
            }
        }

        /// Whatever stands where an amount goes, deserializing never panics;
        /// it accepts only text in the amount's grammar, as exactly what that
        /// text says; and a string is accepted whenever the text is an amount.
        #[test]
        fn any_amount_value_is_refused_or_exact(
            text in prop_oneof!["[-+0-9.eE]{0,16}", "[0-9]{1,14}(\\.[0-9]{0,4})?", "\\PC{0,12}"],
            quoted in any::<bool>(),
        ) {
            let value = if quoted { serde_json::to_string(&text).unwrap() } else { text.clone() };
            let json = format!(r#"{{"amount":{value}}}"#);
            match serde_json::from_str::<Body>(&json) {
                Ok(b) => {
                    prop_assert!(amount_grammar(&text), "{} accepted", json);
                    prop_assert_eq!(Money::parse(&text), Ok(b.amount), "{}", json);
                }
                Err(_) if quoted => prop_assert!(Money::parse(&text).is_err(), "{} refused", json),
                Err(_) => {}
            }
        }

        /// A value sent in the wrong shape, whatever its characters (quotes,
        /// backslashes and backticks included), is cut out of serde's
        /// message: only the kind and what was expected remain.
        #[test]
        fn a_misplaced_value_never_reaches_the_message(
            secret in "\\PC{1,40}",
            digits in "[1-9][0-9]{0,17}",
        ) {
            let json = format!(r#"{{"cell":{},"secret":"x"}}"#, serde_json::to_string(&secret).unwrap());
            let message = format!("cell: {}", serde_json::from_str::<Typed>(&json).unwrap_err());
            let kept = without_values(&message);
            prop_assert!(only_the_position_follows(&kept, "cell: invalid type: string …, expected u32"), "{}", kept);

            let json = format!(r#"{{"cell":1,"secret":{digits}}}"#);
            let message = format!("secret: {}", serde_json::from_str::<Typed>(&json).unwrap_err());
            let kept = without_values(&message);
            prop_assert!(
                only_the_position_follows(&kept, "secret: invalid type: integer …, expected a string"),
                "{}",
                kept
            );
        }
    }
}
