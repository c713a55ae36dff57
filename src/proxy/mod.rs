//! The agent-blind egress proxy: the child holds placeholders, never values; this module
//! intercepts its HTTPS traffic and swaps each placeholder for the value bound to the host
//! the request goes to (and back again in what the upstream echoes).
//!
//! - [`bindings`]: which secret may go to which host, and the placeholders given out instead;
//! - [`hosts`]: host patterns and the private-address check; [`substitute`]: the streaming
//!   multi-pattern substitution;
//! - [`ca`]: the per-start CA and the leaf certificates of intercepted hosts;
//! - [`upstream`]: the pooled, verified client that refuses private addresses;
//! - [`server`]: the listener (CONNECT, routes, the proxy credential, limits, audit).

pub mod bindings;
pub mod ca;
pub mod hosts;
pub mod server;
pub mod substitute;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Egress;

/// `--route NAME=https://upstream[/base]`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// The base path, without a trailing slash ("" for none).
    pub base: String,
}

impl Route {
    pub fn parse(spec: &str) -> Result<Route, String> {
        let (name, url) = spec.split_once('=').ok_or_else(|| format!("--route {spec}: expected NAME=URL"))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
            return Err(format!("--route {spec}: NAME must be letters, digits, '-', '_' or '.'"));
        }
        let uri: http::Uri = url.trim().parse().map_err(|e| format!("--route {spec}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("--route {spec}: the URL must start with https:// (or http://)")),
        };
        let authority = uri.authority().ok_or_else(|| format!("--route {spec}: the URL has no host"))?;
        if uri.query().is_some() || authority.as_str().contains('@') {
            return Err(format!("--route {spec}: the URL may not carry a query or credentials"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let base = uri.path().trim_end_matches('/').to_string();
        Ok(Route { name: name.to_string(), https, host, port, base })
    }
}

/// The proxy's options (`--proxy` and the options that go with it).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub addr: SocketAddr,
    pub routes: Vec<Route>,
    pub egress: Egress,
    pub allow_private: bool,
    pub ca_bundle: PathBuf,
    pub max_connections: usize,
    /// Largest request head (request line and headers) a client may send.
    pub max_header_bytes: usize,
    /// A connection with no request in flight is closed after this long.
    pub idle: Duration,
    /// Upstream connect (TCP and TLS) timeout.
    pub connect_timeout: Duration,
}

impl ProxyConfig {
    pub fn new(
        addr: SocketAddr,
        routes: &[String],
        egress: Egress,
        allow_private: bool,
        ca_bundle: PathBuf,
        max_connections: usize,
    ) -> Result<ProxyConfig, String> {
        if !addr.ip().is_loopback() {
            return Err(format!("--proxy {addr}: the proxy listens on loopback only (127.0.0.1 or ::1)"));
        }
        let routes = routes.iter().map(|r| Route::parse(r)).collect::<Result<Vec<_>, _>>()?;
        let mut names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("--route: two routes have the same NAME".into());
        }
        Ok(ProxyConfig {
            addr,
            routes,
            egress,
            allow_private,
            ca_bundle,
            max_connections: max_connections.max(1),
            max_header_bytes: 64 * 1024,
            idle: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(30),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        let r = Route::parse("openai=https://api.openai.com/v1/").unwrap();
        assert_eq!(
            (r.name.as_str(), r.https, r.host.as_str(), r.port, r.base.as_str()),
            ("openai", true, "api.openai.com", 443, "/v1")
        );
        let r = Route::parse("local=https://127.0.0.1:8443").unwrap();
        assert_eq!((r.port, r.base.as_str()), (8443, ""));
        assert!(Route::parse("x=ftp://a").is_err());
        assert!(Route::parse("x=https://u:p@a").is_err());
        assert!(Route::parse("a/b=https://a").is_err());
        assert!(Route::parse("nourl").is_err());
    }
}
