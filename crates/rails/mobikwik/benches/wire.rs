//! The per-request CPU work of the wallet rail, piece by piece.
//!
//! `cargo bench -p payrail-mobikwik --bench wire`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use payrail_core::Money;
use payrail_mobikwik::checksum;
use payrail_mobikwik::wire::{Answer, Code, Format, Params};

const SECRET: &[u8] = b"ju6tygh7u7tdg554k098ujd5468o";
const DEBIT: [&str; 9] = [
    "150.50",
    "9311032820",
    "Payment for order",
    "TestMerchant",
    "MBK9006",
    "504",
    "ORDER_123456",
    "MBK_TOKEN_123456789",
    "DEBIT",
];

fn bench(c: &mut Criterion) {
    let sum = checksum::sign(SECRET, DEBIT);
    c.bench_function("checksum/sign (debit, 9 fields)", |b| {
        b.iter(|| checksum::sign(black_box(SECRET), black_box(DEBIT)))
    });
    c.bench_function("checksum/verify (debit, 9 fields)", |b| {
        b.iter(|| checksum::verify_request(black_box(SECRET), black_box(&DEBIT), black_box(&sum)))
    });

    c.bench_function("amount/parse 150.50", |b| {
        b.iter(|| Money::parse(black_box("150.50")))
    });
    c.bench_function("amount/parse 9999999999.99", |b| {
        b.iter(|| Money::parse(black_box("9999999999.99")))
    });

    let query = format!(
        "mid=MBK9006&cell=9311032820&amount=150.50&orderid=ORDER_123456&token=MBK_TOKEN_123456789&merchantname=TestMerchant&msgcode=504&comment=Payment%20for%20order&txntype=DEBIT&checksum={sum}"
    );
    c.bench_function("request/decode debit query", |b| {
        b.iter(|| Params::from_parts(black_box(Some(query.as_str())), black_box(b"")))
    });

    let answer = Answer::status("504", Code::Ok)
        .with("orderid", "ORDER_123456")
        .with("txnid", "MBK_TXN_0193a1b2c3d4e5f60718293a4b5c")
        .with("amount", "150.50")
        .with("cashback", "30.10")
        .with("net_debit", "120.40");
    c.bench_function("response/sign and encode debit (JSON)", |b| {
        b.iter(|| black_box(answer.clone()).render(Some(SECRET), Format::Json))
    });
    c.bench_function("response/sign and encode debit (XML)", |b| {
        b.iter(|| black_box(answer.clone()).render(Some(SECRET), Format::Xml))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
