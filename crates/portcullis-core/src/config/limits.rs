//! Limits on a config file's size and shape, enforced on the raw text before anything is built
//! from it.
//!
//! The file is the operator's, but it arrives through templating, CI and ConfigMaps, and it is read
//! again on every reload while the service decides. Without limits, a file nested 64,000 levels
//! deep took 20 s to refuse (libyaml's scanner, under serde_yaml, is quadratic in flow nesting),
//! and a 300-byte alias bomb was expanded into hundreds of millions of values. The scan here is one
//! pass over the parser's events: it builds nothing, counts what an alias would expand to without
//! expanding it, and stops at the first limit crossed, naming the limit and the line.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use serde_saphyr::granit_parser::{ErrorKind, Event, Options, Parser, Span, StrInput};

/// The largest config file read, in bytes (64 MiB). The largest policy measured (100,000 keys,
/// 10,000 CIDRs, 1,000 APIs) is 13 MB.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// The deepest nesting of mappings and sequences, the document itself being level 1. The deepest
/// real config (`identity_providers[].keys[]` holding a JWK with an `x5c` list) nests 6 levels.
pub const MAX_DEPTH: usize = 64;

/// The most values (mappings, sequences and scalars) in a file, an alias counting as every value
/// it repeats. The largest policy measured has about 730,000.
pub const MAX_VALUES: u64 = 4_000_000;

/// The most text in a file's values (keys included), an alias counting as the text it repeats.
pub const MAX_TEXT_BYTES: u64 = MAX_FILE_BYTES;

/// The largest file a `${file:PATH}` substitution reads (1 MiB): substituted values are secrets
/// and single settings.
pub const MAX_SUBSTITUTED_FILE_BYTES: u64 = 1024 * 1024;

/// A config file past one of the limits above; nothing was built from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("larger than {} MiB, the limit for a config file", MAX_FILE_BYTES >> 20)]
    FileSize,
    /// Mappings and sequences nest deeper than [`MAX_DEPTH`].
    #[error(
        "line {line}: nested more than {} levels deep, the limit for a config file",
        MAX_DEPTH
    )]
    Depth {
        /// Where the first level past the limit opens.
        line: usize,
    },
    /// More than [`MAX_VALUES`] values, aliases expanded.
    #[error(
        "line {line}: more than {} values (an alias counts as the values it repeats), the limit for a config file",
        MAX_VALUES
    )]
    Values {
        /// Where the count went past the limit.
        line: usize,
    },
    /// More than [`MAX_TEXT_BYTES`] of text, aliases expanded.
    #[error(
        "line {line}: more than {} MiB of text (an alias counts as the text it repeats), the limit for a config file",
        MAX_TEXT_BYTES >> 20
    )]
    Text {
        /// Where the count went past the limit.
        line: usize,
    },
    /// A `${file:...}` substitution names a file larger than [`MAX_SUBSTITUTED_FILE_BYTES`].
    #[error(
        "{path}: larger than {} MiB, the limit for a substituted file",
        MAX_SUBSTITUTED_FILE_BYTES >> 20
    )]
    SubstitutedFile {
        /// The file, as resolved.
        path: String,
    },
    /// Substituted values add up to more than [`MAX_TEXT_BYTES`].
    #[error(
        "substituted values add up to more than {} MiB, the limit for a config file",
        MAX_TEXT_BYTES >> 20
    )]
    SubstitutedText,
}

/// Why the scan refused a text.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Past a limit.
    Limit(LimitExceeded),
    /// Not YAML at all (the parser's message, with its line and column).
    Syntax(String),
}

/// Reads at most `limit` bytes of the file at `path`; `Ok(None)` when it holds more.
///
/// The size is checked before reading, and the read itself is bounded too: a file that grows while
/// it is read, or a device such as `/dev/zero` (whose size reads as 0), stops at the limit.
pub(super) fn read_at_most(path: &Path, limit: u64) -> std::io::Result<Option<String>> {
    let Some(bytes) = read_bytes_at_most(path, limit)? else {
        return Ok(None);
    };
    String::from_utf8(bytes).map(Some).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// [`read_at_most`] for files that are not text: every file the config names (a JWKS, TLS keys and
/// certificates) is read through this, so none can cost more than its limit.
pub fn read_bytes_at_most(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    if file.metadata().is_ok_and(|m| m.len() > limit) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// The largest TLS certificate, key or CA bundle file read (`listen.tls`, `check --cert`).
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// What a value costs once its aliases are expanded.
#[derive(Clone, Copy, Default)]
struct Cost {
    values: u64,
    text: u64,
}

/// A mapping or sequence still open, with the totals when it opened (to price its anchor).
struct Open {
    anchor: usize,
    at_open: Cost,
}

/// Checks `text` (already within [`MAX_FILE_BYTES`]) against the shape limits in one pass over
/// its parser events, building nothing; the number of values, aliases expanded, when it passes.
/// Every event (with its span) is shown to `visit` on the way, so that another look at the file
/// (where its substitutions are) costs no second parse; when `visit` returns false the scan stops
/// there, with `Ok(None)`: the rest of the file was not checked.
pub(super) fn scan_with<'a>(
    text: &'a str,
    mut visit: impl FnMut(&Event<'a>, &Span) -> bool,
) -> Result<Option<u64>, Refusal> {
    let mut total = Cost::default();
    // What each anchor expands to; an alias adds its anchor's cost without being expanded.
    let mut anchors: HashMap<usize, Cost> = HashMap::new();
    let mut open: Vec<Open> = Vec::new();
    // The scanner reads a flow collection's openers ahead of their events, so it enforces the
    // flow limit itself (as a recursion limit); block nesting is counted below.
    let mut options = Options::default();
    options.flow_nesting_limit = MAX_DEPTH;
    for item in Parser::with_options(StrInput::new(text), options) {
        let (event, span) = item.map_err(|e| {
            if matches!(e.kind(), ErrorKind::RecursionLimitExceeded) {
                Refusal::Limit(LimitExceeded::Depth {
                    line: e.marker().line(),
                })
            } else {
                Refusal::Syntax(e.to_string())
            }
        })?;
        if !visit(&event, &span) {
            return Ok(None);
        }
        let line = span.start.line();
        match event {
            Event::Scalar(value, _, anchor, tag) => {
                let before = total;
                total.values += 1;
                total.text = total
                    .text
                    .saturating_add(value.len() as u64)
                    .saturating_add(tag.map_or(0, |t| {
                        let (handle, suffix) = t.parts();
                        (handle.len() + suffix.len()) as u64
                    }));
                if anchor != 0 {
                    anchors.insert(anchor, total.minus(before));
                }
            }
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                open.push(Open {
                    anchor,
                    at_open: total,
                });
                total.values += 1;
                if open.len() > MAX_DEPTH {
                    return Err(Refusal::Limit(LimitExceeded::Depth { line }));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(closed) = open.pop()
                    && closed.anchor != 0
                {
                    anchors.insert(closed.anchor, total.minus(closed.at_open));
                }
            }
            Event::Alias(anchor) => {
                // An alias of a collection still open (a recursive alias) has no price yet: the
                // loaders refuse it, so it counts as one value.
                let cost = anchors
                    .get(&anchor)
                    .copied()
                    .unwrap_or(Cost { values: 1, text: 0 });
                total.values = total.values.saturating_add(cost.values);
                total.text = total.text.saturating_add(cost.text);
            }
            _ => {}
        }
        if total.values > MAX_VALUES {
            return Err(Refusal::Limit(LimitExceeded::Values { line }));
        }
        if total.text > MAX_TEXT_BYTES {
            return Err(Refusal::Limit(LimitExceeded::Text { line }));
        }
    }
    Ok(Some(total.values))
}

impl Cost {
    fn minus(self, earlier: Cost) -> Cost {
        Cost {
            values: self.values.saturating_sub(earlier.values),
            text: self.text.saturating_sub(earlier.text),
        }
    }
}
