//! A decision as Envoy effects: the module's counterpart of `to_check_response` in the service
//! (`src/server/grpc.rs`), and the one place that maps a [`Decision`] for the module. What the
//! client and the backend see must be what they see through ext_authz:
//!
//! - deny: the denial's status; `content-type: application/json`, the decision id and (when
//!   there is one) the challenge; the JSON body of `Denial::body`;
//! - allow: every upstream header set (overwriting what the client sent, as ext_authz's
//!   `append: false`), the decision id header set, then the headers to remove removed, then the
//!   query parameters to remove dropped from `:path`.

use portcullis_core::check::{DECISION_ID_HEADER, Decision, Outcome};

/// What to do with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Let it pass, changed so.
    Allow(Allow),
    /// Answer the client.
    Deny(Deny),
}

/// The changes to an allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// Headers to set, each replacing every value the client sent.
    pub set: Vec<(String, String)>,
    /// Headers to remove (after setting).
    pub remove: Vec<String>,
    /// Query parameters to remove from `:path`.
    pub remove_query: Vec<String>,
}

/// The local reply for a denied request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: String,
}

impl Deny {
    /// The headers as `send_response` takes them.
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// Maps a decision, moving its strings.
pub fn reply(d: Decision) -> Reply {
    let Decision {
        id,
        outcome,
        upstream_headers,
        remove_headers,
        remove_query,
        ..
    } = d;
    match outcome {
        Outcome::Allow => Reply::Allow(Allow {
            set: upstream_headers
                .into_iter()
                .map(|h| (h.name, h.value))
                .chain([(DECISION_ID_HEADER.to_string(), id)])
                .collect(),
            remove: remove_headers,
            remove_query,
        }),
        Outcome::Deny(denial) => {
            let body = denial.body(&id);
            let mut headers = Vec::with_capacity(3);
            headers.push(("content-type", "application/json".to_string()));
            headers.push((DECISION_ID_HEADER, id));
            if let Some(challenge) = denial.www_authenticate {
                headers.push(("www-authenticate", challenge));
            }
            Reply::Deny(Deny {
                status: denial.status,
                headers,
                body,
            })
        }
    }
}

/// `path` without the query parameters named in `remove` (compared after percent-decoding), or
/// `None` when nothing is removed. The remaining parameters are ordered by name (values of one
/// name keep their order): Envoy's ext_authz filter rebuilds the query from a sorted map, and
/// both modes must hand the backend the same path.
pub fn strip_query(path: &str, remove: &[String]) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let mut kept: Vec<(String, &str)> = Vec::new();
    let mut removed = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw_name = pair.split('=').next().unwrap_or_default();
        let name: String = form_urlencoded::parse(raw_name.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        if remove.contains(&name) {
            removed = true;
        } else {
            kept.push((name, pair));
        }
    }
    if !removed {
        return None;
    }
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    if kept.is_empty() {
        return Some(base.to_string());
    }
    let query: Vec<&str> = kept.iter().map(|(_, p)| *p).collect();
    Some(format!("{base}?{}", query.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::check::{Denial, Header, Reason};

    #[test]
    fn a_deny_is_the_ext_authz_denied_response() {
        let mut d = Decision::new();
        let id = d.id.clone();
        d.outcome = Outcome::Deny(
            Denial::new(Reason::SubscriptionKeyNotFound).with_challenge("Key realm=\"x\"".into()),
        );
        let Reply::Deny(deny) = reply(d) else {
            panic!("a deny")
        };
        assert_eq!(deny.status, 401);
        assert_eq!(
            deny.headers,
            vec![
                ("content-type", "application/json".to_string()),
                (DECISION_ID_HEADER, id.clone()),
                ("www-authenticate", "Key realm=\"x\"".to_string()),
            ]
        );
        let body: serde_json::Value = serde_json::from_str(&deny.body).unwrap();
        assert_eq!(body["reason"], "SubscriptionKeyNotFound");
        assert_eq!(body["decisionId"], id.as_str());
    }

    #[test]
    fn an_allow_sets_headers_then_the_decision_id() {
        let mut d = Decision::new();
        let id = d.id.clone();
        d.upstream_headers.push(Header {
            name: "x-user".into(),
            value: "alice".into(),
            sensitive: false,
        });
        d.remove_headers.push("ocp-apim-subscription-key".into());
        let Reply::Allow(allow) = reply(d) else {
            panic!("an allow")
        };
        assert_eq!(
            allow.set,
            vec![
                ("x-user".to_string(), "alice".to_string()),
                (DECISION_ID_HEADER.to_string(), id)
            ]
        );
        assert_eq!(allow.remove, vec!["ocp-apim-subscription-key".to_string()]);
    }

    #[test]
    fn query_parameters_are_removed_by_decoded_name() {
        let rm = vec!["subscription-key".to_string()];
        assert_eq!(
            strip_query("/o/7?b=2&subscription-key=k&a=1", &rm).as_deref(),
            Some("/o/7?a=1&b=2")
        );
        assert_eq!(
            strip_query("/o?subscription%2Dkey=k", &rm).as_deref(),
            Some("/o")
        );
        assert_eq!(strip_query("/o?a=1", &rm), None);
        assert_eq!(strip_query("/o", &rm), None);
    }
}
