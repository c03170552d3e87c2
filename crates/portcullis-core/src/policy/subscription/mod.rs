//! Subscription keys with API Management semantics: the header first, the query parameter only when
//! the header is absent; keys kept as SHA-256 hashes; primary and secondary; scopes and states.
//!
//! Subscriptions come from three places, each a [`KeyTable`]: inline `subscriptions.keys` (compiled
//! with the policy), `subscriptions.keys_file` (recompiled on its own when the file changes, see
//! [`keys_file`]) and run-time subscriptions made through the admin API (see
//! [`super::runtime_keys`]). A key is looked up in that order. An id is configured (inline or file)
//! at most once; a run-time subscription whose id is also configured is shadowed: its keys are
//! refused while the configured one exists.
//!
//! A table is dense: one hash index (key digest -> entry number), one array of entries (id, state,
//! scope number), an id index of entry numbers, and the few distinct scopes, by name. Scopes are
//! resolved by name at check time ([`ScopeResolver`]), so a table compiled against one policy stays
//! correct (fail closed: an unknown name covers nothing) under the next.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::digest::Sha256;

use crate::config::{ConfigErrors, Source};

pub mod keys_file;

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

/// Parses `sha256:<64 hex digits>` (either case).
///
/// By arithmetic on all 64 digits at once, then pairs packed into bytes: both loops have no
/// branches and no table lookups, so the compiler vectorizes them (a keys file of 100,000 lines
/// spent a third of its load in the `hex` crate's decoder, and a sixth in a 256-entry table).
pub fn parse_hash(s: &str) -> Option<KeyHash> {
    let hex: &[u8; 64] = s.strip_prefix("sha256:")?.as_bytes().try_into().ok()?;
    let mut nibbles = [0u8; 64];
    let mut bad = 0u8;
    for (n, &c) in nibbles.iter_mut().zip(hex) {
        let digit = c.wrapping_sub(b'0');
        // `| 0x20` maps exactly `A`-`F` and `a`-`f` onto `a`-`f`.
        let letter = (c | 0x20).wrapping_sub(b'a');
        let is_digit = digit < 10;
        let is_letter = letter < 6;
        bad |= u8::from(!(is_digit | is_letter));
        *n = if is_digit {
            digit
        } else {
            letter.wrapping_add(10)
        };
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = (pair[0] << 4) | (pair[1] & 0x0f);
    }
    (bad == 0).then_some(out)
}

/// A subscription's lifecycle state; only `Active` grants access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Grants access.
    Active,
    /// Every other state: suspended, cancelled, expired, submitted, rejected.
    Inactive,
}

/// The states a subscription may be written with, and whether each grants access.
pub fn parse_state(s: &str) -> Option<State> {
    match s {
        "active" => Some(State::Active),
        "suspended" | "cancelled" | "expired" | "submitted" | "rejected" => Some(State::Inactive),
        _ => None,
    }
}

/// Which APIs a subscription covers, resolved to API indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every API.
    All,
    /// These API indices (sorted).
    Apis(Vec<usize>),
}

/// Resolves a scope name (`all`, `product:NAME`, `api:NAME`) against one policy's APIs and products.
#[derive(Debug, Default, Clone)]
pub struct ScopeResolver {
    apis: HashMap<Box<str>, usize>,
    products: HashMap<Box<str>, Vec<usize>>,
}

/// Why a scope name does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// `product:NAME` with no such product.
    #[error("no product is named `{0}`")]
    NoProduct(String),
    /// `api:NAME` with no such API.
    #[error("no API is named `{0}`")]
    NoApi(String),
    /// Neither form.
    #[error("use `all`, `product:NAME` or `api:NAME`")]
    Malformed,
}

impl ScopeResolver {
    /// A resolver for these APIs and products (by name).
    pub fn new(api_names: &HashMap<&str, usize>, product_apis: &HashMap<&str, Vec<usize>>) -> Self {
        ScopeResolver {
            apis: api_names.iter().map(|(k, v)| (Box::from(*k), *v)).collect(),
            products: product_apis
                .iter()
                .map(|(k, v)| (Box::from(*k), v.clone()))
                .collect(),
        }
    }

    /// The APIs a scope name covers.
    pub fn resolve(&self, scope: &str) -> Result<Scope, ScopeError> {
        match scope {
            "all" => Ok(Scope::All),
            other => match other.split_once(':') {
                Some(("product", name)) => self
                    .products
                    .get(name)
                    .map(|apis| Scope::Apis(apis.clone()))
                    .ok_or_else(|| ScopeError::NoProduct(name.into())),
                Some(("api", name)) => self
                    .apis
                    .get(name)
                    .map(|&i| Scope::Apis(vec![i]))
                    .ok_or_else(|| ScopeError::NoApi(name.into())),
                _ => Err(ScopeError::Malformed),
            },
        }
    }

    /// Whether a valid scope name exists in this policy (for a new run-time subscription).
    pub fn check(&self, scope: &str) -> Result<(), ScopeError> {
        match scope {
            "all" => Ok(()),
            other => match other.split_once(':') {
                Some(("product", name)) if self.products.contains_key(name) => Ok(()),
                Some(("product", name)) => Err(ScopeError::NoProduct(name.into())),
                Some(("api", name)) if self.apis.contains_key(name) => Ok(()),
                Some(("api", name)) => Err(ScopeError::NoApi(name.into())),
                _ => Err(ScopeError::Malformed),
            },
        }
    }

    /// Whether the scope named `scope` covers the API at index `api`, without allocating. A name
    /// this policy does not know covers nothing (fail closed).
    fn covers(&self, scope: &ScopeName, api: usize) -> bool {
        match scope.kind {
            ScopeKind::All => true,
            ScopeKind::Product => self
                .products
                .get(&*scope.name)
                .is_some_and(|apis| apis.binary_search(&api).is_ok()),
            ScopeKind::Api => self.apis.get(&*scope.name) == Some(&api),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScopeKind {
    All,
    Product,
    Api,
}

/// One distinct scope of a table: its kind and the product or API name.
#[derive(Debug)]
struct ScopeName {
    kind: ScopeKind,
    /// The product or API name (empty for `all`).
    name: Arc<str>,
    /// The product, shared by every subscription of that scope (`{subscription.product}`-like facts).
    product: Option<Arc<str>>,
}

impl ScopeName {
    fn parse(scope: &str) -> Option<ScopeName> {
        let (kind, name) = match scope {
            "all" => (ScopeKind::All, ""),
            other => match other.split_once(':') {
                Some(("product", n)) if !n.is_empty() => (ScopeKind::Product, n),
                Some(("api", n)) if !n.is_empty() => (ScopeKind::Api, n),
                _ => return None,
            },
        };
        let name: Arc<str> = Arc::from(name);
        Some(ScopeName {
            kind,
            product: (kind == ScopeKind::Product).then(|| name.clone()),
            name,
        })
    }

    fn text(&self) -> String {
        match self.kind {
            ScopeKind::All => "all".into(),
            ScopeKind::Product => format!("product:{}", self.name),
            ScopeKind::Api => format!("api:{}", self.name),
        }
    }
}

/// Hashes a key hash by its first eight bytes. The map's keys are SHA-256 digests, uniform whatever
/// the keys were (a caller chooses a key, never its digest), so no further mixing is needed and a
/// lookup costs one multiply-free load instead of SipHash over 32 bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct DigestHasher;

impl std::hash::BuildHasher for DigestHasher {
    type Hasher = DigestPrefix;
    fn build_hasher(&self) -> DigestPrefix {
        DigestPrefix(0)
    }
}

/// See [`DigestHasher`].
#[derive(Debug, Default, Clone, Copy)]
pub struct DigestPrefix(u64);

impl std::hash::Hasher for DigestPrefix {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its bytes (after a length prefix, ignored below); anything else
        // still mixes in, so the map stays correct (only slower) whatever it is given.
        let mut chunk = [0u8; 8];
        let n = bytes.len().min(8);
        chunk[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(chunk);
    }

    fn write_usize(&mut self, _len: usize) {}
}

pub use crate::check::decision::SubscriptionId;

/// One subscription of a table.
#[derive(Debug)]
struct Entry {
    id: SubscriptionId,
    scope: u32,
    state: State,
}

/// A valid key's subscription, as the decision records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// The subscription's id, shown to the backend as `{subscription.id}`.
    pub id: SubscriptionId,
    /// The product of a `product:NAME` scope.
    pub product: Option<Arc<str>>,
}

/// Subscriptions indexed by key hash, immutable once built (see [`KeyTableBuilder`]).
#[derive(Debug, Default)]
pub struct KeyTable {
    /// Key hash -> entry index.
    by_hash: HashMap<KeyHash, u32, DigestHasher>,
    entries: Vec<Entry>,
    /// Entry indices by id: four bytes a slot, the id itself is the entry's (no second copy).
    by_id: hashbrown::HashTable<u32>,
    ids: IdHasher,
    scopes: Vec<ScopeName>,
}

/// Hashes ids for [`KeyTable::by_id`]. Ids come from the operator's files and the admin API, not
/// from callers, so a fast seeded hash is enough.
type IdHasher = foldhash::fast::RandomState;

/// A subscription as listed (never a key or a hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The id.
    pub id: SubscriptionId,
    /// Whether it grants access.
    pub active: bool,
    /// The scope as written.
    pub scope: String,
}

impl KeyTable {
    /// Number of subscriptions and of keys.
    pub fn counts(&self) -> (usize, usize) {
        (self.entries.len(), self.by_hash.len())
    }

    fn find(&self, hash: &KeyHash) -> Option<&Entry> {
        let &i = self.by_hash.get(hash)?;
        Some(&self.entries[i as usize])
    }

    fn find_id(&self, id: &str) -> Option<&Entry> {
        use std::hash::BuildHasher;
        let h = self.ids.hash_one(id);
        let &i = self
            .by_id
            .find(h, |&e| &*self.entries[e as usize].id == id)?;
        Some(&self.entries[i as usize])
    }

    /// Whether a subscription has this id.
    pub fn contains_id(&self, id: &str) -> bool {
        self.find_id(id).is_some()
    }

    /// Whether a key hash belongs to a subscription of this table.
    pub fn contains_hash(&self, hash: &KeyHash) -> bool {
        self.find(hash).is_some()
    }

    /// The id of the subscription owning `hash`.
    pub fn owner(&self, hash: &KeyHash) -> Option<SubscriptionId> {
        self.find(hash).map(|e| e.id.clone())
    }

    /// One subscription by id, as listed.
    pub fn get(&self, id: &str) -> Option<Listed> {
        self.find_id(id).map(|e| self.listed(e))
    }

    fn listed(&self, e: &Entry) -> Listed {
        Listed {
            id: e.id.clone(),
            active: e.state == State::Active,
            scope: self.scopes[e.scope as usize].text(),
        }
    }

    /// Every subscription, by id.
    pub fn list(&self) -> impl Iterator<Item = Listed> + '_ {
        let mut order: Vec<&Entry> = self.entries.iter().collect();
        order.sort_by(|a, b| a.id.cmp(&b.id));
        order.into_iter().map(|e| self.listed(e))
    }

    fn verdict(&self, e: &Entry, api: usize, resolver: &ScopeResolver) -> Option<Matched> {
        let scope = &self.scopes[e.scope as usize];
        (e.state == State::Active && resolver.covers(scope, api)).then(|| Matched {
            id: e.id.clone(),
            product: scope.product.clone(),
        })
    }
}

/// Why an entry cannot join a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clash {
    /// Entry `.0` has the id of entry `.1` (indices in the order pushed).
    Id(usize, usize),
    /// Entry `.0` has a key of entry `.1`.
    Key(usize, usize),
}

/// Builds a [`KeyTable`] from subscriptions pushed one at a time (no parsed copy of a whole file is
/// held: each line becomes a few fixed-size values at once, and is indexed by key and by id as it
/// is pushed, so nothing is walked a second time).
#[derive(Debug, Default)]
pub struct KeyTableBuilder {
    table: KeyTable,
    /// Keys shared by two subscriptions, as pushed.
    clashes: Vec<Clash>,
    /// Duplicate ids, as pushed; reported after the shared keys.
    id_clashes: Vec<Clash>,
    scope_index: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
}

impl KeyTableBuilder {
    /// A builder with room for `subscriptions` subscriptions and `keys` keys.
    pub fn with_capacity(subscriptions: usize, keys: usize) -> Self {
        let mut b = KeyTableBuilder::default();
        b.table.entries.reserve_exact(subscriptions);
        b.table.by_hash.reserve(keys);
        b.table.by_id = hashbrown::HashTable::with_capacity(subscriptions);
        b.scope_index.reserve(16);
        b
    }

    /// Adds one subscription; `scope` must be `all`, `product:NAME` or `api:NAME` (else `false`
    /// and nothing is added). Duplicates are found by [`KeyTableBuilder::finish`].
    pub fn push(&mut self, id: &str, state: State, scope: &str, hashes: &[KeyHash]) -> bool {
        let Some(scope) = self.scope(scope).or_else(|| self.add_scope(scope)) else {
            return false;
        };
        self.push_scoped(id, state, scope, hashes);
        true
    }

    /// The number of a scope already added (its name was checked then).
    pub fn scope(&self, scope: &str) -> Option<u32> {
        self.scope_index.get(scope).copied()
    }

    /// Adds a scope (`all`, `product:NAME` or `api:NAME`, else `None`), its number for
    /// [`KeyTableBuilder::push_scoped`].
    pub fn add_scope(&mut self, scope: &str) -> Option<u32> {
        if let Some(s) = self.scope(scope) {
            return Some(s);
        }
        let name = ScopeName::parse(scope)?;
        let s = u32::try_from(self.table.scopes.len()).unwrap_or(u32::MAX);
        self.table.scopes.push(name);
        self.scope_index.insert(Box::from(scope), s);
        Some(s)
    }

    /// [`KeyTableBuilder::push`] with a scope number from [`KeyTableBuilder::scope`] or
    /// [`KeyTableBuilder::add_scope`].
    pub fn push_scoped(&mut self, id: &str, state: State, scope: u32, hashes: &[KeyHash]) {
        use std::hash::BuildHasher;
        let KeyTable {
            by_hash,
            entries,
            by_id,
            ids,
            ..
        } = &mut self.table;
        let idx = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        entries.push(Entry {
            id: SubscriptionId::new(id),
            scope,
            state,
        });
        // The first of an id keeps it; the clash is reported by `finish`. One probe.
        let h = ids.hash_one(id);
        match by_id.find(h, |&j| &*entries[j as usize].id == id) {
            Some(&j) => self.id_clashes.push(Clash::Id(idx as usize, j as usize)),
            None => {
                by_id.insert_unique(h, idx, |&j| ids.hash_one(&*entries[j as usize].id));
            }
        }
        for h in hashes {
            // The first owner keeps the key; the clash is reported by `finish`. One probe.
            match by_hash.entry(*h) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    if *o.get() != idx {
                        self.clashes
                            .push(Clash::Key(idx as usize, *o.get() as usize));
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(idx);
                }
            }
        }
    }

    /// Number of subscriptions pushed.
    pub fn len(&self) -> usize {
        self.table.entries.len()
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.table.entries.is_empty()
    }

    /// The table, with every key shared by two subscriptions and then every duplicate id, as a
    /// [`Clash`] naming the later entry first.
    pub fn finish(self) -> (KeyTable, Vec<Clash>) {
        let mut t = self.table;
        let mut clashes = self.clashes;
        clashes.extend(self.id_clashes);
        t.entries.shrink_to_fit();
        (t, clashes)
    }
}

/// A keys file put in service: its subscriptions and keys, and the table it replaced.
pub type Swapped = ((usize, usize), Arc<KeyTable>);

/// How long a reloading thread waits for the checks still reading a replaced table.
const RETIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Frees a replaced table on the calling (reloading, blocking) thread once the checks that were
/// reading it are done: freeing 100,000 ids takes milliseconds, which the last check to let go
/// would otherwise pay. Past [`RETIRE_WAIT`] the last reader frees it.
pub fn retire(old: Arc<KeyTable>) {
    let deadline = std::time::Instant::now() + RETIRE_WAIT;
    while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(old);
}

/// Where callers send keys, and every subscription: inline, from the keys file, and made at run
/// time.
#[derive(Debug)]
pub struct SubscriptionStore {
    /// Header name, lower-case.
    pub header: String,
    /// Query parameter name.
    pub query: String,
    /// Remove the key from the request before it goes upstream.
    pub remove_key: bool,
    inline: KeyTable,
    /// `subscriptions.keys_file` (resolved) and how it is shown in errors, when configured.
    keys_file: Option<(std::path::PathBuf, String)>,
    file: ArcSwap<KeyTable>,
    runtime: Arc<ArcSwap<KeyTable>>,
    resolver: ScopeResolver,
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
pub enum KeyCheck {
    /// A valid key for this API.
    Valid(Matched),
    /// No key, and none needed.
    NotNeeded,
    /// No key, but one is required.
    Missing,
    /// A key that is unknown, inactive or out of scope.
    Invalid,
}

impl SubscriptionStore {
    /// A store with the given parameter names and inline subscriptions, without a keys file, whose
    /// run-time table is `runtime`.
    pub fn new(
        header: String,
        query: String,
        remove_key: bool,
        inline: KeyTable,
        resolver: ScopeResolver,
        runtime: Arc<ArcSwap<KeyTable>>,
    ) -> Self {
        SubscriptionStore {
            header,
            query,
            remove_key,
            inline,
            keys_file: None,
            file: ArcSwap::from_pointee(KeyTable::default()),
            runtime,
            resolver,
        }
    }

    /// Inline plus keys-file subscriptions and keys (run-time ones are counted apart).
    pub fn counts(&self) -> (usize, usize) {
        let (s1, k1) = self.inline.counts();
        let (s2, k2) = self.file.load().counts();
        (s1 + s2, k1 + k2)
    }

    /// The keys file, resolved, when one is configured.
    pub fn keys_file(&self) -> Option<&std::path::Path> {
        self.keys_file.as_ref().map(|(p, _)| p.as_path())
    }

    /// Reads the keys file again and, when it is valid, puts its table in service in place of the
    /// current one (nothing else of the policy changes). A broken file keeps the current table.
    /// `Ok(None)` without a keys file; else the file's subscriptions and keys.
    pub fn reload_keys_file(&self) -> Result<Option<(usize, usize)>, ConfigErrors> {
        Ok(self.swap_keys_file()?.map(|(counts, old)| {
            retire(old);
            counts
        }))
    }

    /// [`SubscriptionStore::reload_keys_file`], handing back the replaced table for the caller to
    /// [`retire`] once it has reported the reload.
    pub fn swap_keys_file(&self) -> Result<Option<Swapped>, ConfigErrors> {
        let Some((path, shown)) = &self.keys_file else {
            return Ok(None);
        };
        let table = keys_file::load(path, shown, &self.resolver, &self.inline)?;
        let counts = table.counts();
        Ok(Some((counts, self.file.swap(Arc::new(table)))))
    }

    /// Whether `id` is a configured subscription (inline or keys file): a run-time subscription of
    /// that id is shadowed.
    pub fn is_configured(&self, id: &str) -> bool {
        self.inline.contains_id(id) || self.file.load().contains_id(id)
    }

    /// Whether a scope name is valid in this policy.
    pub fn check_scope(&self, scope: &str) -> Result<(), ScopeError> {
        self.resolver.check(scope)
    }

    /// One configured subscription (inline or keys file), never a key.
    pub fn configured_one(&self, id: &str) -> Option<Listed> {
        self.inline.get(id).or_else(|| self.file.load().get(id))
    }

    fn lookup(&self, hash: &KeyHash, api: usize) -> Option<Matched> {
        if let Some(e) = self.inline.find(hash) {
            return self.inline.verdict(e, api, &self.resolver);
        }
        let file = self.file.load();
        if let Some(e) = file.find(hash) {
            return file.verdict(e, api, &self.resolver);
        }
        let runtime = self.runtime.load();
        let e = runtime.find(hash)?;
        if self.inline.contains_id(&e.id) || file.contains_id(&e.id) {
            // Shadowed by a configured subscription of the same id.
            return None;
        }
        runtime.verdict(e, api, &self.resolver)
    }

    /// Checks a presented key (or its absence) for the API at index `api`.
    pub fn check(&self, api: usize, key: Option<&[u8]>, required: bool) -> KeyCheck {
        match key {
            Some(key) => {
                let hash: KeyHash = Sha256::digest(key);
                match self.lookup(&hash, api) {
                    Some(m) => KeyCheck::Valid(m),
                    None => KeyCheck::Invalid,
                }
            }
            None if required => KeyCheck::Missing,
            None => KeyCheck::NotNeeded,
        }
    }
}

/// Compiles `subscriptions` (inline keys and the keys file) against the APIs and products by name;
/// `runtime` is the table of run-time subscriptions, shared by every policy.
pub(in crate::policy) fn compile_subscriptions(
    src: &Source,
    api_names: &HashMap<&str, usize>,
    product_apis: &HashMap<&str, Vec<usize>>,
    runtime: Arc<ArcSwap<KeyTable>>,
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
    let resolver = ScopeResolver::new(api_names, product_apis);
    let keys = s
        .keys
        .iter()
        .map(|k| usize::from(k.primary.is_some()) + usize::from(k.secondary.is_some()));
    let mut builder = KeyTableBuilder::with_capacity(s.keys.len(), keys.sum());
    // Errors of `subscriptions.keys`, put in the order of the keys once clashes are known.
    let outer = errs;
    let mut local = ConfigErrors::default();
    let errs = &mut local;
    // The inline index of each pushed subscription, to name a clash.
    let mut pushed: Vec<usize> = Vec::with_capacity(s.keys.len());
    for (i, k) in s.keys.iter().enumerate() {
        // Paths are formatted only for an error or a substituted key.
        let path = || format!("subscriptions.keys[{i}]");
        let scope_text = k.scope.as_deref().unwrap_or("all");
        let scope_ok = match resolver.check(scope_text) {
            Ok(()) => true,
            Err(ScopeError::Malformed) => {
                errs.push(
                    format!("{}.scope", path()),
                    format!("`{scope_text}`: use `all`, `product:NAME` or `api:NAME`"),
                );
                false
            }
            Err(e) => {
                errs.push(format!("{}.scope", path()), e.to_string());
                false
            }
        };
        let state = match k.state.as_deref().map_or(Some(State::Active), parse_state) {
            Some(s) => s,
            None => {
                errs.push(
                    format!("{}.state", path()),
                    format!(
                        "`{}`: use active, suspended, cancelled or expired",
                        k.state.as_deref().unwrap_or_default()
                    ),
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
        if scope_ok && builder.push(&k.id, state, scope_text, hashes) {
            pushed.push(i);
        }
    }
    let (inline, clashes) = builder.finish();
    for c in clashes {
        match c {
            Clash::Id(a, _) => errs.push(
                format!("subscriptions.keys[{}].id", pushed[a]),
                format!("`{}` is used by two subscriptions", s.keys[pushed[a]].id),
            ),
            Clash::Key(a, b) => errs.push(
                format!("subscriptions.keys[{}]", pushed[a]),
                format!(
                    "a key of this subscription is also a key of `{}`",
                    s.keys[pushed[b]].id
                ),
            ),
        }
    }
    let index = |path: &str| {
        path.strip_prefix("subscriptions.keys[")
            .and_then(|r| r.split(']').next())
            .and_then(|n| n.parse::<usize>().ok())
    };
    local.0.sort_by_key(|e| index(&e.path));
    let errs = outer;
    errs.0.extend(local.0);
    let mut store = SubscriptionStore::new(
        header,
        query,
        s.remove_key.unwrap_or(true),
        inline,
        resolver,
        runtime,
    );
    if let Some(file) = &s.keys_file {
        if file.trim().is_empty() {
            errs.push("subscriptions.keys_file", "must not be empty");
        } else {
            let path = src.resolve(file);
            match keys_file::load(&path, file, &store.resolver, &store.inline) {
                Ok(table) => store.file = ArcSwap::from_pointee(table),
                Err(e) => errs.0.extend(e.0),
            }
            store.keys_file = Some((path, file.clone()));
        }
    }
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_parse_as_the_hex_crate_reads_them() {
        let h = hash_key("k");
        let lower = format_hash(&h);
        assert_eq!(parse_hash(&lower), Some(h));
        let upper = format!("sha256:{}", hex::encode_upper(h));
        assert_eq!(parse_hash(&upper), Some(h));
        assert_eq!(parse_hash(&lower[..lower.len() - 1]), None);
        assert_eq!(parse_hash(&format!("{lower}0")), None);
        assert_eq!(parse_hash(&lower.replace("sha256:", "sha512:")), None);
        assert_eq!(parse_hash(&lower["sha256:".len()..]), None);
        // 64 bytes that are not 64 characters.
        assert_eq!(parse_hash(&format!("sha256:{}", "\u{e9}".repeat(32))), None);
        // Every ASCII byte in every position of a pair: the same answer as the hex crate.
        for b in 0u8..128 {
            for at in [7, 8, 69, 70] {
                let mut text = lower.clone().into_bytes();
                text[at] = b;
                let text = String::from_utf8(text).unwrap();
                let mut want = [0u8; 32];
                let want = hex::decode_to_slice(&text[7..], &mut want)
                    .ok()
                    .map(|()| want);
                assert_eq!(parse_hash(&text), want, "{b} at {at}");
            }
        }
    }

    fn resolver() -> ScopeResolver {
        let apis: HashMap<&str, usize> = [("a0", 0), ("a1", 1)].into_iter().collect();
        let products: HashMap<&str, Vec<usize>> = [("p1", vec![1])].into_iter().collect();
        ScopeResolver::new(&apis, &products)
    }

    fn table(subs: &[(&str, State, &str, &[&str])]) -> KeyTable {
        let mut b = KeyTableBuilder::default();
        for (id, state, scope, keys) in subs {
            let hashes: Vec<KeyHash> = keys.iter().map(|k| hash_key(k)).collect();
            assert!(b.push(id, *state, scope, &hashes));
        }
        let (t, clashes) = b.finish();
        assert_eq!(clashes, []);
        t
    }

    fn store(runtime: KeyTable) -> SubscriptionStore {
        let inline = table(&[
            ("all", State::Active, "all", &["k-all", "k-all-2"]),
            ("api1", State::Active, "api:a1", &["k-api1"]),
            ("prod", State::Active, "product:p1", &["k-prod"]),
            ("off", State::Inactive, "all", &["k-off"]),
            ("gone", State::Active, "product:removed", &["k-gone"]),
        ]);
        SubscriptionStore::new(
            "ocp-apim-subscription-key".into(),
            "subscription-key".into(),
            true,
            inline,
            resolver(),
            Arc::new(ArcSwap::from_pointee(runtime)),
        )
    }

    #[test]
    fn keys_states_and_scopes() {
        let s = store(KeyTable::default());
        assert!(matches!(s.check(0, Some(b"k-all"), true), KeyCheck::Valid(m) if &*m.id == "all"));
        assert!(matches!(
            s.check(0, Some(b"k-all-2"), true),
            KeyCheck::Valid(_)
        ));
        assert_eq!(s.check(0, Some(b"k-api1"), true), KeyCheck::Invalid);
        assert!(matches!(
            s.check(1, Some(b"k-api1"), true),
            KeyCheck::Valid(_)
        ));
        assert_eq!(
            s.check(1, Some(b"k-prod"), true),
            KeyCheck::Valid(Matched {
                id: "prod".into(),
                product: Some("p1".into())
            })
        );
        assert_eq!(s.check(0, Some(b"k-prod"), true), KeyCheck::Invalid);
        assert_eq!(s.check(0, Some(b"k-off"), true), KeyCheck::Invalid);
        // A scope naming a product the policy does not have covers nothing.
        assert_eq!(s.check(1, Some(b"k-gone"), true), KeyCheck::Invalid);
        assert_eq!(s.check(0, Some(b"nope"), false), KeyCheck::Invalid);
        assert_eq!(s.check(0, None, true), KeyCheck::Missing);
        assert_eq!(s.check(0, None, false), KeyCheck::NotNeeded);
    }

    #[test]
    fn runtime_keys_are_looked_up_last_and_shadowed_by_configured_ids() {
        let s = store(table(&[
            ("rt", State::Active, "all", &["k-rt"]),
            // Same id as an inline subscription: shadowed.
            ("api1", State::Active, "all", &["k-shadowed"]),
            ("rt-off", State::Inactive, "all", &["k-rt-off"]),
        ]));
        assert!(matches!(s.check(0, Some(b"k-rt"), true), KeyCheck::Valid(m) if &*m.id == "rt"));
        assert_eq!(s.check(0, Some(b"k-shadowed"), true), KeyCheck::Invalid);
        assert_eq!(s.check(0, Some(b"k-rt-off"), true), KeyCheck::Invalid);
        assert!(s.is_configured("api1"));
        assert!(!s.is_configured("rt"));
    }

    #[test]
    fn duplicates_are_found_by_finish() {
        let mut b = KeyTableBuilder::default();
        b.push("a", State::Active, "all", &[hash_key("k1")]);
        b.push("b", State::Active, "all", &[hash_key("k2"), hash_key("k1")]);
        b.push("a", State::Active, "all", &[hash_key("k3")]);
        assert!(!b.push("c", State::Active, "bogus", &[hash_key("k4")]));
        let (t, clashes) = b.finish();
        assert_eq!(clashes, [Clash::Key(1, 0), Clash::Id(2, 0)]);
        assert_eq!(t.owner(&hash_key("k1")).as_deref(), Some("a"));
        let ids: Vec<_> = t.list().map(|l| l.id).collect();
        assert_eq!(ids, ["a", "a", "b"]);
    }

    #[test]
    fn ids_of_every_length_are_found_by_key_and_by_id() {
        // Up to 23 bytes an id is kept inline, longer ones are shared: both must read back whole.
        let ids: Vec<String> = [1, 22, 23, 24, 25, 128]
            .iter()
            .map(|&n| "i".repeat(n - 1) + "z")
            .collect();
        let mut b = KeyTableBuilder::default();
        for id in &ids {
            assert!(b.push(id, State::Active, "all", &[hash_key(id)]));
        }
        let (t, clashes) = b.finish();
        assert!(clashes.is_empty());
        for id in &ids {
            assert_eq!(t.owner(&hash_key(id)).as_deref(), Some(id.as_str()));
            assert_eq!(t.get(id).map(|l| l.id), Some(SubscriptionId::new(id)));
        }
        let listed: Vec<_> = t.list().map(|l| l.id.len()).collect();
        // By id: "i…iz" sorts before "iz", so the longest first.
        assert_eq!(listed, [128, 25, 24, 23, 22, 1]);
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
