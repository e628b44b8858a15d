//! Random identifiers. Everything a client might guess (tokens, transaction
//! ids, OTPs) comes from the operating system's CSPRNG via `rand`.

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// `n` random decimal digits, uniformly distributed (no modulo bias).
pub fn random_digits(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rand::random_range(0..10u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let h = random_hex(16);
        assert_eq!(h.len(), 32);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(random_hex(16), h);
        let d = random_digits(6);
        assert_eq!(d.len(), 6);
        assert!(d.bytes().all(|b| b.is_ascii_digit()));
    }
}
