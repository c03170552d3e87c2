//! The command line (product contract, section 1).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;
use crate::policy::{self, Decision, EvalOptions, Outcome, PolicySet, Runtime, StepResult};
use crate::telemetry;

/// portcullis: external authorization decisions for Envoy ext_authz v3.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Config file (default: $PORTCULLIS_CONFIG, else ./portcullis.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Compile the config and print a summary; every error is reported with its path (exit 2).
    Validate {
        /// Config file (default: $PORTCULLIS_CONFIG, else ./portcullis.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Evaluate one request offline and explain every check (exit 0 allow, 1 deny, 2 error).
    Check(CheckArgs),
    /// Read a subscription key on stdin and print `sha256:<hex>` for the config.
    HashKey,
    /// Print Envoy's ext_authz filter for the compiled policy: headers limited to what it reads.
    EnvoyConfig(EnvoyConfigArgs),
    /// Upgrade a store written before per-user connections were keyed by issuer and subject
    /// (`serve` refuses it and names the credential); run while the service is stopped.
    UpgradeStore(UpgradeStoreArgs),
}

#[derive(Debug, clap::Args)]
struct UpgradeStoreArgs {
    /// Config file (default: $PORTCULLIS_CONFIG, else ./portcullis.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The credential `serve` named.
    #[arg(long)]
    credential: String,
    /// Its old per-user connections are the users of this identity provider (their `iss`).
    #[arg(long, conflicts_with = "drop", required_unless_present = "drop")]
    issuer: Option<String>,
    /// Delete its old per-user connections instead (their users consent again).
    #[arg(long)]
    drop: bool,
}

#[derive(Debug, clap::Args)]
struct EnvoyConfigArgs {
    /// Config file (default: $PORTCULLIS_CONFIG, else ./portcullis.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// How Envoy reaches portcullis.
    #[arg(long, value_enum, default_value = "grpc")]
    transport: crate::envoy_config::Transport,
    /// The Envoy cluster of portcullis (default: `portcullis` for gRPC, `portcullis_http` for HTTP).
    #[arg(long)]
    cluster: Option<String>,
    /// Envoy's timeout for one check, e.g. `250ms`.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

fn config_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("PORTCULLIS_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("portcullis.yaml"))
}

/// Runs the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config_path(config)),
        Command::Validate { config } => validate(&config_path(config)),
        Command::Check(args) => {
            let path = config_path(args.config.clone());
            check(&path, args)
        }
        Command::HashKey => hash_key(),
        Command::EnvoyConfig(args) => envoy_config(&config_path(args.config.clone()), args),
        Command::UpgradeStore(args) => upgrade_store(&config_path(args.config.clone()), args),
    }
}

fn envoy_config(path: &Path, args: EnvoyConfigArgs) -> ExitCode {
    let policy = match config::load(path).and_then(|src| policy::compile(&src, &Runtime::offline()))
    {
        Ok((policy, _)) => policy,
        Err(errs) => {
            eprintln!("error: {} is invalid:\n{errs}", path.display());
            return ExitCode::from(2);
        }
    };
    if args.timeout.is_zero() {
        eprintln!("error: --timeout must be more than 0");
        return ExitCode::from(2);
    }
    if args.cluster.as_deref().is_some_and(str::is_empty) {
        eprintln!("error: --cluster must not be empty");
        return ExitCode::from(2);
    }
    let opts = crate::envoy_config::Options {
        transport: args.transport,
        cluster: args
            .cluster
            .unwrap_or_else(|| crate::envoy_config::default_cluster(args.transport).to_string()),
        timeout: args.timeout,
        source: path.display().to_string(),
    };
    print!("{}", crate::envoy_config::render(&policy, &opts));
    ExitCode::SUCCESS
}

fn upgrade_store(path: &Path, args: UpgradeStoreArgs) -> ExitCode {
    let compiled = config::load(path).and_then(|src| {
        policy::compile(&src, &Runtime::offline()).map(|(policy, _)| (src, policy))
    });
    let (src, policy) = match compiled {
        Ok(c) => c,
        Err(errs) => {
            eprintln!("error: {} is invalid:\n{errs}", path.display());
            return ExitCode::from(2);
        }
    };
    let action = match args.issuer {
        Some(issuer) => crate::credentials::LegacyAction::Adopt { issuer },
        None => crate::credentials::LegacyAction::Drop,
    };
    match crate::credentials::upgrade_legacy_store(
        &src,
        policy.backend_credentials(),
        &args.credential,
        &action,
    ) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn serve(path: &Path) -> ExitCode {
    // The file is read once. Logging needs its format and level (and span export its OTLP
    // endpoint) before the service starts; a config that does not load or compile is still
    // reported, with default logging.
    let loaded = config::load_pruned(path)
        .map_err(policy::every_error)
        .and_then(|src| {
            let mut errs = config::ConfigErrors::default();
            match config::settings::compile_settings(&src, &mut errs) {
                Some(settings) if errs.is_empty() => Ok((src, settings)),
                _ => Err(errs),
            }
        });
    let (format, level, otlp) = match &loaded {
        Ok((_, s)) => (s.log_format, s.log_level.clone(), s.otlp.clone()),
        Err(_) => (config::LogFormat::Text, "info".into(), None),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // The OTLP client is built inside the runtime it will do its I/O on.
    let process_telemetry = {
        let _runtime = rt.enter();
        telemetry::init(format, &level, otlp.as_ref())
    };
    let code = serve_on(&rt, path, loaded.map(|(src, _)| src));
    // Spans still queued go out while the runtime is alive.
    process_telemetry.shutdown();
    code
}

fn serve_on(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    src: Result<config::Source, config::ConfigErrors>,
) -> ExitCode {
    rt.block_on(async {
        let started = match src {
            Ok(src) => crate::server::start_with(path, src).await,
            Err(errs) => Err(errs.into()),
        };
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        match running.wait().await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        }
    })
}

/// Reads the run-time subscriptions of `policy`'s store into `runtime` for `check` and
/// `validate`: a line to print saying how many, or why none could be read.
fn read_runtime_subscriptions(policy: &PolicySet, runtime: &Runtime) -> Option<String> {
    let store = policy.store_spec()?;
    let rt = match self::runtime() {
        Ok(rt) => rt,
        Err(e) => return Some(format!("run-time subscriptions not read: {e}")),
    };
    Some(match rt.block_on(runtime.subscriptions.read_once(store)) {
        Ok(n) => format!("{n} run-time subscriptions (from the store)"),
        Err(e) => format!("run-time subscriptions not read: {e}"),
    })
}

fn validate(path: &Path) -> ExitCode {
    // Every error at once: structural ones, and those of compiling the rest of the file.
    let runtime = Runtime::offline();
    let compiled = policy::compile_loaded(config::load_pruned(path), &runtime);
    match compiled {
        Ok((policy, settings)) => {
            println!("{}: valid", path.display());
            println!("  {}", policy.summary);
            if let Some(line) = read_runtime_subscriptions(&policy, &runtime) {
                println!("  {line}");
            }
            for note in &policy.summary.notes {
                println!("  {note}");
            }
            println!(
                "  gRPC listener {}{}",
                settings.grpc,
                settings
                    .http
                    .map(|h| format!(", HTTP listener {h}"))
                    .unwrap_or_default()
            );
            for name in policy.api_names() {
                println!("  api {name}");
            }
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!(
                "{}: {} error{}",
                path.display(),
                errs.0.len(),
                if errs.0.len() == 1 { "" } else { "s" }
            );
            for e in &errs.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Config file (default: $PORTCULLIS_CONFIG, else ./portcullis.yaml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Full URL, e.g. https://api.example.com/orders/1?x=1.
    #[arg(long)]
    url: String,
    /// A request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The caller's address (the TCP peer Envoy would report).
    #[arg(long)]
    source: Option<std::net::IpAddr>,
    /// Client certificate, PEM file.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// An Envoy context extension, `key=value` (repeatable).
    #[arg(long = "context-extension")]
    context_extensions: Vec<String>,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
}

fn check(path: &Path, args: CheckArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(2)
    };
    let uri: http::Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => return fail(format!("--url `{}`: {e}", args.url)),
    };
    let host = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let target = uri
        .path_and_query()
        .map_or("/".to_string(), |pq| pq.as_str().to_string());
    let mut headers = policy::Headers::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            return fail(format!("-H `{h}`: write `name: value`"));
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().as_bytes();
        headers.append(name, value);
    }
    let mut ce = HashMap::new();
    for kv in &args.context_extensions {
        let Some((k, v)) = kv.split_once('=') else {
            return fail(format!("--context-extension `{kv}`: write `key=value`"));
        };
        ce.insert(k.to_string(), v.to_string());
    }
    let cert = match &args.cert {
        Some(p) => {
            let max = crate::config::limits::MAX_PEM_FILE_BYTES;
            match crate::config::limits::read_bytes_at_most(p, max) {
                Ok(Some(pem)) => {
                    percent_encoding::percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC)
                        .to_string()
                }
                Ok(None) => {
                    return fail(format!("--cert {}: larger than {max} bytes", p.display()));
                }
                Err(e) => return fail(format!("--cert {}: {e}", p.display())),
            }
        }
        None => String::new(),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    // Signing keys may be fetched (once, when the JWT step needs them), and the CRLs of
    // `crl_urls` (once each, before deciding); nothing else leaves the process.
    let runtime = Runtime::on_demand();
    let compiled = config::load(path).and_then(|src| policy::compile(&src, &runtime));
    let (policy, _) = match compiled {
        Ok(c) => c,
        Err(errs) => return fail(format!("{} is invalid:\n{errs}", path.display())),
    };
    // Keys made through the admin API are checked too, when the store can be read.
    if let Some(line) = read_runtime_subscriptions(&policy, &runtime) {
        eprintln!("{line}");
    }
    let input = policy::CheckInput {
        method: &args.method,
        host: &host,
        path: &target,
        scheme: uri.scheme_str().unwrap_or(""),
        headers: &headers,
        peer: args.source,
        peer_certificate: &cert,
        context_extensions: if ce.is_empty() { None } else { Some(&ce) },
    };
    rt.block_on(runtime.crl.fetch_unobtained());
    let decision = rt.block_on(policy.decide(
        &input,
        EvalOptions {
            explain: true,
            ..Default::default()
        },
    ));
    if args.json {
        println!("{}", explain_json(&decision));
    } else {
        print!("{}", explain_text(&decision));
    }
    if decision.is_allow() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The human-readable explanation `portcullis check` prints. Credentials are never shown.
pub fn explain_text(d: &Decision) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    match &d.outcome {
        Outcome::Allow if d.waived.is_some() => {
            let _ = writeln!(
                s,
                "decision: allow (shadow mode; would deny: {})",
                d.waived.map(|r| r.as_str()).unwrap_or("")
            );
        }
        Outcome::Allow => {
            let _ = writeln!(s, "decision: allow");
        }
        Outcome::Deny(den) => {
            let _ = writeln!(
                s,
                "decision: deny\nstatus: {}\nreason: {}\nmessage: {}",
                den.status, den.reason, den.message
            );
            if let Some(c) = &den.www_authenticate {
                let _ = writeln!(s, "www-authenticate: {c}");
            }
        }
    }
    let _ = writeln!(s, "api: {}", d.api.as_deref().unwrap_or("(none)"));
    let _ = writeln!(s, "checks:");
    for step in &d.steps {
        let result = match step.result {
            StepResult::Pass => "pass".to_string(),
            StepResult::Skip => "skip".to_string(),
            StepResult::Fail(r) => format!("FAIL {r}"),
        };
        let _ = writeln!(s, "  {:<20} {:<38} {}", step.check, result, step.detail);
    }
    if d.is_allow() {
        let _ = writeln!(s, "headers to set upstream:");
        for h in &d.upstream_headers {
            let _ = writeln!(
                s,
                "  {}: {}",
                h.name,
                if h.sensitive {
                    "<redacted credential>"
                } else {
                    &h.value
                }
            );
        }
        if !d.remove_headers.is_empty() {
            let _ = writeln!(s, "headers to remove: {}", d.remove_headers.join(", "));
        }
        if !d.remove_query.is_empty() {
            let _ = writeln!(
                s,
                "query parameters to remove: {}",
                d.remove_query.join(", ")
            );
        }
    }
    if !d.metadata.is_empty() {
        // The decision id is new on every run: left out, so the output is reproducible.
        let _ = writeln!(s, "dynamic metadata (envoy.filters.http.ext_authz):");
        for (key, value) in d.metadata.entries().unwrap_or_default() {
            if key == "decision_id" {
                continue;
            }
            let shown = match value {
                portcullis_core::check::metadata::MetaValue::String(v) => v,
                portcullis_core::check::metadata::MetaValue::Bool(b) => b.to_string(),
                portcullis_core::check::metadata::MetaValue::List(items) => {
                    format!("[{}]", items.join(", "))
                }
            };
            let _ = writeln!(s, "  {key}: {shown}");
        }
    }
    s
}

/// The dynamic metadata without the decision id (new on every run), for reproducible output.
fn metadata_json(d: &Decision) -> serde_json::Value {
    let mut m = d.metadata.to_json();
    if let Some(map) = m.as_object_mut() {
        map.remove("decision_id");
    }
    m
}

fn explain_json(d: &Decision) -> String {
    let steps: Vec<_> = d
        .steps
        .iter()
        .map(|s| {
            let (result, reason) = match s.result {
                StepResult::Pass => ("pass", None),
                StepResult::Skip => ("skip", None),
                StepResult::Fail(r) => ("fail", Some(r.as_str())),
            };
            serde_json::json!({"check": s.check, "result": result, "reason": reason, "detail": s.detail})
        })
        .collect();
    let (status, message) = match &d.outcome {
        Outcome::Allow => (200, None),
        Outcome::Deny(den) => (den.status, Some(den.message.clone())),
    };
    serde_json::json!({
        "decision": if d.is_allow() { "allow" } else { "deny" },
        "status": status,
        "reason": d.reason().map(|r| r.as_str()),
        "message": message,
        "api": d.api.as_deref(),
        "shadow": d.waived.is_some(),
        "checks": steps,
        "headers_to_set": d.upstream_headers.iter().map(|h| serde_json::json!({"name": h.name, "value": if h.sensitive { "<redacted credential>" } else { h.value.as_str() }})).collect::<Vec<_>>(),
        "headers_to_remove": d.remove_headers,
        "query_parameters_to_remove": d.remove_query,
        "dynamic_metadata": metadata_json(d),
    })
    .to_string()
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("error: cannot read stdin: {e}");
        return ExitCode::from(2);
    }
    let key = input.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        eprintln!("error: no key on stdin");
        return ExitCode::from(2);
    }
    println!(
        "{}",
        policy::subscription::format_hash(&policy::subscription::hash_key(key))
    );
    ExitCode::SUCCESS
}
