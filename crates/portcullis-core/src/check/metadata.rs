//! The decision's facts for the rest of the proxy: a `google.protobuf.Struct` that Envoy stores as
//! dynamic metadata of `envoy.filters.http.ext_authz`, where its rate-limit filter, RBAC, Lua, the
//! router and access logs (`%DYNAMIC_METADATA(envoy.filters.http.ext_authz:subject)%`) read it.
//!
//! The Struct is written straight into its protobuf encoding as the facts are known, into one
//! buffer: no map, no `String` per key or value. A `Struct` is `map<string, Value> fields = 1`;
//! each entry is a length-delimited `{1: key, 2: Value}`, and a `Value` here is a `string_value`
//! (field 3), a `bool_value` (4) or a `list_value` (6, `repeated Value values = 1`).
//!
//! Values come from configuration names, fixed reason codes, token claims and subscription ids:
//! never a token, a key or a secret (templates have no placeholder for them).

/// The names portcullis writes itself; `on_allow.metadata` may not use them.
pub const STANDARD_KEYS: &[&str] = &[
    "api",
    "decision_id",
    "reason",
    "shadow_reason",
    "subscription_id",
    "product",
    "subject",
    "issuer",
    "client_id",
    "scopes",
    "client_certificate_thumbprint",
    "token_binding",
];

/// An encoded `google.protobuf.Struct`; empty when the decision sends none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    buf: Vec<u8>,
}

/// `Struct.fields` entries, and the `MapEntry`/`ListValue` fields: all field 1, length-delimited.
const TAG_1_LEN: u8 = 0x0a;
/// `MapEntry.value`: field 2, length-delimited.
const TAG_2_LEN: u8 = 0x12;
/// `Value.string_value`: field 3, length-delimited.
const TAG_STRING: u8 = 0x1a;
/// `Value.bool_value`: field 4, varint.
const TAG_BOOL: u8 = 0x20;
/// `Value.list_value`: field 6, length-delimited.
const TAG_LIST: u8 = 0x32;

/// Bytes reserved at the first entry: a typical allow's facts fit, so the buffer is allocated once.
const INITIAL_CAPACITY: usize = 512;

impl Metadata {
    /// No entries.
    pub const fn new() -> Self {
        Metadata { buf: Vec::new() }
    }

    /// Whether no entry was added.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The protobuf encoding of the Struct (without a tag or length of its own).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The encoding, moved out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Adds `key: "value"`. A value with a control character is left out: metadata ends up in
    /// access logs and headers, where a line break could forge a line.
    pub fn string(&mut self, key: &str, value: &str) {
        if has_control(value) {
            return;
        }
        let value_len = 1 + varint_len(value.len()) + value.len();
        self.entry(key, value_len);
        self.buf.push(TAG_STRING);
        self.str(value);
    }

    /// Adds `key: true|false`.
    pub fn bool(&mut self, key: &str, value: bool) {
        self.entry(key, 2);
        self.buf.push(TAG_BOOL);
        self.buf.push(u8::from(value));
    }

    /// Adds `key: ["a", "b", ...]`.
    pub fn strings<'a, I>(&mut self, key: &str, values: I)
    where
        I: IntoIterator<Item = &'a str>,
        I::IntoIter: Clone,
    {
        let values = values.into_iter().filter(|v| !has_control(v));
        // ListValue: one `values` entry (a Value holding a string_value) per item.
        let list_len: usize = values
            .clone()
            .map(|v| {
                let value = 1 + varint_len(v.len()) + v.len();
                1 + varint_len(value) + value
            })
            .sum();
        let value_len = 1 + varint_len(list_len) + list_len;
        self.entry(key, value_len);
        self.buf.push(TAG_LIST);
        varint(&mut self.buf, list_len);
        for v in values {
            self.buf.push(TAG_1_LEN);
            varint(&mut self.buf, 1 + varint_len(v.len()) + v.len());
            self.buf.push(TAG_STRING);
            self.str(v);
        }
    }

    /// Writes an entry's header and key; the caller writes `value_len` bytes of `Value` next.
    fn entry(&mut self, key: &str, value_len: usize) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(INITIAL_CAPACITY);
        }
        let entry_len =
            1 + varint_len(key.len()) + key.len() + 1 + varint_len(value_len) + value_len;
        self.buf.push(TAG_1_LEN);
        varint(&mut self.buf, entry_len);
        self.buf.push(TAG_1_LEN);
        self.str(key);
        self.buf.push(TAG_2_LEN);
        varint(&mut self.buf, value_len);
    }

    fn str(&mut self, s: &str) {
        varint(&mut self.buf, s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// The entries in order, decoded: for explanations (`portcullis check`) and tests. Lists are
    /// their items; `None` when the buffer is not an encoding this module writes.
    pub fn entries(&self) -> Option<Vec<(String, MetaValue)>> {
        let mut out = Vec::new();
        self.visit(|key, value| {
            let value = match value {
                MetaRef::String(v) => MetaValue::String(v.to_string()),
                MetaRef::Bool(b) => MetaValue::Bool(b),
                MetaRef::List(items) => MetaValue::List(items.map(str::to_string).collect()),
            };
            out.push((key.to_string(), value));
        })?;
        Some(out)
    }

    /// Calls `f` with each entry in order, borrowed from the buffer (nothing is copied: the
    /// Envoy module hands them straight to Envoy); `None` when the buffer is not an encoding this
    /// module writes, after the entries before the fault.
    pub fn visit<'a>(&'a self, mut f: impl FnMut(&'a str, MetaRef<'a>)) -> Option<()> {
        let mut r = Reader(&self.buf);
        while !r.0.is_empty() {
            r.tag(TAG_1_LEN)?;
            let mut entry = Reader(r.bytes()?);
            entry.tag(TAG_1_LEN)?;
            let key = entry.str()?;
            entry.tag(TAG_2_LEN)?;
            let mut value = Reader(entry.bytes()?);
            let v = match value.byte()? {
                TAG_STRING => MetaRef::String(value.str()?),
                TAG_BOOL => MetaRef::Bool(value.byte()? != 0),
                TAG_LIST => {
                    let list = Reader(value.bytes()?);
                    // Checked whole before it is handed out, so that the iterator cannot fail.
                    list.clone()
                        .items()
                        .try_for_each(|item| item.map(drop))
                        .ok()?;
                    MetaRef::List(ListItems(list))
                }
                _ => return None,
            };
            f(key, v);
        }
        Some(())
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, v) in self.entries().unwrap_or_default() {
            let v = match v {
                MetaValue::String(s) => serde_json::Value::String(s),
                MetaValue::Bool(b) => serde_json::Value::Bool(b),
                MetaValue::List(items) => {
                    items.into_iter().map(serde_json::Value::String).collect()
                }
            };
            map.insert(k, v);
        }
        serde_json::Value::Object(map)
    }
}

/// One decoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaValue {
    /// `string_value`.
    String(String),
    /// `bool_value`.
    Bool(bool),
    /// `list_value` of strings.
    List(Vec<String>),
}

/// One entry's value, borrowed from the buffer ([`Metadata::visit`]).
#[derive(Debug, Clone)]
pub enum MetaRef<'a> {
    /// `string_value`.
    String(&'a str),
    /// `bool_value`.
    Bool(bool),
    /// `list_value` of strings: its items.
    List(ListItems<'a>),
}

/// The items of a list value, in order.
#[derive(Debug, Clone)]
pub struct ListItems<'a>(Reader<'a>);

impl<'a> Iterator for ListItems<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        // The list was checked whole by `visit`.
        self.0.items().next().and_then(Result::ok)
    }
}

#[derive(Debug, Clone)]
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The string items of a list value; an item that is not one is an `Err` (and the end).
    fn items(&mut self) -> impl Iterator<Item = Result<&'a str, ()>> + '_ {
        std::iter::from_fn(move || {
            if self.0.is_empty() {
                return None;
            }
            let item = (|| {
                self.tag(TAG_1_LEN)?;
                let mut item = Reader(self.bytes()?);
                item.tag(TAG_STRING)?;
                item.str()
            })();
            if item.is_none() {
                self.0 = &[];
            }
            Some(item.ok_or(()))
        })
    }
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn tag(&mut self, want: u8) -> Option<()> {
        (self.byte()? == want).then_some(())
    }

    fn varint(&mut self) -> Option<usize> {
        let mut n: usize = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.varint()?;
        if len > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

/// Whether `s` holds a control character (`char::is_control`: U+0000-U+001F, U+007F-U+009F).
/// Values are mostly ASCII, so first a fold over the bytes that the compiler vectorises: no byte
/// below 0x20, no DEL and no 0xC2 (the lead byte of U+0080-U+00BF) means none; only then the
/// characters are looked at.
fn has_control(s: &str) -> bool {
    let suspect = s
        .bytes()
        .fold(false, |any, b| any | (b < 0x20) | (b == 0x7f) | (b == 0xc2));
    suspect && s.chars().any(char::is_control)
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn varint(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        // Truncation intended: the low seven bits with the continuation bit.
        buf.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_order() {
        let mut m = Metadata::new();
        assert!(m.is_empty());
        m.string("subject", "alice");
        m.strings("scopes", ["orders:read", "orders:write"]);
        m.bool("shadow", true);
        m.strings("empty", []);
        m.string("forged", "alice\r\nx-admin: true");
        m.strings("mixed", ["ok", "bad\n"]);
        let long = "x".repeat(300);
        m.string("long", &long);
        assert_eq!(
            m.entries().unwrap(),
            vec![
                ("subject".into(), MetaValue::String("alice".into())),
                (
                    "scopes".into(),
                    MetaValue::List(vec!["orders:read".into(), "orders:write".into()])
                ),
                ("shadow".into(), MetaValue::Bool(true)),
                ("empty".into(), MetaValue::List(vec![])),
                ("mixed".into(), MetaValue::List(vec!["ok".into()])),
                ("long".into(), MetaValue::String(long)),
            ]
        );
    }

    #[test]
    fn control_characters_are_found_in_every_encoding() {
        for bad in [
            "a\u{0}",
            "\u{1f}",
            "x\u{7f}y",
            "\u{80}",
            "caf\u{e9}\u{9f}",
            "\r\n",
        ] {
            assert!(has_control(bad), "{bad:?}");
        }
        for good in [
            "",
            "alice",
            "caf\u{e9}",
            "\u{a0}\u{bf}",
            "\u{100}",
            "\u{2028}",
            "\u{10ffff}",
        ] {
            assert!(!has_control(good), "{good:?}");
        }
    }

    /// The exact bytes protoc writes for `fields {key: "k" value {string_value: "v"}}`.
    #[test]
    fn the_encoding_is_protobufs() {
        let mut m = Metadata::new();
        m.string("k", "v");
        assert_eq!(
            m.as_bytes(),
            [0x0a, 0x08, 0x0a, 0x01, b'k', 0x12, 0x03, 0x1a, 0x01, b'v']
        );
    }

    #[test]
    fn a_typical_allow_allocates_once() {
        let mut m = Metadata::new();
        m.string("api", "orders");
        m.string("decision_id", &"0".repeat(32));
        m.string("subject", "user-1234567890");
        m.string("issuer", "https://login.example.com/tenant/v2.0");
        m.string("client_id", "0123456789abcdef");
        m.strings("scopes", ["orders:read", "orders:write"]);
        assert_eq!(m.buf.capacity(), INITIAL_CAPACITY);
    }
}
