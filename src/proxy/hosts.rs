//! Host patterns (what a bound secret may be sent to) and the private-address rule (where
//! the proxy never connects unless told to).
//!
//! A [`HostPattern`] is an exact host (`api.example.com`, an IPv4 address or a bracketed IPv6
//! address), optionally with a port (`api.example.com:8443`; no port matches any port), or a
//! wildcard `*.example.com` that matches every subdomain of `example.com` at any depth but
//! not `example.com` itself. Names are ASCII only (an internationalized name is written in
//! its `xn--` form), compared case-insensitively, and a trailing dot is ignored.
//! [`is_private`] says whether an address is one the proxy must not reach by default:
//! loopback, private, link-local and cloud metadata, CGNAT, reserved, multicast, and the IPv6
//! forms that embed such an IPv4 address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest host name DNS can carry (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// The longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A host list or pattern that cannot be used. Host patterns are configuration, not secrets,
/// so the errors quote them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host list")]
    EmptyList,
    #[error("empty host in list {0:?}")]
    EmptyHost(String),
    #[error("host pattern {0:?} is not ASCII (write an internationalized name in its xn-- form)")]
    NotAscii(String),
    #[error("host pattern {pattern:?}: bad port (expected 1 to 65535)")]
    BadPort { pattern: String },
    #[error("host pattern {pattern:?}: {why}")]
    BadHost { pattern: String, why: &'static str },
}

/// What a pattern's host part matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostKind {
    /// This name, lower case, no trailing dot.
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
    /// Any name ending in `.` + this suffix (lower case, no trailing dot).
    Subdomains(String),
}

/// One host a bound secret may be sent to (see the module docs for the forms).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    host: HostKind,
    /// `None`: any port.
    port: Option<u16>,
}

impl HostPattern {
    /// Parses one pattern: `host`, `host:port`, `*.domain`, `*.domain:port`, `1.2.3.4[:port]`,
    /// `[::1][:port]` (a bare IPv6 address without brackets is accepted without a port).
    pub fn parse(s: &str) -> Result<Self, HostError> {
        let pattern = s.trim();
        if pattern.is_empty() {
            return Err(HostError::EmptyHost(s.to_string()));
        }
        if !pattern.is_ascii() {
            return Err(HostError::NotAscii(pattern.to_string()));
        }
        let bad = |why| HostError::BadHost { pattern: pattern.to_string(), why };
        let (host, port) = split_port(pattern)?;
        if let Some(literal) = host.strip_prefix('[') {
            let inner = literal.strip_suffix(']').ok_or_else(|| bad("unclosed '['"))?;
            let ip: Ipv6Addr = inner.parse().map_err(|_| bad("not an IPv6 address inside [ ]"))?;
            return Ok(HostPattern { host: HostKind::Ip(IpAddr::V6(ip)), port });
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostPattern { host: HostKind::Ip(ip), port });
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if let Some(suffix) = name.strip_prefix("*.") {
            check_name(suffix).map_err(bad)?;
            if !suffix.contains('.') {
                // `*.com` would bind a secret to a whole top-level domain.
                return Err(bad("a wildcard needs at least two labels after \"*.\""));
            }
            return Ok(HostPattern { host: HostKind::Subdomains(suffix.to_string()), port });
        }
        check_name(&name).map_err(bad)?;
        Ok(HostPattern { host: HostKind::Name(name), port })
    }

    /// Whether a request to `host` (a name, an IPv4 address, or an IPv6 address with or
    /// without brackets) on `port` may carry this pattern's secrets.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) || !host.is_ascii() {
            return false;
        }
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.host == HostKind::Ip(ip);
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        match &self.host {
            HostKind::Name(want) => name.eq_ignore_ascii_case(want),
            HostKind::Subdomains(suffix) => {
                name.len() > suffix.len() + 1
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            HostKind::Ip(_) => false,
        }
    }

    /// The port this pattern is limited to, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostKind::Name(name) => f.write_str(name)?,
            HostKind::Subdomains(suffix) => write!(f, "*.{suffix}")?,
            HostKind::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
            HostKind::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// Parses a comma-separated host list (`api.example.com, *.example.org:8443`); whitespace
/// around entries is ignored; an empty list or an empty entry is refused.
pub fn parse_host_list(s: &str) -> Result<Vec<HostPattern>, HostError> {
    if s.trim().is_empty() {
        return Err(HostError::EmptyList);
    }
    s.split(',')
        .map(
            |entry| {
                if entry.trim().is_empty() {
                    Err(HostError::EmptyHost(s.to_string()))
                } else {
                    HostPattern::parse(entry)
                }
            },
        )
        .collect()
}

/// Splits an optional `:port` off a pattern. A bare IPv6 address (several colons, no
/// brackets) has no port.
fn split_port(pattern: &str) -> Result<(&str, Option<u16>), HostError> {
    let (host, port) = if let Some(rest) = pattern.strip_prefix('[') {
        match rest.find(']') {
            Some(end) if end + 2 < pattern.len() => {
                let (host, port) = pattern.split_at(end + 2);
                match port.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => {
                        return Err(HostError::BadHost { pattern: pattern.to_string(), why: "junk after ']'" });
                    }
                }
            }
            _ => (pattern, None),
        }
    } else {
        match pattern.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            _ => (pattern, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(HostError::BadPort { pattern: pattern.to_string() }),
        },
    };
    Ok((host, port))
}

/// Checks a lower-case DNS name (no trailing dot, no wildcard): labels of letters, digits,
/// `-` and `_` (seen in real service names), none empty or longer than 63 bytes, none
/// starting or ending with `-`.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty host name");
    }
    if name.len() > MAX_HOST_LEN {
        return Err("host name longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row, or a leading dot)");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("label longer than 63 bytes");
        }
        if label == "*" || label.contains('*') {
            return Err("'*' is allowed only as the whole first label (\"*.example.com\")");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err("a host name holds only letters, digits, '-', '_' and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'");
        }
    }
    Ok(())
}

/// Whether the proxy must refuse to connect to `ip` (unless `--proxy-allow-private`):
/// anything that is not a public unicast address. IPv6 addresses that carry an IPv4 address
/// (mapped, compatible, NAT64, 6to4, Teredo) are judged by that address too.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0                                      // "this network", 0.0.0.0 included
        || a == 10                              // RFC 1918
        || a == 127                             // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10 (Alibaba's metadata 100.100.100.200)
        || (a == 169 && b == 254)               // link-local, 169.254.169.254 metadata
        || (a == 172 && (16..32).contains(&b))  // RFC 1918
        || (a == 192 && b == 168)               // RFC 1918
        || (a == 192 && b == 0 && c == 0)       // IETF protocol assignments (192.0.0.192 metadata)
        || (a == 192 && b == 0 && c == 2)       // documentation
        || (a == 198 && (b == 18 || b == 19))   // benchmarking 198.18/15
        || (a == 198 && b == 51 && c == 100)    // documentation
        || (a == 203 && b == 0 && c == 113)     // documentation
        || a >= 224 // multicast 224/4, reserved 240/4, broadcast 255.255.255.255
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if s[..6] == [0, 0, 0, 0, 0, 0xffff] || s[..6] == [0; 6] {
        // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d; :: and ::1 included,
        // as 0.0.0.0 and 0.0.0.1 are private).
        return is_private_v4(embedded_v4(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96: the gateway connects to the embedded address.
        return is_private_v4(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        // 6to4 2002:a.b.c.d::/48.
        return is_private_v4(embedded_v4(s[1], s[2]));
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo 2001:0::/32: the client's address is the last 32 bits, inverted.
        return is_private_v4(embedded_v4(!s[6], !s[7]));
    }
    (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)   // local-use NAT64 64:ff9b:1::/48
        || s[..4] == [0x100, 0, 0, 0]           // discard-only 100::/64
        || (s[0] & 0xfe00) == 0xfc00            // unique local fc00::/7 (AWS metadata fd00:ec2::254)
        || (s[0] & 0xffc0) == 0xfe80            // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0            // site-local fec0::/10 (deprecated, still routed inside)
        || (s[0] & 0xff00) == 0xff00            // multicast ff00::/8
        || (s[0] == 0x2001 && s[1] == 0xdb8)    // documentation 2001:db8::/32
        || (s[0] == 0x2001 && s[1] < 0x200) // IETF protocol assignments 2001::/23
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn an_exact_host_matches_itself_on_any_port_whatever_the_case_or_trailing_dot() {
        let pat = p("API.Example.com.");
        assert_eq!(pat.to_string(), "api.example.com");
        for host in ["api.example.com", "API.EXAMPLE.COM", "api.example.com."] {
            assert!(pat.matches(host, 443), "{host}");
            assert!(pat.matches(host, 8443), "{host}");
        }
        for host in ["example.com", "x.api.example.com", "api.example.co", "api.example.com.evil", "", "."] {
            assert!(!pat.matches(host, 443), "{host}");
        }
    }

    #[test]
    fn a_port_limits_the_match_to_that_port() {
        let pat = p("api.example.com:8443");
        assert_eq!(pat.to_string(), "api.example.com:8443");
        assert_eq!(pat.port(), Some(8443));
        assert!(pat.matches("api.example.com", 8443));
        assert!(!pat.matches("api.example.com", 443));
    }

    #[test]
    fn a_wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let pat = p("*.Example.com");
        assert_eq!(pat.to_string(), "*.example.com");
        for host in ["a.example.com", "A.B.EXAMPLE.COM", "a.example.com."] {
            assert!(pat.matches(host, 443), "{host}");
        }
        for host in ["example.com", ".example.com", "aexample.com", "example.com.evil", "a.example.co"] {
            assert!(!pat.matches(host, 443), "{host}");
        }
        let with_port = p("*.example.com:443");
        assert!(with_port.matches("a.example.com", 443));
        assert!(!with_port.matches("a.example.com", 444));
    }

    #[test]
    fn ip_literals_match_only_the_same_address() {
        let v4 = p("127.0.0.1:8443");
        assert!(v4.matches("127.0.0.1", 8443));
        assert!(!v4.matches("127.0.0.2", 8443));
        assert!(!v4.matches("localhost", 8443));
        let v6 = p("[::1]:443");
        assert_eq!(v6.to_string(), "[::1]:443");
        assert!(v6.matches("[::1]", 443));
        assert!(v6.matches("::1", 443));
        assert!(v6.matches("0:0:0:0:0:0:0:1", 443));
        let bare = p("fe80::1");
        assert_eq!(bare.to_string(), "[fe80::1]");
        assert!(bare.matches("[FE80::1]", 1));
    }

    #[test]
    fn non_ascii_hosts_are_refused_and_never_match() {
        assert!(matches!(HostPattern::parse("bücher.example"), Err(HostError::NotAscii(_))));
        assert!(p("xn--bcher-kva.example").matches("XN--BCHER-KVA.example", 443));
        assert!(!p("*.example.com").matches("ä.example.com", 443));
    }

    #[test]
    fn malformed_patterns_are_refused_with_a_reason() {
        for bad in [
            "*",
            "*.",
            "*.com",
            "a.*.com",
            "*a.example.com",
            "**.example.com",
            "exa mple.com",
            "a..b",
            ".a.b",
            "-a.example.com",
            "a-.example.com",
            "a/b",
            "a@b",
            "host:",
            "host:0",
            "host:65536",
            "host:+1",
            "host:1:2",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[nope]",
            "https://a.example.com",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} parsed");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(HostPattern::parse(&long_label).is_err());
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        assert!(long_name.len() > 253);
        assert!(HostPattern::parse(&long_name).is_err());
        let err = HostPattern::parse("host:99999").unwrap_err().to_string();
        assert!(err.contains("host:99999") && err.contains("port"), "{err}");
    }

    #[test]
    fn a_host_list_is_comma_separated_tolerating_whitespace() {
        let list = parse_host_list(" api.example.com , *.example.org:8443,127.0.0.1 ").unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["api.example.com", "*.example.org:8443", "127.0.0.1"]);
        assert_eq!(parse_host_list(""), Err(HostError::EmptyList));
        assert_eq!(parse_host_list("  "), Err(HostError::EmptyList));
        assert!(matches!(parse_host_list("a.com,,b.com"), Err(HostError::EmptyHost(_))));
        assert!(matches!(parse_host_list("a.com, "), Err(HostError::EmptyHost(_))));
        assert!(parse_host_list("a.com,b c").is_err());
    }

    #[test]
    fn private_v4_ranges_are_private() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "100.100.100.200",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "192.0.0.192",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "198.20.0.1",
            "192.0.1.1",
            "223.255.255.255",
            "93.184.216.34",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn private_v6_ranges_and_embedded_private_v4_are_private() {
        for ip in [
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "100::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // Teredo, client 127.0.0.1
            "2001:10::1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
