//! Subscription keys with API Management semantics: the header first, the query parameter only when
//! the header is absent; keys kept as SHA-256 hashes; primary and secondary; scopes and states.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// The SHA-256 of a key.
pub type KeyHash = [u8; 32];

/// Hashes a plain key.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Formats a hash the way the config writes it: `sha256:<hex>`.
pub fn format_hash(hash: &KeyHash) -> String {
    format!("sha256:{}", hex::encode(hash))
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_hash(s: &str) -> Option<KeyHash> {
    let hex_part = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// A subscription's lifecycle state; only `Active` grants access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Grants access.
    Active,
    /// Every other state: suspended, cancelled, expired, submitted, rejected.
    Inactive,
}

/// Which APIs a subscription covers, resolved to API indices at compile time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every API.
    All,
    /// These API indices (sorted).
    Apis(Vec<usize>),
}

impl Scope {
    fn covers(&self, api: usize) -> bool {
        match self {
            Scope::All => true,
            Scope::Apis(apis) => apis.binary_search(&api).is_ok(),
        }
    }
}

/// One subscription.
#[derive(Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The configured id, shown to the backend as `{subscription.id}`.
    pub id: Arc<str>,
    /// Lifecycle state.
    pub state: State,
    /// Covered APIs.
    pub scope: Scope,
}

/// Every subscription, indexed by key hash.
#[derive(Debug, Default)]
pub struct SubscriptionStore {
    /// Header name, lower-case.
    pub header: String,
    /// Query parameter name.
    pub query: String,
    /// Remove the key from the request before it goes upstream.
    pub remove_key: bool,
    subscriptions: Vec<Subscription>,
    by_hash: HashMap<KeyHash, usize>,
}

/// Where the key was found, so exactly that place can be stripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLocation {
    /// In the header.
    Header,
    /// In the query parameter.
    Query,
}

/// The outcome of the subscription step for one API.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck<'a> {
    /// A valid key for this API.
    Valid(&'a Subscription),
    /// No key, and none needed.
    NotNeeded,
    /// No key, but one is required.
    Missing,
    /// A key that is unknown, inactive or out of scope.
    Invalid,
}

impl SubscriptionStore {
    /// A store with the given parameter names.
    pub fn new(header: String, query: String, remove_key: bool) -> Self {
        SubscriptionStore {
            header,
            query,
            remove_key,
            ..Default::default()
        }
    }

    /// Makes room for `subscriptions` more subscriptions with `keys` keys between them, so that a
    /// large file is compiled without the tables growing (and rehashing) step by step.
    pub fn reserve(&mut self, subscriptions: usize, keys: usize) {
        self.subscriptions.reserve_exact(subscriptions);
        self.by_hash.reserve(keys);
    }

    /// Adds a subscription and its key hashes; returns the hash already owned by another subscription
    /// if there is a clash.
    pub fn insert(&mut self, sub: Subscription, hashes: &[KeyHash]) -> Result<(), Arc<str>> {
        for h in hashes {
            if let Some(&other) = self.by_hash.get(h) {
                return Err(self.subscriptions[other].id.clone());
            }
        }
        let idx = self.subscriptions.len();
        self.subscriptions.push(sub);
        for h in hashes {
            self.by_hash.insert(*h, idx);
        }
        Ok(())
    }

    /// Number of subscriptions and of keys.
    pub fn counts(&self) -> (usize, usize) {
        (self.subscriptions.len(), self.by_hash.len())
    }

    /// Checks a presented key (or its absence) for the API at index `api`.
    pub fn check(&self, api: usize, key: Option<&[u8]>, required: bool) -> KeyCheck<'_> {
        match key {
            Some(key) => {
                let hash: KeyHash = Sha256::digest(key).into();
                match self.by_hash.get(&hash).map(|&i| &self.subscriptions[i]) {
                    Some(sub) if sub.state == State::Active && sub.scope.covers(api) => {
                        KeyCheck::Valid(sub)
                    }
                    _ => KeyCheck::Invalid,
                }
            }
            None if required => KeyCheck::Missing,
            None => KeyCheck::NotNeeded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SubscriptionStore {
        let mut s = SubscriptionStore::new(
            "ocp-apim-subscription-key".into(),
            "subscription-key".into(),
            true,
        );
        s.insert(
            Subscription {
                id: "all".into(),
                state: State::Active,
                scope: Scope::All,
            },
            &[hash_key("k-all"), hash_key("k-all-2")],
        )
        .unwrap();
        s.insert(
            Subscription {
                id: "api1".into(),
                state: State::Active,
                scope: Scope::Apis(vec![1]),
            },
            &[hash_key("k-api1")],
        )
        .unwrap();
        s.insert(
            Subscription {
                id: "off".into(),
                state: State::Inactive,
                scope: Scope::All,
            },
            &[hash_key("k-off")],
        )
        .unwrap();
        s
    }

    #[test]
    fn keys_states_and_scopes() {
        let s = store();
        assert!(
            matches!(s.check(0, Some(b"k-all"), true), KeyCheck::Valid(sub) if &*sub.id == "all")
        );
        assert!(matches!(
            s.check(0, Some(b"k-all-2"), true),
            KeyCheck::Valid(_)
        ));
        assert_eq!(s.check(0, Some(b"k-api1"), true), KeyCheck::Invalid);
        assert!(matches!(
            s.check(1, Some(b"k-api1"), true),
            KeyCheck::Valid(_)
        ));
        assert_eq!(s.check(0, Some(b"k-off"), true), KeyCheck::Invalid);
        assert_eq!(s.check(0, Some(b"nope"), false), KeyCheck::Invalid);
        assert_eq!(s.check(0, None, true), KeyCheck::Missing);
        assert_eq!(s.check(0, None, false), KeyCheck::NotNeeded);
    }

    #[test]
    fn duplicate_key_is_refused() {
        let mut s = store();
        let err = s.insert(
            Subscription {
                id: "dup".into(),
                state: State::Active,
                scope: Scope::All,
            },
            &[hash_key("k-api1")],
        );
        assert_eq!(err.unwrap_err().as_ref(), "api1");
    }

    #[test]
    fn hash_format_roundtrip() {
        let h = hash_key("abc");
        assert_eq!(
            format_hash(&h),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_hash(&format_hash(&h)), Some(h));
        assert_eq!(parse_hash("sha256:zz"), None);
        assert_eq!(parse_hash("md5:00"), None);
    }
}
