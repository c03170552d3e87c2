//! Reading a `subscriptions.keys_file` of 100,000 lines into a key table, as a keys-only reload does
//! (issue 19: at most 50 ms). The file is the one `loadtest/scale/gen.py --keys-in file` writes:
//! `sub-K active SCOPE sha256:<hex> -`, a third of the scopes `all`, the rest `api:api-N` over 1,000
//! APIs.
//!
//!   cargo bench --bench keys_file

use std::collections::HashMap;
use std::fmt::Write;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::policy::subscription::{
    KeyTable, KeyTableBuilder, ScopeResolver, format_hash, hash_key, keys_file,
};

const KEYS: usize = 100_000;
const APIS: usize = 1_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.txt");
    let mut text = String::from("# id state scope primary [secondary]\n");
    for k in 0..KEYS {
        let scope = if k % 3 == 0 {
            "all".to_string()
        } else {
            format!("api:api-{}", k % APIS)
        };
        let hash = format_hash(&hash_key(&format!("key-{k}")));
        let _ = writeln!(text, "sub-{k} active {scope} {hash} -");
    }
    std::fs::write(&path, text).unwrap();
    let names: Vec<String> = (0..APIS).map(|a| format!("api-{a}")).collect();
    let apis: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let resolver = ScopeResolver::new(&apis, &HashMap::new());
    let inline: KeyTable = KeyTableBuilder::default().finish().0;
    let mut g = c.benchmark_group("keys_file");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.bench_function("load/100000", |b| {
        b.iter(|| {
            let table = keys_file::load(&path, "keys.txt", &resolver, &inline).unwrap();
            assert_eq!(table.counts(), (KEYS, KEYS));
            black_box(table)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
