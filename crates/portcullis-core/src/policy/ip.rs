//! Address sets for `ip_filter` and the caller's address.
//!
//! Every address is mapped into one 128-bit space (IPv4 as IPv4-mapped IPv6, `::ffff:a.b.c.d`), so an
//! IPv4 caller that arrives as `::ffff:10.1.2.3` matches `10.0.0.0/8`. A set is a sorted list of
//! disjoint, non-adjacent inclusive intervals: membership is one binary search, O(log n).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The 128-bit key of an address: IPv4 and IPv4-mapped IPv6 land on the same value.
pub fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => v4_key(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_key(v4),
            None => u128::from(v6),
        },
    }
}

fn v4_key(v4: Ipv4Addr) -> u128 {
    (0xffff_u128 << 32) | u128::from(u32::from(v4))
}

/// Normalises an address: IPv4-mapped IPv6 becomes plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A set of addresses, compiled for binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    /// Sorted, disjoint, non-adjacent inclusive intervals.
    ranges: Vec<(u128, u128)>,
}

impl IpSet {
    /// Builds a set from inclusive intervals in any order, merging overlaps and neighbours.
    pub fn from_ranges(mut ranges: Vec<(u128, u128)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        IpSet { ranges: merged }
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let k = key(ip);
        // The first interval whose end is >= k is the only candidate.
        let i = self.ranges.partition_point(|&(_, hi)| hi < k);
        self.ranges.get(i).is_some_and(|&(lo, _)| lo <= k)
    }

    /// Number of disjoint intervals after merging.
    pub fn interval_count(&self) -> usize {
        self.ranges.len()
    }
}

/// Parses one `ip_filter.addresses` entry: a single address, a CIDR, or an inclusive `a-b` range.
pub fn parse_entry(entry: &str) -> Result<(u128, u128), String> {
    let entry = entry.trim();
    if let Some((from, to)) = entry.split_once('-') {
        let from: IpAddr = from
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an IP address", from.trim()))?;
        let to: IpAddr = to
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not an IP address", to.trim()))?;
        if canonical(from).is_ipv4() != canonical(to).is_ipv4() {
            return Err(format!("range `{entry}` mixes IPv4 and IPv6"));
        }
        let (lo, hi) = (key(from), key(to));
        if lo > hi {
            return Err(format!("range `{entry}` starts after it ends"));
        }
        return Ok((lo, hi));
    }
    if entry.contains('/') {
        let net: ipnet::IpNet = entry
            .parse()
            .map_err(|_| format!("`{entry}` is not a valid CIDR"))?;
        if net.network() != net.addr() {
            return Err(format!(
                "`{entry}` has host bits set; did you mean `{}`?",
                net.trunc()
            ));
        }
        return Ok((key(net.network()), key(net.broadcast())));
    }
    let ip: IpAddr = entry
        .parse()
        .map_err(|_| format!("`{entry}` is not an IP address, CIDR or range"))?;
    Ok((key(ip), key(ip)))
}

/// Where the caller's address comes from (`client_ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIpSource {
    /// The TCP peer Envoy saw (`source.address`).
    Peer,
    /// `x-forwarded-for`, skipping the `trusted_hops` right-most entries our own proxies added.
    ForwardedFor {
        /// How many right-most entries were added by our own proxies.
        trusted_hops: u32,
    },
}

/// The caller's address, or `None` when it cannot be established.
///
/// With `x-forwarded-for`, entries left of the trusted ones are written by the client and cannot be
/// trusted, so exactly one entry is read: the first one right after the trusted hops. When the header
/// is shorter than that, the request did not pass through all our proxies and the peer address is the
/// only trustworthy one.
pub fn client_ip(
    source: ClientIpSource,
    peer: Option<IpAddr>,
    xff: Option<&[u8]>,
) -> Option<IpAddr> {
    match source {
        ClientIpSource::Peer => peer.map(canonical),
        ClientIpSource::ForwardedFor { trusted_hops } => {
            let Some(xff) = xff else {
                return peer.map(canonical);
            };
            let Ok(xff) = std::str::from_utf8(xff) else {
                return None;
            };
            let mut entries = xff.rsplit(',').map(str::trim).filter(|e| !e.is_empty());
            match entries.nth(trusted_hops as usize) {
                Some(entry) => parse_forwarded_entry(entry).map(canonical),
                None => peer.map(canonical),
            }
        }
    }
}

/// Parses one x-forwarded-for entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`, optionally quoted.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim_matches('"');
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        let (addr, _) = rest.split_once(']')?;
        return addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (addr, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(entries: &[&str]) -> IpSet {
        IpSet::from_ranges(entries.iter().map(|e| parse_entry(e).unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_single_and_range() {
        let s = set(&[
            "10.0.0.0/8",
            "2001:db8::/32",
            "192.168.1.10-192.168.1.20",
            "203.0.113.7",
        ]);
        assert!(s.contains(ip("10.255.0.1")));
        assert!(!s.contains(ip("11.0.0.0")));
        assert!(s.contains(ip("2001:db8:ffff::1")));
        assert!(!s.contains(ip("2001:db9::")));
        assert!(s.contains(ip("192.168.1.10")));
        assert!(s.contains(ip("192.168.1.20")));
        assert!(!s.contains(ip("192.168.1.21")));
        assert!(!s.contains(ip("192.168.1.9")));
        assert!(s.contains(ip("203.0.113.7")));
        assert!(!s.contains(ip("203.0.113.8")));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_same_caller() {
        let s = set(&["10.0.0.0/8"]);
        assert!(s.contains(ip("::ffff:10.1.2.3")));
        let s = set(&["::ffff:10.1.2.3"]);
        assert!(s.contains(ip("10.1.2.3")));
    }

    #[test]
    fn bad_entries_explain_themselves() {
        assert!(
            parse_entry("10.0.0.1/8")
                .unwrap_err()
                .contains("did you mean `10.0.0.0/8`")
        );
        assert!(
            parse_entry("10.0.0.9-10.0.0.1")
                .unwrap_err()
                .contains("starts after it ends")
        );
        assert!(parse_entry("10.0.0.1-::1").unwrap_err().contains("mixes"));
        assert!(parse_entry("10.0.0.300").is_err());
        assert!(parse_entry("10.0.0.0/33").is_err());
        assert!(parse_entry("").is_err());
    }

    #[test]
    fn forwarded_for_skips_trusted_hops() {
        let peer = Some(ip("10.9.9.9"));
        let src = ClientIpSource::ForwardedFor { trusted_hops: 1 };
        assert_eq!(
            client_ip(src, peer, Some(b"6.6.6.6, 203.0.113.5, 10.0.0.1")),
            Some(ip("203.0.113.5"))
        );
        // Too short: the request did not pass our proxies; only the peer is trustworthy.
        assert_eq!(client_ip(src, peer, Some(b"203.0.113.5")), peer);
        assert_eq!(client_ip(src, peer, None), peer);
        // Junk where the client address should be: unknown, never the peer.
        assert_eq!(client_ip(src, peer, Some(b"junk, 10.0.0.1")), None);
        // Junk to the left of the trusted entry is the client's own business.
        assert_eq!(
            client_ip(src, peer, Some(b"junk,,  1.2.3.4:555 ,10.0.0.1")),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            client_ip(
                ClientIpSource::ForwardedFor { trusted_hops: 0 },
                peer,
                Some(b"[2001:db8::1]:443")
            ),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            client_ip(
                ClientIpSource::ForwardedFor { trusted_hops: 0 },
                peer,
                Some(b"::ffff:1.2.3.4")
            ),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(client_ip(src, peer, Some(&[0xff, 0xfe])), None);
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        ]
    }

    proptest! {
        /// The merged set answers exactly like a linear scan over the original intervals.
        #[test]
        fn set_matches_linear_scan(ranges in proptest::collection::vec((any::<u128>(), any::<u128>()), 0..40), probes in proptest::collection::vec(any::<u128>(), 0..40)) {
            let ranges: Vec<(u128, u128)> = ranges.into_iter().map(|(a, b)| (a.min(b), a.max(b))).collect();
            let s = IpSet::from_ranges(ranges.clone());
            let probe_points: Vec<u128> = probes.into_iter().chain(ranges.iter().flat_map(|&(a, b)| [a, b, a.wrapping_sub(1), b.wrapping_add(1)])).collect();
            for p in probe_points {
                let expected = ranges.iter().any(|&(lo, hi)| lo <= p && p <= hi);
                let addr = IpAddr::V6(Ipv6Addr::from(p));
                prop_assert_eq!(s.contains(addr), expected);
            }
        }

        /// A CIDR contains exactly the addresses that share its prefix.
        #[test]
        fn cidr_membership(base in arb_ip(), len in 0u8..=128, probe in arb_ip()) {
            let net = match base {
                IpAddr::V4(v4) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(v4, len.min(32)).unwrap()).trunc(),
                IpAddr::V6(v6) => ipnet::IpNet::V6(ipnet::Ipv6Net::new(v6, len).unwrap()).trunc(),
            };
            let s = IpSet::from_ranges(vec![parse_entry(&net.to_string()).unwrap()]);
            let probe_c = canonical(probe);
            let expected = match (net, probe_c) {
                (ipnet::IpNet::V4(n), IpAddr::V4(p)) => n.contains(&p),
                (ipnet::IpNet::V6(n), IpAddr::V6(p)) => n.contains(&p),
                (ipnet::IpNet::V6(n), IpAddr::V4(p)) => n.contains(&p.to_ipv6_mapped()),
                (ipnet::IpNet::V4(_), IpAddr::V6(_)) => false,
            };
            prop_assert_eq!(s.contains(probe), expected);
        }

        /// Parsing never panics on arbitrary input.
        #[test]
        fn parse_never_panics(s in ".{0,60}") {
            let _ = parse_entry(&s);
            let _ = client_ip(ClientIpSource::ForwardedFor { trusted_hops: 2 }, None, Some(s.as_bytes()));
        }
    }
}
