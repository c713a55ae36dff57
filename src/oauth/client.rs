//! The token endpoint client: one OAuth 2.0 token request (RFC 6749 §4.4 client_credentials,
//! §6 refresh_token) over a kept-alive HTTP/1.1 connection, verified against the system roots
//! and `SSL_CERT_FILE` like Connect, and its answer classified: tokens, a refusal (permanent:
//! `invalid_grant`, `invalid_client` and every other 4xx but 429), or the endpoint being
//! unavailable (5xx, 429 with its `Retry-After`, timeout, a dropped connection).
//!
//! Tokens and the client secret travel in the request body and the `Authorization` header
//! only (never in a URL); every copy this module makes is zeroizing, and no message it builds
//! holds one: an error carries the endpoint's `error` code and description, nothing else.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde_json::Value as Json;
use zeroize::Zeroizing;

use crate::locked::extend_zeroizing;
use crate::scrub::scrub;

/// A token request is given up (and backed off) after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token response read; real ones are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;
/// Longest error description kept from the endpoint.
const MAX_DESCRIPTION: usize = 200;

/// How the client authenticates to the token endpoint (the item's `token_auth` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAuth {
    /// `client_secret_basic`: HTTP Basic with the form-encoded id and secret (the default).
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` as form fields.
    Post,
}

impl TokenAuth {
    pub fn parse(text: Option<&str>) -> Result<TokenAuth, String> {
        match text.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(TokenAuth::Basic),
            Some(t) if t.eq_ignore_ascii_case("basic") => Ok(TokenAuth::Basic),
            Some(t) if t.eq_ignore_ascii_case("post") => Ok(TokenAuth::Post),
            Some(other) => Err(format!("token_auth must be 'basic' or 'post' (got '{other}')")),
        }
    }
}

/// The client as the item describes it.
pub struct ClientSettings {
    pub token_url: reqwest::Url,
    pub client_id: String,
    pub client_secret: Option<Zeroizing<String>>,
    pub auth: TokenAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
}

/// Checks a token endpoint: https, or http to a loopback host (tests, local sidecars).
pub fn check_token_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|_| format!("token_url is not a URL ('{}')", text.trim()))?;
    let host = url.host_str().ok_or("token_url has no host")?.trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(format!("token_url must be https:// (http:// only to a loopback host), not '{}'", url)),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("token_url must not carry credentials".into());
    }
    Ok(url)
}

/// The grant of one request.
pub enum Grant<'a> {
    RefreshToken(&'a str),
    ClientCredentials,
}

/// A successful token response.
pub struct TokenResponse {
    pub access_token: Zeroizing<String>,
    /// A rotated refresh token, when the endpoint sent one.
    pub refresh_token: Option<Zeroizing<String>>,
    pub expires_in: Option<u64>,
}

/// Why a token request gave no tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused the grant or the client for good (retrying cannot help).
    #[error("{0}")]
    Refused(String),
    /// 429: the endpoint asked to wait (`Retry-After`, when it said).
    #[error("{message}")]
    RateLimited { message: String, retry_after: Option<Duration> },
    /// 5xx, timeout, connection trouble, or an answer that is not a token response.
    #[error("{0}")]
    Unavailable(String),
}

/// The pooled HTTP client every OAuth client of the process shares.
pub struct TokenClient {
    http: reqwest::Client,
}

impl TokenClient {
    pub fn new() -> Result<TokenClient, String> {
        let roots = crate::backend::connect::load_roots().map_err(|e| e.to_string())?;
        let tls = crate::backend::tls::client_config(roots)?;
        let http = reqwest::Client::builder()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("op-bridge/", env!("CARGO_PKG_VERSION")))
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| format!("cannot build the token endpoint client: {e}"))?;
        Ok(TokenClient { http })
    }

    /// One token request; never retried here (the refresher owns the backoff).
    pub async fn request(&self, settings: &ClientSettings, grant: Grant<'_>) -> Result<TokenResponse, TokenError> {
        let mut form = Zeroizing::new(String::new());
        match grant {
            Grant::RefreshToken(token) => {
                form_pair(&mut form, "grant_type", "refresh_token");
                form_pair(&mut form, "refresh_token", token);
            }
            Grant::ClientCredentials => form_pair(&mut form, "grant_type", "client_credentials"),
        }
        if let Some(scope) = &settings.scope {
            form_pair(&mut form, "scope", scope);
        }
        if let Some(audience) = &settings.audience {
            form_pair(&mut form, "audience", audience);
        }
        let mut request = self.http.post(settings.token_url.clone());
        match (settings.auth, &settings.client_secret) {
            (TokenAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: both parts form-encoded before they are joined.
                let mut pair = Zeroizing::new(String::new());
                encode_into(&mut pair, &settings.client_id);
                pair.push(':');
                encode_into(&mut pair, secret);
                let header = Zeroizing::new(format!(
                    "Basic {}",
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pair.as_bytes())
                ));
                let mut value = HeaderValue::from_str(&header)
                    .map_err(|_| TokenError::Refused("the client secret cannot be sent in a header".into()))?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            (TokenAuth::Post, Some(secret)) => {
                form_pair(&mut form, "client_id", &settings.client_id);
                form_pair(&mut form, "client_secret", secret);
            }
            // A public client identifies itself only (RFC 6749 §3.2.1).
            (_, None) => form_pair(&mut form, "client_id", &settings.client_id),
        }
        let body = bytes::Bytes::from_owner(Zeroizing::new(std::mem::take(&mut *form).into_bytes()));
        let request = request
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body);
        let exchange = async {
            let mut response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::backend::connect::parse_retry_after_header);
            let mut body = Zeroizing::new(Vec::new());
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_BODY {
                    return Ok(None);
                }
                extend_zeroizing(&mut body, &chunk);
            }
            Ok::<_, reqwest::Error>(Some((status, retry_after, body)))
        };
        let (status, retry_after, body) = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => return Err(TokenError::Unavailable("the token endpoint answered too much".into())),
            Ok(Err(err)) if crate::backend::tls::is_certificate_error(&err) => {
                return Err(TokenError::Unavailable(format!(
                    "the token endpoint's certificate is not trusted ({}); name its CA in SSL_CERT_FILE",
                    chain(&err)
                )));
            }
            Ok(Err(err)) => return Err(TokenError::Unavailable(format!("token request failed: {}", chain(&err)))),
            Err(_) => {
                return Err(TokenError::Unavailable(format!(
                    "the token endpoint did not answer within {}s",
                    REQUEST_TIMEOUT.as_secs()
                )));
            }
        };
        let mut doc: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
        let outcome = classify(status.as_u16(), retry_after, &doc);
        scrub(&mut doc);
        outcome
    }
}

/// What an answer means: tokens, or why not.
fn classify(status: u16, retry_after: Option<Duration>, doc: &Json) -> Result<TokenResponse, TokenError> {
    let error = doc.get("error").and_then(Json::as_str).map(short);
    let described = || {
        let code = error.clone().unwrap_or_else(|| "no error code".into());
        match doc.get("error_description").and_then(Json::as_str) {
            Some(d) => format!("HTTP {status}, {code}: {}", short(d)),
            None => format!("HTTP {status}, {code}"),
        }
    };
    match status {
        // Some endpoints (GitHub's) answer a refused grant with 200 and an `error`.
        200 if error.is_some() => Err(TokenError::Refused(described())),
        200 => {
            let access = doc.get("access_token").and_then(Json::as_str).filter(|t| !t.is_empty());
            let Some(access) = access else {
                return Err(TokenError::Unavailable("the token endpoint answered 200 without an access_token".into()));
            };
            Ok(TokenResponse {
                access_token: Zeroizing::new(access.to_string()),
                refresh_token: doc
                    .get("refresh_token")
                    .and_then(Json::as_str)
                    .filter(|t| !t.is_empty())
                    .map(|t| Zeroizing::new(t.to_string())),
                expires_in: doc
                    .get("expires_in")
                    .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))),
            })
        }
        429 => Err(TokenError::RateLimited { message: described(), retry_after }),
        500..=599 => Err(TokenError::Unavailable(described())),
        400..=499 => Err(TokenError::Refused(described())),
        _ => Err(TokenError::Unavailable(described())),
    }
}

/// At most [`MAX_DESCRIPTION`] characters of endpoint text, control characters dropped.
fn short(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(MAX_DESCRIPTION).collect()
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text.chars().take(300).collect()
}

/// Appends `key=value` form-encoded (`application/x-www-form-urlencoded`).
fn form_pair(form: &mut String, key: &str, value: &str) {
    if !form.is_empty() {
        form.push('&');
    }
    encode_into(form, key);
    form.push('=');
    encode_into(form, value);
}

fn encode_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_urls_are_https_or_loopback_http() {
        assert!(check_token_url("https://auth.example.com/oauth/token").is_ok());
        assert!(check_token_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_token_url("http://localhost/token").is_ok());
        assert!(check_token_url("http://[::1]:9/token").is_ok());
        assert!(check_token_url("http://auth.example.com/token").is_err());
        assert!(check_token_url("https://user:pw@auth.example.com/token").is_err());
        assert!(check_token_url("ftp://127.0.0.1/token").is_err());
        assert!(check_token_url("not a url").is_err());
    }

    #[test]
    fn answers_are_classified_and_errors_hold_no_token() {
        let ok = serde_json::json!({"access_token": "at_1", "refresh_token": "rt_2", "expires_in": 60});
        let tokens = classify(200, None, &ok).unwrap();
        assert_eq!((tokens.access_token.as_str(), tokens.expires_in), ("at_1", Some(60)));
        assert_eq!(tokens.refresh_token.as_deref().map(String::as_str), Some("rt_2"));
        let grant = serde_json::json!({"error": "invalid_grant", "error_description": "token family revoked"});
        assert!(matches!(classify(400, None, &grant), Err(TokenError::Refused(m)) if m.contains("invalid_grant")));
        assert!(matches!(
            classify(401, None, &serde_json::json!({"error": "invalid_client"})),
            Err(TokenError::Refused(_))
        ));
        let limited = classify(429, Some(Duration::from_secs(7)), &Json::Null);
        assert!(matches!(limited, Err(TokenError::RateLimited { retry_after: Some(d), .. }) if d.as_secs() == 7));
        assert!(matches!(classify(503, None, &Json::Null), Err(TokenError::Unavailable(_))));
        let github = serde_json::json!({"error": "bad_refresh_token", "error_description": "The refresh token passed is incorrect or expired."});
        assert!(matches!(classify(200, None, &github), Err(TokenError::Refused(m)) if m.contains("bad_refresh_token")));
        assert!(matches!(
            classify(200, None, &serde_json::json!({"token_type": "Bearer"})),
            Err(TokenError::Unavailable(_))
        ));
    }

    #[test]
    fn form_encoding() {
        let mut form = String::new();
        form_pair(&mut form, "grant_type", "refresh_token");
        form_pair(&mut form, "scope", "read write/all+x");
        assert_eq!(form, "grant_type=refresh_token&scope=read+write%2Fall%2Bx");
        assert_eq!(TokenAuth::parse(Some(" POST ")), Ok(TokenAuth::Post));
        assert_eq!(TokenAuth::parse(None), Ok(TokenAuth::Basic));
        assert!(TokenAuth::parse(Some("jwt")).is_err());
    }
}
