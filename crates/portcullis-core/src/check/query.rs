//! Query parameters of a request target, read the one way the proxy and backend will read them.

/// A query parameter named twice: the backend may read the other one, so neither is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepeatedParam;

/// The decoded value of the query parameter `name` in a request target (path and query), `Ok(None)`
/// when it is absent. The name is compared as written, never decoded: the proxy removes a parameter
/// by its literal name, so `?subscription%2Dkey=...` must not count as the key that removal would
/// then leave in place. A name present twice is an error.
pub fn query_param(target: &str, name: &str) -> Result<Option<Vec<u8>>, RepeatedParam> {
    let Some((_, query)) = target.split_once('?') else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                return Err(RepeatedParam);
            }
            found = Some(percent_decode_form(v));
        }
    }
    Ok(found)
}

fn percent_decode_form(s: &str) -> Vec<u8> {
    let plus_fixed: std::borrow::Cow<'_, str> = if s.contains('+') {
        std::borrow::Cow::Owned(s.replace('+', " "))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    percent_encoding::percent_decode_str(&plus_fixed).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameter_parsing() {
        assert_eq!(
            query_param("/x?a=1&subscription-key=abc%20d+e", "subscription-key"),
            Ok(Some(b"abc d e".to_vec()))
        );
        assert_eq!(
            query_param(
                "/x?subscription-key=1&subscription-key=2",
                "subscription-key"
            ),
            Err(RepeatedParam)
        );
        // Only the literal name counts: removal by name would leave this one in place.
        assert_eq!(
            query_param("/x?subscription%2Dkey=k", "subscription-key"),
            Ok(None)
        );
        assert_eq!(
            query_param("/x?Subscription-Key=k", "subscription-key"),
            Ok(None)
        );
        assert_eq!(
            query_param("/x?subscription-key", "subscription-key"),
            Ok(Some(vec![]))
        );
        assert_eq!(query_param("/x", "subscription-key"), Ok(None));
    }
}
