//! Subscription keys with API Management semantics: the header first, the query parameter only when
//! the header is absent; keys kept as SHA-256 hashes; primary and secondary; scopes and states.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::digest::Sha256;

use crate::config::{ConfigErrors, Source};

/// The SHA-256 of a key.
pub type KeyHash = [u8; 32];

/// Hashes a plain key.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes())
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
    /// The product of a `product:NAME` scope.
    pub product: Option<Arc<str>>,
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
                let hash: KeyHash = Sha256::digest(key);
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

/// Compiles `subscriptions` (inline keys) against the APIs and products by name.
pub(super) fn compile_subscriptions(
    src: &Source,
    api_names: &HashMap<&str, usize>,
    product_apis: &HashMap<&str, Vec<usize>>,
    errs: &mut ConfigErrors,
) -> SubscriptionStore {
    let s = &src.file.subscriptions;
    let header = s
        .header
        .as_deref()
        .unwrap_or("ocp-apim-subscription-key")
        .to_ascii_lowercase();
    let query = s.query.clone().unwrap_or_else(|| "subscription-key".into());
    if header.is_empty() || !header.bytes().all(super::compile::is_token_char) {
        errs.push(
            "subscriptions.header",
            format!("`{header}` is not a header name"),
        );
    }
    if query.is_empty() {
        errs.push("subscriptions.query", "must not be empty");
    }
    let mut store = SubscriptionStore::new(header, query, s.remove_key.unwrap_or(true));
    let keys = s
        .keys
        .iter()
        .map(|k| usize::from(k.primary.is_some()) + usize::from(k.secondary.is_some()));
    store.reserve(s.keys.len(), keys.sum());
    let mut ids = HashSet::with_capacity(s.keys.len());
    for (i, k) in s.keys.iter().enumerate() {
        // Paths are formatted only for an error or a substituted key: a policy of 100,000 keys
        // would otherwise format 200,000 strings per load for nothing.
        let path = || format!("subscriptions.keys[{i}]");
        if !ids.insert(k.id.as_str()) {
            errs.push(
                format!("{}.id", path()),
                format!("`{}` is used by two subscriptions", k.id),
            );
        }
        let scope = match k.scope.as_deref().unwrap_or("all") {
            "all" => Some(Scope::All),
            other => match other.split_once(':') {
                Some(("product", name)) => match product_apis.get(name) {
                    Some(apis) => Some(Scope::Apis(apis.clone())),
                    None => {
                        errs.push(
                            format!("{}.scope", path()),
                            format!("no product is named `{name}`"),
                        );
                        None
                    }
                },
                Some(("api", name)) => match api_names.get(name) {
                    Some(&idx) => Some(Scope::Apis(vec![idx])),
                    None => {
                        errs.push(
                            format!("{}.scope", path()),
                            format!("no API is named `{name}`"),
                        );
                        None
                    }
                },
                _ => {
                    errs.push(
                        format!("{}.scope", path()),
                        format!("`{other}`: use `all`, `product:NAME` or `api:NAME`"),
                    );
                    None
                }
            },
        };
        let state = match k.state.as_deref().unwrap_or("active") {
            "active" => State::Active,
            "suspended" | "cancelled" | "expired" | "submitted" | "rejected" => State::Inactive,
            other => {
                errs.push(
                    format!("{}.state", path()),
                    format!("`{other}`: use active, suspended, cancelled or expired"),
                );
                State::Inactive
            }
        };
        // At most two: no allocation.
        let mut hashes: [Option<KeyHash>; 2] = [None, None];
        for (slot, (field, value)) in [("primary", &k.primary), ("secondary", &k.secondary)]
            .into_iter()
            .enumerate()
        {
            let Some(value) = value else { continue };
            let v = value.expose();
            if let Some(h) = parse_hash(v) {
                hashes[slot] = Some(h);
                continue;
            }
            let fpath = format!("{}.{field}", path());
            if v.starts_with("sha256:") {
                errs.push(&fpath, "a hash is `sha256:` followed by 64 hex digits");
            } else if src.substituted.contains(&fpath) {
                if v.is_empty() || v.len() > 256 {
                    errs.push(&fpath, "a key is 1 to 256 characters");
                } else {
                    hashes[slot] = Some(hash_key(v));
                }
            } else {
                errs.push(&fpath, "plain keys must not be written in the file: store `sha256:<hex>` (portcullis hash-key) or read the key with ${env:NAME} or ${file:PATH}");
            }
        }
        let hashes: &[KeyHash] = match &hashes {
            [Some(a), Some(b)] => &[*a, *b],
            [Some(a), None] | [None, Some(a)] => std::slice::from_ref(a),
            [None, None] => &[],
        };
        if hashes.is_empty() {
            errs.push(path(), "a subscription needs a primary or a secondary key");
        }
        if let Some(scope) = scope {
            let product = match k.scope.as_deref().and_then(|s| s.split_once(':')) {
                Some(("product", name)) => Some(Arc::from(name)),
                _ => None,
            };
            let sub = Subscription {
                id: Arc::from(k.id.as_str()),
                state,
                scope,
                product,
            };
            if let Err(other) = store.insert(sub, hashes) {
                errs.push(
                    path(),
                    format!("a key of this subscription is also a key of `{other}`"),
                );
            }
        }
    }
    store
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
                product: None,
            },
            &[hash_key("k-all"), hash_key("k-all-2")],
        )
        .unwrap();
        s.insert(
            Subscription {
                id: "api1".into(),
                state: State::Active,
                scope: Scope::Apis(vec![1]),
                product: None,
            },
            &[hash_key("k-api1")],
        )
        .unwrap();
        s.insert(
            Subscription {
                id: "off".into(),
                state: State::Inactive,
                scope: Scope::All,
                product: None,
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
                product: None,
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
