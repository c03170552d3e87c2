//! Per-route settings: `typed_per_filter_config` of the module's filter on a route.
//!
//! The ext_authz filter lets a route send `context_extensions` (`check_settings`); the module's
//! per-route `filter_config` carries the same map, as a `google.protobuf.Struct` (Envoy hands it
//! over as JSON) or a JSON string:
//!
//! ```yaml
//! typed_per_filter_config:
//!   portcullis:
//!     "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilterPerRoute
//!     dynamic_module_config: {name: portcullis_envoy}
//!     filter_name: portcullis
//!     filter_config:
//!       "@type": type.googleapis.com/google.protobuf.Struct
//!       value: {context_extensions: {api: alpha}}
//! ```
//!
//! `{disabled: true}` skips the module on the route (the request is neither decided nor changed).

use std::collections::HashMap;

/// One route's settings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Skip the module on this route (ext_authz's per-route `disabled: true`).
    pub disabled: bool,
    /// What the policy's `match.context_extensions` selects on.
    pub context_extensions: HashMap<String, String>,
}

impl RouteConfig {
    /// Parses the per-route `filter_config` bytes: a JSON object
    /// `{"context_extensions": {"name": "value", ...}}` or `{"disabled": true}`.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let obj = value.as_object().ok_or("not a JSON object")?;
        let mut out = RouteConfig::default();
        for (key, v) in obj {
            match key.as_str() {
                "context_extensions" => {
                    let map = v.as_object().ok_or("context_extensions: not an object")?;
                    for (k, v) in map {
                        let v = v
                            .as_str()
                            .ok_or_else(|| format!("context_extensions.{k}: not a string"))?;
                        out.context_extensions.insert(k.clone(), v.to_string());
                    }
                }
                "disabled" => {
                    out.disabled = v.as_bool().ok_or("disabled: not a boolean")?;
                }
                other => return Err(format!("unknown field `{other}`")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_extensions_are_read_and_unknown_fields_refused() {
        let r = RouteConfig::parse(br#"{"context_extensions":{"api":"alpha"}}"#).unwrap();
        assert_eq!(r.context_extensions["api"], "alpha");
        assert!(
            RouteConfig::parse(br#"{"disabled":true}"#)
                .unwrap()
                .disabled
        );
        assert!(RouteConfig::parse(br#"{"disabled":1}"#).is_err());
        assert!(RouteConfig::parse(br#"{"enabled":true}"#).is_err());
        assert!(RouteConfig::parse(br#"{"context_extensions":{"api":1}}"#).is_err());
        assert!(RouteConfig::parse(b"nope").is_err());
    }
}
