//! Merchants, as the wire endpoints need them: looked up on every request, so
//! cached in memory. A merchant never changes once created (a changed
//! registration is refused with 409), which makes the cache safe on every
//! node without invalidation.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use payrail_core::AccountId;
use payrail_store::{Store, StoreError, mobikwik};
use secrecy::{ExposeSecret, SecretString};

pub struct Merchant {
    pub mid: String,
    pub name: String,
    pub secret: SecretString,
    /// Signs `/tokenregenerate` when configured; otherwise `secret` does.
    pub regen_secret: Option<SecretString>,
    pub aggregated_ids: Vec<String>,
    pub account: AccountId,
}

impl Merchant {
    pub fn secret_bytes(&self, regen: bool) -> &[u8] {
        match (&self.regen_secret, regen) {
            (Some(s), true) => s.expose_secret().as_bytes(),
            _ => self.secret.expose_secret().as_bytes(),
        }
    }

    pub(crate) fn from_row(row: mobikwik::MerchantRow) -> Merchant {
        Merchant {
            mid: row.mid,
            name: row.name,
            secret: row.secret,
            regen_secret: row.regen_secret,
            aggregated_ids: row.aggregated_ids,
            account: row.account,
        }
    }
}

#[derive(Default)]
pub struct MerchantCache {
    known: RwLock<HashMap<String, Arc<Merchant>>>,
}

impl MerchantCache {
    pub fn insert(&self, m: Merchant) -> Arc<Merchant> {
        let m = Arc::new(m);
        self.known.write().insert(m.mid.clone(), Arc::clone(&m));
        m
    }

    /// The merchant, from memory or else from the database. Unknown mids are
    /// not remembered: another node may create the merchant at any time.
    pub async fn get(&self, store: &Store, mid: &str) -> Result<Option<Arc<Merchant>>, StoreError> {
        if let Some(m) = self.known.read().get(mid) {
            return Ok(Some(Arc::clone(m)));
        }
        let owned = mid.to_string();
        let row = store.read(move |tx| mobikwik::merchant(tx, &owned)).await?;
        Ok(row.map(|r| self.insert(Merchant::from_row(r))))
    }
}
