//! Compiling `credentials`, `store` and each API's `on_allow.backend_credential`.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use super::credential::{Credential, DEFAULT_CONNECTION};
use super::registry::{DEFAULT_MAX_CONCURRENT_FETCHES, locked};
use super::spec::{self, GrantKind};
use super::{BackendCredentialPolicy, ConnectionRef, CredentialSet, Registry, SetInner};
use crate::check::template::Template;
use crate::config::{self, ConfigErrors, Source};

/// Compiles `credentials` and `store`.
pub fn compile_credentials(
    src: &Source,
    registry: &Registry,
    errs: &mut ConfigErrors,
) -> CredentialSet {
    let store = spec::compile_store(src, errs);
    let has_store = src.file.store.is_some();
    let shared = &registry.shared;
    let mut by_name = BTreeMap::new();
    let mut by_fp = locked(&shared.by_fingerprint);
    by_fp.retain(|_, w| w.strong_count() > 0);
    for (i, c) in src.file.credentials.iter().enumerate() {
        let Some(spec) = spec::compile_credential(i, c, has_store, errs) else {
            continue;
        };
        if by_name.contains_key(&spec.name) {
            errs.push(
                format!("credentials[{i}].name"),
                format!("`{}` names two credentials", spec.name),
            );
            continue;
        }
        let fp = spec.fingerprint();
        // Unchanged settings: the same credential, with its cached tokens.
        let cred = match by_fp.get(&fp).and_then(Weak::upgrade) {
            Some(c) => c,
            None => {
                let c = Arc::new(Credential::new(spec.clone(), shared.clone()));
                by_fp.insert(fp, Arc::downgrade(&c));
                c
            }
        };
        by_name.insert(spec.name, cred);
    }
    let max_fetches = match src.file.limits.max_concurrent_fetches {
        Some(0) => {
            errs.push("limits.max_concurrent_fetches", "must be greater than 0");
            DEFAULT_MAX_CONCURRENT_FETCHES
        }
        Some(n) => n,
        None => DEFAULT_MAX_CONCURRENT_FETCHES,
    };
    CredentialSet {
        inner: Arc::new(SetInner {
            by_name,
            store,
            max_fetches,
        }),
    }
}

/// Compiles one API's `on_allow.backend_credential`.
pub fn compile_backend_credential(
    cfg: &config::BackendCredential,
    path: &str,
    api_has_jwt: bool,
    set: &CredentialSet,
    errs: &mut ConfigErrors,
) -> Option<BackendCredentialPolicy> {
    let before = errs.0.len();
    let Some(credential) = set.inner.by_name.get(&cfg.name).cloned() else {
        errs.push(
            format!("{path}.name"),
            format!("no credential is named `{}`", cfg.name),
        );
        return None;
    };
    let header = cfg
        .header
        .as_deref()
        .unwrap_or("authorization")
        .to_ascii_lowercase();
    if header.is_empty()
        || !header
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        errs.push(
            format!("{path}.header"),
            format!("`{header}` is not a header name"),
        );
    } else if header == "host" || header == crate::check::DECISION_ID_HEADER {
        errs.push(
            format!("{path}.header"),
            format!("`{header}` cannot carry a credential"),
        );
    }
    let default_format = if credential.grant() == GrantKind::Basic {
        "Basic {token}"
    } else {
        "Bearer {token}"
    };
    let (prefix, suffix) = match parse_format(cfg.format.as_deref().unwrap_or(default_format)) {
        Ok(p) => p,
        Err(e) => {
            errs.push(format!("{path}.format"), e);
            (String::new(), String::new())
        }
    };
    let connection = match (&cfg.connection, credential.grant()) {
        (None, GrantKind::RefreshToken) => ConnectionRef::Fixed {
            id: DEFAULT_CONNECTION.into(),
            slot: credential
                .shared
                .slot(credential.name(), DEFAULT_CONNECTION),
        },
        (None, _) => ConnectionRef::None,
        (Some(_), g) if g != GrantKind::RefreshToken => {
            errs.push(
                format!("{path}.connection"),
                format!(
                    "only `refresh_token` credentials have connections; `{}` is `{}`",
                    cfg.name,
                    g.as_str()
                ),
            );
            ConnectionRef::None
        }
        (Some(c), _) => match Template::parse(c) {
            Ok(t) if t.uses_claims() => {
                if !api_has_jwt {
                    errs.push(
                        format!("{path}.connection"),
                        "uses {jwt.*} but the API has no `jwt` section",
                    );
                }
                ConnectionRef::PerUser(t)
            }
            // A per-user connection is keyed by the validated token's issuer; without a claim
            // there is no token to take it from.
            Ok(_) if c.contains('{') => {
                errs.push(
                    format!("{path}.connection"),
                    "a per-user connection is keyed by the caller's token (issuer and a claim): use a {jwt.*} claim, e.g. \"{jwt.sub}\"",
                );
                ConnectionRef::None
            }
            Ok(_) if spec::valid_fixed_connection_id(c) => ConnectionRef::Fixed {
                id: c.clone(),
                slot: credential.shared.slot(credential.name(), c),
            },
            Ok(_) => {
                errs.push(
                    format!("{path}.connection"),
                    format!("`{c}`: a fixed connection id is 1 to 128 letters, digits, `.`, `_` or `-` (per-user connections are written as a template, e.g. \"{{jwt.sub}}\")"),
                );
                ConnectionRef::None
            }
            Err(e) => {
                errs.push(format!("{path}.connection"), e);
                ConnectionRef::None
            }
        },
    };
    if let ConnectionRef::Fixed { slot, .. } = &connection {
        // A shared connection is kept warm: refreshed ahead of expiry even without traffic.
        slot.proactive
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if credential.grant() == GrantKind::TokenExchange && !api_has_jwt {
        errs.push(path, format!("credential `{}` exchanges the caller's token, but the API has no `jwt` section to validate one", cfg.name));
    }
    if errs.0.len() > before {
        return None;
    }
    Some(BackendCredentialPolicy {
        credential,
        header,
        prefix,
        suffix,
        connection,
    })
}

/// Splits `format` at its one `{token}`; `{{` and `}}` are literal braces.
pub(super) fn parse_format(format: &str) -> Result<(String, String), String> {
    let mut done: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                cur.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                cur.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                if name.trim() != "token" {
                    return Err(format!("`{{{name}}}`: the only placeholder is {{token}}"));
                }
                done.push(std::mem::take(&mut cur));
            }
            '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
            c if c.is_control() => return Err("must not contain control characters".into()),
            c => cur.push(c),
        }
    }
    match <[String; 1]>::try_from(done) {
        Ok([prefix]) => Ok((prefix, cur)),
        Err(_) => Err("must contain {token} exactly once, e.g. \"Bearer {token}\"".into()),
    }
}
