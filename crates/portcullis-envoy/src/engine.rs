//! One filter config ([`Engine`]: its Envoy counters) and the state it shares with every filter
//! config of the same `filter_config` ([`Shared`]): the compiled policy (swapped whole on reload),
//! the `Runtime` whose key and token caches outlive reloads, the tokio runtime that does every
//! fetch on the module's own threads, and the file watcher.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use portcullis_core::config::{self, ConfigErrors, watched};
use portcullis_core::policy::{self, PolicySet, Runtime};

use crate::abi::ConfigHandle;

/// How long a request that waits for a fetch (keys, a backend token) may stay parked before it
/// is denied (fail closed). The core's own fetch timeouts are shorter; this is the backstop.
pub const DEFAULT_DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long config_new waits for the backend credentials' first tokens (as the service does at
/// start, but bounded: it holds Envoy's main thread).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Editors and ConfigMap updates produce bursts of events; wait for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Where the policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The service's config file, watched and reloaded.
    File(PathBuf),
    /// The YAML itself (no reload: Envoy replaces the filter config instead).
    Inline(String),
}

/// The filter's `filter_config` (a `google.protobuf.StringValue`, or a `Struct`): a config file
/// path, inline YAML, or a JSON object with options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterOptions {
    /// The policy.
    pub source: ConfigSource,
    /// Backstop for a decision that waits for a fetch.
    pub decision_timeout: Duration,
    /// Debug builds only (the end-to-end suite's way to prove a panic fails closed): a request
    /// carrying this header panics inside the filter. Release builds refuse the option.
    pub test_panic_header: Option<String>,
}

impl FilterOptions {
    /// Reads the `filter_config` bytes:
    /// - `{"config_file": "/etc/portcullis/portcullis.yaml", "decision_timeout_ms": 2000}` or
    ///   `{"config": "<inline YAML>"}`;
    /// - one line without `: ` (a path);
    /// - anything else: inline YAML.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "filter_config is not UTF-8")?;
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(
                "filter_config is empty: give the config file's path or inline YAML".into(),
            );
        }
        if trimmed.starts_with('{')
            && let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(trimmed)
            && (obj.contains_key("config_file") || obj.contains_key("config"))
        {
            let mut source = None;
            let mut decision_timeout = DEFAULT_DECISION_TIMEOUT;
            #[cfg_attr(not(debug_assertions), allow(unused_mut))]
            let mut test_panic_header = None;
            for (k, v) in &obj {
                match (k.as_str(), v) {
                    ("config_file", serde_json::Value::String(p)) => {
                        source = Some(ConfigSource::File(PathBuf::from(p)));
                    }
                    ("config", serde_json::Value::String(y)) => {
                        source = Some(ConfigSource::Inline(y.clone()));
                    }
                    #[cfg(debug_assertions)]
                    ("test_panic_header", serde_json::Value::String(h)) => {
                        test_panic_header = Some(h.to_ascii_lowercase());
                    }
                    ("decision_timeout_ms", serde_json::Value::Number(n)) => {
                        let ms = n
                            .as_u64()
                            .filter(|ms| *ms > 0)
                            .ok_or("decision_timeout_ms: a positive integer")?;
                        decision_timeout = Duration::from_millis(ms);
                    }
                    (other, _) => {
                        return Err(format!("filter_config: unknown or invalid `{other}`"));
                    }
                }
            }
            if obj.contains_key("config_file") && obj.contains_key("config") {
                return Err("filter_config: config_file and config are exclusive".into());
            }
            let source = source.ok_or("filter_config: no config")?;
            return Ok(FilterOptions {
                source,
                decision_timeout,
                test_panic_header,
            });
        }
        let source =
            if !trimmed.contains('\n') && !trimmed.contains(": ") && !trimmed.starts_with('{') {
                ConfigSource::File(PathBuf::from(trimmed))
            } else {
                ConfigSource::Inline(text.to_string())
            };
        Ok(FilterOptions {
            source,
            decision_timeout: DEFAULT_DECISION_TIMEOUT,
            test_panic_header: None,
        })
    }
}

/// Envoy counters (`<metrics_namespace>.<name>`, default namespace `dynamicmodulescustom`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// `portcullis_allow`: requests let through (shadow-mode waivers included).
    pub allow: Option<usize>,
    /// `portcullis_deny`: requests refused.
    pub deny: Option<usize>,
    /// `portcullis_shadow_waived`: denies not enforced (shadow mode).
    pub shadow_waived: Option<usize>,
    /// `portcullis_deferred`: decisions that waited for a fetch on the module's runtime.
    pub deferred: Option<usize>,
    /// `portcullis_failed_closed`: panics and decision timeouts answered 500.
    pub failed_closed: Option<usize>,
}

/// Why a filter config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `filter_config` is unusable.
    #[error("{0}")]
    Options(String),
    /// The policy file has errors.
    #[error("configuration rejected: {0}")]
    Config(ConfigErrors),
    /// The module's runtime could not start.
    #[error("cannot start the module's runtime: {0}")]
    Runtime(std::io::Error),
    /// The credential store could not be opened, or the first tokens not obtained.
    #[error("{0}")]
    Start(String),
}

/// One filter config: the shared policy state, and this config's Envoy counters (counter ids
/// belong to the config that defined them).
pub struct Engine {
    shared: Arc<Shared>,
    /// Envoy counters.
    pub counters: Counters,
}

impl std::ops::Deref for Engine {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// The compiled policy and what keeps it current, shared by every filter config with the same
/// `filter_config` bytes (the http and https listeners of one bootstrap, an xDS update that
/// changes something else): one runtime, one set of key and token caches, one watcher.
pub struct Shared {
    policy: ArcSwap<PolicySet>,
    runtime: Arc<Runtime>,
    /// `Some` until drop.
    tokio: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    source: ConfigSource,
    digest: Mutex<[u8; 32]>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// The keys file the watcher reloads the keys for (the policy's `subscriptions.keys_file`).
    keys_file: Arc<Mutex<Option<PathBuf>>>,
    /// `telemetry.decision_log` as the module started.
    pub decision_log: bool,
    /// `telemetry.decision_log_client_ip`.
    pub decision_log_client_ip: bool,
    /// See [`FilterOptions::decision_timeout`].
    pub decision_timeout: Duration,
    /// See [`FilterOptions::test_panic_header`] (always `None` in release builds).
    pub test_panic_header: Option<String>,
}

/// The live shared states, by their `filter_config` bytes.
type Registry = Mutex<Vec<(Vec<u8>, Weak<Shared>)>>;
static SHARED: Registry = Mutex::new(Vec::new());

impl Engine {
    /// Creates a filter config from Envoy's `filter_config` bytes (on Envoy's main thread):
    /// the shared state of the same bytes if one is alive, else a new one.
    pub fn new(bytes: &[u8], envoy: &ConfigHandle<'_>) -> Result<Arc<Engine>, EngineError> {
        let shared = {
            let mut live = SHARED.lock().unwrap_or_else(|p| p.into_inner());
            live.retain(|(_, w)| w.strong_count() > 0);
            match live
                .iter()
                .find(|(b, _)| b == bytes)
                .and_then(|(_, w)| w.upgrade())
            {
                Some(shared) => shared,
                None => {
                    let shared = Shared::start(bytes)?;
                    live.push((bytes.to_vec(), Arc::downgrade(&shared)));
                    shared
                }
            }
        };
        let counters = Counters {
            allow: envoy.define_counter("portcullis_allow"),
            deny: envoy.define_counter("portcullis_deny"),
            shadow_waived: envoy.define_counter("portcullis_shadow_waived"),
            deferred: envoy.define_counter("portcullis_deferred"),
            failed_closed: envoy.define_counter("portcullis_failed_closed"),
        };
        Ok(Arc::new(Engine { shared, counters }))
    }
}

impl Shared {
    /// Loads, compiles and starts the policy of `filter_config` bytes.
    fn start(bytes: &[u8]) -> Result<Arc<Shared>, EngineError> {
        let options = FilterOptions::parse(bytes).map_err(EngineError::Options)?;
        let src = load(&options.source)?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("portcullis-io")
            .enable_all()
            .build()
            .map_err(EngineError::Runtime)?;
        let handle = tokio.handle().clone();
        let runtime = Arc::new(Runtime::default());
        // Compiling starts key refreshes: they must land on the module's runtime.
        let compiled = {
            let _entered = handle.enter();
            policy::compile(&src, &runtime)
        };
        let (policy, settings) = compiled.map_err(EngineError::Config)?;
        crate::logging::install(&settings.log_level);
        runtime.publish(&policy);
        let started = tokio
            .block_on(async { tokio::time::timeout(START_TIMEOUT, runtime.start(&policy)).await });
        match started {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(EngineError::Start(e.to_string())),
            Err(_) => {
                return Err(EngineError::Start(format!(
                    "backend credentials not obtained within {START_TIMEOUT:?}"
                )));
            }
        }
        tracing::info!(summary = %policy.summary, source = %describe(&options.source), "portcullis module: configuration loaded");
        let engine = Arc::new(Shared {
            policy: ArcSwap::from_pointee(policy),
            runtime,
            tokio: Some(tokio),
            handle,
            source: options.source,
            digest: Mutex::new(src.digest),
            watcher: Mutex::new(None),
            keys_file: Arc::new(Mutex::new(None)),
            decision_log: settings.decision_log,
            decision_log_client_ip: settings.decision_log_client_ip,
            decision_timeout: options.decision_timeout,
            test_panic_header: options.test_panic_header,
        });
        if let ConfigSource::File(path) = &engine.source {
            let watcher = watch(path, Arc::downgrade(&engine));
            *engine.watcher.lock().unwrap_or_else(|p| p.into_inner()) = watcher;
        }
        engine.follow_keys_file();
        Ok(engine)
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy.load_full()
    }

    /// The module's runtime, where fetches and deferred decisions run.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Re-reads and recompiles the config file (a no-op for inline config, or an unchanged
    /// file); a broken file keeps the running policy. Runs on a blocking thread of the runtime.
    pub fn reload(&self) -> Result<bool, ConfigErrors> {
        let ConfigSource::File(path) = &self.source else {
            return Ok(false);
        };
        let started = Instant::now();
        let result = self.try_reload(path);
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(true) => {
                tracing::info!(summary = %self.policy.load().summary, duration_ms, "portcullis module: configuration reloaded");
                self.follow_keys_file();
            }
            Ok(false) => {}
            Err(errs) => {
                let errors: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
                tracing::error!(errors = ?errors, duration_ms, "portcullis module: configuration rejected; the last good configuration keeps serving");
            }
        }
        result
    }

    /// Re-reads `subscriptions.keys_file` alone (as the service does): only the key table is
    /// swapped; a broken file keeps the last good keys. Runs on a blocking thread of the runtime.
    pub fn reload_keys(&self) -> Result<Option<(usize, usize)>, ConfigErrors> {
        let started = Instant::now();
        let result = self.policy.load().subscriptions().reload_keys_file();
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(Some((subscriptions, keys))) => {
                tracing::info!(
                    subscriptions,
                    keys,
                    duration_ms,
                    "portcullis module: subscription keys file reloaded"
                );
            }
            Ok(None) => {}
            Err(errs) => {
                let errors: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
                tracing::error!(errors = ?errors, duration_ms, "portcullis module: subscription keys file rejected; the last good keys keep serving");
            }
        }
        result
    }

    /// Points the watcher at the policy's keys file: its name is what keys events match, and its
    /// directory is watched when it is not the config file's. Called at start and after a reload
    /// (which may name another file).
    fn follow_keys_file(&self) {
        let ConfigSource::File(config) = &self.source else {
            return;
        };
        let now = self
            .policy
            .load()
            .subscriptions()
            .keys_file()
            .map(Path::to_path_buf);
        // The lock is let go before the watcher is touched: notify's event thread takes it for
        // every event, and `watch` waits for that thread.
        let old = {
            let mut keys = self.keys_file.lock().unwrap_or_else(|p| p.into_inner());
            if *keys == now {
                return;
            }
            std::mem::replace(&mut *keys, now.clone())
        };
        let (stop, start) =
            watched::moved(&watched::parent(config), old.as_deref(), now.as_deref());
        let mut watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        let Some(watcher) = watcher.as_mut() else {
            return;
        };
        if let Some(d) = stop {
            let _ = watcher.unwatch(&d);
        }
        if let Some(d) = start
            && let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive)
        {
            tracing::warn!(error = %e, dir = %d.display(), "portcullis module: cannot watch the keys file's directory; it will be read with the config only");
        }
    }

    fn try_reload(&self, path: &Path) -> Result<bool, ConfigErrors> {
        let text = config::read(path)?;
        // A file emptied in place (a writer between truncate and write) would remove every API.
        if text.bytes().all(|b| b.is_ascii_whitespace()) {
            let mut errs = ConfigErrors::default();
            errs.push("", "the config file is empty (a write in progress?)");
            return Err(errs);
        }
        let src = config::load_text_pruned(path, &text).map_err(policy::every_error)?;
        let mut digest = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        if *digest == src.digest {
            return Ok(false);
        }
        let (policy, _settings) = {
            let _entered = self.handle.enter();
            policy::compile(&src, &self.runtime)?
        };
        self.runtime.publish(&policy);
        self.policy.store(Arc::new(policy));
        *digest = src.digest;
        Ok(true)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Stop watching first: the watcher's thread holds a sender into the runtime.
        drop(
            self.watcher
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(rt) = self.tokio.take() {
            // Never block Envoy's thread on our tasks; and a runtime cannot be dropped from inside
            // one of its own threads, so hand it to a thread of its own then.
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("portcullis-stop".into())
                    .spawn(move || rt.shutdown_background());
            } else {
                rt.shutdown_background();
            }
        }
    }
}

fn describe(source: &ConfigSource) -> String {
    match source {
        ConfigSource::File(p) => p.display().to_string(),
        ConfigSource::Inline(_) => "inline".into(),
    }
}

fn load(source: &ConfigSource) -> Result<config::Source, EngineError> {
    let loaded = match source {
        ConfigSource::File(path) => config::load_pruned(path),
        ConfigSource::Inline(text) => {
            let base = std::env::current_dir().unwrap_or_default();
            config::parse_pruned(text, &base, &|name| std::env::var(name).ok())
        }
    };
    loaded
        .map_err(policy::every_error)
        .map_err(EngineError::Config)
}

/// Watches the config file's directory (atomic renames and ConfigMap symlink swaps are seen)
/// and reloads on change, on the engine's runtime. Holds the engine weakly: dropping the filter
/// config stops it.
fn watch(path: &Path, engine: Weak<Shared>) -> Option<notify::RecommendedWatcher> {
    let dir = watched::parent(path);
    let shared = engine.upgrade()?;
    let handle = shared.handle.clone();
    let keys_file = shared.keys_file.clone();
    drop(shared);
    // `true` for the config file, `false` for the keys file alone.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let config_path = path.to_path_buf();
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let keys = keys_file.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (config, keys) = watched::touches(&event.paths, &config_path, keys.as_deref());
            if config {
                let _ = tx.send(true);
            }
            if keys {
                let _ = tx.send(false);
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "portcullis module: cannot watch the config file; it will not be reloaded");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "portcullis module: cannot watch the config directory; it will not be reloaded");
        return None;
    }
    handle.spawn(async move {
        while let Some(first) = rx.recv().await {
            tokio::time::sleep(DEBOUNCE).await;
            let (mut config, mut keys) = (first, !first);
            while let Ok(c) = rx.try_recv() {
                config |= c;
                keys |= !c;
            }
            let engine = engine.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(engine) = engine.upgrade() {
                    // A config reload that installed a policy read the keys file with it.
                    let full = config && matches!(engine.reload(), Ok(true));
                    if keys && !full {
                        let _ = engine.reload_keys();
                    }
                }
            })
            .await;
        }
    });
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_config_is_a_path_inline_yaml_or_options() {
        let o = FilterOptions::parse(b" /etc/portcullis/p.yaml\n").unwrap();
        assert_eq!(
            o.source,
            ConfigSource::File("/etc/portcullis/p.yaml".into())
        );
        let o = FilterOptions::parse(b"apis:\n  - name: x\n").unwrap();
        assert!(matches!(o.source, ConfigSource::Inline(_)));
        let o = FilterOptions::parse(b"apis: []").unwrap();
        assert!(matches!(o.source, ConfigSource::Inline(_)));
        let o = FilterOptions::parse(br#"{"config_file": "/p.yaml", "decision_timeout_ms": 250}"#)
            .unwrap();
        assert_eq!(o.source, ConfigSource::File("/p.yaml".into()));
        assert_eq!(o.decision_timeout, Duration::from_millis(250));
        assert!(FilterOptions::parse(br#"{"config_file": "/p", "extra": 1}"#).is_err());
        assert!(FilterOptions::parse(br#"{"config_file": "/p", "config": "a: b"}"#).is_err());
        assert!(FilterOptions::parse(b"  ").is_err());
        assert!(FilterOptions::parse(&[0xff]).is_err());
    }
}
