//! The client side: builds signed requests and verifies the answers'
//! checksums. Used by the tests, the CLI and the load harness.

use secrecy::{ExposeSecret, SecretString};

use crate::checksum;
use crate::wire::signed_fields as fields;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed answer: {0}")]
    Malformed(String),
}

/// A signed request, ready to send (or to tamper with, in tests).
#[derive(Clone, Debug)]
pub struct SignedRequest {
    pub path: &'static str,
    pub params: Vec<(String, String)>,
}

impl SignedRequest {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces (or adds) a parameter, leaving the checksum as it was.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some(p) => p.1 = value,
            None => self.params.push((name.to_string(), value)),
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.params.retain(|(k, _)| k != name);
    }

    /// The query string (or form body).
    pub fn encoded(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.params)
            .finish()
    }
}

/// An answer: its fields in the order received, and whether its checksum
/// verified with the merchant's secret.
#[derive(Clone, Debug)]
pub struct WalletResponse {
    pub fields: Vec<(String, String)>,
    pub checksum_ok: bool,
}

impl WalletResponse {
    /// A field's value, `""` if absent.
    pub fn get(&self, name: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == name)
    }

    pub fn statuscode(&self) -> &str {
        self.get("statuscode")
    }

    pub fn is_success(&self) -> bool {
        self.statuscode() == "0"
    }
}

/// A debit, with every value as it goes on the wire.
#[derive(Clone, Debug)]
pub struct Debit<'a> {
    pub cell: &'a str,
    pub amount: &'a str,
    pub orderid: &'a str,
    pub token: &'a str,
    pub comment: Option<&'a str>,
    pub coupon: Option<&'a str>,
    pub msgcode: &'a str,
}

impl<'a> Debit<'a> {
    pub fn new(cell: &'a str, amount: &'a str, orderid: &'a str, token: &'a str) -> Debit<'a> {
        Debit {
            cell,
            amount,
            orderid,
            token,
            comment: None,
            coupon: None,
            msgcode: "504",
        }
    }
}

/// Response format asked for with the `payloadtype` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Json,
    Xml,
}

/// A merchant's client for one payrail (or provider) base URL.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    pub mid: String,
    pub merchantname: String,
    secret: SecretString,
    regen_secret: Option<SecretString>,
    aggregated_id: Option<String>,
    /// Send POST form bodies instead of GET query strings.
    pub post: bool,
    pub payload: Payload,
}

impl Client {
    pub fn new(base: &str, mid: &str, merchantname: &str, secret: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            mid: mid.into(),
            merchantname: merchantname.into(),
            secret: SecretString::from(secret.to_string()),
            regen_secret: None,
            aggregated_id: None,
            post: false,
            payload: Payload::Json,
        }
    }

    /// The sandbox's merchant, `MBK9006`.
    pub fn sandbox(base: &str) -> Client {
        use crate::fixtures::*;
        Client::new(base, MID, MERCHANT_NAME, SECRET)
    }

    pub fn with_http(mut self, http: reqwest::Client) -> Client {
        self.http = http;
        self
    }

    pub fn with_regen_secret(mut self, secret: &str) -> Client {
        self.regen_secret = Some(SecretString::from(secret.to_string()));
        self
    }

    /// Signs as an aggregator on behalf of `id`.
    pub fn with_aggregator(mut self, id: &str) -> Client {
        self.aggregated_id = Some(id.into());
        self
    }

    fn secret(&self, regen: bool) -> &[u8] {
        match (&self.regen_secret, regen) {
            (Some(s), true) => s.expose_secret().as_bytes(),
            _ => self.secret.expose_secret().as_bytes(),
        }
    }

    /// Signs `params` over `signed` (in order, absent as `''`, the
    /// aggregator id appended when set).
    pub fn sign(
        &self,
        path: &'static str,
        signed: &[&str],
        params: Vec<(&str, String)>,
        regen: bool,
    ) -> SignedRequest {
        let mut params: Vec<(String, String)> = params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if let Some(a) = &self.aggregated_id {
            params.push(("aggregatedMerchantId".into(), a.clone()));
        }
        let value = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let mut values: Vec<&str> = signed.iter().map(|f| value(f)).collect();
        if let Some(a) = &self.aggregated_id {
            values.push(a);
        }
        let sum = checksum::sign(self.secret(regen), values);
        params.push(("checksum".into(), sum));
        SignedRequest { path, params }
    }

    fn base_params(&self, msgcode: &str) -> Vec<(&'static str, String)> {
        vec![
            ("mid", self.mid.clone()),
            ("merchantname", self.merchantname.clone()),
            ("msgcode", msgcode.to_string()),
        ]
    }

    pub fn otp_generate_request(&self, cell: &str, amount: &str) -> SignedRequest {
        let mut p = self.base_params("504");
        p.extend([
            ("cell", cell.into()),
            ("amount", amount.into()),
            ("tokentype", "1".into()),
        ]);
        self.sign("/otpgenerate", fields::OTP_GENERATE, p, false)
    }

    pub fn token_from_otp_request(&self, cell: &str, amount: &str, otp: &str) -> SignedRequest {
        let mut p = self.base_params("507");
        p.extend([
            ("cell", cell.into()),
            ("amount", amount.into()),
            ("otp", otp.into()),
            ("tokentype", "1".into()),
        ]);
        self.sign("/tokengenerate", fields::TOKEN_FROM_OTP, p, false)
    }

    /// The seed's regeneration: `/tokengenerate` with `token` and a new cap.
    pub fn regenerate_with_cap_request(
        &self,
        cell: &str,
        amount: &str,
        token: &str,
    ) -> SignedRequest {
        let mut p = self.base_params("504");
        p.extend([
            ("cell", cell.into()),
            ("amount", amount.into()),
            ("token", token.into()),
            ("tokentype", "1".into()),
        ]);
        self.sign("/tokengenerate", fields::TOKEN_FROM_TOKEN, p, false)
    }

    /// The real clients' `/tokenregenerate` (cap kept), signed with the
    /// regeneration secret when one is set.
    pub fn regenerate_request(&self, cell: &str, token: &str) -> SignedRequest {
        let mut p = self.base_params("507");
        p.extend([
            ("cell", cell.into()),
            ("token", token.into()),
            ("tokentype", "1".into()),
        ]);
        self.sign("/tokenregenerate", fields::TOKEN_REGENERATE, p, true)
    }

    pub fn debit_request(&self, d: &Debit<'_>) -> SignedRequest {
        let mut p = self.base_params(d.msgcode);
        p.extend([
            ("cell", d.cell.into()),
            ("amount", d.amount.into()),
            ("orderid", d.orderid.into()),
            ("token", d.token.into()),
            ("txntype", "DEBIT".into()),
        ]);
        if let Some(c) = d.comment {
            p.push(("comment", c.into()));
        }
        if let Some(c) = d.coupon {
            p.push(("couponcode", c.into()));
        }
        self.sign("/debitwallet", fields::DEBIT_WITH_TOKEN, p, false)
    }

    pub fn balance_request(&self, cell: &str, token: &str) -> SignedRequest {
        let mut p = self.base_params("501");
        p.extend([("cell", cell.into()), ("token", token.into())]);
        self.sign("/userbalance", fields::USER_BALANCE, p, false)
    }

    pub fn query_wallet_request(&self, cell: &str) -> SignedRequest {
        let mut p = self.base_params("500");
        p.extend([
            ("cell", cell.into()),
            ("action", "existingusercheck".into()),
        ]);
        self.sign("/querywallet", fields::QUERY_WALLET, p, false)
    }

    pub fn create_wallet_user_request(&self, cell: &str, email: &str, otp: &str) -> SignedRequest {
        let mut p = self.base_params("502");
        p.extend([
            ("cell", cell.into()),
            ("email", email.into()),
            ("otp", otp.into()),
        ]);
        self.sign("/createwalletuser", fields::CREATE_WALLET_USER, p, false)
    }

    pub fn check_status_request(&self, orderid: &str, refundid: Option<&str>) -> SignedRequest {
        let mut p = vec![("mid", self.mid.clone()), ("orderid", orderid.to_string())];
        let signed = match refundid {
            Some(r) => {
                p.push(("refundid", r.to_string()));
                fields::CHECK_REFUND_STATUS
            }
            None => fields::CHECK_STATUS,
        };
        let mut req = self.sign("/checkstatus", signed, p, false);
        req.remove("aggregatedMerchantId");
        req
    }

    pub fn refund_request(
        &self,
        txid: &str,
        refundid: &str,
        amount: &str,
        partial: bool,
    ) -> SignedRequest {
        let p = vec![
            ("mid", self.mid.clone()),
            ("txid", txid.to_string()),
            ("refundid", refundid.to_string()),
            ("amount", amount.to_string()),
        ];
        let mut req = self.sign("/walletrefund", fields::WALLET_REFUND, p, false);
        req.remove("aggregatedMerchantId");
        if partial {
            req.set("ispartial", "yes");
        }
        req
    }

    /// Sends a request and verifies the answer's checksum.
    pub async fn send(&self, req: &SignedRequest) -> Result<WalletResponse, ClientError> {
        let url = format!("{}{}", self.base, req.path);
        let mut builder = if self.post {
            self.http.post(&url).form(&req.params)
        } else {
            self.http.get(&url).query(&req.params)
        };
        builder = builder.header(
            "payloadtype",
            match self.payload {
                Payload::Json => "json",
                Payload::Xml => "xml",
            },
        );
        let resp = builder.send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        if status != 200 {
            return Err(ClientError::Status { status, body });
        }
        let fields = match self.payload {
            Payload::Json => parse_json(&body)?,
            Payload::Xml => parse_xml(&body)?,
        };
        let checksum_ok = self.verify(req, &fields);
        Ok(WalletResponse {
            fields,
            checksum_ok,
        })
    }

    /// Checks an answer's checksum the way the endpoint signs it.
    pub fn verify(&self, req: &SignedRequest, fields: &[(String, String)]) -> bool {
        let Some(provided) = fields
            .iter()
            .find(|(k, _)| k == "checksum")
            .map(|(_, v)| v.as_str())
        else {
            return false;
        };
        let value = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let regen = req.path == "/tokenregenerate";
        let secret = self.secret(regen);
        if req.path == "/checkstatus" {
            let order = if req.get("refundid").is_some() {
                fields::REFUND_STATUS_ANSWER
            } else {
                fields::STATUS_ANSWER
            };
            checksum::verify(secret, order.iter().map(|f| value(f)), provided)
        } else {
            let pairs: Vec<(&str, &str)> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            checksum::verify(secret, checksum::sorted_values(&pairs), provided)
        }
    }

    pub async fn otp_generate(
        &self,
        cell: &str,
        amount: &str,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.otp_generate_request(cell, amount)).await
    }

    pub async fn token_from_otp(
        &self,
        cell: &str,
        amount: &str,
        otp: &str,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.token_from_otp_request(cell, amount, otp))
            .await
    }

    pub async fn regenerate_with_cap(
        &self,
        cell: &str,
        amount: &str,
        token: &str,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.regenerate_with_cap_request(cell, amount, token))
            .await
    }

    pub async fn regenerate(&self, cell: &str, token: &str) -> Result<WalletResponse, ClientError> {
        self.send(&self.regenerate_request(cell, token)).await
    }

    pub async fn debit(&self, d: &Debit<'_>) -> Result<WalletResponse, ClientError> {
        self.send(&self.debit_request(d)).await
    }

    pub async fn balance(&self, cell: &str, token: &str) -> Result<WalletResponse, ClientError> {
        self.send(&self.balance_request(cell, token)).await
    }

    pub async fn query_wallet(&self, cell: &str) -> Result<WalletResponse, ClientError> {
        self.send(&self.query_wallet_request(cell)).await
    }

    pub async fn create_wallet_user(
        &self,
        cell: &str,
        email: &str,
        otp: &str,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.create_wallet_user_request(cell, email, otp))
            .await
    }

    pub async fn check_status(&self, orderid: &str) -> Result<WalletResponse, ClientError> {
        self.send(&self.check_status_request(orderid, None)).await
    }

    pub async fn check_refund_status(
        &self,
        orderid: &str,
        refundid: &str,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.check_status_request(orderid, Some(refundid)))
            .await
    }

    pub async fn refund(
        &self,
        txid: &str,
        refundid: &str,
        amount: &str,
        partial: bool,
    ) -> Result<WalletResponse, ClientError> {
        self.send(&self.refund_request(txid, refundid, amount, partial))
            .await
    }
}

fn parse_json(body: &str) -> Result<Vec<(String, String)>, ClientError> {
    let value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| ClientError::Malformed(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| ClientError::Malformed("not a JSON object".into()))?;
    obj.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(ClientError::Malformed(format!(
                "{k} is {other}, not a string"
            ))),
        })
        .collect()
}

/// Reads the flat `<wallet><name>value</name>…</wallet>` answers.
pub(crate) fn parse_xml(body: &str) -> Result<Vec<(String, String)>, ClientError> {
    let bad = |m: &str| ClientError::Malformed(m.to_string());
    let start = body
        .find("<wallet>")
        .ok_or_else(|| bad("no <wallet> element"))?
        + "<wallet>".len();
    let end = body.rfind("</wallet>").ok_or_else(|| bad("no </wallet>"))?;
    let mut rest = &body[start..end];
    let mut out = Vec::new();
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>').ok_or_else(|| bad("unclosed tag"))? + open;
        let name = &rest[open + 1..close];
        let end_tag = format!("</{name}>");
        let value_end = rest[close..]
            .find(&end_tag)
            .ok_or_else(|| bad("missing end tag"))?
            + close;
        let value =
            unescape_xml(&rest[close + 1..value_end]).ok_or_else(|| bad("bad reference"))?;
        out.push((name.to_string(), value));
        rest = &rest[value_end + end_tag.len()..];
    }
    Ok(out)
}

/// Replaces XML's five named references and its character references.
fn unescape_xml(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';')? + amp;
        let c = match &rest[amp + 1..semi] {
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            "amp" => '&',
            r => {
                let (digits, radix) = match r.strip_prefix("#x") {
                    Some(hex) => (hex, 16),
                    None => (r.strip_prefix('#')?, 10),
                };
                if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                    return None;
                }
                char::from_u32(u32::from_str_radix(digits, radix).ok()?)?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_seed_debit_as_documented() {
        let c = Client::sandbox("http://x");
        let mut d = Debit::new(
            "9311032820",
            "150.50",
            "ORDER_123456",
            "MBK_TOKEN_123456789",
        );
        d.comment = Some("Payment for order");
        let req = c.debit_request(&d);
        let expected = checksum::sign(
            crate::fixtures::SECRET.as_bytes(),
            [
                "150.50",
                "9311032820",
                "Payment for order",
                "TestMerchant",
                "MBK9006",
                "504",
                "ORDER_123456",
                "MBK_TOKEN_123456789",
                "DEBIT",
            ],
        );
        assert_eq!(req.get("checksum"), Some(expected.as_str()));
        let agg = c.clone().with_aggregator("AGG123").debit_request(&d);
        assert_eq!(agg.get("aggregatedMerchantId"), Some("AGG123"));
        assert_ne!(agg.get("checksum"), req.get("checksum"));
    }

    #[test]
    fn parses_xml_answers() {
        let xml = "<?xml version=\"1.0\"?>\n<wallet><status>SUCCESS</status><statusdescription>a &amp; b</statusdescription><checksum></checksum></wallet>\n";
        let f = parse_xml(xml).unwrap();
        assert_eq!(
            f,
            vec![
                ("status".into(), "SUCCESS".into()),
                ("statusdescription".into(), "a & b".into()),
                ("checksum".into(), String::new()),
            ]
        );
        assert_eq!(
            unescape_xml("a&#13;&#x41;&amp;#13;&lt;").as_deref(),
            Some("a\rA&#13;<")
        );
        for bad in [
            "&",
            "&bogus;",
            "&#;",
            "&#+13;",
            "&#x;",
            "&#xD800;",
            "&#99999999;",
        ] {
            assert_eq!(unescape_xml(bad), None, "{bad}");
        }
    }
}
