//! Loading the configuration file: YAML, `${env:NAME}` / `${file:PATH}` substitution, and structural
//! errors, every one reported with its path.
//!
//! Loading stops at the shape of the file; `policy::compile` checks the meaning of every value.
//! Before either loader runs, the text is checked against the limits in [`limits`] (size, nesting,
//! values and text with aliases expanded), so a hostile file is refused in one cheap pass.

pub mod limits;
pub mod settings;
mod splice;
mod types;
pub mod watched;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::digest::Sha256;
use serde::Deserialize;
use serde_yaml::Value;

pub use limits::LimitExceeded;
pub use settings::{
    ConnectionLimits, LogFormat, OtlpProtocol, OtlpTarget, Settings, TlsFiles, duration, positive,
};
pub use types::*;

/// One thing wrong with a configuration, located by its path in the file (`apis[2].jwt.audiences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where in the file: `apis[2].jwt.audiences[0]`; empty for the file as a whole.
    pub path: String,
    /// What is wrong. Never contains a secret value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every error found in a configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Records an error at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A string that must never be printed: client secrets, keys, tokens.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A loaded (but not yet compiled) configuration.
#[derive(Debug)]
pub struct Source {
    /// The file's contents, shaped.
    pub file: ConfigFile,
    /// Paths whose value came from `${env:...}` or `${file:...}`.
    pub substituted: HashSet<String>,
    /// Directory relative file references (`${file:...}`, `jwks_file`, TLS files) resolve against.
    pub base_dir: PathBuf,
    /// SHA-256 of the raw file, to tell a real change from a touch.
    pub digest: [u8; 32],
}

impl Source {
    /// Resolves a path written in the config relative to the config file's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        self.base_dir.join(path)
    }
}

/// Reads and loads the file at `path`.
pub fn load(path: &Path) -> Result<Source, ConfigErrors> {
    let text = read(path)?;
    load_text(path, &text)
}

/// Reads the config file at `path`, refusing one over [`limits::MAX_FILE_BYTES`] before reading
/// it (and stopping the read there, for a file that grows or a device).
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    let message = match limits::read_at_most(path, limits::MAX_FILE_BYTES) {
        Ok(Some(text)) => return Ok(text),
        Ok(None) => format!(
            "config file {} is {}",
            path.display(),
            LimitExceeded::FileSize
        ),
        Err(e) => format!("cannot read config file {}: {e}", path.display()),
    };
    let mut errs = ConfigErrors::default();
    errs.push("", message);
    Err(errs)
}

/// Loads a configuration already [`read`] from `path` (relative references resolve against its
/// directory).
pub fn load_text(path: &Path, text: &str) -> Result<Source, ConfigErrors> {
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(text, &base_dir)
}

/// Loads a configuration from text; relative file references resolve against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<Source, ConfigErrors> {
    parse_with_env(text, base_dir, &|name| std::env::var(name).ok())
}

/// Like [`parse`], with the environment given as a lookup function (tests, embedding).
pub fn parse_with_env(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, ConfigErrors> {
    parse_pruned(text, base_dir, env).map_err(|f| f.errors)
}

/// A configuration that did not load: its errors, and, when every structural error could be set
/// aside (an unknown field, a value of the wrong type), the rest of the file without those values,
/// so that the later stages can report their own errors in the same run.
#[derive(Debug)]
pub struct LoadFailure {
    /// What is wrong, each with its path.
    pub errors: ConfigErrors,
    /// The file without the values that had errors, when it could be read that way.
    pub pruned: Option<Box<Source>>,
}

impl From<ConfigErrors> for LoadFailure {
    fn from(errors: ConfigErrors) -> Self {
        LoadFailure {
            errors,
            pruned: None,
        }
    }
}

/// [`load`], keeping what could be read of a file with structural errors ([`LoadFailure`]).
pub fn load_pruned(path: &Path) -> Result<Source, LoadFailure> {
    let text = read(path)?;
    load_text_pruned(path, &text)
}

/// [`load_text`], keeping what could be read of a file with structural errors.
pub fn load_text_pruned(path: &Path, text: &str) -> Result<Source, LoadFailure> {
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_pruned(text, &base_dir, &|name| std::env::var(name).ok())
}

/// [`parse_with_env`], keeping what could be read of a file with structural errors.
pub fn parse_pruned(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, LoadFailure> {
    parse_traced(text, base_dir, env).0
}

/// Which loader read a file: the streaming parser straight from the text, or the serde_yaml value
/// tree (every file with an error, and the files the streaming path gives up on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loader {
    Streaming,
    Tree,
}

/// [`parse_pruned`], saying which loader read the file.
pub(crate) fn parse_traced(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Result<Source, LoadFailure>, Loader) {
    if text.len() as u64 > limits::MAX_FILE_BYTES {
        let mut errs = ConfigErrors::default();
        errs.push(
            "",
            format!("the config file is {}", LimitExceeded::FileSize),
        );
        return (Err(errs.into()), Loader::Tree);
    }
    let digest: [u8; 32] = Sha256::digest(text.as_bytes());
    // Fast path: a file that is valid as it stands is deserialized straight from the text, without
    // a value tree (which costs about 1 KiB per subscription key and most of the load time of a
    // large file). Anything else, including every file with an error, takes the tree path below,
    // which substitutes and reports every error with its path.
    if let Some(last) = text.rfind("${") {
        // Substitutions: the limits scan (which the tree path needs anyway) also finds where they
        // are, and the streaming parser reads the text with their values written in. A value that
        // is exactly `${...}` has `${` in the text (or a `\` escape in a double-quoted scalar), so
        // the search ends past the last `${` when no `\` follows it; the scan stops there too
        // unless the file could hold an alias (whose limits only a whole scan can count): the
        // streaming parser's budget holds the rest to the same limits, and the tree path, if it
        // comes to that, scans the whole file.
        let can_stop = !text.contains('*') && !text[last..].contains('\\');
        let mut sites = splice::Sites::default();
        let scanned = scan_with(text, |event, span| {
            if can_stop && span.start.byte_offset().is_some_and(|at| at > last) {
                return false;
            }
            sites.event(event, span);
            true
        });
        let values = match scanned {
            Ok(values) => values,
            Err(errs) => return (Err(errs.into()), Loader::Tree),
        };
        if let Some(source) = load_spliced(text, base_dir, env, digest, sites) {
            return (Ok(source), Loader::Streaming);
        }
        let values = match values {
            Some(values) => values,
            None => match scan_with(text, |_, _| true) {
                Ok(values) => values.unwrap_or_default(),
                Err(errs) => return (Err(errs.into()), Loader::Tree),
            },
        };
        return (
            parse_tree(text, base_dir, env, digest, values),
            Loader::Tree,
        );
    }
    // A file that could hold an alias (any `*`) is scanned first: the streaming loader expands
    // aliases as it goes, and its replay limits are counted in events, not in the values built.
    let mut values = None;
    if text.contains('*') {
        values = match scan_with(text, |_, _| true) {
            Ok(values) => values,
            Err(errs) => return (Err(errs.into()), Loader::Tree),
        };
    }
    if let Some(file) = parse_streaming(text) {
        let source = Source {
            file,
            substituted: HashSet::new(),
            base_dir: base_dir.to_path_buf(),
            digest,
        };
        return (Ok(source), Loader::Streaming);
    }
    // Before a value tree is built, one pass over the parser's events: serde_yaml is slow or
    // explosive on hostile shapes (libyaml is quadratic in flow nesting; aliases are expanded into
    // the tree), and the message here names the limit and the line. A valid file without aliases
    // on the fast path does not pay for it: that parser's budget holds it to the same limits.
    let values = match values {
        Some(v) => v,
        None => match scan_with(text, |_, _| true) {
            Ok(values) => values.unwrap_or_default(),
            Err(errs) => return (Err(errs.into()), Loader::Tree),
        },
    };
    (
        parse_tree(text, base_dir, env, digest, values),
        Loader::Tree,
    )
}

/// [`limits::scan_with`] (the file's number of values, `None` when `visit` stopped it), its refusal
/// as the one error of the file.
fn scan_with<'a>(
    text: &'a str,
    visit: impl FnMut(
        &serde_saphyr::granit_parser::Event<'a>,
        &serde_saphyr::granit_parser::Span,
    ) -> bool,
) -> Result<Option<u64>, ConfigErrors> {
    limits::scan_with(text, visit).map_err(|refusal| {
        let mut errs = ConfigErrors::default();
        match refusal {
            limits::Refusal::Limit(limit) => errs.push("", limit.to_string()),
            limits::Refusal::Syntax(e) => errs.push("", format!("not valid YAML: {e}")),
        }
        errs
    })
}

/// A file with substitutions on the streaming path: every `${...}` found by the scan resolved and
/// written into a copy of the text ([`splice`]), which the streaming parser then reads. `None` when
/// the scan gave up on a substitution, one does not resolve, or the streaming parser refuses the
/// result: the tree path then loads the file and reports its errors, each with its path. No
/// resolution error is kept here, and the streaming parser's errors are discarded, so no message
/// from this path can carry a substituted value.
fn load_spliced(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    digest: [u8; 32],
    sites: splice::Sites<'_>,
) -> Option<Source> {
    if sites.gave_up {
        return None;
    }
    let mut bytes = 0u64;
    let values = sites
        .found
        .iter()
        .map(|site| resolve(&site.inner, base_dir, env, &mut bytes).ok())
        .collect::<Option<Vec<String>>>()?;
    let spliced = splice::splice(text, &sites.found, &values)?;
    drop(values);
    let file = parse_streaming(&spliced)?;
    Some(Source {
        file,
        substituted: sites.found.into_iter().map(|site| site.path).collect(),
        base_dir: base_dir.to_path_buf(),
        digest,
    })
}

/// The most errors one load reports.
const MAX_ERRORS: u64 = 200;
/// Errors a load reports whatever the size of the file.
const MIN_ATTEMPTS: u64 = 10;
/// Values walked, over all attempts, while collecting errors (about a second in a release build).
const RETRY_WORK: u64 = 10_000_000;

/// How many errors a load collects from a file of `values` values.
fn error_attempts(values: u64) -> u64 {
    (RETRY_WORK / values.max(1)).clamp(MIN_ATTEMPTS, MAX_ERRORS)
}

/// The general path: a serde_yaml value tree, substituted, then shaped with every error recorded;
/// `values` is the file's number of values, from [`limits::scan_with`].
fn parse_tree(
    text: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    digest: [u8; 32],
    values: u64,
) -> Result<Source, LoadFailure> {
    let mut errs = ConfigErrors::default();
    let mut value: Value = match serde_yaml::from_str(text) {
        Ok(Value::Null) => Value::Mapping(Default::default()),
        Ok(v) => v,
        Err(e) => {
            errs.push("", format!("not valid YAML: {e}"));
            return Err(errs.into());
        }
    };
    let mut substituted = HashSet::new();
    let mut substituted_bytes = 0u64;
    substitute(
        &mut value,
        String::new(),
        &mut Substitution {
            base_dir,
            env,
            done: &mut substituted,
            bytes: &mut substituted_bytes,
            errs: &mut errs,
        },
    );

    // serde stops at the first error. To report every structural error at once, record it, remove
    // the offending value and try again; a field that is required but missing ends the search.
    // Each attempt walks the tree up to the next error, so the attempts are held to a total of
    // `RETRY_WORK` values walked: 200 errors at the end of a 13 MB file would otherwise take 200
    // walks of 730,000 values, minutes in a debug build and seconds on the reload thread.
    let mut seen = HashSet::new();
    let attempts = error_attempts(values);
    let file = loop {
        // From a reference: a clone of the whole tree per attempt would double the peak memory.
        match serde_path_to_error::deserialize::<_, ConfigFile>(&value) {
            Ok(file) => break Some(file),
            Err(e) => {
                let path = display_path(e.path());
                let message = clean_serde_message(&e.inner().to_string());
                if !seen.insert((path.clone(), message.clone())) {
                    break None;
                }
                // A required field missing from a section: the section itself is set aside (when it
                // is a field of its parent, not an entry of a list), so the rest of the file is still
                // read. When the field is missing because its value was set aside for an error
                // already reported, nothing new is said.
                let missing = message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.strip_suffix('`'));
                let ours = missing.is_some_and(|field| {
                    let child = if path.is_empty() {
                        field.to_string()
                    } else {
                        format!("{path}.{field}")
                    };
                    errs.0.iter().any(|e| e.path == child)
                });
                let removable = remove_at(&mut value, e.path());
                if !ours {
                    errs.push(path, message);
                }
                if !removable || errs.0.len() > MAX_ERRORS as usize {
                    break None;
                }
                if attempts < MAX_ERRORS && errs.0.len() as u64 >= attempts {
                    errs.push(
                        "",
                        format!(
                            "stopped looking for errors after {attempts} in a file of {values} values; fix these and validate again"
                        ),
                    );
                    break None;
                }
            }
        }
    };
    let source = file.map(|file| Source {
        file,
        substituted,
        base_dir: base_dir.to_path_buf(),
        digest,
    });
    match source {
        Some(source) if errs.is_empty() => Ok(source),
        // Every structural error was removed and the rest of the file read: it goes with the
        // errors, so the later stages report theirs in the same run.
        pruned => Err(LoadFailure {
            errors: errs,
            pruned: pruned.map(Box::new),
        }),
    }
}

/// Streaming YAML (serde-saphyr: no intermediate tree). `None` on any error: the tree path then
/// reports it. Its options are the strict ones, so that whatever it accepts means what the tree
/// path (serde_yaml, YAML 1.2) would make of it: YAML 1.2 booleans only, duplicate keys and merge
/// keys refused.
fn parse_streaming(text: &str) -> Option<ConfigFile> {
    let mut budget = serde_saphyr::Budget::default();
    // The defaults (a million events, 250,000 nodes) are below a policy of 100,000 subscription keys.
    // These repeat the config limits (an event is a value's start or end), so that this parser never
    // does more than `limits::scan_with` allows, for the files (or the parts of a file) it did not
    // scan. The alias limits stay at their defaults.
    budget.max_depth = limits::MAX_DEPTH;
    budget.max_nodes = limits::MAX_VALUES as usize;
    budget.max_events = 2 * limits::MAX_VALUES as usize + 16;
    budget.max_total_scalar_bytes = limits::MAX_TEXT_BYTES as usize;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.merge_keys = serde_saphyr::MergeKeyPolicy::Error;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<ConfigFile>(text, options).ok()
}

fn display_path(path: &serde_path_to_error::Path) -> String {
    let s = path.to_string();
    if s == "." { String::new() } else { s }
}

/// serde_yaml appends " at line N column M" which is meaningless for a re-serialized tree.
fn clean_serde_message(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Removes the value at `path`; true if something was removed. Sequence elements are replaced by
/// nothing only when they are the last segment's parent map entry, so indices of later errors stay put.
fn remove_at(root: &mut Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = root;
    for seg in parents {
        node = match (seg, node) {
            (Segment::Seq { index }, Value::Sequence(seq)) => match seq.get_mut(*index) {
                Some(n) => n,
                None => return false,
            },
            (Segment::Map { key }, Value::Mapping(map)) => match map.get_mut(key.as_str()) {
                Some(n) => n,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Map { key }, Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        _ => false,
    }
}

/// What a substitution pass needs and records.
struct Substitution<'a> {
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Paths whose value was replaced.
    done: &'a mut HashSet<String>,
    /// Bytes substituted so far, held to [`limits::MAX_TEXT_BYTES`]: a thousand references to one
    /// large file would otherwise multiply it.
    bytes: &'a mut u64,
    errs: &'a mut ConfigErrors,
}

/// Replaces whole-value `${env:NAME}` and `${file:PATH}` strings, recording which paths were replaced.
/// A substituted value is text and is never parsed as YAML, so substitution cannot nest.
fn substitute(value: &mut Value, path: String, cx: &mut Substitution<'_>) {
    match value {
        Value::String(s) => {
            let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) else {
                return;
            };
            let resolved = resolve(inner, cx.base_dir, cx.env, cx.bytes);
            match resolved {
                Ok(v) => {
                    *s = v;
                    cx.done.insert(path);
                }
                Err(msg) => cx.errs.push(path, msg),
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                substitute(v, format!("{path}[{i}]"), cx);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                substitute(v, child, cx);
            }
        }
        Value::Tagged(t) => substitute(&mut t.value, path, cx),
        _ => {}
    }
}

/// The value of one whole-value substitution, `inner` being what is between `${` and `}`, its
/// length added to `bytes` and held with it to [`limits::MAX_TEXT_BYTES`]; the error message has
/// no path (the caller adds it) and never the value.
fn resolve(
    inner: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    bytes: &mut u64,
) -> Result<String, String> {
    let resolved = if let Some(name) = inner.strip_prefix("env:") {
        env(name).ok_or_else(|| format!("environment variable {name} is not set"))
    } else if let Some(file) = inner.strip_prefix("file:") {
        let p = base_dir.join(file);
        match limits::read_at_most(&p, limits::MAX_SUBSTITUTED_FILE_BYTES) {
            Ok(Some(t)) => Ok(t.trim_end_matches(['\r', '\n']).to_string()),
            Ok(None) => Err(LimitExceeded::SubstitutedFile {
                path: p.display().to_string(),
            }
            .to_string()),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
        }
    } else {
        Err(format!(
            "unknown substitution `${{{inner}}}`: use ${{env:NAME}} or ${{file:PATH}}"
        ))
    };
    resolved.and_then(|v| {
        *bytes = bytes.saturating_add(v.len() as u64);
        if *bytes > limits::MAX_TEXT_BYTES {
            Err(LimitExceeded::SubstitutedText.to_string())
        } else {
            Ok(v)
        }
    })
}

#[cfg(test)]
mod tests;
