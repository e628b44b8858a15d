//! Mobikwik's checksum: lowercase hex HMAC-SHA256, keyed with the merchant's
//! secret, over the values wrapped in single quotes and concatenated:
//! `'v1''v2''v3'`. Values enter raw (as received, after URL decoding).

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length")
}

fn feed<'a>(m: &mut HmacSha256, values: impl IntoIterator<Item = &'a str>) {
    for v in values {
        m.update(b"'");
        m.update(v.as_bytes());
        m.update(b"'");
    }
}

/// The string that is signed, for display (`payrail mobikwik sign`, docs).
pub fn signing_string<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    values.into_iter().map(|v| format!("'{v}'")).collect()
}

/// The checksum of `values`, in order.
pub fn sign<'a>(secret: &[u8], values: impl IntoIterator<Item = &'a str>) -> String {
    let mut m = mac(secret);
    feed(&mut m, values);
    hex::encode(m.finalize().into_bytes())
}

/// Does `provided` (hex, either case) sign `values`? Compared in constant
/// time; anything that is not 64 hex characters is simply wrong.
pub fn verify<'a>(
    secret: &[u8],
    values: impl IntoIterator<Item = &'a str>,
    provided: &str,
) -> bool {
    let Ok(expected) = hex::decode(provided) else {
        return false;
    };
    if expected.len() != 32 {
        return false;
    }
    let mut m = mac(secret);
    feed(&mut m, values);
    m.verify_slice(&expected).is_ok()
}

/// Verifies a request checksum in the documented form (every field in order,
/// an absent one as `''`) or, as some real clients compute it, with empty
/// values left out. Both cover exactly the same values.
pub fn verify_request(secret: &[u8], values: &[&str], provided: &str) -> bool {
    verify(secret, values.iter().copied(), provided)
        || (values.iter().any(|v| v.is_empty())
            && verify(
                secret,
                values.iter().copied().filter(|v| !v.is_empty()),
                provided,
            ))
}

/// Response checksum for the msgcode APIs: every field but `checksum`,
/// sorted by name case-insensitively, empty values skipped.
pub fn sign_sorted(secret: &[u8], fields: &[(&str, &str)]) -> String {
    sign(secret, sorted_values(fields))
}

/// The values `sign_sorted` signs, in signing order.
pub fn sorted_values<'a>(fields: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    let mut fields: Vec<&(&str, &str)> = fields
        .iter()
        .filter(|(k, v)| !v.is_empty() && !k.eq_ignore_ascii_case("checksum"))
        .collect();
    fields.sort_by(|a, b| {
        a.0.bytes()
            .map(|c| c.to_ascii_lowercase())
            .cmp(b.0.bytes().map(|c| c.to_ascii_lowercase()))
            .then_with(|| a.0.cmp(b.0))
    });
    fields.into_iter().map(|(_, v)| *v).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"ju6tygh7u7tdg554k098ujd5468o";

    #[test]
    fn published_test_vectors() {
        // wire-compat.md §1.3, from a public React-Native client.
        assert_eq!(
            sign(
                SECRET,
                ["1", "9910057241", "TestMerchant", "MBK9006", "504", "1"]
            ),
            "abb25243ec1d608e10612c6dfa11e0e05a4591c4544acf18d604cd31ea23607d"
        );
        assert_eq!(
            sign(
                SECRET,
                [
                    "1",
                    "9910057241",
                    "comment",
                    "Test Merchant",
                    "MBK9006",
                    "503",
                    "INFO1111100003",
                    "320322754e14428ea85d80d7c732d772",
                    "debit"
                ]
            ),
            "00f7c462b92e038653865f1f656ec1cea4f50745032e5bd9e73b7c62ec204712"
        );
        assert_eq!(signing_string(["1", "9910057241"]), "'1''9910057241'");
    }

    #[test]
    fn verification_accepts_either_case_and_nothing_else() {
        let values = ["150.50", "9311032820"];
        let sig = sign(SECRET, values);
        assert!(verify(SECRET, values, &sig));
        assert!(verify(SECRET, values, &sig.to_uppercase()));
        assert!(!verify(SECRET, values, &sig[..62]));
        assert!(!verify(SECRET, values, ""));
        assert!(!verify(SECRET, values, &format!("{sig}00")));
        assert!(!verify(b"other", values, &sig));
    }

    #[test]
    fn empty_fields_may_be_skipped_by_real_clients() {
        let with_empty = ["1", "", "x"];
        let skipped = sign(SECRET, ["1", "x"]);
        assert!(verify_request(SECRET, &with_empty, &skipped));
        assert!(verify_request(
            SECRET,
            &with_empty,
            &sign(SECRET, with_empty)
        ));
        // No empty field: only the full form counts.
        assert!(!verify_request(
            SECRET,
            &["1", "x"],
            &sign(SECRET, ["1", "", "x"])
        ));
    }

    #[test]
    fn sorted_response_checksum_order() {
        let fields = [
            ("messagecode", "504"),
            ("status", "SUCCESS"),
            ("statuscode", "0"),
            ("statusdescription", "ok"),
            ("orderid", "ORDER_1"),
            ("Amount", "1.00"),
            ("cashback", ""),
            ("checksum", "ignored"),
        ];
        assert_eq!(
            sorted_values(&fields),
            ["1.00", "504", "ORDER_1", "SUCCESS", "0", "ok"]
        );
    }

    proptest! {
        #[test]
        fn any_one_character_change_breaks_the_signature(
            values in proptest::collection::vec("[ -~]{0,12}", 1..8),
            which in any::<prop::sample::Index>(),
            replacement in "[ -~]",
        ) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let sig = sign(SECRET, refs.iter().copied());
            prop_assert!(verify(SECRET, refs.iter().copied(), &sig));
            let i = which.index(values.len());
            let mut changed = values.clone();
            let v = &mut changed[i];
            if v.is_empty() {
                v.push_str(&replacement);
            } else {
                let pos = which.index(v.len());
                let old = v.as_bytes()[pos] as char;
                let new = if replacement.starts_with(old) { if old == 'a' { 'b' } else { 'a' } } else { replacement.chars().next().unwrap() };
                v.replace_range(pos..pos + 1, &new.to_string());
            }
            let changed_refs: Vec<&str> = changed.iter().map(String::as_str).collect();
            prop_assert!(!verify(SECRET, changed_refs.iter().copied(), &sig));
        }

        #[test]
        fn matches_hmac_over_the_quoted_string(values in proptest::collection::vec("\\PC{0,10}", 0..6)) {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            let mut m = mac(SECRET);
            m.update(signing_string(refs.iter().copied()).as_bytes());
            prop_assert_eq!(sign(SECRET, refs.iter().copied()), hex::encode(m.finalize().into_bytes()));
        }
    }
}
