//! Hot reload: the config file is watched (and SIGHUP forces a reload). A new version is compiled
//! whole and swapped in atomically; a broken one is logged with every error while the last good
//! policy keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use super::State;
use crate::config::{self, ConfigErrors, watched};
use crate::policy::{self, PolicySet, Summary, subscription};

/// Editors and ConfigMap updates produce bursts of events; wait for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Reloads the config file. Without `force`, an unchanged file (same SHA-256) is not recompiled.
///
/// Runs on a blocking thread (the watcher and SIGHUP use `spawn_blocking`): checks keep being
/// decided by the current policy while the new one is read and compiled, and see the new one from
/// the atomic swap on.
pub fn reload(state: &Arc<State>, force: bool) -> Result<Summary, ConfigErrors> {
    reload_reporting(state, force).0
}

/// [`reload`], and whether a new policy was installed.
fn reload_reporting(state: &Arc<State>, force: bool) -> (Result<Summary, ConfigErrors>, bool) {
    let started = Instant::now();
    let cpu = thread_cpu();
    let reloading = state.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let result = try_reload(state, force);
    drop(reloading);
    // Milliseconds with a fraction: what operators compare with their reload budget.
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    let (result, retired) = match result {
        Ok(Some((summary, load_ms, old))) => (Ok(Some((summary, load_ms))), Some(old)),
        Ok(None) => (Ok(None), None),
        Err(e) => (Err(e), None),
    };
    match &result {
        Ok(Some((summary, load_ms))) => {
            state.telemetry.config_reload(true, started.elapsed());
            // `load_ms` of `duration_ms` went to reading the file; the rest to compiling and the swap.
            let cpu_ms = cpu.and_then(|c| Some((thread_cpu()? - c).as_secs_f64() * 1e3));
            tracing::info!(summary = %summary, duration_ms, load_ms, cpu_ms, "configuration reloaded");
            for note in &summary.notes {
                match note.strip_prefix("warning: ") {
                    Some(w) => tracing::warn!("{w}"),
                    None => tracing::info!("{note}"),
                }
            }
        }
        Ok(None) => {}
        Err(errs) => {
            state.telemetry.config_reload(false, started.elapsed());
            let errors: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
            tracing::error!(errors = ?errors, duration_ms, "configuration rejected; the last good configuration keeps serving");
        }
    }
    let changed = retired.is_some();
    if changed && let Some(w) = state.watching.get().and_then(std::sync::Weak::upgrade) {
        w.follow_keys_file(state);
    }
    if let Some(old) = retired {
        retire(old);
    }
    let result = result.map(|s| s.map_or_else(|| state.policy().summary.clone(), |(s, _)| s));
    (result, changed)
}

/// Reloads `subscriptions.keys_file` alone: only the key table is rebuilt and swapped into the
/// policy in service; APIs, providers and credentials are untouched. A broken file is logged with
/// every error (each with its line) and the last good table keeps serving.
pub fn reload_keys(state: &Arc<State>) -> Result<Option<(usize, usize)>, ConfigErrors> {
    let started = Instant::now();
    let cpu = thread_cpu();
    let reloading = state.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let result = state.policy().subscriptions().swap_keys_file();
    drop(reloading);
    let duration_ms = started.elapsed().as_secs_f64() * 1e3;
    // CPU time of this thread: what the reload costs, whatever else the machine is doing.
    let cpu_ms = cpu.and_then(|c| Some((thread_cpu()? - c).as_secs_f64() * 1e3));
    match result {
        Ok(None) => Ok(None),
        Ok(Some(((subscriptions, keys), old))) => {
            state.telemetry.config_reload(true, started.elapsed());
            tracing::info!(
                subscriptions,
                keys,
                duration_ms,
                cpu_ms,
                "subscription keys file reloaded"
            );
            subscription::retire(old);
            Ok(Some((subscriptions, keys)))
        }
        Err(errs) => {
            state.telemetry.config_reload(false, started.elapsed());
            let errors: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
            tracing::error!(errors = ?errors, duration_ms, "subscription keys file rejected; the last good keys keep serving");
            Err(errs)
        }
    }
}

/// CPU time this thread has run (Linux `schedstat`); `None` elsewhere.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// How long the reload thread waits for the checks still using the old policy.
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// Frees the replaced policy on this (blocking) thread once the checks that were evaluating it are
/// done. Freeing 100,000 subscriptions takes milliseconds: if the last check to let go of the old
/// policy freed it, that check would pay for it. Past `RETIRE_WAIT` the last user frees it.
fn retire(old: Arc<PolicySet>) {
    let deadline = Instant::now() + RETIRE_WAIT;
    while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(old);
}

/// A reload's summary, the milliseconds spent loading the file, and the policy it replaced.
type Reloaded = (Summary, f64, Arc<PolicySet>);

/// The new policy's summary, the milliseconds spent loading the file and the replaced policy, or
/// `None` when the file is unchanged.
fn try_reload(state: &Arc<State>, force: bool) -> Result<Option<Reloaded>, ConfigErrors> {
    let started = Instant::now();
    // A file emptied in place (a writer that truncated it and has not written yet) parses as a
    // config without APIs, which would replace every API with none. While serving, refuse it.
    // The file is read once, bounded by the config size limit, for both this check and the load.
    let text = config::read(state.config_path())?;
    if text.bytes().all(|b| b.is_ascii_whitespace()) {
        let mut errs = ConfigErrors::default();
        errs.push("", "the config file is empty (a write in progress?)");
        return Err(errs);
    }
    // A reload that fails logs every error at once, structural and semantic.
    let src = config::load_text_pruned(state.config_path(), &text).map_err(policy::every_error)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    {
        let digest = state
            .config_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !force && *digest == src.digest {
            return Ok(None);
        }
    }
    let (policy, settings) = policy::compile(&src, &state.runtime)?;
    if settings != state.settings {
        tracing::warn!(
            "listen, telemetry or connection limit settings changed: they apply after a restart"
        );
    }
    let summary = policy.summary.clone();
    let old = state.install(policy, src.digest);
    Ok(Some((summary, load_ms, old)))
}

/// What a file event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changed {
    Config,
    Keys,
}

/// The file watcher and the keys file it watches for (which a reload may change).
pub struct Watching {
    watcher: std::sync::Mutex<notify::RecommendedWatcher>,
    /// The config file's directory, always watched.
    config_dir: PathBuf,
    /// The keys file whose events reload the keys, and its directory when watched apart.
    keys: Arc<std::sync::Mutex<Option<PathBuf>>>,
}

impl Watching {
    /// Follows the `keys_file` of the policy in service, at start and after a reload that names
    /// another one: its name is what keys events match, and its directory is watched (the old
    /// one's let go).
    fn follow_keys_file(&self, state: &State) {
        let now = state
            .policy()
            .subscriptions()
            .keys_file()
            .map(std::path::Path::to_path_buf);
        // The name is switched first, and the lock let go before the watcher is touched: notify's
        // event thread takes it for every event, and `watch` waits for that thread.
        let old = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if *keys == now {
                return;
            }
            std::mem::replace(&mut *keys, now.clone())
        };
        let (stop, start) = watched::moved(&self.config_dir, old.as_deref(), now.as_deref());
        let mut watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = stop {
            let _ = watcher.unwatch(&d);
        }
        if let Some(d) = start
            && let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive)
        {
            tracing::warn!(error = %e, dir = %d.display(), "cannot watch the keys file's directory; reload with SIGHUP");
        }
        if let Some(new) = &now {
            tracing::info!(keys_file = %new.display(), "watching the keys file");
        }
    }
}

/// Watches the config file's directory (so atomic renames and Kubernetes ConfigMap symlink swaps
/// are seen) and reloads on change; and the keys file's, which reloads only the keys. The
/// returned watcher must be kept alive. A reload that names another keys file moves the watch to
/// it.
pub fn watch(state: Arc<State>) -> Option<Arc<Watching>> {
    let path = state.config_path().to_path_buf();
    let dir = watched::parent(&path);
    // Filled by `follow_keys_file` below, once the config's directory is watched.
    let keys = Arc::new(std::sync::Mutex::new(None));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Changed>();
    let config_path = path.clone();
    let keys_now = keys.clone();
    let watcher = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let keys = keys_now.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (config, keys) = watched::touches(&event.paths, &config_path, keys.as_deref());
            if config {
                let _ = tx.send(Changed::Config);
            }
            if keys {
                let _ = tx.send(Changed::Keys);
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            return None;
        }
    };
    let watching = Arc::new(Watching {
        watcher: std::sync::Mutex::new(watcher),
        config_dir: dir.clone(),
        keys,
    });
    if let Err(e) = watching
        .watcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .watch(&dir, RecursiveMode::NonRecursive)
    {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP");
        return None;
    }
    watching.follow_keys_file(&state);
    let _ = state.watching.set(Arc::downgrade(&watching));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Debounce: collect the rest of the burst.
            tokio::time::sleep(DEBOUNCE).await;
            let (mut config, mut keys) = (first == Changed::Config, first == Changed::Keys);
            while let Ok(c) = rx.try_recv() {
                config |= c == Changed::Config;
                keys |= c == Changed::Keys;
            }
            let s = state.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // A config reload that found the file unchanged does not read the keys file: then
                // the keys are reloaded on their own.
                let full = config && reload_reporting(&s, false).1;
                if keys && !full {
                    let _ = reload_keys(&s);
                }
            })
            .await;
        }
    });
    Some(watching)
}
