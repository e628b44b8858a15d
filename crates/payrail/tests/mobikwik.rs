//! The Mobikwik-style wallet rail, from outside, through the real server:
//! the seed documents' samples, every status code on purpose, tampering,
//! token life cycle, OTPs, cashback, refunds, races.

mod support;

use payrail_mobikwik::checksum;
use payrail_mobikwik::client::{Client, Debit, Payload, SignedRequest, WalletResponse};
use payrail_mobikwik::fixtures::{MID, SECRET, TOKEN};
use reqwest::StatusCode;
use serde_json::json;
use support::{Server, cell, counts, orderid, tally};

const RICH: &str = "9311032820"; // 10000.00, holds the fixture token
const POOR: &str = "9910057241"; // 1000.00

async fn send(c: &Client, req: &SignedRequest) -> WalletResponse {
    let r = c.send(req).await.expect("request");
    assert!(r.checksum_ok, "answer checksum does not verify: {r:?}");
    r
}

fn assert_code(r: &WalletResponse, code: &str) {
    assert_eq!(r.statuscode(), code, "{r:?}");
    let status = if code == "0" { "SUCCESS" } else { "FAILURE" };
    assert_eq!(r.get("status"), status, "{r:?}");
}

/// A refusal sent before the request's checksum verified: it must carry no
/// checksum, or the server would sign text the sender chose.
async fn refused_unsigned(c: &Client, req: &SignedRequest, code: &str) -> WalletResponse {
    let r = c.send(req).await.expect("request");
    assert_code(&r, code);
    assert_eq!(r.get("checksum"), "", "{r:?}");
    r
}

fn seed_debit(c: &Client, orderid: &str, coupon: Option<&'static str>) -> SignedRequest {
    let mut d = Debit::new(RICH, "150.50", orderid, TOKEN);
    d.comment = Some("Payment for order");
    d.coupon = coupon;
    c.debit_request(&d)
}

#[tokio::test]
async fn the_seed_samples_succeed_as_written() {
    let s = Server::start().await;
    let c = s.client();

    // "With Coupon Code" sample.
    let r = send(&c, &seed_debit(&c, "ORDER_123456", Some("SAVE20"))).await;
    assert_code(&r, "0");
    assert_eq!(r.get("messagecode"), "504");
    assert_eq!(
        r.get("statusdescription"),
        "Transaction completed successfully"
    );
    assert_eq!(r.get("orderid"), "ORDER_123456");
    assert_eq!(
        (r.get("amount"), r.get("cashback"), r.get("net_debit")),
        ("150.50", "30.10", "120.40")
    );
    let txnid = r.get("txnid");
    assert!(
        txnid.len() >= 32 && txnid.starts_with("MBK_TXN_"),
        "{txnid}"
    );
    let keys: Vec<&str> = r.fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "messagecode",
            "status",
            "statuscode",
            "statusdescription",
            "orderid",
            "txnid",
            "amount",
            "cashback",
            "net_debit",
            "checksum"
        ]
    );

    // The plain sample repeats the orderid: refused, nothing moves.
    let r = send(&c, &seed_debit(&c, "ORDER_123456", None)).await;
    assert_code(&r, "304");
    assert_eq!(r.get("orderid"), "ORDER_123456");
    // With a fresh orderid it succeeds, without cashback.
    let r = send(&c, &seed_debit(&c, "ORDER_123457", None)).await;
    assert_code(&r, "0");
    assert_eq!((r.get("cashback"), r.get("net_debit")), ("0.00", "150.50"));
    assert_ne!(r.get("txnid"), txnid);

    assert_eq!(s.wallet_balance(RICH).await, "9729.10"); // 10000 - 120.40 - 150.50
    assert_eq!(s.merchant_balance(MID).await, "301.00");
    s.verify_ok().await;

    // The token regeneration sample: new token, old one dead at once.
    let r = send(&c, &c.regenerate_with_cap_request(RICH, "200", TOKEN)).await;
    assert_code(&r, "0");
    assert_eq!(r.get("statusdescription"), "Token regenerated successfully");
    let new_token = r.get("token").to_string();
    assert_eq!(new_token.len(), 32);
    assert_code(
        &send(&c, &seed_debit(&c, "ORDER_123458", None)).await,
        "302",
    );
    assert_code(
        &send(&c, &c.regenerate_with_cap_request(RICH, "200", TOKEN)).await,
        "201",
    );
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "150.50", "ORDER_123458", &new_token)),
    )
    .await;
    assert_code(&r, "0");
}

#[tokio::test]
async fn published_test_vectors_reproduce_on_the_wire() {
    let s = Server::start().await;
    let c = s.client();
    // otpgenerate vector, sent exactly as published.
    let req = SignedRequest {
        path: "/otpgenerate",
        params: [
            ("amount", "1"),
            ("cell", "9910057241"),
            ("merchantname", "TestMerchant"),
            ("mid", "MBK9006"),
            ("msgcode", "504"),
            ("tokentype", "1"),
            (
                "checksum",
                "abb25243ec1d608e10612c6dfa11e0e05a4591c4544acf18d604cd31ea23607d",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec(),
    };
    assert_code(&send(&c, &req).await, "0");
    // debitwallet vector: the checksum is accepted (the token is not ours).
    let req = SignedRequest {
        path: "/debitwallet",
        params: [
            ("amount", "1"),
            ("cell", "9910057241"),
            ("comment", "comment"),
            ("merchantname", "Test Merchant"),
            ("mid", "MBK9006"),
            ("msgcode", "503"),
            ("orderid", "INFO1111100003"),
            ("token", "320322754e14428ea85d80d7c732d772"),
            ("txntype", "debit"),
            (
                "checksum",
                "00f7c462b92e038653865f1f656ec1cea4f50745032e5bd9e73b7c62ec204712",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec(),
    };
    assert_code(&send(&c, &req).await, "302");
}

#[tokio::test]
async fn any_one_character_change_to_a_signed_parameter_is_refused() {
    let s = Server::start().await;
    let c = s.client();
    let original = seed_debit(&c, "TAMPER_000001", None);
    let signed = [
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
    for name in signed {
        let mut req = original.clone();
        let value = req.get(name).unwrap().to_string();
        let mut chars: Vec<char> = value.chars().collect();
        let last = chars.len() - 1;
        chars[last] = if chars[last] == '1' { '2' } else { '1' };
        req.set(name, chars.into_iter().collect::<String>());
        // An unknown mid is reported as such (22), unsigned; everything else is 80.
        if name == "mid" {
            let r = c.send(&req).await.unwrap();
            assert_eq!((r.statuscode(), r.get("checksum")), ("22", ""));
        } else {
            let r = refused_unsigned(&c, &req, "80").await;
            assert_eq!(r.get("statusdescription"), "Checksum Mismatch");
        }
    }
    // Dropping the optional comment is a change too.
    let mut req = original.clone();
    req.remove("comment");
    refused_unsigned(&c, &req, "80").await;
    // couponcode is not signed (as the seed says): changing it is not tampering.
    let mut req = original.clone();
    req.set("couponcode", "SAVE20");
    let r = send(&c, &req).await;
    assert_code(&r, "0");
    assert_eq!(r.get("cashback"), "30.10");
    assert_eq!(s.wallet_balance(RICH).await, "9879.60");
}

#[tokio::test]
async fn get_and_post_are_the_same_and_xml_on_request() {
    let s = Server::start().await;
    let mut c = s.client();
    c.post = true;
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "10", "POSTFORM_0001", TOKEN)),
    )
    .await;
    assert_code(&r, "0");
    assert_eq!(r.get("amount"), "10.00");
    c.post = false;
    c.payload = Payload::Xml;
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "10.5", "XMLQUERY_0001", TOKEN)),
    )
    .await;
    assert_code(&r, "0");
    assert_eq!(r.get("amount"), "10.50");
    let raw = s
        .http
        .get(s.url("/debitwallet"))
        .query(
            &c.debit_request(&Debit::new(RICH, "1", "XMLQUERY_0002", TOKEN))
                .params,
        )
        .header("payloadtype", "xml")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::OK);
    assert!(
        raw.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/xml")
    );
    let body = raw.text().await.unwrap();
    assert!(
        body.contains("<wallet><messagecode>504</messagecode><status>SUCCESS</status>"),
        "{body}"
    );
    assert_eq!(s.wallet_balance(RICH).await, "9978.50");

    // A refused orderid is repeated in the answer. XML 1.0 cannot carry a
    // control character; the answer leaves it out and still verifies.
    let bad = c.debit_request(&Debit::new(RICH, "1", "XMLQUERY\u{1}_0003\r", TOKEN));
    let r = send(&c, &bad).await;
    assert_code(&r, "52");
    assert_eq!(r.get("orderid"), "XMLQUERY_0003\r");
    let raw = s
        .http
        .get(s.url("/debitwallet"))
        .query(&bad.params)
        .header("payloadtype", "xml")
        .send()
        .await
        .unwrap();
    let body = raw.text().await.unwrap();
    assert!(
        body.contains("<orderid>XMLQUERY_0003&#13;</orderid>") && !body.contains('\u{1}'),
        "{body:?}"
    );
}

/// Every endpoint takes GET and POST; any other method, HEAD too, gets 405
/// with an Allow header, and a body in the endpoint's failure shape (151,
/// unsigned), JSON or XML as asked. A signed debit sent with PUT or HEAD moves nothing,
/// and leaves its orderid free.
#[tokio::test]
async fn other_methods_get_405_in_the_rails_shape() {
    let s = Server::start().await;
    let c = s.client();
    let debit = c.debit_request(&Debit::new(RICH, "10", "METHOD_0001", TOKEN));
    let r = s
        .http
        .put(s.url("/debitwallet"))
        .query(&debit.params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, POST");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["messagecode"], "504", "{v}");
    assert_eq!(v["status"], "FAILURE", "{v}");
    assert_eq!(v["statuscode"], "151", "{v}");
    assert_eq!(v["checksum"], "", "{v}");
    // A debit's failures repeat its orderid.
    assert_eq!(v["orderid"], "METHOD_0001", "{v}");
    // /checkstatus and /walletrefund answer in their own shapes.
    let r = s
        .http
        .delete(s.url("/checkstatus?mid=MBK9006&orderid=METHOD_0002"))
        .header("payloadtype", "xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("<statuscode>151</statuscode><orderid>METHOD_0002</orderid>")
            && body.contains("<statusmessage>Invalid Request Parameters</statusmessage>")
            && body.contains("<status>FAILURE</status>")
            && !body.contains("messagecode"),
        "{body}"
    );
    let r = s
        .http
        .patch(s.url("/walletrefund?txid=METHOD_0003&refundid=R1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, POST");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (
            &v["statuscode"],
            &v["statusmessage"],
            &v["txid"],
            &v["refundid"]
        ),
        (
            &"151".into(),
            &"Invalid Request Parameters".into(),
            &"METHOD_0003".into(),
            &"R1".into()
        ),
        "{v}"
    );
    assert!(v.get("messagecode").is_none(), "{v}");
    // HEAD would otherwise run the GET handler and drop the answer.
    for path in ["/debitwallet", "/userbalance", "/otpgenerate"] {
        let r = s
            .http
            .head(s.url(path))
            .query(&debit.params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(r.headers()["allow"], "GET, POST", "{path}");
    }
    assert_eq!(s.wallet_balance(RICH).await, "10000.00");
    assert_code(&send(&c, &debit).await, "0");
    assert_eq!(s.wallet_balance(RICH).await, "9990.00");
}

/// A client that shuts its side of the connection once it has sent its
/// request (as `nc -N` and some HTTP/1.0 clients do) still gets the answer:
/// otherwise it could not tell whether it was charged.
#[tokio::test]
async fn a_half_closed_connection_still_gets_its_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start().await;
    let c = s.client();
    let debit = c.debit_request(&Debit::new(RICH, "10", "HALFCLOSE_0001", TOKEN));
    let body: Vec<String> = debit
        .params
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect();
    let body = body.join("&");
    let addr = s.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "POST /debitwallet HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    conn.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        conn.read_to_string(&mut answer),
    )
    .await
    .expect("no answer")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.contains("\"status\":\"SUCCESS\"") && answer.contains("HALFCLOSE_0001"),
        "{answer:?}"
    );
    assert_eq!(s.wallet_balance(RICH).await, "9990.00");
}

/// A value over the parser's bound (512 bytes) is still part of what the
/// checksum covers: a correctly signed request with one is told 151, signed,
/// not 80 (which would send its sender after a checksum that is right).
#[tokio::test]
async fn an_oversized_value_in_a_signed_request_is_151_not_80() {
    let s = Server::start().await;
    let c = s.client();
    let long = "x".repeat(513);
    let mut d = Debit::new(RICH, "10", "LONGCMT_0001", TOKEN);
    d.comment = Some(&long);
    let r = send(&c, &c.debit_request(&d)).await;
    assert_code(&r, "151");
    assert_eq!(r.get("orderid"), "LONGCMT_0001");
    let long_orderid = "O".repeat(600);
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "10", &long_orderid, TOKEN)),
    )
    .await;
    assert_code(&r, "151");
    // Still a checksum mismatch when the long value was not what was signed.
    let mut tampered = c.debit_request(&d);
    tampered.set("comment", "y".repeat(513));
    refused_unsigned(&c, &tampered, "80").await;
    assert_eq!(s.wallet_balance(RICH).await, "10000.00");
    // The orderid is still free.
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "10", "LONGCMT_0001", TOKEN)),
    )
    .await;
    assert_code(&r, "0");
}

/// A value that is not UTF-8 reads as U+FFFD, so `%FF` and `%FE` would
/// verify under one checksum: the request is malformed, 151 after its
/// checksum, and moves nothing.
#[tokio::test]
async fn a_value_that_is_not_utf8_is_151_and_moves_nothing() {
    let s = Server::start().await;
    let c = s.client();
    let mut d = Debit::new(RICH, "10", "NOTUTF8_0001", TOKEN);
    d.comment = Some("\u{fffd}");
    let req = c.debit_request(&d);
    let encoded = req.encoded();
    assert!(encoded.contains("%EF%BF%BD"), "{encoded}");
    for raw in ["%FF", "%FE"] {
        let url = s.url(&format!(
            "{}?{}",
            req.path,
            encoded.replace("%EF%BF%BD", raw)
        ));
        let v: serde_json::Value = s.http.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["statuscode"], "151", "{raw}: {v}");
        assert_eq!(v["orderid"], "NOTUTF8_0001", "{v}");
        assert_ne!(
            v["checksum"], "",
            "signed, after the checksum verified: {v}"
        );
    }
    assert_eq!(s.wallet_balance(RICH).await, "10000.00");
    // The character itself, sent as UTF-8, is a comment like any other.
    assert_code(&send(&c, &req).await, "0");
    assert_eq!(s.wallet_balance(RICH).await, "9990.00");
}

/// Razorpay's OTP-then-debit flow: `/debitwallet` with the OTP instead of a
/// token. The OTP authorises one debit of at most the amount it was
/// requested for.
#[tokio::test]
async fn an_otp_pays_once_and_no_more_than_it_was_asked_for() {
    let s = Server::start().await;
    let c = s.client();
    let with_otp_for = |who: &str, amount: &str, orderid: &str, otp: &str| {
        let mut req = c.debit_request(&Debit::new(who, amount, orderid, "unused"));
        req.remove("token");
        req.set("otp", otp);
        resign(
            &c,
            req,
            payrail_mobikwik::wire::signed_fields::DEBIT_WITH_OTP,
        )
    };
    let with_otp =
        |amount: &str, orderid: &str, otp: &str| with_otp_for(POOR, amount, orderid, otp);
    // A cell with no wallet: no user (120), as at /tokengenerate, with a
    // wrong OTP or its own right one; the OTP is neither spent nor counted a
    // try (three wrong ones would lock it).
    let stranger = cell(2);
    assert_code(
        &send(&c, &c.otp_generate_request(&stranger, "10")).await,
        "0",
    );
    let otp = s.last_otp(&stranger).await;
    let wrong = if otp == "000000" { "111111" } else { "000000" };
    for sent in [wrong, wrong, wrong, otp.as_str()] {
        let r = send(&c, &with_otp_for(&stranger, "5", "OTPDEBIT_0000", sent)).await;
        assert_code(&r, "120");
        assert_eq!(r.get("orderid"), "OTPDEBIT_0000", "{r:?}");
    }
    let (status, _) = s
        .admin_post("/wallets", json!({ "cell": stranger, "balance": "10.00" }))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let r = send(&c, &with_otp_for(&stranger, "5", "OTPDEBIT_0000", &otp)).await;
    assert_code(&r, "0");
    assert_eq!(s.wallet_balance(&stranger).await, "5.00");
    assert_code(&send(&c, &c.otp_generate_request(POOR, "200")).await, "0");
    let otp = s.last_otp(POOR).await;
    // More than the OTP was asked for: refused, and the OTP stays good.
    for _ in 0..4 {
        let r = send(&c, &with_otp("200.01", "OTPDEBIT_0001", &otp)).await;
        assert_code(&r, "164");
    }
    assert_eq!(s.wallet_balance(POOR).await, "1000.00");
    let r = send(&c, &with_otp("150", "OTPDEBIT_0002", &otp)).await;
    assert_code(&r, "0");
    assert_eq!(s.wallet_balance(POOR).await, "850.00");
    // Single use.
    let r = send(&c, &with_otp("1", "OTPDEBIT_0003", &otp)).await;
    assert_code(&r, "164");
    assert_eq!(s.wallet_balance(POOR).await, "850.00");
}

/// Requests and answers are signed with the same key and quoting, so an
/// answer to a request that did not verify must not be signed: it repeats
/// fields the sender chose, and its checksum could serve as a request's.
#[tokio::test]
async fn no_answer_to_an_unverified_request_is_signed() {
    let s = Server::start().await;
    let c = s.client();
    let wrong = Client::new(&s.base, MID, "TestMerchant", "not-the-secret");
    // The forgery a signed refusal would allow: fields that quote a debit.
    let crafted = format!("y''TestMerchant''{MID}''504''ORDER12345''{TOKEN}''DEBIT");
    let requests = [
        wrong.otp_generate_request(RICH, "1"),
        wrong.token_from_otp_request(RICH, "1", "123456"),
        wrong.regenerate_with_cap_request(RICH, "200", TOKEN),
        wrong.regenerate_request(RICH, TOKEN),
        wrong.debit_request(&Debit::new(RICH, "1", "UNSIGNED_0001", TOKEN)),
        wrong.balance_request(RICH, TOKEN),
        wrong.query_wallet_request(RICH),
        wrong.check_status_request("UNSIGNED_0001", None),
        wrong.refund_request(&crafted, "100''9311032820''x", "1", false),
    ];
    for req in &requests {
        refused_unsigned(&c, req, "80").await;
    }
    // And nothing moved.
    assert_eq!(s.wallet_balance(RICH).await, "10000.00");
}

#[tokio::test]
async fn every_debit_check_in_order() {
    let s = Server::start().await;
    let c = s.client();
    let d = |amount, orderid| Debit::new(RICH, amount, orderid, TOKEN);

    // 22: unknown merchant; the answer cannot be signed.
    let other = Client::new(&s.base, "NOPE9999", "TestMerchant", SECRET);
    let r = other.debit(&d("1", "CHECKS_00001")).await.unwrap();
    assert_eq!((r.statuscode(), r.get("checksum")), ("22", ""));
    assert_eq!(r.get("statusdescription"), "Merchant does not Exist");
    // 80: wrong secret.
    let wrong = Client::new(&s.base, MID, "TestMerchant", "not-the-secret");
    refused_unsigned(&c, &wrong.debit_request(&d("1", "CHECKS_00001")), "80").await;
    // 150: msgcode.
    let mut bad = d("1", "CHECKS_00001");
    bad.msgcode = "999";
    assert_code(&send(&c, &c.debit_request(&bad)).await, "150");
    // 151: a missing parameter, a wrong txntype; 55, 54, 51, 52, 56.
    let mut req = c.debit_request(&d("1", "CHECKS_00001"));
    req.remove("token");
    let resigned = resign(
        &c,
        req,
        payrail_mobikwik::wire::signed_fields::DEBIT_WITH_TOKEN,
    );
    assert_code(&send(&c, &resigned).await, "151");
    for (name, value, code) in [
        ("txntype", "credit", "151"),
        ("cell", "6311032820", "55"),
        ("cell", "93110328", "55"),
        ("amount", "1.234", "54"),
        ("amount", "-1", "54"),
        ("amount", "1e3", "54"),
        ("amount", "0", "54"),
        ("orderid", "SHORT", "51"),
        ("orderid", "THIRTY_ONE_CHARACTERS_LONG_1234", "51"),
        ("orderid", "ORDER#123456", "52"),
        ("merchantname", "Name'With'Quotes", "56"),
    ] {
        let mut req = c.debit_request(&d("1", "CHECKS_00001"));
        req.set(name, value);
        let req = resign(
            &c,
            req,
            payrail_mobikwik::wire::signed_fields::DEBIT_WITH_TOKEN,
        );
        assert_code(&send(&c, &req).await, code);
    }
    // txntype in any case.
    let mut req = c.debit_request(&d("1", "CHECKS_00002"));
    req.set("txntype", "dEbIt");
    let req = resign(
        &c,
        req,
        payrail_mobikwik::wire::signed_fields::DEBIT_WITH_TOKEN,
    );
    assert_code(&send(&c, &req).await, "0");
    // 302: a token that is not ours, or ours for another cell.
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(RICH, "1", "CHECKS_00003", "feedface")),
        )
        .await,
        "302",
    );
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(POOR, "1", "CHECKS_00003", TOKEN)),
        )
        .await,
        "302",
    );
    // 303: above the token's cap (200.00); the cap is per debit, not a total.
    assert_code(
        &send(&c, &c.debit_request(&d("200.01", "CHECKS_00004"))).await,
        "303",
    );
    assert_code(
        &send(&c, &c.debit_request(&d("200", "CHECKS_00004"))).await,
        "0",
    );
    assert_code(
        &send(&c, &c.debit_request(&d("200", "CHECKS_00005"))).await,
        "0",
    );
    // 305 before 304: a blocked wallet, even with a used orderid.
    let (st, v) = s
        .admin_post(&format!("/wallets/{RICH}/block"), json!({}))
        .await;
    assert_eq!(
        (st, v["status"].as_str()),
        (StatusCode::OK, Some("blocked"))
    );
    assert_code(
        &send(&c, &c.debit_request(&d("1", "CHECKS_00004"))).await,
        "305",
    );
    let (st, v) = s
        .admin_post(&format!("/wallets/{RICH}/unblock"), json!({}))
        .await;
    assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("active")));
    // 304 before 301: a used orderid on an empty wallet.
    let empty = cell(1);
    let token = s.wallet_with_token(&empty, "0", "50").await;
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&empty, "5", "CHECKS_00006", &token)),
        )
        .await,
        "301",
    );
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&empty, "5", "CHECKS_00004", &token)),
        )
        .await,
        "304",
    );
    // 301 leaves nothing behind: the orderid stays free.
    let (st, _) = s
        .admin_post(
            &format!("/wallets/{empty}/credit"),
            json!({ "amount": "5.00", "reference": "fund-empty" }),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&empty, "5", "CHECKS_00006", &token)),
        )
        .await,
        "0",
    );
    assert_eq!(s.wallet_balance(&empty).await, "0.00");
    // Unknown coupon: no cashback, no failure.
    let mut with_coupon = d("10", "CHECKS_00007");
    with_coupon.coupon = Some("NOSUCHCOUPON");
    let r = send(&c, &c.debit_request(&with_coupon)).await;
    assert_code(&r, "0");
    assert_eq!(r.get("cashback"), "0.00");
    // 503, the real clients' msgcode, works too.
    let mut real = d("1", "CHECKS_00008");
    real.msgcode = "503";
    let r = send(&c, &c.debit_request(&real)).await;
    assert_code(&r, "0");
    assert_eq!(r.get("messagecode"), "503");
    s.verify_ok().await;
}

/// Replaces a request's checksum with a correct one over its current values.
fn resign(c: &Client, mut req: SignedRequest, fields: &[&str]) -> SignedRequest {
    let values: Vec<String> = fields
        .iter()
        .map(|f| req.get(f).unwrap_or("").to_string())
        .collect();
    req.set(
        "checksum",
        checksum::sign(SECRET.as_bytes(), values.iter().map(String::as_str)),
    );
    let _ = c;
    req
}

#[tokio::test]
async fn aggregators_sign_their_id_last() {
    let s = Server::start().await;
    let agg = s.client().with_aggregator("AGG123");
    let r = send(
        &agg,
        &agg.debit_request(&Debit::new(RICH, "2", "AGGREGATE_001", TOKEN)),
    )
    .await;
    assert_code(&r, "0");
    // The id is signed: changing it breaks the checksum...
    let mut req = agg.debit_request(&Debit::new(RICH, "2", "AGGREGATE_002", TOKEN));
    req.set("aggregatedMerchantId", "AGG124");
    refused_unsigned(&agg, &req, "80").await;
    // ...and an id the merchant does not aggregate for is refused.
    let stranger = s.client().with_aggregator("AGG999");
    assert_code(
        &send(
            &stranger,
            &stranger.debit_request(&Debit::new(RICH, "2", "AGGREGATE_003", TOKEN)),
        )
        .await,
        "151",
    );
}

#[tokio::test]
async fn otp_then_token_then_debit() {
    let s = Server::start().await;
    let c = s.client();
    let r = send(&c, &c.otp_generate_request(POOR, "500")).await;
    assert_code(&r, "0");
    assert!(r.get("statusdescription").ends_with("7241"), "{r:?}");
    let otp = s.last_otp(POOR).await;
    assert_eq!(otp.len(), 6);
    assert!(otp.bytes().all(|b| b.is_ascii_digit()));

    let r = send(&c, &c.token_from_otp_request(POOR, "500", &otp)).await;
    assert_code(&r, "0");
    let token = r.get("token").to_string();
    assert_eq!(token.len(), 32);
    // Single use.
    assert_code(
        &send(&c, &c.token_from_otp_request(POOR, "500", &otp)).await,
        "155",
    );
    // The token works, with its cap.
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(POOR, "500", "VIAOTP_00001", &token)),
        )
        .await,
        "0",
    );
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(POOR, "500.01", "VIAOTP_00002", &token)),
        )
        .await,
        "303",
    );
    let r = send(&c, &c.balance_request(POOR, &token)).await;
    assert_code(&r, "0");
    assert_eq!(r.get("balanceamount"), "500.00");

    // msgcode 504 is accepted for /tokengenerate too; 190 and 200.
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let otp = s.last_otp(POOR).await;
    let mut req = c.token_from_otp_request(POOR, "1", &otp);
    req.set("msgcode", "504");
    let req = resign(
        &c,
        req,
        payrail_mobikwik::wire::signed_fields::TOKEN_FROM_OTP,
    );
    assert_code(&send(&c, &req).await, "0");
    let mut both = c.token_from_otp_request(POOR, "1", "123456");
    both.set("token", &token);
    refused_unsigned(&c, &both, "200").await;
    let mut neither = c.token_from_otp_request(POOR, "1", "123456");
    neither.remove("otp");
    refused_unsigned(&c, &neither, "190").await;
    // 120: no wallet for the cell.
    let stranger = cell(2);
    assert_code(
        &send(&c, &c.otp_generate_request(&stranger, "1")).await,
        "0",
    );
    let otp = s.last_otp(&stranger).await;
    assert_code(
        &send(&c, &c.token_from_otp_request(&stranger, "1", &otp)).await,
        "120",
    );
}

#[tokio::test]
async fn otps_expire_lock_after_three_misses_and_are_rate_limited() {
    let s = Server::start().await;
    let c = s.client();
    // Three wrong tries lock the OTP, even for the right value afterwards.
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let otp = s.last_otp(POOR).await;
    let wrong = if otp == "000000" { "111111" } else { "000000" };
    for _ in 0..3 {
        assert_code(
            &send(&c, &c.token_from_otp_request(POOR, "1", wrong)).await,
            "155",
        );
    }
    assert_code(
        &send(&c, &c.token_from_otp_request(POOR, "1", &otp)).await,
        "155",
    );
    // Two wrong tries do not.
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let otp = s.last_otp(POOR).await;
    let wrong = if otp == "000000" { "111111" } else { "000000" };
    for _ in 0..2 {
        assert_code(
            &send(&c, &c.token_from_otp_request(POOR, "1", wrong)).await,
            "155",
        );
    }
    assert_code(
        &send(&c, &c.token_from_otp_request(POOR, "1", &otp)).await,
        "0",
    );
    // Valid for ten minutes.
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let otp = s.last_otp(POOR).await;
    s.advance_clock(601).await;
    assert_code(
        &send(&c, &c.token_from_otp_request(POOR, "1", &otp)).await,
        "155",
    );
    // A new OTP replaces the previous one.
    s.advance_clock(3600).await;
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let first = s.last_otp(POOR).await;
    assert_code(&send(&c, &c.otp_generate_request(POOR, "1")).await, "0");
    let second = s.last_otp(POOR).await;
    if first != second {
        assert_code(
            &send(&c, &c.token_from_otp_request(POOR, "1", &first)).await,
            "155",
        );
    }
    assert_code(
        &send(&c, &c.token_from_otp_request(POOR, "1", &second)).await,
        "0",
    );
    // At most five per cell per hour.
    let limited = cell(3);
    for _ in 0..5 {
        assert_code(&send(&c, &c.otp_generate_request(&limited, "1")).await, "0");
    }
    assert_code(
        &send(&c, &c.otp_generate_request(&limited, "1")).await,
        "148",
    );
    s.advance_clock(3601).await;
    assert_code(&send(&c, &c.otp_generate_request(&limited, "1")).await, "0");
}

#[tokio::test]
async fn regeneration_rules() {
    let s = Server::start().await;
    let c = s.client();
    let w = cell(4);
    let mut token = s.wallet_with_token(&w, "1000", "100").await;
    // /tokenregenerate keeps the cap; /tokengenerate with a token sets it.
    let r = send(&c, &c.regenerate_request(&w, &token)).await;
    assert_code(&r, "0");
    token = r.get("token").to_string();
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&w, "100.01", "REGEN_000001", &token)),
        )
        .await,
        "303",
    );
    let r = send(&c, &c.regenerate_with_cap_request(&w, "300", &token)).await;
    assert_code(&r, "0");
    let old = std::mem::replace(&mut token, r.get("token").to_string());
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&w, "300", "REGEN_000002", &token)),
        )
        .await,
        "0",
    );
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&w, "1", "REGEN_000003", &old)),
        )
        .await,
        "302",
    );
    assert_code(&send(&c, &c.regenerate_request(&w, &old)).await, "201");
    assert_code(
        &send(&c, &c.regenerate_request(&w, "never-issued")).await,
        "201",
    );
    // Five regenerations per lineage per 24 hours: two done, three more...
    for _ in 0..3 {
        let r = send(&c, &c.regenerate_request(&w, &token)).await;
        assert_code(&r, "0");
        token = r.get("token").to_string();
    }
    // ...then 202, and the token is still the current one.
    assert_code(&send(&c, &c.regenerate_request(&w, &token)).await, "202");
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(&w, "1", "REGEN_000004", &token)),
        )
        .await,
        "0",
    );
    s.advance_clock(24 * 3600 + 1).await;
    assert_code(&send(&c, &c.regenerate_request(&w, &token)).await, "0");
}

#[tokio::test]
async fn tokens_expire_after_thirty_days() {
    let s = Server::start().await;
    let c = s.client();
    s.advance_clock(30 * 86_400 - 60).await;
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(RICH, "1", "EXPIRY_00001", TOKEN)),
        )
        .await,
        "0",
    );
    s.advance_clock(120).await;
    assert_code(
        &send(
            &c,
            &c.debit_request(&Debit::new(RICH, "1", "EXPIRY_00002", TOKEN)),
        )
        .await,
        "302",
    );
    assert_code(&send(&c, &c.balance_request(RICH, TOKEN)).await, "198");
    assert_code(&send(&c, &c.regenerate_request(RICH, TOKEN)).await, "201");
}

#[tokio::test]
async fn a_separate_regeneration_secret() {
    let s = Server::start().await;
    let (st, v) = s
        .admin_post(
            "/mobikwik/merchants",
            json!({ "mid": "MBK7000", "name": "Other", "secret": "main-secret-123", "regen_secret": "regen-secret-456" }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let w = cell(5);
    let (st, _) = s
        .admin_post("/wallets", json!({ "cell": w, "balance": "10" }))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, v) = s
        .admin_post(
            "/mobikwik/tokens",
            json!({ "mid": "MBK7000", "cell": w, "amount": "5" }),
        )
        .await;
    let token = v["token"].as_str().unwrap().to_string();
    let plain = Client::new(&s.base, "MBK7000", "Other", "main-secret-123");
    // Signed with the main secret: refused, unsigned.
    refused_unsigned(&plain, &plain.regenerate_request(&w, &token), "80").await;
    let c = plain.clone().with_regen_secret("regen-secret-456");
    let r = send(&c, &c.regenerate_request(&w, &token)).await;
    assert_code(&r, "0");
    // The other endpoints keep using the main secret.
    let r = send(
        &c,
        &c.debit_request(&Debit::new(&w, "5", "REGENSEC_0001", r.get("token"))),
    )
    .await;
    assert_code(&r, "0");
}

#[tokio::test]
async fn balance_query_and_wallet_creation() {
    let s = Server::start().await;
    let c = s.client();
    let r = send(&c, &c.balance_request(RICH, TOKEN)).await;
    assert_code(&r, "0");
    assert_eq!(r.get("balanceamount"), "10000.00");
    assert_code(&send(&c, &c.balance_request(RICH, "wrong")).await, "198");
    assert_code(&send(&c, &c.balance_request(POOR, TOKEN)).await, "198");
    let mut bad = c.balance_request(RICH, TOKEN);
    bad.set("msgcode", "500");
    assert_code(
        &send(
            &c,
            &resign(&c, bad, payrail_mobikwik::wire::signed_fields::USER_BALANCE),
        )
        .await,
        "150",
    );

    let r = send(&c, &c.query_wallet_request(RICH)).await;
    assert_code(&r, "0");
    assert_eq!(
        (r.get("statusdescription"), r.get("nonzeroflag")),
        ("User Exists", "y")
    );
    let newcomer = cell(6);
    assert_code(&send(&c, &c.query_wallet_request(&newcomer)).await, "120");
    let mut bad = c.query_wallet_request(RICH);
    bad.set("action", "somethingelse");
    assert_code(
        &send(
            &c,
            &resign(&c, bad, payrail_mobikwik::wire::signed_fields::QUERY_WALLET),
        )
        .await,
        "110",
    );

    assert_code(
        &send(&c, &c.otp_generate_request(&newcomer, "0")).await,
        "0",
    );
    let otp = s.last_otp(&newcomer).await;
    assert_code(
        &send(
            &c,
            &c.create_wallet_user_request(&newcomer, "not-an-email", &otp),
        )
        .await,
        "53",
    );
    let r = send(
        &c,
        &c.create_wallet_user_request(&newcomer, "new@example.com", &otp),
    )
    .await;
    assert_code(&r, "0");
    assert_eq!(r.get("statusdescription"), "User Created");
    let r = send(&c, &c.query_wallet_request(&newcomer)).await;
    assert_code(&r, "0");
    assert_eq!(
        (r.get("emailaddress"), r.get("nonzeroflag")),
        ("new@example.com", "n")
    );
    assert_code(
        &send(
            &c,
            &c.create_wallet_user_request(&newcomer, "new@example.com", &otp),
        )
        .await,
        "153",
    );
    let (st, v) = s.admin_get(&format!("/wallets/{newcomer}")).await;
    assert_eq!(
        (st, v),
        (
            StatusCode::OK,
            json!({ "cell": newcomer, "balance": "0.00", "status": "active" })
        )
    );
}

#[tokio::test]
async fn status_checks() {
    let s = Server::start().await;
    let c = s.client();
    let r = send(
        &c,
        &c.debit_request(&Debit::new(RICH, "42.00", "STATUS_00001", TOKEN)),
    )
    .await;
    assert_code(&r, "0");
    let txnid = r.get("txnid").to_string();
    let st = send(&c, &c.check_status_request("STATUS_00001", None)).await;
    assert_eq!(st.statuscode(), "0");
    assert_eq!(
        (
            st.get("orderid"),
            st.get("refid"),
            st.get("amount"),
            st.get("ordertype")
        ),
        ("STATUS_00001", txnid.as_str(), "42.00", "payment")
    );
    // The checksum covers exactly statuscode orderid refid amount statusmessage ordertype.
    let fixed: Vec<&str> = [
        "statuscode",
        "orderid",
        "refid",
        "amount",
        "statusmessage",
        "ordertype",
    ]
    .iter()
    .map(|f| st.get(f))
    .collect();
    assert_eq!(st.get("checksum"), checksum::sign(SECRET.as_bytes(), fixed));
    let unknown = send(&c, &c.check_status_request("STATUS_99999", None)).await;
    assert_ne!(unknown.statuscode(), "0");
    assert_eq!(unknown.get("status"), "FAILURE");
    let mut tampered = c.check_status_request("STATUS_00001", None);
    tampered.set("orderid", "STATUS_00002");
    refused_unsigned(&c, &tampered, "80").await;
}

#[tokio::test]
async fn refunds_never_exceed_the_debit_and_replay_by_refundid() {
    let s = Server::start().await;
    let c = s.client();
    let w = cell(7);
    let token = s.wallet_with_token(&w, "100", "100").await;
    let mut d = Debit::new(&w, "100", "REFUND_00001", &token);
    d.coupon = Some("SAVE20");
    let r = send(&c, &c.debit_request(&d)).await;
    assert_code(&r, "0");
    let txnid = r.get("txnid").to_string();
    assert_eq!(s.wallet_balance(&w).await, "20.00"); // paid 80, cashback 20

    // Partial refund by orderid: 50 back, in the proportions paid (40 wallet, 10 promotions).
    let r = send(&c, &c.refund_request("REFUND_00001", "RF1", "50", true)).await;
    assert_code(&r, "0");
    let refid = r.get("refid").to_string();
    assert!(!refid.is_empty());
    assert_eq!(s.wallet_balance(&w).await, "60.00");
    // The same refundid again: the first result, nothing moves.
    let again = send(&c, &c.refund_request("REFUND_00001", "RF1", "50", true)).await;
    assert_code(&again, "0");
    assert_eq!(again.get("refid"), refid);
    assert_eq!(s.wallet_balance(&w).await, "60.00");
    // The same refundid with another amount: refused.
    assert_code(
        &send(&c, &c.refund_request("REFUND_00001", "RF1", "40", true)).await,
        "45",
    );
    // More than what is left: refused. By txnid this time.
    assert_code(
        &send(&c, &c.refund_request(&txnid, "RF2", "50.01", true)).await,
        "45",
    );
    assert_code(
        &send(&c, &c.refund_request(&txnid, "RF2", "50", false)).await,
        "0",
    );
    assert_eq!(s.wallet_balance(&w).await, "100.00");
    assert_eq!(s.merchant_balance(MID).await, "0.00");
    assert_code(
        &send(&c, &c.refund_request(&txnid, "RF3", "0.01", true)).await,
        "45",
    );
    // Unknown transaction; bad amount.
    assert_code(
        &send(&c, &c.refund_request("NOSUCHORDER1", "RF4", "1", false)).await,
        "101",
    );
    assert_code(
        &send(&c, &c.refund_request(&txnid, "RF5", "1.001", false)).await,
        "54",
    );
    // Refund status.
    let st = send(&c, &c.check_status_request("REFUND_00001", Some("RF1"))).await;
    assert_eq!(
        (st.statuscode(), st.get("refundamount"), st.get("txnamount")),
        ("0", "50.00", "100.00")
    );
    s.verify_ok().await;
}

/// A refund that cannot fit is refused before anything is written. Refused
/// after its refundid was claimed, each would make the writer roll its batch
/// back and run it again, as often as a merchant cared to send one.
#[tokio::test]
async fn refunds_that_cannot_fit_cost_the_writer_no_rerun() {
    let s = Server::start().await;
    let c = s.client();
    let w = cell(17);
    let token = s.wallet_with_token(&w, "10", "10").await;
    let r = send(
        &c,
        &c.debit_request(&Debit::new(&w, "10", "RERUN_00001", &token)),
    )
    .await;
    assert_code(&r, "0");
    let first = send(&c, &c.refund_request("RERUN_00001", "RR0", "6", true)).await;
    assert_code(&first, "0");

    let before = s.counter("payrail_group_commit_redos_total").await;
    for n in 1..=5 {
        let r = c.refund_request("RERUN_00001", &format!("RR{n}"), "4.01", true);
        assert_code(&send(&c, &r).await, "45");
    }
    // A replay of the refund made still gets its first answer, though it
    // would not fit as a new one.
    let again = send(&c, &c.refund_request("RERUN_00001", "RR0", "6", true)).await;
    assert_code(&again, "0");
    assert_eq!(again.get("refid"), first.get("refid"));
    assert_eq!(
        s.counter("payrail_group_commit_redos_total").await,
        before,
        "refused refunds rolled their batches back and ran them again"
    );
    // Nothing of the refusals was kept: a refundid refused may be used for
    // a refund that fits.
    let r = send(&c, &c.refund_request("RERUN_00001", "RR1", "4", true)).await;
    assert_code(&r, "0");
    assert_eq!(s.wallet_balance(&w).await, "10.00");
    s.verify_ok().await;
}

/// A debit over the balance is refused before anything is written, on every
/// backend. Refused after its order row was written, each would make the
/// writer roll its batch back and run it again with savepoints, the other
/// callers' units with it, as often as anyone with a token cared to ask.
#[tokio::test]
async fn debits_over_the_balance_cost_the_writer_no_rerun() {
    let s = Server::start().await;
    let c = s.client();
    let w = cell(18);
    let token = s.wallet_with_token(&w, "10", "100").await;
    let paid = c.debit_request(&Debit::new(&w, "6", "SHORT_00000", &token));
    assert_code(&send(&c, &paid).await, "0");

    let before = s.counter("payrail_group_commit_redos_total").await;
    for n in 1..=5 {
        let r = c.debit_request(&Debit::new(&w, "5", &format!("SHORT_0000{n}"), &token));
        assert_code(&send(&c, &r).await, "301");
    }
    // A used orderid is still told so (304 outranks 301).
    let again = c.debit_request(&Debit::new(&w, "6", "SHORT_00000", &token));
    assert_code(&send(&c, &again).await, "304");
    assert_eq!(
        s.counter("payrail_group_commit_redos_total").await,
        before,
        "refused debits rolled their batches back and ran them again"
    );
    // Nothing of the refusals was kept: a refused orderid may pay what fits.
    let fits = c.debit_request(&Debit::new(&w, "4", "SHORT_00001", &token));
    assert_code(&send(&c, &fits).await, "0");
    assert_eq!(s.wallet_balance(&w).await, "0.00");
    s.verify_ok().await;
}

/// A token issued for a reference is issued once: a retry gets the same
/// token (200), the same reference with another cap is refused, and without
/// a reference every call issues a new one.
#[tokio::test]
async fn admin_tokens_for_a_reference_are_issued_once() {
    let s = Server::start().await;
    let c = s.client();
    let w = cell(18);
    let (st, v) = s
        .admin_post("/wallets", json!({ "cell": w, "balance": "50" }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let body = json!({ "mid": MID, "cell": w, "amount": "10", "reference": "order-setup-1" });
    let (st, first) = s.admin_post("/mobikwik/tokens", body.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{first}");
    let token = first["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32);
    let (st, again) = s.admin_post("/mobikwik/tokens", body.clone()).await;
    assert_eq!((st, &again), (StatusCode::OK, &first));

    let mut other_cap = body.clone();
    other_cap["amount"] = json!("11");
    let (st, v) = s.admin_post("/mobikwik/tokens", other_cap).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(!v.to_string().contains(&token), "{v}");
    let mut other_ref = body.clone();
    other_ref["reference"] = json!("order-setup-2");
    let (st, v) = s.admin_post("/mobikwik/tokens", other_ref).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_ne!(v["token"], first["token"]);
    let mut bad_ref = body.clone();
    bad_ref["reference"] = json!("no spaces allowed");
    assert_eq!(
        s.admin_post("/mobikwik/tokens", bad_ref).await.0,
        StatusCode::BAD_REQUEST
    );
    let plain = json!({ "mid": MID, "cell": w, "amount": "10" });
    let (a, b) = (
        s.admin_post("/mobikwik/tokens", plain.clone()).await.1,
        s.admin_post("/mobikwik/tokens", plain).await.1,
    );
    assert_ne!(a["token"], b["token"]);

    // The token works, with its cap.
    let r = send(
        &c,
        &c.debit_request(&Debit::new(&w, "10", "REFTOKEN0001", &token)),
    )
    .await;
    assert_code(&r, "0");
    let r = send(
        &c,
        &c.debit_request(&Debit::new(&w, "10.01", "REFTOKEN0002", &token)),
    )
    .await;
    assert_code(&r, "303");
}

#[tokio::test]
async fn admin_resources_are_idempotent() {
    let s = Server::start().await;
    let m = json!({ "mid": "MBK1234", "name": "Shop", "secret": "s3cret-value", "aggregated_merchant_ids": ["A1"] });
    assert_eq!(
        s.admin_post("/mobikwik/merchants", m.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        s.admin_post("/mobikwik/merchants", m.clone()).await.0,
        StatusCode::OK
    );
    let mut other = m.clone();
    other["secret"] = json!("another-secret");
    let (st, v) = s.admin_post("/mobikwik/merchants", other).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert!(!v.to_string().contains("s3cret-value") && !v.to_string().contains("another-secret"));
    // A name is counted in bytes, as its message says, and is more than spaces.
    for (name, ok) in [
        ("   ", false),
        (&"\u{e9}".repeat(32)[..], true),
        (&"\u{e9}".repeat(33)[..], false),
    ] {
        let body = json!({ "mid": "MBK1235", "name": name, "secret": "s3cret-value" });
        let (st, v) = s.admin_post("/mobikwik/merchants", body).await;
        if ok {
            assert_eq!(st, StatusCode::CREATED, "{name:?}: {v}");
        } else {
            assert_eq!(st, StatusCode::BAD_REQUEST, "{name:?}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("64 bytes"),
                "{v}"
            );
        }
    }
    // Optional fields sent as `null` are fields left out.
    let body = json!({
        "mid": "MBK1236", "name": "Nulls", "secret": "s3cret-value",
        "regen_secret": null, "aggregated_merchant_ids": null,
    });
    let (st, v) = s.admin_post("/mobikwik/merchants", body).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["aggregated_merchant_ids"], json!([]), "{v}");

    let w = cell(8);
    let (st, v) = s
        .admin_post("/wallets", json!({ "cell": w, "balance": "12.50" }))
        .await;
    assert_eq!(
        (st, v.clone()),
        (
            StatusCode::CREATED,
            json!({ "cell": w, "balance": "12.50", "status": "active" })
        )
    );
    assert_eq!(
        s.admin_post("/wallets", json!({ "cell": w, "balance": "12.50" }))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        s.admin_post("/wallets", json!({ "cell": w, "balance": "13" }))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        s.admin_get(&format!("/wallets/{}", cell(9))).await.0,
        StatusCode::NOT_FOUND
    );
    // A body is an object: an array is not read as the fields in order, and
    // nothing else names a Rust type.
    for body in [
        json!([cell(9), "5.00"]),
        json!(cell(9)),
        json!(null),
        json!(5),
    ] {
        let (st, v) = s.admin_post("/wallets", body.clone()).await;
        assert_eq!(
            (st, v["error"]["message"].as_str()),
            (
                StatusCode::BAD_REQUEST,
                Some("the body must be a JSON object")
            ),
            "{body}"
        );
    }
    assert_eq!(
        s.admin_get(&format!("/wallets/{}", cell(9))).await.0,
        StatusCode::NOT_FOUND
    );
    // `null` is a balance left out: an empty wallet.
    let (st, v) = s
        .admin_post("/wallets", json!({ "cell": cell(9), "balance": null }))
        .await;
    assert_eq!(
        (st, v["balance"].as_str()),
        (StatusCode::CREATED, Some("0.00")),
        "{v}"
    );

    let credit = json!({ "amount": "7.50", "reference": "ref-1" });
    let (st, v) = s
        .admin_post(&format!("/wallets/{w}/credit"), credit.clone())
        .await;
    assert_eq!((st, v["balance"].as_str()), (StatusCode::OK, Some("20.00")));
    let (st, v) = s.admin_post(&format!("/wallets/{w}/credit"), credit).await;
    assert_eq!((st, v["balance"].as_str()), (StatusCode::OK, Some("20.00")));
    let (st, _) = s
        .admin_post(
            &format!("/wallets/{w}/credit"),
            json!({ "amount": "8", "reference": "ref-1" }),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = s
        .admin_post(
            &format!("/wallets/{w}/credit"),
            json!({ "amount": "0", "reference": "ref-2" }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    assert_eq!(
        s.admin_post(
            "/mobikwik/coupons",
            json!({ "code": "HALF", "percent": "50" })
        )
        .await
        .0,
        StatusCode::CREATED
    );
    assert_eq!(
        s.admin_post(
            "/mobikwik/coupons",
            json!({ "code": "HALF", "percent": "50.00" })
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        s.admin_post(
            "/mobikwik/coupons",
            json!({ "code": "HALF", "percent": "40" })
        )
        .await
        .0,
        StatusCode::CONFLICT
    );
    let (st, v) = s
        .admin_post(
            "/mobikwik/coupons",
            json!({ "code": "TOOMUCH", "percent": "101" }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v.to_string().contains("a percentage is at most 100"), "{v}");
    let (st, _) = s
        .admin_post(
            "/mobikwik/tokens",
            json!({ "mid": "NOPE", "cell": w, "amount": "1" }),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, v) = s
        .admin_post(
            "/mobikwik/tokens",
            json!({ "mid": "MBK1234", "cell": w, "amount": "1" }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v["token"].as_str().map(str::len), Some(32));
    s.verify_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_k_concurrent_debits_succeed_on_a_wallet_funded_for_k() {
    const K: usize = 23;
    const N: usize = 120;
    let s = Server::start().await;
    let w = cell(10);
    let token = s.wallet_with_token(&w, &format!("{}.00", 7 * K), "7").await;
    let c = s.client();
    let mut tasks = Vec::new();
    for i in 0..N {
        let (c, w, token) = (c.clone(), w.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let oid = orderid("RACE", i);
            c.debit(&Debit::new(&w, "7", &oid, &token))
                .await
                .expect("debit")
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.checksum_ok);
        answers.push(r.statuscode().to_string());
    }
    assert_eq!(tally(answers), counts(&[("0", K), ("301", N - K)]));
    assert_eq!(s.wallet_balance(&w).await, "0.00");
    assert_eq!(s.merchant_balance(MID).await, format!("{}.00", 7 * K));
    s.verify_ok().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_orderid_racing_debits_once() {
    let s = Server::start().await;
    let c = s.client();
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.debit(&Debit::new(RICH, "9.99", "SAMEORDER_001", TOKEN))
                .await
                .expect("debit")
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.statuscode() {
            "0" => ok += 1,
            "304" => {}
            other => panic!("unexpected {other}: {r:?}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.wallet_balance(RICH).await, "9990.01");
    s.verify_ok().await;
}

#[tokio::test]
async fn garbage_never_gets_a_500() {
    let s = Server::start().await;
    for path in [
        "/debitwallet",
        "/otpgenerate",
        "/tokengenerate",
        "/tokenregenerate",
        "/checkstatus",
        "/walletrefund",
        "/userbalance",
        "/querywallet",
        "/createwalletuser",
    ] {
        for query in [
            "",
            "mid=MBK9006",
            "mid=%FF%FE&cell=%00",
            "mid=MBK9006&mid=OTHER",
            "a=b&&&==&c",
            "mid=MBK9006&checksum=zz",
        ] {
            let r = s
                .http
                .get(format!("{}?{query}", s.url(path)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}?{query}");
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(
                body["statuscode"].as_str().is_some_and(|c| c != "0"),
                "{path}?{query}: {body}"
            );
            assert!(
                body.as_object().unwrap().values().all(|v| v.is_string()),
                "{body}"
            );
        }
        let r = s
            .http
            .post(s.url(path))
            .header("content-type", "application/json")
            .body("{\"mid\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
}
