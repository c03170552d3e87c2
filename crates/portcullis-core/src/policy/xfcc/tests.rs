use super::*;
use proptest::prelude::*;

fn kind(header: &str) -> XfccErrorKind {
    match parse(header.as_bytes()) {
        Ok(x) => panic!("`{header}` parsed: {x:?}"),
        Err(e) => e.kind,
    }
}

fn nearest_cert(header: &str) -> Option<String> {
    parse(header.as_bytes())
        .unwrap_or_else(|e| panic!("`{header}`: {e}"))
        .nearest
        .cert
        .map(Cow::into_owned)
}

#[test]
fn reads_what_envoy_writes() {
    // Two hops, as APPEND_FORWARD builds it: the nearest proxy's element is last.
    let h = concat!(
        r#"By=spiffe://edge;By=spiffe://edge/alt;Hash=abc;Cert="first%0A";Subject="CN=a,O=b";URI=;DNS=a.example;DNS=b.example"#,
        r#",By=spiffe://mesh;Hash=def;Cert="second";Chain="c1%0Ac2";Subject="";URI=spiffe://client"#
    );
    let x = parse(h.as_bytes()).unwrap();
    assert_eq!(x.earlier.len(), 1);
    let far = &x.earlier[0];
    assert_eq!(far.by, ["spiffe://edge", "spiffe://edge/alt"]);
    assert_eq!(far.hash.as_deref(), Some("abc"));
    assert_eq!(far.cert.as_deref(), Some("first%0A"));
    assert_eq!(far.subject.as_deref(), Some("CN=a,O=b"));
    assert_eq!(far.uri, [""]);
    assert_eq!(far.dns, ["a.example", "b.example"]);
    let near = &x.nearest;
    assert_eq!(near.cert.as_deref(), Some("second"));
    assert_eq!(near.chain.as_deref(), Some("c1%0Ac2"));
    assert_eq!(near.subject.as_deref(), Some(""));
    assert_eq!(near.uri, ["spiffe://client"]);
    assert_eq!(x.elements().count(), 2);
    // A certificate value is borrowed from the header, not copied.
    assert!(matches!(near.cert, Some(Cow::Borrowed(_))));
}

#[test]
fn an_element_without_cert_has_none() {
    assert_eq!(nearest_cert("By=x;Hash=y"), None);
    assert_eq!(nearest_cert(r#"Cert="a",By=x;Hash=y"#), None);
}

#[test]
fn keys_are_case_insensitive() {
    assert_eq!(nearest_cert(r#"cert="a""#).as_deref(), Some("a"));
    assert_eq!(
        nearest_cert(r#"CERT="a";uri=u;dns=d;BY=b"#).as_deref(),
        Some("a")
    );
    assert_eq!(
        kind(r#"Cert="a";cErT="b""#),
        XfccErrorKind::DuplicateKey(XfccKey::Cert)
    );
}

#[test]
fn escaped_quotes_stay_inside_the_value() {
    let x = parse(br#"Subject="CN=\"a,b\";O=\\x";Cert="c""#).unwrap();
    assert_eq!(x.nearest.subject.as_deref(), Some(r#"CN="a,b";O=\x"#));
    assert_eq!(x.nearest.cert.as_deref(), Some("c"));
    // The escaped quote does not close: the comma after it is not structural.
    let x = parse(br#"Subject="\",Cert=x""#).unwrap();
    assert!(x.earlier.is_empty());
    assert_eq!(x.nearest.subject.as_deref(), Some(r#"",Cert=x"#));
    assert_eq!(x.nearest.cert, None);
}

#[test]
fn whitespace_only_next_to_separators() {
    assert_eq!(nearest_cert(r#" By=a ; Cert="c" "#).as_deref(), Some("c"));
    assert_eq!(
        nearest_cert("Cert=\"a\",\tCert=\"b\"").as_deref(),
        Some("b")
    );
    assert_eq!(nearest_cert(r#"Cert="a" , Cert="b""#).as_deref(), Some("b"));
    assert_eq!(kind(r#"Cert ="a""#), XfccErrorKind::UnknownKey);
    assert_eq!(kind(r#"Cert= "a""#), XfccErrorKind::QuoteInUnquotedValue);
    assert_eq!(kind("By= a"), XfccErrorKind::WhitespaceInUnquotedValue);
    assert_eq!(kind("By=a b"), XfccErrorKind::WhitespaceInUnquotedValue);
    assert_eq!(
        parse(b"By=a \t;URI=u").unwrap().nearest.by,
        ["a"],
        "trailing whitespace is not part of the value"
    );
}

#[test]
fn refusals_say_what_and_where() {
    let cases: &[(&[u8], XfccErrorKind, usize)] = &[
        (b"", XfccErrorKind::EmptyElement, 0),
        (b"  ", XfccErrorKind::EmptyElement, 0),
        (b"Cert=a,", XfccErrorKind::EmptyElement, 7),
        (b",Cert=a", XfccErrorKind::EmptyElement, 0),
        (b"Cert=a,,Cert=b", XfccErrorKind::EmptyElement, 7),
        (b"By=a;;Cert=b", XfccErrorKind::EmptyPair, 5),
        (b"By=a;", XfccErrorKind::EmptyPair, 5),
        (b";By=a", XfccErrorKind::EmptyPair, 0),
        (b"By=a;junk", XfccErrorKind::PairWithoutEquals, 5),
        (b"junk", XfccErrorKind::PairWithoutEquals, 0),
        (b"X=1", XfccErrorKind::UnknownKey, 0),
        (b"=1", XfccErrorKind::UnknownKey, 0),
        (b"By=a;Cert=\"x", XfccErrorKind::UnbalancedQuote, 10),
        (b"Cert=\"x\\\"", XfccErrorKind::UnbalancedQuote, 5),
        (b"Cert=\"x\\", XfccErrorKind::UnbalancedQuote, 5),
        (b"Cert=a\"b\"", XfccErrorKind::QuoteInUnquotedValue, 6),
        (b"Cert=\"a\"b", XfccErrorKind::AfterClosingQuote, 8),
        (b"Cert=\"a\" b", XfccErrorKind::AfterClosingQuote, 9),
        (b"Cert=\"a\"\"b\"", XfccErrorKind::AfterClosingQuote, 8),
        (b"Cert=a\\,b", XfccErrorKind::BackslashOutsideQuotes, 6),
        (b"By=a=b", XfccErrorKind::EqualsInUnquotedValue, 4),
        (
            b"Cert=\"a\";Cert=\"b\"",
            XfccErrorKind::DuplicateKey(XfccKey::Cert),
            9,
        ),
        (
            b"Chain=a;Chain=b",
            XfccErrorKind::DuplicateKey(XfccKey::Chain),
            8,
        ),
        (
            b"Hash=a;Hash=b",
            XfccErrorKind::DuplicateKey(XfccKey::Hash),
            7,
        ),
        (
            b"Subject=a;Subject=b",
            XfccErrorKind::DuplicateKey(XfccKey::Subject),
            10,
        ),
        (b"Cert=\"a\nb\"", XfccErrorKind::ByteNotAllowed, 7),
        (b"Cert=\"a\x00\"", XfccErrorKind::ByteNotAllowed, 7),
        (b"Cert=\"\xc3\xa9\"", XfccErrorKind::ByteNotAllowed, 6),
        (b"Cert=\"\x7f\"", XfccErrorKind::ByteNotAllowed, 6),
        (&[0xff], XfccErrorKind::ByteNotAllowed, 0),
    ];
    for (header, want, at) in cases {
        let got = parse(header).expect_err(&String::from_utf8_lossy(header));
        assert_eq!(
            (got.kind, got.at),
            (*want, *at),
            "{}",
            String::from_utf8_lossy(header)
        );
    }
}

#[test]
fn repeatable_keys_repeat() {
    let x = parse(b"By=a;By=b;URI=u1;URI=u2;DNS=d1;DNS=d2").unwrap();
    assert_eq!(x.nearest.by.len(), 2);
    assert_eq!(x.nearest.uri.len(), 2);
    assert_eq!(x.nearest.dns.len(), 2);
}

#[test]
fn errors_never_echo_the_header() {
    let secret = "Cert=\"MIIsecretcertificatebody\";Hash=\"MIIsecret";
    let e = parse(secret.as_bytes()).unwrap_err();
    let shown = e.to_string();
    assert!(!shown.contains("MII"), "{shown}");
    assert!(
        shown.starts_with("x-forwarded-client-cert is malformed: "),
        "{shown}"
    );
}

#[test]
fn the_smuggling_shape_is_refused() {
    // A caller's own certificate, then an unbalanced quote; the proxy appends its element.
    let attacker = r#"Cert="-----BEGIN%20CERTIFICATE-----attacker";X=""#;
    let proxy = r#"By=spiffe://proxy;Hash=abc;Cert="-----BEGIN%20CERTIFICATE-----real";URI="#;
    let header = format!("{attacker},{proxy}");
    assert_eq!(kind(&header), XfccErrorKind::UnknownKey);
    // With a key Envoy does write the quote still runs into the proxy's value.
    let attacker = r#"Cert="-----BEGIN%20CERTIFICATE-----attacker";Subject=""#;
    let header = format!("{attacker},{proxy}");
    assert_eq!(kind(&header), XfccErrorKind::AfterClosingQuote);
    // And when the proxy writes no quote at all, the attacker's never closes.
    let header = format!("{attacker},By=spiffe://proxy;Hash=abc");
    assert_eq!(kind(&header), XfccErrorKind::UnbalancedQuote);
}

/// Counts quotes that a backslash does not escape: a quote preceded by an odd run of backslashes is
/// escaped. (Independent of the parser, so the property below checks it.)
fn unescaped_quotes(s: &[u8]) -> usize {
    let (mut run, mut n) = (0usize, 0);
    for &c in s {
        match c {
            b'\\' => run += 1,
            b'"' => {
                if run.is_multiple_of(2) {
                    n += 1;
                }
                run = 0;
            }
            _ => run = 0,
        }
    }
    n
}

fn value() -> impl Strategy<Value = Cow<'static, str>> {
    // Visible ASCII, space and tab, with the structural characters made likely.
    prop_oneof![
        "[\t -~]{0,12}",
        "[a-z,;=\"\\\\ ]{0,12}",
        "-----BEGIN%20CERTIFICATE-----%0A[A-Za-z0-9%]{0,24}",
    ]
    .prop_map(Cow::Owned)
}

fn element() -> impl Strategy<Value = XfccElement<'static>> {
    let many = || proptest::collection::vec(value(), 0..3);
    (
        many(),
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(value()),
        proptest::option::of(value()),
        many(),
        many(),
    )
        .prop_map(|(by, hash, cert, chain, subject, uri, dns)| XfccElement {
            by,
            hash,
            cert,
            chain,
            subject,
            uri,
            dns,
        })
        .prop_filter("an element has at least one pair", |e| !e.is_empty())
}

fn header() -> impl Strategy<Value = Xfcc<'static>> {
    (proptest::collection::vec(element(), 0..3), element())
        .prop_map(|(earlier, nearest)| Xfcc { earlier, nearest })
}

/// Bytes that look like XFCC: keys, separators, quotes and backslashes are common.
fn xfcc_like() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"Cert=".to_vec()),
        Just(b"By=".to_vec()),
        Just(b"URI=".to_vec()),
        Just(b"Subject=".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\\".to_vec()),
        Just(b",".to_vec()),
        Just(b";".to_vec()),
        Just(b"=".to_vec()),
        Just(b" ".to_vec()),
        "[a-z%0-9-]{1,6}".prop_map(String::into_bytes),
    ];
    proptest::collection::vec(token, 0..24).prop_map(|t| t.concat())
}

proptest! {
    #[test]
    fn serialised_headers_read_back(x in header()) {
        let text = x.to_string();
        let back = parse(text.as_bytes());
        prop_assert_eq!(back.as_ref(), Ok(&x), "{}", text);
    }

    #[test]
    fn never_panics_and_what_parses_reserialises(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..64), xfcc_like()]
    ) {
        if let Ok(x) = parse(&bytes) {
            let text = x.to_string();
            prop_assert_eq!(parse(text.as_bytes()), Ok(x));
        }
    }

    #[test]
    fn an_attacker_prefix_left_open_never_parses(
        before in proptest::option::of(element()),
        key in prop_oneof![Just("Cert"), Just("Subject"), Just("URI"), Just("X"), Just("chain")],
        open in proptest::collection::vec(
            prop_oneof!["[\t !#-\\[\\]-~]{1,8}", "\\\\[\t -~]"], 0..6
        ),
        dangling_backslash in any::<bool>(),
        proxy in element(),
    ) {
        let mut attacker = before.map(|e| format!("{e};")).unwrap_or_default();
        attacker.push_str(key);
        attacker.push_str("=\"");
        attacker.push_str(&open.concat());
        if dangling_backslash {
            attacker.push('\\');
        }
        let header = format!("{attacker},{proxy}");
        prop_assert!(parse(header.as_bytes()).is_err(), "{}", header);
    }

    #[test]
    fn an_odd_number_of_unescaped_quotes_never_parses(
        bytes in prop_oneof![xfcc_like(), header().prop_map(|x| x.to_string().into_bytes())],
        insert_at in any::<proptest::sample::Index>(),
    ) {
        let mut bytes = bytes;
        if unescaped_quotes(&bytes).is_multiple_of(2) {
            let at = insert_at.index(bytes.len() + 1);
            bytes.insert(at, b'"');
        }
        prop_assume!(!unescaped_quotes(&bytes).is_multiple_of(2));
        prop_assert!(parse(&bytes).is_err(), "{}", String::from_utf8_lossy(&bytes));
    }
}
