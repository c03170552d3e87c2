//! Substitution without a value tree: where a file's `${env:NAME}` / `${file:PATH}` values are, found
//! in the limits scan's one pass over the parser's events, so that a file with substitutions can be
//! loaded by the streaming parser too.
//!
//! Each substituted value is written back into a copy of the text as a double-quoted scalar tagged
//! `!!str`, with every character that could end or bend it escaped: the streaming parser then reads
//! exactly the substituted text as a string, never as YAML (substitution does not nest), and refuses
//! it where a number, boolean or section is expected, as the tree path does. Anything this does not
//! handle (an anchor, alias or tag around a substitution, a key that is not plainly a string, a
//! block scalar, more than one document) gives up, and the file takes the tree path, which reports
//! every error with its path exactly as before.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_saphyr::granit_parser::{Event, ScalarStyle, Span};

/// One `${...}` value: where it is in the text and in the file.
#[derive(Debug)]
pub(super) struct Site<'a> {
    /// The path as the tree path writes it (`apis[0].credentials[1].client_secret`).
    pub path: String,
    /// What is between `${` and `}`.
    pub inner: Cow<'a, str>,
    /// The scalar's bytes in the text, quotes included.
    pub start: usize,
    pub end: usize,
}

/// A map key on the way down.
enum Key<'a> {
    /// A scalar key, with whether it was plain (its type then depends on its text).
    Scalar { text: Cow<'a, str>, plain: bool },
    /// A collection, an alias or a tagged scalar as key: the tree path would print it as YAML.
    Other,
}

/// A mapping or sequence still open.
enum Frame<'a> {
    Map {
        /// The key of the value being read (set once the key is read).
        key: Option<Key<'a>>,
        /// True when the next node is a key.
        at_key: bool,
        /// Anchored, tagged or inside a key: a substitution inside gives up.
        unusual: bool,
    },
    Seq {
        index: usize,
        unusual: bool,
    },
}

impl Frame<'_> {
    fn unusual(&self) -> bool {
        match self {
            Frame::Map { unusual, .. } | Frame::Seq { unusual, .. } => *unusual,
        }
    }
}

/// The substitution sites of one file, collected event by event ([`Sites::event`]).
#[derive(Default)]
pub(super) struct Sites<'a> {
    open: Vec<Frame<'a>>,
    documents: usize,
    /// Something around a substitution this module does not handle: the tree path loads the file.
    pub gave_up: bool,
    pub found: Vec<Site<'a>>,
}

impl<'a> Sites<'a> {
    /// Takes the parser's next event.
    pub fn event(&mut self, event: &Event<'a>, span: &Span) {
        if self.gave_up {
            return;
        }
        match event {
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    self.gave_up = true;
                }
            }
            Event::Scalar(value, style, anchor, tag) => {
                if self.at_key() {
                    let key = if tag.is_some() || *anchor != 0 {
                        Key::Other
                    } else {
                        Key::Scalar {
                            text: value.clone(),
                            plain: matches!(style, ScalarStyle::Plain),
                        }
                    };
                    self.key_read(key);
                    return;
                }
                if let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                    let usual = *anchor == 0
                        && tag.is_none()
                        && matches!(
                            style,
                            ScalarStyle::Plain
                                | ScalarStyle::SingleQuoted
                                | ScalarStyle::DoubleQuoted
                        );
                    match (usual, span.start.byte_offset(), span.end.byte_offset()) {
                        (true, Some(start), Some(end)) if start < end => match self.path() {
                            Some(path) => self.found.push(Site {
                                path,
                                inner: match value {
                                    Cow::Borrowed(v) => Cow::Borrowed(&v[2..v.len() - 1]),
                                    Cow::Owned(_) => Cow::Owned(inner.to_string()),
                                },
                                start,
                                end,
                            }),
                            None => self.gave_up = true,
                        },
                        _ => self.gave_up = true,
                    }
                }
                self.node_done();
            }
            Event::Alias(_) | Event::UnresolvedAlias(_) => {
                if self.at_key() {
                    self.key_read(Key::Other);
                } else {
                    self.node_done();
                }
            }
            Event::SequenceStart(_, anchor, tag) | Event::MappingStart(_, anchor, tag) => {
                let in_key = self.at_key();
                let unusual = in_key
                    || *anchor != 0
                    || tag.is_some()
                    || self.open.last().is_some_and(Frame::unusual);
                self.open.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map {
                        key: None,
                        at_key: true,
                        unusual,
                    }
                } else {
                    Frame::Seq { index: 0, unusual }
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.open.pop();
                if self.at_key() {
                    self.key_read(Key::Other);
                } else {
                    self.node_done();
                }
            }
            _ => {}
        }
    }

    /// True when the next node is a mapping's key.
    fn at_key(&self) -> bool {
        matches!(self.open.last(), Some(Frame::Map { at_key: true, .. }))
    }

    fn key_read(&mut self, read: Key<'a>) {
        if let Some(Frame::Map { key, at_key, .. }) = self.open.last_mut() {
            *key = Some(read);
            *at_key = false;
        }
    }

    /// A value ended: its parent moves on to its next key or entry.
    fn node_done(&mut self) {
        match self.open.last_mut() {
            Some(Frame::Map { at_key, .. }) => *at_key = true,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }

    /// The path of the value being read, as [`super::substitute`] writes it; `None` when a
    /// container on the way is unusual or a key is not plainly a string.
    fn path(&self) -> Option<String> {
        let mut path = String::new();
        for frame in &self.open {
            if frame.unusual() {
                return None;
            }
            match frame {
                Frame::Map { key, .. } => {
                    let Some(Key::Scalar { text, plain }) = key else {
                        return None;
                    };
                    if *plain && !plain_is_string(text) {
                        return None;
                    }
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(text);
                }
                Frame::Seq { index, .. } => {
                    let _ = write!(path, "[{index}]");
                }
            }
        }
        Some(path)
    }
}

/// True when serde_yaml (YAML 1.2 core schema) reads this plain scalar as a string: it starts with
/// a letter or `_` (so it is no number) and is no null or boolean word. Other keys give up.
fn plain_is_string(text: &str) -> bool {
    text.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && !matches!(
            text,
            "null" | "Null" | "NULL" | "true" | "True" | "TRUE" | "false" | "False" | "FALSE"
        )
}

/// `text` with each site's scalar replaced by its value (`values[i]` for `sites[i]`), written as
/// `!!str "..."`. `None` when the sites are out of order (never from one pass of the parser).
pub(super) fn splice(text: &str, sites: &[Site<'_>], values: &[String]) -> Option<String> {
    let extra: usize = values.iter().map(|v| v.len() + 16).sum();
    let mut out = String::with_capacity(text.len() + extra);
    let mut at = 0;
    for (site, value) in sites.iter().zip(values) {
        if site.start < at || site.end > text.len() {
            return None;
        }
        out.push_str(text.get(at..site.start)?);
        out.push_str("!!str ");
        push_double_quoted(&mut out, value);
        at = site.end;
    }
    out.push_str(text.get(at..)?);
    Some(out)
}

/// Writes `value` as a one-line YAML double-quoted scalar: `"` and `\` escaped, and every
/// character that is not printable in YAML, or that a parser could take as a line break or byte
/// order mark, as an escape.
pub(super) fn push_double_quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            ' '..='~' => out.push(c),
            '\u{2028}' | '\u{2029}' | '\u{FEFF}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            '\u{A0}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}' => {
                out.push(c)
            }
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
}
