//! The proxy's way out: one pooled keep-alive HTTP/1.1 client whose TLS is verified against
//! the system roots and `SSL_CERT_FILE`, and whose resolver hands the connector only public
//! addresses (unless `--proxy-allow-private`): the address checked is the address connected,
//! so a name that resolves to 127.0.0.1, or re-resolves there (DNS rebinding), is refused.
//! Tunnelled CONNECTs get a TCP connection made under the same rule.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::hosts::is_private;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A destination refused because it is a private address.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to loopback, private, link-local or metadata addresses (see --proxy-allow-private)")]
pub struct PrivateAddress(pub String);

/// The trusted roots (system bundle and `SSL_CERT_FILE`), and their PEM text for the bundle
/// the child gets.
pub fn load_roots() -> Result<(RootCertStore, Vec<u8>), String> {
    let mut store = RootCertStore::empty();
    let mut pem = Vec::new();
    let mut add = |path: &std::path::Path, required: bool| -> Result<(), String> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(err) if required => return Err(format!("cannot read {}: {err}", path.display())),
            Err(_) => return Ok(()),
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&text).filter_map(Result::ok).collect();
        if certs.is_empty() && required {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        store.add_parsable_certificates(certs);
        pem.extend_from_slice(&text);
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        Ok(())
    };
    if let Some(path) = crate::backend::tls::SYSTEM_BUNDLES.iter().map(std::path::Path::new).find(|p| p.is_file()) {
        add(path, false)?;
    }
    if let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        add(std::path::Path::new(&path), true)?;
    }
    Ok((store, pem))
}

/// The resolver behind the pooled client: public addresses only, unless allowed.
#[derive(Clone)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move { resolve(name.as_str(), 0, allow_private).await.map(Vec::into_iter) })
    }
}

/// `host`'s addresses that may be connected to (an IP literal is checked as it is).
pub async fn resolve(host: &str, port: u16, allow_private: bool) -> std::io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| allow_private || !is_private(a.ip())).collect();
    if allowed.is_empty() && !addrs.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, PrivateAddress(host.to_string())));
    }
    Ok(allowed)
}

/// Whether `err` (or what caused it) is a [`PrivateAddress`] refusal.
pub fn is_private_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err.downcast_ref::<PrivateAddress>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.downcast_ref::<PrivateAddress>().is_some())
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The pooled client.
pub type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>, Body>;

/// Builds the client (roots already loaded).
pub fn client(roots: RootCertStore, allow_private: bool, connect_timeout: Duration) -> Result<Upstream, String> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new_with_resolver(GuardedResolver { allow_private });
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(32)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(https))
}

/// A TCP connection for a tunnelled CONNECT, to a permitted address of `host`.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    allow_private: bool,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let addrs = resolve(host, port, allow_private).await?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address"));
    for addr in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => last = err,
            Err(_) => {
                last = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {addr} timed out"))
            }
        }
    }
    Err(last)
}
