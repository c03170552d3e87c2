//! The module layers of docs/architecture.md hold in the code: every `crate::<module>` path a
//! top-level module uses is one its row of the table allows, the table has no cycle, and the
//! policy core's dependency tree has no gRPC, HTTP server framework or OpenTelemetry in it (nor the
//! Envoy module's), and `unsafe` code stays in the module's ABI bindings.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `module -> modules it may use`, read from the table in docs/architecture.md.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let table = doc
        .split("| module | may use |")
        .nth(1)
        .expect("docs/architecture.md has the `| module | may use |` table");
    let mut out = BTreeMap::new();
    for line in table.lines().skip(2) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !line.starts_with('|') {
            break;
        }
        let uses = cells[2]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        out.insert(cells[1].to_string(), uses);
    }
    assert!(out.len() >= 9, "the table lists every module: {out:?}");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src_dir` belongs to (`policy/compile.rs` -> `policy`).
fn module_of(src_dir: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src_dir).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Every `crate::x` (and `crate::{x, y}`) in `text`, comments included: a doc link to a higher
/// layer is a reader's dependency too.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        // `portcullis_core::` or `some_crate::` is not `crate::`.
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// `module -> (module it uses -> a file that uses it)` over one crate's `src`.
fn edges(src_dir: &Path) -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut files = Vec::new();
    rust_files(src_dir, &mut files);
    let mut out: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in files {
        let Some(from) = module_of(src_dir, &file) else {
            continue;
        };
        let entry = out.entry(from.clone()).or_default();
        for to in crate_paths(&std::fs::read_to_string(&file).unwrap()) {
            if to != from {
                entry.entry(to).or_insert_with(|| file.clone());
            }
        }
    }
    out
}

#[test]
fn top_level_modules_use_only_the_layers_below_them() {
    let allowed = allowed();
    let mut violations = Vec::new();
    let mut seen = BTreeSet::new();
    for src in [
        root().join("src"),
        root().join("crates/portcullis-core/src"),
    ] {
        for (from, uses) in edges(&src) {
            seen.insert(from.clone());
            let Some(may) = allowed.get(&from) else {
                violations.push(format!(
                    "module `{from}` is not in docs/architecture.md's table"
                ));
                continue;
            };
            for (to, file) in uses {
                if !may.contains(&to) {
                    violations.push(format!(
                        "`{from}` uses `crate::{to}` ({}), which its row does not allow",
                        file.strip_prefix(root()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    let listed: BTreeSet<String> = allowed.keys().cloned().collect();
    assert_eq!(
        seen, listed,
        "the table lists exactly the modules there are"
    );
}

#[test]
fn the_layer_table_has_no_cycle() {
    let allowed = allowed();
    // Kahn's algorithm: repeatedly remove modules all of whose uses are removed.
    let mut left = allowed.clone();
    let mut order = Vec::new();
    while !left.is_empty() {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(!ready.is_empty(), "a cycle among {:?}", left.keys());
        for m in ready {
            left.remove(&m);
            order.push(m);
        }
    }
    for (m, uses) in &allowed {
        for u in uses {
            assert!(
                allowed.contains_key(u),
                "`{m}` may use `{u}`, which is not a module"
            );
        }
    }
}

/// The normal (non-dev) dependencies of a workspace package, by name, from `cargo tree`.
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(root())
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_core_builds_without_grpc_http_servers_or_telemetry_export() {
    let crates = normal_dependencies("portcullis-core");
    assert!(crates.contains("portcullis-core"), "{crates:?}");
    let forbidden: Vec<&String> = crates
        .iter()
        .filter(|c| {
            ["tonic", "axum", "prost", "opentelemetry", "clap", "notify"]
                .iter()
                .any(|f| c.starts_with(f))
        })
        .collect();
    assert!(forbidden.is_empty(), "the core depends on {forbidden:?}");
}

/// The Envoy module (crates/portcullis-envoy) builds on the core alone: no gRPC, HTTP server
/// framework or OpenTelemetry in Envoy's address space, and never the service crate.
#[test]
fn the_envoy_module_builds_on_the_core_without_the_service() {
    let crates = normal_dependencies("portcullis-envoy");
    assert!(crates.contains("portcullis-core"), "{crates:?}");
    let forbidden: Vec<&String> = crates
        .iter()
        .filter(|c| {
            *c == "portcullis"
                || ["tonic", "axum", "prost", "opentelemetry", "clap"]
                    .iter()
                    .any(|f| c.starts_with(f))
        })
        .collect();
    assert!(forbidden.is_empty(), "the module depends on {forbidden:?}");
}

/// `unsafe` code exists in one file of the project: the Envoy module's ABI bindings
/// (crates/portcullis-envoy/src/abi.rs). Everything else is `forbid`/`deny(unsafe_code)`.
#[test]
fn unsafe_code_lives_only_in_the_envoy_modules_abi() {
    let mut files = Vec::new();
    for dir in [
        "src",
        "crates/portcullis-core/src",
        "crates/portcullis-envoy/src",
    ] {
        rust_files(&root().join(dir), &mut files);
    }
    let abi = root().join("crates/portcullis-envoy/src/abi.rs");
    let markers = [
        "unsafe {",
        "unsafe fn",
        "unsafe impl",
        "unsafe extern",
        "#[unsafe(",
    ];
    for file in files.iter().filter(|f| **f != abi) {
        let text = std::fs::read_to_string(file).unwrap();
        for m in markers {
            assert!(
                !text.contains(m),
                "{} contains `{m}`: unsafe code belongs in crates/portcullis-envoy/src/abi.rs",
                file.display()
            );
        }
    }
    let lib = std::fs::read_to_string(root().join("crates/portcullis-envoy/src/lib.rs")).unwrap();
    assert!(
        lib.contains("#![deny(unsafe_code)]"),
        "the module denies unsafe code outside abi"
    );
}
