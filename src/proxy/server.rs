//! The proxy listener: HTTP/1.1 on a loopback port, serving three kinds of request.
//!
//! - `CONNECT host:port` (with the proxy credential): a host with a bound secret is
//!   intercepted (TLS terminated with a leaf from [`ProxyCa`], each request rewritten and sent
//!   on over verified TLS); any other host is tunnelled untouched, or refused with
//!   `--egress bound-only`.
//! - `GET http://host/…` (absolute form, with the credential): plain HTTP is forwarded, but
//!   never with a value: a placeholder in it refuses the request.
//! - `GET /NAME/…` (no credential, since base-URL clients cannot send one): route NAME.
//!
//! In a rewritten request each placeholder of a secret bound to the destination becomes the
//! value (path, query, headers, `Basic` credentials, streamed body); a placeholder of any
//! other bound secret refuses the request with 403 before anything is sent. The upstream's
//! echo of a value becomes the placeholder again (headers, identity-encoded bodies). One
//! audit line per request, written when its response body ends: never a value.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::ProxyConfig;
use super::bindings::Bindings;
use super::ca::ProxyCa;
use super::substitute::{Action, Encoding, Pattern, Substituter};
use super::upstream::{self, Body, BoxError, Upstream};
use crate::cli::Egress;
use crate::daemon::audit::AuditLog;
use crate::daemon::broker::Broker;

/// The user name in the proxy URL (the password is the per-start credential).
pub const PROXY_USER: &str = "opb";
/// Bodies up to this size are rewritten whole, so a refusal sends nothing and the upstream
/// gets an exact Content-Length; larger ones are streamed (chunked).
const BUFFERED_BODY: u64 = 1024 * 1024;
/// A TLS handshake from the client must finish within this.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Headers that concern one hop only: never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where a request goes.
#[derive(Debug, Clone)]
struct Dest {
    https: bool,
    host: String,
    port: u16,
}

impl Dest {
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match (self.https, self.port) {
            (true, 443) | (false, 80) => host,
            _ => format!("{host}:{}", self.port),
        }
    }
}

/// What the child's environment needs to use the proxy.
#[derive(Debug, Clone)]
pub struct ProxyInfo {
    pub addr: SocketAddr,
    /// `http://opb:CREDENTIAL@ADDR`.
    pub url: zeroize::Zeroizing<String>,
    pub ca_bundle: std::path::PathBuf,
    /// The hosts in NO_PROXY: loopback, unless bound.
    pub no_proxy: String,
}

/// The variables that point a child at the proxy: the proxy URL (with the credential) in
/// both cases, `NODE_USE_ENV_PROXY`, the CA bundle under every name common clients read, and
/// `NO_PROXY`: loopback plus the user's entries, minus any that would let a bound host
/// bypass the proxy (it would get the placeholder, not the key).
pub fn child_env(info: &ProxyInfo, bindings: &Bindings, user_no_proxy: &str) -> Vec<(&'static str, String)> {
    let mut no_proxy: Vec<String> = info.no_proxy.split(',').filter(|h| !h.is_empty()).map(str::to_string).collect();
    for entry in user_no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let domain = entry.trim_start_matches("*.").trim_start_matches('.').to_ascii_lowercase();
        let domain = domain.split(':').next().unwrap_or("").to_string();
        let shadows_binding = entry == "*"
            || bindings.iter().any(|b| {
                b.hosts.iter().any(|pattern| {
                    let bound = pattern_host(pattern);
                    bound == domain || bound.ends_with(&format!(".{domain}")) || domain.ends_with(&format!(".{bound}"))
                })
            });
        if !shadows_binding && !no_proxy.iter().any(|e| e == entry) {
            no_proxy.push(entry.to_string());
        }
    }
    let no_proxy = no_proxy.join(",");
    let bundle = info.ca_bundle.display().to_string();
    let url = info.url.to_string();
    vec![
        ("HTTPS_PROXY", url.clone()),
        ("https_proxy", url.clone()),
        ("HTTP_PROXY", url.clone()),
        ("http_proxy", url),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
        ("NODE_USE_ENV_PROXY", "1".into()),
        ("SSL_CERT_FILE", bundle.clone()),
        ("NODE_EXTRA_CA_CERTS", bundle.clone()),
        ("REQUESTS_CA_BUNDLE", bundle.clone()),
        ("CURL_CA_BUNDLE", bundle),
    ]
}

pub struct Proxy {
    broker: Arc<Broker>,
    config: ProxyConfig,
    ca: ProxyCa,
    client: Upstream,
    /// The expected `Proxy-Authorization` header value.
    authorization: Zeroizing<String>,
    audit: Option<Arc<AuditLog>>,
    connections: Arc<Semaphore>,
    pub info: ProxyInfo,
}

impl Proxy {
    /// Makes the CA, writes the bundle, builds the client and binds the listener.
    pub async fn start(
        broker: Arc<Broker>,
        config: ProxyConfig,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<(Arc<Proxy>, TcpListener), String> {
        let ca = ProxyCa::new()?;
        let (roots, roots_pem) = upstream::load_roots()?;
        ca.write_bundle(&config.ca_bundle, &roots_pem)
            .map_err(|e| format!("cannot write the proxy CA bundle {}: {e}", config.ca_bundle.display()))?;
        let client = upstream::client(roots, config.allow_private, config.connect_timeout)?;
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|e| format!("cannot listen on --proxy {}: {e}", config.addr))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let credential = super::bindings::make_placeholder("")?;
        let credential = credential.trim_start_matches(super::bindings::MARKER);
        let engine = base64::engine::general_purpose::STANDARD;
        let authorization = Zeroizing::new(format!("Basic {}", engine.encode(format!("{PROXY_USER}:{credential}"))));
        let url = Zeroizing::new(format!("http://{PROXY_USER}:{credential}@{addr}"));
        let bindings = broker.bindings();
        let no_proxy: Vec<&str> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .filter(|h| !bindings.iter().any(|b| b.hosts.iter().any(|p| pattern_host(p) == *h)))
            .collect();
        let info = ProxyInfo { addr, url, ca_bundle: config.ca_bundle.clone(), no_proxy: no_proxy.join(",") };
        broker.set_proxy_status(serde_json::json!({
            "listen": addr.to_string(),
            "ca_bundle": config.ca_bundle,
            "routes": config.routes.iter().map(|r| serde_json::json!({
                "name": r.name,
                "upstream": format!("{}://{}{}", if r.https { "https" } else { "http" }, Dest { https: r.https, host: r.host.clone(), port: r.port }.authority(), r.base),
            })).collect::<Vec<_>>(),
            "egress": match config.egress { Egress::All => "all", Egress::BoundOnly => "bound-only" },
            "allow_private": config.allow_private,
        }));
        let user_no_proxy = std::env::var("NO_PROXY").or_else(|_| std::env::var("no_proxy")).unwrap_or_default();
        broker.set_proxy_env(
            child_env(&info, bindings, &user_no_proxy)
                .into_iter()
                .map(|(k, v)| (k.to_string(), Zeroizing::new(v)))
                .collect(),
        );
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let proxy = Proxy { broker, config, ca, client, authorization, audit, connections, info };
        Ok((Arc::new(proxy), listener))
    }

    /// Accepts connections until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tracing::info!(addr = %self.info.addr, "proxy listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!("proxy accept failed: {err}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "proxy connection refused: --proxy-max-connections reached");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = {
                    let proxy = proxy.clone();
                    service_fn(move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, std::convert::Infallible>(proxy.outer(req, peer).await) }
                    })
                };
                let conn = proxy.http1().serve_connection(TokioIo::new(stream), service).with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }

    fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.idle)
            .max_buf_size(self.config.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(header::PROXY_AUTHORIZATION) else { return false };
        let (given, expected) = (given.as_bytes(), self.authorization.as_bytes());
        // Compared in constant time: the credential is what keeps other processes out.
        given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// A request on the plain listener.
    async fn outer(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let audit = |host: &str, status: StatusCode, note: &str| {
            self.audit_line(peer, host, req.method(), "", &BTreeSet::new(), status, 0, 0, started, note)
        };
        if req.method() == Method::CONNECT {
            let target = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
            if !self.authorized(req.headers()) {
                audit(&target, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "no or wrong proxy credential");
                return proxy_auth_required();
            }
            let dest = req.uri().authority().map(|a| Dest {
                https: true,
                host: strip_brackets(a.host()),
                port: a.port_u16().unwrap_or(443),
            });
            let Some(dest) = dest else {
                audit(&target, StatusCode::BAD_REQUEST, "CONNECT without host:port");
                return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n");
            };
            if self.broker.bindings().host_is_bound(&dest.host, dest.port) {
                return self.intercept(req, dest, peer);
            }
            if self.config.egress == Egress::BoundOnly {
                audit(&target, StatusCode::FORBIDDEN, "egress bound-only");
                return text(StatusCode::FORBIDDEN, "op-bridge: this host has no binding (--egress bound-only)\n");
            }
            return self.tunnel(req, dest, peer, started).await;
        }
        if let Some(scheme) = req.uri().scheme_str() {
            if !self.authorized(req.headers()) {
                let host = req.uri().host().unwrap_or_default().to_string();
                audit(&host, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "no or wrong proxy credential");
                return proxy_auth_required();
            }
            if scheme != "http" {
                return text(StatusCode::BAD_REQUEST, "op-bridge: use CONNECT for https\n");
            }
            let Some(authority) = req.uri().authority() else {
                return text(StatusCode::BAD_REQUEST, "no host\n");
            };
            let dest =
                Dest { https: false, host: strip_brackets(authority.host()), port: authority.port_u16().unwrap_or(80) };
            let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
            return self.forward(req, dest, path, peer, started).await;
        }
        // A route: /NAME/rest → upstream base + /rest.
        let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let trimmed = path.trim_start_matches('/');
        let (name, rest) = match trimmed.find(['/', '?']) {
            Some(at) => (&trimmed[..at], &trimmed[at..]),
            None => (trimmed, ""),
        };
        let Some(route) = self.config.routes.iter().find(|r| r.name == name) else {
            audit("", StatusCode::NOT_FOUND, "no such route");
            return text(StatusCode::NOT_FOUND, "op-bridge: no such route (see --route)\n");
        };
        let rest = if rest.starts_with('?') || rest.is_empty() { format!("/{rest}") } else { rest.to_string() };
        let path = format!("{}{}", route.base, rest);
        let dest = Dest { https: route.https, host: route.host.clone(), port: route.port };
        self.forward(req, dest, path, peer, started).await
    }

    /// Answers a CONNECT to a bound host: TLS with our leaf, then each request rewritten.
    fn intercept(self: &Arc<Self>, req: Request<Incoming>, dest: Dest, peer: SocketAddr) -> Response<Body> {
        let config = match self.ca.server_config(&dest.host) {
            Ok(config) => config,
            Err(err) => {
                tracing::warn!("proxy: {err}");
                return text(StatusCode::BAD_GATEWAY, "op-bridge: cannot make a certificate for this host\n");
            }
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(upgraded) => upgraded,
                Err(err) => return tracing::debug!("proxy: CONNECT upgrade failed: {err}"),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(TokioIo::new(upgraded))).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => return tracing::debug!(host = %dest.host, "proxy: client TLS handshake failed: {err}"),
                Err(_) => return tracing::debug!(host = %dest.host, "proxy: client TLS handshake timed out"),
            };
            let service = {
                let proxy = proxy.clone();
                service_fn(move |req: Request<Incoming>| {
                    let proxy = proxy.clone();
                    let dest = dest.clone();
                    async move {
                        let started = Instant::now();
                        let path =
                            req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
                        Ok::<_, std::convert::Infallible>(proxy.forward(req, dest, path, peer, started).await)
                    }
                })
            };
            let _ = proxy.http1().serve_connection(TokioIo::new(tls), service).await;
        });
        Response::new(empty())
    }

    /// Tunnels a CONNECT to a host with no binding, untouched.
    async fn tunnel(
        self: &Arc<Self>,
        req: Request<Incoming>,
        dest: Dest,
        peer: SocketAddr,
        started: Instant,
    ) -> Response<Body> {
        let target = dest.authority();
        let upstream =
            match upstream::connect_tcp(&dest.host, dest.port, self.config.allow_private, self.config.connect_timeout)
                .await
            {
                Ok(stream) => stream,
                Err(err) => {
                    let status = if upstream::is_private_refusal(&err) {
                        StatusCode::FORBIDDEN
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    self.audit_line(peer, &target, req.method(), "", &BTreeSet::new(), status, 0, 0, started, "tunnel");
                    return text(status, &format!("op-bridge: {err}\n"));
                }
            };
        self.audit_line(peer, &target, req.method(), "", &BTreeSet::new(), StatusCode::OK, 0, 0, started, "tunnel");
        let idle = self.config.idle;
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                relay(TokioIo::new(upgraded), upstream, idle).await;
            }
        });
        Response::new(empty())
    }

    /// Rewrites one request for `dest` and relays the answer.
    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        dest: Dest,
        path: String,
        peer: SocketAddr,
        started: Instant,
    ) -> Response<Body> {
        let target = dest.authority();
        let method = req.method().clone();
        let shown_path = path.split('?').next().unwrap_or("").to_string();
        let refuse = |status: StatusCode, used: &BTreeSet<String>, note: &str, message: &str| {
            self.audit_line(peer, &target, &method, &shown_path, used, status, 0, 0, started, note);
            text(status, message)
        };
        if let Ok(ip) = dest.host.parse::<std::net::IpAddr>()
            && !self.config.allow_private
            && super::hosts::is_private(ip)
        {
            let message = format!("op-bridge: {} is a private address (see --proxy-allow-private)\n", dest.host);
            return refuse(StatusCode::FORBIDDEN, &BTreeSet::new(), "private address", &message);
        }
        // A small body is read whole up front: it is rewritten exactly, and it can be sent
        // again when a broker-owned OAuth token was refused and refreshed.
        let (parts, body) = req.into_parts();
        let length = hyper::body::Body::size_hint(&body).exact();
        let mut payload = match length {
            Some(0) => Payload::Buffered(Bytes::new()),
            Some(n) if n <= BUFFERED_BODY => match Limited::new(body, BUFFERED_BODY as usize).collect().await {
                Ok(collected) => Payload::Buffered(collected.to_bytes()),
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        &BTreeSet::new(),
                        "body read failed",
                        "op-bridge: cannot read the request body\n",
                    );
                }
            },
            _ => Payload::Streamed(body),
        };
        let mut retried = false;
        let (response, secrets, used, sent) = loop {
            let prepared = match self.prepare(&dest, &path, &parts, &mut payload) {
                Ok(prepared) => prepared,
                Err(refusal) => return refuse(refusal.status, &refusal.used, refusal.note, &refusal.message),
            };
            let Prepared { request, secrets, used, sent, stream_refusal, generations } = prepared;
            if let Some(message) = used.iter().find_map(|name| self.broker.oauth().unusable(name)) {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &used,
                    "oauth unavailable",
                    &format!("op-bridge: {message}\n"),
                );
            }
            let response = match self.client.request(request).await {
                Ok(response) => response,
                Err(err) => {
                    if let Some(label) = stream_refusal.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            &BTreeSet::from([label.clone()]),
                            "unbound placeholder",
                            &format!("op-bridge: secret {label} is not bound to {target}; request refused\n"),
                        );
                    }
                    if upstream::is_private_refusal(&err) {
                        let message = format!(
                            "op-bridge: {} resolves to a private address (see --proxy-allow-private)\n",
                            dest.host
                        );
                        return refuse(StatusCode::FORBIDDEN, &used, "private address", &message);
                    }
                    let mut chain = err.to_string();
                    let mut source = std::error::Error::source(&err);
                    while let Some(cause) = source {
                        chain.push_str(": ");
                        chain.push_str(&cause.to_string());
                        source = cause.source();
                    }
                    tracing::debug!(host = %target, "proxy: upstream failed: {chain}");
                    return refuse(
                        StatusCode::BAD_GATEWAY,
                        &used,
                        "upstream failed",
                        &format!("op-bridge: upstream {target} failed: {chain}\n"),
                    );
                }
            };
            // The API refused a broker-owned access token: one refresh (shared with any that
            // is running) and, when the body can be sent again, one retry with the new token.
            if response.status() == StatusCode::UNAUTHORIZED && !retried && !generations.is_empty() {
                let mut renewed = false;
                for (name, seen) in &generations {
                    renewed |= self.broker.oauth().refresh_rejected(name, *seen).await;
                }
                if renewed && matches!(payload, Payload::Buffered(_)) {
                    retried = true;
                    continue;
                }
            }
            break (response, secrets, used, sent);
        };
        if let Some(name) = used.iter().find(|n| self.broker.bindings().is_raw(n)) {
            tracing::debug!(name, "proxy used --allow-raw secret {name}");
        }

        // The answer: echoes of a value become the placeholder again.
        let (mut parts, body) = response.into_parts();
        let reverse = Arc::new(Substituter::new(secrets.reverse(), Encoding::Raw));
        if !reverse.is_empty() {
            for value in parts.headers.values_mut() {
                if let Ok(applied) = reverse.apply_header("", value.as_bytes())
                    && !applied.used.is_empty()
                    && let Ok(replaced) = HeaderValue::from_bytes(&applied.out)
                {
                    *value = replaced;
                }
            }
        }
        let identity =
            parts.headers.get(header::CONTENT_ENCODING).is_none_or(|e| e.as_bytes().eq_ignore_ascii_case(b"identity"));
        let reverse = (!reverse.is_empty() && identity).then_some(reverse);
        if reverse.is_some() {
            // The length may change; hyper frames the rewritten body itself.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        for hop in HOP_BY_HOP {
            parts.headers.remove(*hop);
        }
        let line = AuditOnEnd {
            proxy: self.clone(),
            peer,
            host: target.clone(),
            method: method.to_string(),
            path: shown_path,
            used,
            status: parts.status,
            sent,
            received: Arc::new(AtomicU64::new(0)),
            started,
        };
        let received = line.received.clone();
        let body = substituted(body, reverse, Arc::default(), received, Some(line));
        Response::from_parts(parts, body)
    }

    /// One attempt's request: placeholders in the path, headers and body of `parts` and
    /// `payload` replaced for `dest` (a streamed body can be taken once only).
    fn prepare(
        &self,
        dest: &Dest,
        path: &str,
        parts: &http::request::Parts,
        payload: &mut Payload,
    ) -> Result<Prepared, Refusal> {
        let target = dest.authority();
        let secrets = self.secrets_for(dest);
        let mut used = BTreeSet::new();
        let unbound = |label: String| Refusal {
            status: StatusCode::FORBIDDEN,
            message: format!("op-bridge: secret {label} is not bound to {target}; request refused\n"),
            used: BTreeSet::from([label]),
            note: "unbound placeholder",
        };
        let bad = |used: &BTreeSet<String>, note: &'static str, message: &str| Refusal {
            status: StatusCode::BAD_REQUEST,
            used: used.clone(),
            note,
            message: message.to_string(),
        };

        // Path and query.
        let path = match secrets.uri.apply(path.as_bytes()) {
            Ok(applied) => {
                used.extend(applied.used);
                String::from_utf8_lossy(&applied.out).into_owned()
            }
            Err(refusal) => return Err(self.oauth_or(unbound(refusal.label))),
        };
        let uri = format!("{}://{}{}", if dest.https { "https" } else { "http" }, dest.authority(), path)
            .parse::<Uri>()
            .map_err(|_| bad(&used, "bad uri", "op-bridge: bad request target\n"))?;

        // Headers.
        let mut headers = HeaderMap::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            if HOP_BY_HOP.contains(&name.as_str()) || name == header::HOST {
                continue;
            }
            match secrets.headers.apply_header(name.as_str(), value.as_bytes()) {
                Ok(applied) => {
                    used.extend(applied.used);
                    let value = HeaderValue::from_bytes(&applied.out)
                        .map_err(|_| bad(&used, "bad header", "op-bridge: a header cannot carry that value\n"))?;
                    headers.append(name.clone(), value);
                }
                Err(refusal) => return Err(self.oauth_or(unbound(refusal.label))),
            }
        }
        if let Ok(host) = HeaderValue::from_str(&dest.authority()) {
            headers.insert(header::HOST, host);
        }

        // Body: small ones whole (exact length, refusal before anything is sent), large ones
        // streamed.
        let encoding = body_encoding(&parts.headers);
        let body_sub = Arc::new(Substituter::new(secrets.patterns(), encoding));
        let sent = Arc::new(AtomicU64::new(0));
        let stream_refusal: Arc<Mutex<Option<String>>> = Arc::default();
        let body: Body = match payload {
            Payload::Buffered(bytes) if bytes.is_empty() => empty(),
            Payload::Buffered(bytes) => {
                let out = match body_sub.apply(bytes) {
                    Ok(applied) => {
                        used.extend(applied.used);
                        applied.out
                    }
                    Err(refusal) => return Err(self.oauth_or(unbound(refusal.label))),
                };
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                sent.store(out.len() as u64, Ordering::Relaxed);
                Full::new(Bytes::from(out.to_vec())).map_err(|never| match never {}).boxed()
            }
            Payload::Streamed(_) => {
                let Payload::Streamed(body) = std::mem::replace(payload, Payload::Taken) else {
                    return Err(bad(&used, "bad request", "op-bridge: bad request\n"));
                };
                headers.remove(header::CONTENT_LENGTH);
                substituted(
                    body,
                    (!body_sub.is_empty()).then_some(body_sub.clone()),
                    stream_refusal.clone(),
                    sent.clone(),
                    None,
                )
            }
            Payload::Taken => return Err(bad(&used, "bad request", "op-bridge: bad request\n")),
        };
        let mut request = Request::builder().method(parts.method.clone()).uri(uri).version(http::Version::HTTP_11);
        if let Some(h) = request.headers_mut() {
            *h = headers;
        }
        let request = request.body(body).map_err(|_| bad(&used, "bad request", "op-bridge: bad request\n"))?;
        // The broker-owned tokens this request carries, with the generation sent (a 401
        // refreshes only a token that is still the one the API refused).
        let generations = secrets
            .entries
            .iter()
            .filter(|e| used.contains(&e.name) && self.broker.oauth().owns(&e.name))
            .map(|e| (e.name.clone(), e.generation))
            .collect();
        Ok(Prepared { request, secrets, used, sent, stream_refusal, generations })
    }

    /// A refusal naming a broker-owned OAuth secret that cannot be used now becomes 503 with
    /// the reason (its token has no value to substitute, which is not a binding error).
    fn oauth_or(&self, refusal: Refusal) -> Refusal {
        match refusal.used.iter().find_map(|name| self.broker.oauth().unusable(name)) {
            Some(message) => Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!("op-bridge: {message}\n"),
                note: "oauth unavailable",
                ..refusal
            },
            None => refusal,
        }
    }

    /// The substitutions for one destination.
    fn secrets_for(&self, dest: &Dest) -> Secrets {
        let mut entries = Vec::new();
        for binding in self.broker.bindings().iter() {
            // Values travel over TLS only: a plain-http destination gets none.
            let found = (dest.https && binding.matches(&dest.host, dest.port))
                .then(|| self.broker.store.with_value_generation(&binding.name, |v, g| (Zeroizing::new(v.to_vec()), g)))
                .flatten();
            let (value, generation) = match found {
                Some((value, generation)) => (Some(value), generation),
                None => (None, 0),
            };
            entries.push(Entry {
                name: binding.name.clone(),
                placeholder: binding.placeholder.clone(),
                value,
                generation,
            });
        }
        let make = |encoding| Substituter::new(patterns(&entries), encoding);
        Secrets { uri: make(Encoding::Percent), headers: make(Encoding::Raw), entries }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_line(
        &self,
        peer: SocketAddr,
        host: &str,
        method: &Method,
        path: &str,
        used: &BTreeSet<String>,
        status: StatusCode,
        sent: u64,
        received: u64,
        started: Instant,
        note: &str,
    ) {
        if status == StatusCode::FORBIDDEN && !used.is_empty() {
            tracing::warn!(host, names = ?used, "proxy refused a request: {note}");
        }
        let Some(audit) = &self.audit else { return };
        audit.record_json(serde_json::json!({
            "time": std::time::SystemTime::now().duration_since(std::time::SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "command": "PROXY",
            "peer": peer.to_string(),
            "host": host,
            "method": method.as_str(),
            "path": path,
            "names": used,
            "status": status.as_u16(),
            "bytes_sent": sent,
            "bytes_received": received,
            "ms": started.elapsed().as_millis() as u64,
            "note": note,
        }));
    }
}

/// One bound secret as one destination sees it.
struct Entry {
    name: String,
    placeholder: String,
    /// The value, when the secret is bound to the destination.
    value: Option<Zeroizing<Vec<u8>>>,
    /// The value's generation in the store.
    generation: u64,
}

/// A request body: read whole (it can be sent again), or streamed (once).
enum Payload {
    Buffered(Bytes),
    Streamed(Incoming),
    Taken,
}

/// One attempt's rewritten request and what it carries.
struct Prepared {
    request: Request<Body>,
    secrets: Secrets,
    used: BTreeSet<String>,
    sent: Arc<AtomicU64>,
    stream_refusal: Arc<Mutex<Option<String>>>,
    /// The broker-owned OAuth tokens it carries, with their generations.
    generations: Vec<(String, u64)>,
}

/// A request refused before anything was sent.
struct Refusal {
    status: StatusCode,
    used: BTreeSet<String>,
    note: &'static str,
    message: String,
}

/// One destination's secrets and the substituters for its URI and headers.
struct Secrets {
    uri: Substituter,
    headers: Substituter,
    entries: Vec<Entry>,
}

impl Secrets {
    fn patterns(&self) -> Vec<Pattern> {
        patterns(&self.entries)
    }

    /// Value → placeholder, for the secrets bound to the destination.
    fn reverse(&self) -> Vec<Pattern> {
        self.entries
            .iter()
            .filter_map(|entry| {
                let value = entry.value.as_ref().filter(|v| !v.is_empty())?;
                Some(Pattern {
                    needle: value.clone(),
                    action: Action::Replace(Zeroizing::new(entry.placeholder.as_bytes().to_vec())),
                    label: entry.name.clone(),
                })
            })
            .collect()
    }
}

/// Placeholder → value for the secrets bound to the destination; placeholder → refusal for
/// every other bound secret.
fn patterns(entries: &[Entry]) -> Vec<Pattern> {
    entries
        .iter()
        .map(|entry| Pattern {
            needle: Zeroizing::new(entry.placeholder.as_bytes().to_vec()),
            action: match &entry.value {
                Some(value) => Action::Replace(value.clone()),
                None => Action::Refuse,
            },
            label: entry.name.clone(),
        })
        .collect()
}

/// How a value is written into a body of this content type.
fn body_encoding(headers: &HeaderMap) -> Encoding {
    let kind = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if kind.contains("json") {
        Encoding::Json
    } else if kind.starts_with("application/x-www-form-urlencoded") {
        Encoding::Percent
    } else {
        Encoding::Raw
    }
}

/// Writes the request's audit line when its response body ends (or is dropped).
struct AuditOnEnd {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    host: String,
    method: String,
    path: String,
    used: BTreeSet<String>,
    status: StatusCode,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    started: Instant,
}

impl Drop for AuditOnEnd {
    fn drop(&mut self) {
        let method = Method::from_bytes(self.method.as_bytes()).unwrap_or(Method::GET);
        self.proxy.audit_line(
            self.peer,
            &self.host,
            &method,
            &self.path,
            &self.used,
            self.status,
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
            self.started,
            "",
        );
    }
}

/// `body` streamed through `sub` (when there is one), counting bytes; a refusal ends the
/// stream with an error (so the upstream never gets a complete request) and is noted.
fn substituted<B>(
    body: B,
    sub: Option<Arc<Substituter>>,
    refusal: Arc<Mutex<Option<String>>>,
    count: Arc<AtomicU64>,
    on_end: Option<AuditOnEnd>,
) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    struct State<B> {
        body: B,
        stream: Option<super::substitute::StreamSubstituter>,
        done: bool,
        refusal: Arc<Mutex<Option<String>>>,
        count: Arc<AtomicU64>,
        _on_end: Option<AuditOnEnd>,
    }
    let state = State { body, stream: sub.map(|s| s.stream()), done: false, refusal, count, _on_end: on_end };
    let frames = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if state.done {
                return None;
            }
            match state.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = match &mut state.stream {
                            Some(stream) => match stream.push(&data) {
                                Ok(out) => Bytes::from(out.to_vec()),
                                Err(refused) => {
                                    state.done = true;
                                    *state.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(refused.label);
                                    let err: BoxError = "request refused: a placeholder of an unbound secret".into();
                                    return Some((Err(err), state));
                                }
                            },
                            None => data,
                        };
                        state.count.fetch_add(out.len() as u64, Ordering::Relaxed);
                        if out.is_empty() {
                            continue;
                        }
                        return Some((Ok(Frame::data(out)), state));
                    }
                    Err(frame) => return Some((Ok(frame), state)),
                },
                Some(Err(err)) => {
                    state.done = true;
                    return Some((Err(err.into()), state));
                }
                None => {
                    state.done = true;
                    let tail = match &mut state.stream {
                        Some(stream) => match stream.finish() {
                            Ok(out) => Bytes::from(out.to_vec()),
                            Err(refused) => {
                                *state.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(refused.label);
                                let err: BoxError = "request refused: a placeholder of an unbound secret".into();
                                return Some((Err(err), state));
                            }
                        },
                        None => Bytes::new(),
                    };
                    if tail.is_empty() {
                        return None;
                    }
                    state.count.fetch_add(tail.len() as u64, Ordering::Relaxed);
                    return Some((Ok(Frame::data(tail)), state));
                }
            }
        }
    });
    BodyExt::boxed(StreamBody::new(frames))
}

/// A host pattern's host part (no port, brackets or wildcard).
fn pattern_host(pattern: &super::hosts::HostPattern) -> String {
    let text = pattern.to_string().to_ascii_lowercase();
    let text = text.trim_start_matches("*.");
    let host = match text.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None if text.matches(':').count() == 1 => text.split(':').next().unwrap_or(""),
        None => text,
    };
    host.to_string()
}

/// Copies both ways until both sides are done, or until neither side has sent anything for
/// `idle` (a tunnel is bounded in time like any other connection).
async fn relay<A>(client: A, upstream: tokio::net::TcpStream, idle: std::time::Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let last = Mutex::new(Instant::now());
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    async fn pump<R, W>(read: &mut R, write: &mut W, last: &Mutex<Instant>, idle: std::time::Duration) -> bool
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(idle, read.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    let _ = write.shutdown().await;
                    return true;
                }
                Ok(Ok(n)) => {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                    if write.write_all(&buf[..n]).await.is_err() {
                        return true;
                    }
                }
                // Quiet this way: idle only if the other way is quiet too.
                Err(_) if last.lock().unwrap_or_else(|e| e.into_inner()).elapsed() >= idle => return false,
                Err(_) => {}
            }
        }
    }
    let up = pump(&mut client_read, &mut upstream_write, &last, idle);
    let down = pump(&mut upstream_read, &mut client_write, &last, idle);
    tokio::pin!(up, down);
    // A side that ends (EOF) lets the other finish; an idle side ends the tunnel.
    tokio::select! {
        finished = &mut up => if finished { down.await; },
        finished = &mut down => if finished { up.await; },
    }
}

fn strip_brackets(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase()
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response =
        Response::new(Full::new(Bytes::from(message.to_string())).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn proxy_auth_required() -> Response<Body> {
    let mut response = text(StatusCode::PROXY_AUTHENTICATION_REQUIRED, "op-bridge: proxy credential required\n");
    response.headers_mut().insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"op-bridge\""));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::bindings::BindingSpec;

    #[test]
    fn no_proxy_never_names_a_bound_host() {
        let spec = BindingSpec::parse([], "OP_", &["API=api.example.com,localhost:8443".into()], &[], &[]).unwrap();
        let bindings = Bindings::new(&spec, &Default::default()).unwrap();
        let info = ProxyInfo {
            addr: "127.0.0.1:8118".parse().unwrap(),
            url: Zeroizing::new("http://opb:x@127.0.0.1:8118".into()),
            ca_bundle: "/b.pem".into(),
            no_proxy: "127.0.0.1,::1".into(),
        };
        let env = child_env(&info, &bindings, "internal.corp,.example.com,api.example.com,*,other.org:8080");
        let no_proxy = &env.iter().find(|(k, _)| *k == "NO_PROXY").unwrap().1;
        assert_eq!(no_proxy, "127.0.0.1,::1,internal.corp,other.org:8080");
        assert!(env.iter().any(|(k, v)| *k == "https_proxy" && v == "http://opb:x@127.0.0.1:8118"));
        assert!(env.iter().any(|(k, v)| *k == "NODE_EXTRA_CA_CERTS" && v == "/b.pem"));
    }

    #[test]
    fn pattern_hosts() {
        for (pattern, host) in [
            ("api.example.com", "api.example.com"),
            ("*.example.com:8443", "example.com"),
            ("localhost:1", "localhost"),
        ] {
            assert_eq!(pattern_host(&super::super::hosts::HostPattern::parse(pattern).unwrap()), host);
        }
    }
}
