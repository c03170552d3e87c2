//! `subscriptions.keys_file`: subscriptions kept apart from the policy, one per line, read as a
//! stream (a line at a time into one reused buffer) straight into a [`KeyTable`].
//!
//! Grammar (ASCII; fields separated by spaces or tabs; `\n` or `\r\n` line ends):
//!
//! ```text
//! file     = *( line EOL )
//! line     = blank / comment / record
//! comment  = *WSP "#" *VCHAR-or-WSP
//! record   = *WSP id 1*WSP state 1*WSP scope 1*WSP key [ 1*WSP key ] *WSP
//! id       = 1*128( ALPHA / DIGIT / "." / "_" / "-" / "~" / ":" / "@" )
//! state    = "active" / "suspended" / "cancelled" / "expired" / "submitted" / "rejected"
//! scope    = "all" / "product:" NAME / "api:" NAME
//! key      = "sha256:" 64HEXDIG / "-"          ; primary, then secondary; "-" for none
//! ```
//!
//! A line is at most [`MAX_LINE`] bytes. Every error names `file:line`; none repeats a key field
//! (a plain key written by mistake must not reach a log).

use std::io::Read;
use std::path::Path;

use super::{Clash, KeyHash, KeyTable, KeyTableBuilder, ScopeResolver, parse_hash, parse_state};
use crate::config::ConfigErrors;

/// Longest line, in bytes, end of line excluded.
pub const MAX_LINE: usize = 1024;
/// Most subscriptions one file may hold.
pub const MAX_SUBSCRIPTIONS: usize = 4_000_000;
/// Errors reported per file; the rest are counted.
pub const MAX_ERRORS: usize = 100;
/// Longest id.
pub const MAX_ID: usize = 128;

/// Whether `id` is a valid subscription id for the keys file and the admin API.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b':' | b'@')
        })
}

/// What reading one line found.
enum Line<'a> {
    Nothing,
    Record {
        id: &'a str,
        state: super::State,
        scope: &'a str,
        hashes: [Option<KeyHash>; 2],
    },
}

/// The position of the first byte that is not printable ASCII, a space or a tab, found in one
/// pass that the compiler can vectorize.
fn first_bad_byte(line: &[u8]) -> Option<usize> {
    let allowed = |b: u8| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b);
    if line.iter().fold(true, |ok, &b| ok & allowed(b)) {
        return None;
    }
    line.iter().position(|&b| !allowed(b))
}

/// The fields of a checked line, split at runs of spaces and tabs (on bytes: a `char` pattern
/// decodes every character).
struct Fields<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let bytes = self.text.as_bytes();
        let blank = |b: u8| b == b' ' || b == b'\t';
        let mut from = self.at;
        while from < bytes.len() && blank(bytes[from]) {
            from += 1;
        }
        let to = from + first_blank(&bytes[from..]).unwrap_or(bytes.len() - from);
        self.at = to;
        (from < to).then(|| self.text.get(from..to)).flatten()
    }
}

/// The position of the first space or tab of a checked line, eight bytes a step (a hash is 71
/// bytes; `memchr2` cost more than it saved on fields this short). Only printable ASCII, spaces
/// and tabs are left, so a blank is exactly a byte below `!` (0x21): subtracting 0x21 from every
/// byte sets the high bit of exactly those, and a borrow only ever leaves a byte that is one of
/// them, so the lowest byte marked is the first blank.
fn first_blank(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let marked = x.wrapping_sub(ONES * 0x21) & !x & HIGHS;
        if marked != 0 {
            return Some(at + (marked.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let rest = chunks.remainder();
    rest.iter().position(|&b| b < 0x21).map(|i| at + i)
}

fn parse_line(line: &[u8]) -> Result<Line<'_>, String> {
    if let Some(i) = first_bad_byte(line) {
        return Err(format!(
            "byte {} is not printable ASCII, a space or a tab (a look-alike character, a control character or another encoding)",
            i + 1
        ));
    }
    // Only printable ASCII, spaces and tabs are left, so `from_utf8` cannot fail and every byte
    // index is a character boundary.
    let mut f = Fields {
        text: std::str::from_utf8(line).unwrap_or_default(),
        at: 0,
    };
    let Some(id) = f.next().filter(|id| !id.starts_with('#')) else {
        return Ok(Line::Nothing);
    };
    let (Some(state), Some(scope), Some(primary)) = (f.next(), f.next(), f.next()) else {
        return Err("a line is `id state scope primary [secondary]`".into());
    };
    let secondary = f.next();
    if f.next().is_some() {
        return Err("more than five fields: a line is `id state scope primary [secondary]`".into());
    }
    if !valid_id(id) {
        return Err(format!(
            "the id must be 1 to {MAX_ID} of A-Z a-z 0-9 . _ - ~ : @"
        ));
    }
    let Some(state) = parse_state(state) else {
        return Err(format!(
            "`{state}` is no state: use active, suspended, cancelled, expired, submitted or rejected"
        ));
    };
    let mut hashes = [None, None];
    for (slot, (field, value)) in [("primary", Some(primary)), ("secondary", secondary)]
        .into_iter()
        .enumerate()
    {
        match value {
            None | Some("-") => {}
            Some(v) => match parse_hash(v) {
                Some(h) => hashes[slot] = Some(h),
                // The value is not repeated: it may be a plain key written by mistake.
                None if v.starts_with("sha256:") => {
                    return Err(format!(
                        "the {field} key is `sha256:` followed by 64 hex digits"
                    ));
                }
                None => {
                    return Err(format!(
                        "the {field} key must be `sha256:<64 hex digits>` (portcullis hash-key) or `-`: plain keys are never written in the keys file"
                    ));
                }
            },
        }
    }
    if hashes == [None, None] {
        return Err("a subscription needs a primary or a secondary key".into());
    }
    Ok(Line::Record {
        id,
        state,
        scope,
        hashes,
    })
}

/// Counts the lines of `path` (one cheap pass, so the table is sized exactly once).
fn count_lines(path: &Path) -> std::io::Result<usize> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; CHUNK];
    let mut n = 1;
    loop {
        let read = match f.read(&mut buf) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if read == 0 {
            return Ok(n);
        }
        n += memchr::memchr_iter(b'\n', &buf[..read]).count();
    }
}

/// How much of the file is read at a time.
const CHUNK: usize = 128 * 1024;

/// One line of the file, its end (`\n` or `\r\n`) taken off.
enum Next<'a> {
    Line(&'a [u8]),
    /// Longer than [`MAX_LINE`]: skipped without being kept.
    TooLong,
}

/// The lines of a file, found with `memchr` in a buffer of [`CHUNK`] bytes and handed out as
/// slices of it (nothing is copied per line; a line cut by the end of a chunk is moved to the
/// front before the next read).
struct Lines<R> {
    src: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl<R: Read> Lines<R> {
    fn new(src: R) -> Self {
        Lines {
            src,
            buf: vec![0u8; CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        }
    }

    fn next(&mut self) -> std::io::Result<Option<Next<'_>>> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                let (from, to) = (self.start, self.start + i);
                self.start = to + 1;
                let line = &self.buf[from..to];
                return Ok(Some(fits(line.strip_suffix(b"\r").unwrap_or(line))));
            }
            if self.eof {
                if self.start == self.end {
                    return Ok(None);
                }
                // The last line, without an end.
                let from = std::mem::replace(&mut self.start, self.end);
                return Ok(Some(fits(&self.buf[from..self.end])));
            }
            if self.end - self.start > MAX_LINE + 1 {
                // No end within MAX_LINE + 2 bytes: too long, whatever follows.
                self.skip_line()?;
                return Ok(Some(Next::TooLong));
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.fill()?;
        }
    }

    /// Drops the rest of the current line, its end included.
    fn skip_line(&mut self) -> std::io::Result<()> {
        loop {
            if let Some(i) = memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                self.start += i + 1;
                return Ok(());
            }
            (self.start, self.end) = (0, 0);
            self.fill()?;
            if self.eof {
                return Ok(());
            }
        }
    }

    /// Reads more after `end`.
    fn fill(&mut self) -> std::io::Result<()> {
        loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(read) => self.end += read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            return Ok(());
        }
    }
}

fn fits(line: &[u8]) -> Next<'_> {
    if line.len() > MAX_LINE {
        Next::TooLong
    } else {
        Next::Line(line)
    }
}

/// Reads the keys file at `path` (shown as `shown` in errors) into a table. Scopes are checked with
/// `resolver`; an id or a key that is also in `inline` (the config's `subscriptions.keys`) is an
/// error. Every error names `shown:line`.
pub fn load(
    path: &Path,
    shown: &str,
    resolver: &ScopeResolver,
    inline: &KeyTable,
) -> Result<KeyTable, ConfigErrors> {
    let capacity = count_lines(path)
        .map_err(|e| read_error(shown, &e))?
        .min(MAX_SUBSCRIPTIONS);
    let file = std::fs::File::open(path).map_err(|e| read_error(shown, &e))?;
    read(file, capacity, shown, resolver, inline)
}

/// The one error of a file that cannot be read.
fn read_error(shown: &str, e: &std::io::Error) -> ConfigErrors {
    let mut errs = ConfigErrors::default();
    errs.push(
        "subscriptions.keys_file",
        format!("cannot read {shown}: {e}"),
    );
    errs
}

/// [`load`] from any reader, with room made for `capacity` subscriptions.
fn read(
    src: impl Read,
    capacity: usize,
    shown: &str,
    resolver: &ScopeResolver,
    inline: &KeyTable,
) -> Result<KeyTable, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut more = 0usize;
    let mut push = |errs: &mut ConfigErrors, at: String, msg: String| {
        if errs.0.len() < MAX_ERRORS {
            errs.push(at, msg);
        } else {
            more += 1;
        }
    };
    let io_err = |e: std::io::Error| read_error(shown, &e);
    let mut lines = Lines::new(src);
    // One key a line is reserved; a file of key pairs grows the index once.
    let mut builder = KeyTableBuilder::with_capacity(capacity, capacity);
    // Without inline keys (the usual case with a keys file), no line is looked up in them.
    let no_inline = inline.counts() == (0, 0);
    // The line of each subscription, to name both lines of a clash found once all are read.
    let mut line_of: Vec<u32> = Vec::with_capacity(capacity);
    let mut n: usize = 0;
    while let Some(next) = lines.next().map_err(io_err)? {
        n += 1;
        let at = || format!("{shown}:{n}");
        let Next::Line(line) = next else {
            push(
                &mut errs,
                at(),
                format!("the line is longer than {MAX_LINE} bytes"),
            );
            continue;
        };
        match parse_line(line) {
            Ok(Line::Nothing) => {}
            Ok(Line::Record {
                id,
                state,
                scope,
                hashes,
            }) => {
                // A scope already added was checked then: one lookup a line.
                let known = builder.scope(scope);
                if known.is_none()
                    && let Err(e) = resolver.check(scope)
                {
                    push(&mut errs, at(), format!("scope `{scope}`: {e}"));
                    continue;
                }
                let hashes: &[KeyHash] = match &hashes {
                    [Some(a), Some(b)] => &[*a, *b],
                    [Some(a), None] | [None, Some(a)] => std::slice::from_ref(a),
                    [None, None] => &[],
                };
                if !no_inline {
                    if inline.contains_id(id) {
                        push(
                            &mut errs,
                            at(),
                            format!(
                                "`{id}` is also the id of a subscription in subscriptions.keys"
                            ),
                        );
                        continue;
                    }
                    if let Some(owner) = hashes.iter().find_map(|h| inline.owner(h)) {
                        push(
                            &mut errs,
                            at(),
                            format!(
                                "a key of `{id}` is also a key of `{owner}` in subscriptions.keys"
                            ),
                        );
                        continue;
                    }
                }
                if builder.len() >= MAX_SUBSCRIPTIONS {
                    push(
                        &mut errs,
                        at(),
                        format!("more than {MAX_SUBSCRIPTIONS} subscriptions in one file"),
                    );
                    break;
                }
                // Checked by the resolver, so always a scope name.
                let Some(scope) = known.or_else(|| builder.add_scope(scope)) else {
                    continue;
                };
                builder.push_scoped(id, state, scope, hashes);
                line_of.push(u32::try_from(n).unwrap_or(u32::MAX));
            }
            Err(e) => push(&mut errs, at(), e),
        }
    }
    let (table, clashes) = builder.finish();
    for c in clashes {
        let (a, b, what) = match c {
            Clash::Id(a, b) => (a, b, "the id"),
            Clash::Key(a, b) => (a, b, "a key"),
        };
        push(
            &mut errs,
            format!("{shown}:{}", line_of[a]),
            format!("{what} of line {} again", line_of[b]),
        );
    }
    if more > 0 {
        errs.push(
            "subscriptions.keys_file",
            format!("{more} more errors in {shown}"),
        );
    }
    if errs.is_empty() {
        Ok(table)
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::{KeyTableBuilder, State, format_hash, hash_key};
    use super::*;

    fn resolver() -> ScopeResolver {
        let apis: HashMap<&str, usize> = [("orders", 0)].into_iter().collect();
        let products: HashMap<&str, Vec<usize>> = [("gold", vec![0])].into_iter().collect();
        ScopeResolver::new(&apis, &products)
    }

    fn inline() -> KeyTable {
        let mut b = KeyTableBuilder::default();
        b.push("inline-1", State::Active, "all", &[hash_key("inline-key")]);
        b.finish().0
    }

    fn load_text(text: &[u8]) -> Result<KeyTable, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.txt");
        std::fs::write(&path, text).unwrap();
        load(&path, "keys.txt", &resolver(), &inline())
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    fn h(k: &str) -> String {
        format_hash(&hash_key(k))
    }

    #[test]
    fn a_valid_file_with_comments_blank_lines_and_crlf() {
        let text = format!(
            "# subscriptions of the portal\n\n  \t\nalice active all {} {}\r\nbob\tsuspended\tproduct:gold\t{}\t-\ncarol active api:orders - {}\n \t erin  active\t \tall {}\t \n  # an indented comment\n",
            h("a1"),
            h("a2"),
            h("b1"),
            h("c2"),
            h("e1")
        );
        let t = load_text(text.as_bytes()).unwrap();
        assert_eq!(t.counts(), (4, 5));
        assert_eq!(t.owner(&hash_key("e1")).as_deref(), Some("erin"));
        assert_eq!(t.owner(&hash_key("a2")).as_deref(), Some("alice"));
        assert_eq!(t.owner(&hash_key("c2")).as_deref(), Some("carol"));
        let bob = t.get("bob").unwrap();
        assert!(!bob.active);
        assert_eq!(bob.scope, "product:gold");
        // No final newline is fine too.
        let t = load_text(format!("dave active all {}", h("d")).as_bytes()).unwrap();
        assert_eq!(t.counts(), (1, 1));
    }

    #[test]
    fn every_error_names_its_line() {
        let long = format!("x active all {} {}", h("l"), "a".repeat(MAX_LINE));
        let lines = [
            format!("ok1 active all {}", h("1")),                   // 1
            "only two".to_string(),                                 // 2
            format!("bad/id active all {}", h("2")),                // 3
            format!("ok2 paused all {}", h("3")),                   // 4
            format!("ok3 active product:nope {}", h("4")),          // 5
            format!("ok4 active api:nope {}", h("5")),              // 6
            format!("ok5 active somewhere {}", h("6")),             // 7
            "ok6 active all my-plain-secret-key".to_string(),       // 8
            "ok7 active all sha256:abc".to_string(),                // 9
            "ok8 active all - -".to_string(),                       // 10
            format!("ok1 active all {}", h("7")),                   // 11: id of line 1
            format!("ok9 active all {}", h("1")),                   // 12: key of line 1
            format!("inline-1 active all {}", h("8")),              // 13
            format!("ok10 active all {}", h("inline-key")),         // 14
            format!("caf\u{e9} active all {}", h("9")),             // 15
            format!("ok11 active all {} {} extra", h("a"), h("b")), // 16
            long,                                                   // 17
            format!("ok12 active all {}", h("fine")),               // 18
        ];
        let errs = load_text(lines.join("\n").as_bytes()).unwrap_err();
        let at: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(
            at,
            [
                "keys.txt:2",
                "keys.txt:3",
                "keys.txt:4",
                "keys.txt:5",
                "keys.txt:6",
                "keys.txt:7",
                "keys.txt:8",
                "keys.txt:9",
                "keys.txt:10",
                "keys.txt:13",
                "keys.txt:14",
                "keys.txt:15",
                "keys.txt:16",
                "keys.txt:17",
                "keys.txt:12",
                "keys.txt:11",
            ],
            "{errs:#?}"
        );
        let all = errs.join("\n");
        assert!(all.contains("keys.txt:5: scope `product:nope`: no product is named `nope`"));
        assert!(all.contains("keys.txt:11: the id of line 1 again"));
        assert!(all.contains("keys.txt:12: a key of line 1 again"));
        assert!(all.contains("keys.txt:17: the line is longer than 1024 bytes"));
        assert!(all.contains("keys.txt:15: byte 4 is not printable ASCII"));
        // A plain key written by mistake is never repeated in an error.
        assert!(!all.contains("my-plain-secret-key"), "{all}");
        assert!(!all.contains("sha256:abc"), "{all}");
    }

    #[test]
    fn an_oversized_line_without_an_end_is_skipped_not_kept() {
        let mut text = format!("ok active all {}\n", h("1")).into_bytes();
        text.extend(std::iter::repeat_n(b'a', 8 * 1024 * 1024));
        let errs = load_text(&text).unwrap_err();
        assert_eq!(errs, ["keys.txt:2: the line is longer than 1024 bytes"]);
    }

    /// Hands out its bytes a few at a time, so lines and `\r\n` are cut at every place.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = self.1 % 7 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// What the lines of `text` must be: split at `\n`, a `\r` before it taken off, a last
    /// line without an end kept; `None` for a line longer than `MAX_LINE`.
    fn expected(text: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        if out.last() == Some(&&b""[..]) {
            out.pop();
        }
        let ended = out.len() < text.split(|&b| b == b'\n').count();
        let last = out.len().saturating_sub(1);
        out.iter()
            .enumerate()
            .map(|(i, l)| {
                let l = if i < last || ended {
                    l.strip_suffix(b"\r").unwrap_or(l)
                } else {
                    l
                };
                (l.len() <= MAX_LINE).then(|| l.to_vec())
            })
            .collect()
    }

    fn read_all(mut lines: Lines<impl Read>) -> Vec<Option<Vec<u8>>> {
        let mut got = Vec::new();
        while let Some(next) = lines.next().unwrap() {
            got.push(match next {
                Next::Line(l) => Some(l.to_vec()),
                Next::TooLong => None,
            });
        }
        got
    }

    #[test]
    fn lines_are_the_same_wherever_reads_and_chunks_cut_them() {
        // Lengths around MAX_LINE (with and without `\r`), enough of them to cross several chunks.
        let mut text = Vec::new();
        for i in 0..400usize {
            let len = [
                0,
                1,
                63,
                MAX_LINE - 1,
                MAX_LINE,
                MAX_LINE + 1,
                MAX_LINE + 2,
                3000,
            ][i % 8]
                + i % 3;
            text.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, len));
            text.extend_from_slice(if i % 5 == 0 { b"\r\n" } else { b"\n" });
        }
        for tail in [&b""[..], b"last", b"last\r", &[b'z'; MAX_LINE + 5][..]] {
            let mut t = text.clone();
            t.extend_from_slice(tail);
            let want = expected(&t);
            assert_eq!(read_all(Lines::new(&t[..])), want);
            assert_eq!(read_all(Lines::new(Trickle(&t, 0))), want);
        }
    }

    /// A line as a careless or hostile writer could make it: a valid record, one with a field
    /// broken, or bytes of any kind.
    fn any_line() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let id = "[A-Za-z0-9._~:@-]{1,12}";
        let state = prop_oneof![
            Just("active".to_string()),
            Just("suspended".to_string()),
            "[a-z]{1,9}"
        ];
        let scope = prop_oneof![
            Just("all".to_string()),
            Just("api:orders".to_string()),
            Just("product:gold".to_string()),
            "(api|product):[a-z]{1,6}",
            "[ -~]{0,12}"
        ];
        let key = prop_oneof![
            "[a-z0-9]{1,8}".prop_map(|k| format_hash(&hash_key(&k))),
            Just("-".to_string()),
            "sha256:[0-9a-fA-F]{60,66}",
            "[ -~]{0,20}"
        ];
        let blank = prop_oneof![Just(" "), Just("\t"), Just("  \t ")];
        prop_oneof![
            4 => (id, state, scope, key.clone(), proptest::option::of(key), blank)
                .prop_map(|(i, st, sc, k1, k2, b)| {
                    let mut l = format!("{i}{b}{st}{b}{sc}{b}{k1}");
                    if let Some(k2) = k2 {
                        l.push_str(b);
                        l.push_str(&k2);
                    }
                    l.into_bytes()
                }),
            // Any byte but the line end (the lines are joined with it).
            1 => proptest::collection::vec(any::<u8>().prop_map(|b| if b == b'\n' { b'\r' } else { b }), 0..40),
            1 => Just(b"# a comment".to_vec()),
        ]
    }

    proptest::proptest! {
        /// Whatever the lines before it, a plain key written in a key field is never repeated
        /// in an error; no input panics; a file without errors holds one subscription a record.
        #[test]
        fn no_line_breaks_the_reader_or_shows_a_plain_key(
            lines in proptest::collection::vec(any_line(), 0..40),
            crlf in proptest::bool::ANY,
            secondary in proptest::bool::ANY,
        ) {
            const PLAIN: &str = "plain-Secret-Key-4d2e9a";
            let end: &[u8] = if crlf { b"\r\n" } else { b"\n" };
            let mut text = lines.join(end);
            if !lines.is_empty() {
                text.extend_from_slice(end);
            }
            let last = if secondary {
                format!("zz-last active all {} {PLAIN}", h("zz"))
            } else {
                format!("zz-last active all {PLAIN} -")
            };
            text.extend_from_slice(last.as_bytes());
            let errs = read(&text[..], 8, "keys.txt", &resolver(), &inline()).unwrap_err();
            let all = errs.to_string();
            proptest::prop_assert!(!all.contains(PLAIN), "{}", all);
            proptest::prop_assert!(all.contains(&format!("keys.txt:{}", lines.len() + 1)), "{}", all);
            // Without the last line: either an error or a table of at most one subscription a line.
            let without = &text[..text.len() - text.rsplit(|&b| b == b'\n').next().unwrap_or_default().len()];
            if let Ok(t) = read(without, 8, "keys.txt", &resolver(), &inline()) {
                proptest::prop_assert!(t.counts().0 <= lines.len());
            }
        }
    }

    #[test]
    fn the_first_blank_is_found_wherever_it_is() {
        // Every printable byte and both blanks, at every position of lines of 0 to 20 bytes.
        for len in 0..20 {
            for at in 0..=len {
                for blank in [b' ', b'\t'] {
                    for fill in 0x21u8..=0x7e {
                        let mut line = vec![fill; len];
                        if at < len {
                            line[at] = blank;
                            // A second blank later must not hide the first.
                            if at + 2 < len {
                                line[at + 2] = b' ';
                            }
                        }
                        let want = line.iter().position(|&b| b == b' ' || b == b'\t');
                        assert_eq!(first_blank(&line), want, "{line:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_missing_file_is_one_error() {
        let errs = load(
            Path::new("/nonexistent/keys.txt"),
            "keys.txt",
            &resolver(),
            &inline(),
        )
        .unwrap_err();
        assert_eq!(errs.0.len(), 1);
        assert!(
            errs.to_string()
                .starts_with("subscriptions.keys_file: cannot read keys.txt")
        );
    }

    #[test]
    fn errors_stop_at_a_hundred() {
        let text = "bad\n".repeat(500);
        let errs = load_text(text.as_bytes()).unwrap_err();
        assert_eq!(errs.len(), MAX_ERRORS + 1);
        assert_eq!(
            errs.last().unwrap(),
            "subscriptions.keys_file: 400 more errors in keys.txt"
        );
    }
}
