//! Encryption at rest for the few values payrail must be able to read back
//! (merchant secrets, sandbox messages): AES-256-GCM under the master key.
//!
//! Values that only need comparing (tokens, OTPs, PINs) are never sealed; the
//! rails store digests of them instead.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};

const NONCE_LEN: usize = 12;

/// The 256-bit key everything sealed in the database is encrypted under.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<MasterKey> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(MasterKey(bytes.try_into().ok()?))
    }

    pub fn generate() -> MasterKey {
        MasterKey(rand::random())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A key for another purpose (e.g. keyed digests of OTPs), derived so that
    /// one configured secret serves every use without reusing it directly.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"payrail-key-derivation\0");
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(self.0);
        h.finalize().into()
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sealed value could not be opened (wrong master key or corrupted data)")]
pub struct SealError;

/// Seals and opens values. `context` is bound into each ciphertext as
/// associated data, so a sealed value copied onto another row does not open.
#[derive(Clone)]
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl Sealer {
    pub fn new(key: &MasterKey) -> Sealer {
        let cipher = Aes256Gcm::new(&key.0.into());
        Sealer { cipher }
    }

    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let payload = Payload {
            msg: plaintext,
            aad: context.as_bytes(),
        };
        let ciphertext = self
            .cipher
            .encrypt(&nonce.into(), payload)
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError)?;
        let payload = Payload {
            msg: ciphertext,
            aad: context.as_bytes(),
        };
        self.cipher
            .decrypt(&nonce.into(), payload)
            .map_err(|_| SealError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_in_its_context() {
        let s = Sealer::new(&MasterKey::generate());
        let sealed = s.seal("merchant:M1", b"ju6tygh7u7tdg554k098ujd5468o");
        assert!(!sealed.windows(8).any(|w| w == b"ju6tygh7"));
        assert_eq!(
            s.open("merchant:M1", &sealed).unwrap(),
            b"ju6tygh7u7tdg554k098ujd5468o"
        );
        assert!(s.open("merchant:M2", &sealed).is_err());
        let other = Sealer::new(&MasterKey::generate());
        assert!(other.open("merchant:M1", &sealed).is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(s.open("merchant:M1", &tampered).is_err());
    }

    #[test]
    fn hex_round_trip_and_derivation() {
        let k = MasterKey::generate();
        let back = MasterKey::from_hex(&k.to_hex()).unwrap();
        assert_eq!(k.derive("otp"), back.derive("otp"));
        assert_ne!(k.derive("otp"), k.derive("token"));
        assert!(MasterKey::from_hex("abc").is_none());
        assert_eq!(format!("{k:?}"), "MasterKey([redacted])");
    }
}
