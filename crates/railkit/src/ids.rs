//! Random identifiers. Everything a client might guess (tokens, transaction
//! ids, OTPs) comes from the operating system's CSPRNG via `rand`.

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// A unique, unguessable identifier that sorts by creation time: 12 hex
/// digits of milliseconds since the epoch, then 80 random bits (20 hex).
///
/// Unguessable because of the random part; time-ordered so that the index
/// it is stored in grows at its right edge, touching one page per batch of
/// inserts instead of one random page per insert.
pub fn time_ordered_hex() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random: [u8; 10] = rand::random();
    format!("{:012x}{}", ms & 0xffff_ffff_ffff, hex::encode(random))
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
        let t = time_ordered_hex();
        assert_eq!(t.len(), 32);
        assert!(t < time_ordered_hex() || t[..12] == time_ordered_hex()[..12]);
        let d = random_digits(6);
        assert_eq!(d.len(), 6);
        assert!(d.bytes().all(|b| b.is_ascii_digit()));
    }
}
