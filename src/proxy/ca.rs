//! The proxy's certificate authority: made in memory at start (its key is never written),
//! it signs one leaf certificate per intercepted host, cached for the life of the process.
//! Its certificate is written, with the system roots, as the PEM bundle the child trusts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Leaf configurations kept at most (one per intercepted host; a client naming endless
/// hosts gets old ones dropped, not unbounded memory).
const MAX_LEAVES: usize = 1024;

pub struct ProxyCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl ProxyCa {
    /// A new CA (ECDSA P-256), valid from yesterday for ten years.
    pub fn new() -> Result<ProxyCa, String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make the proxy CA key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("op-bridge proxy CA (pid {})", std::process::id()));
        dn.push(DnType::OrganizationName, "op-bridge");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| format!("cannot make the proxy CA: {e}"))?;
        Ok(ProxyCa { issuer: Issuer::new(params, key), cert_pem: cert.pem(), leaves: Mutex::new(HashMap::new()) })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The TLS server configuration presenting a certificate for `host` (made once per host).
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, String> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = leaves.get(host) {
            return Ok(config.clone());
        }
        let config = Arc::new(self.make_leaf(host)?);
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host.to_string(), config.clone());
        Ok(config)
    }

    fn make_leaf(&self, host: &str) -> Result<ServerConfig, String> {
        let key = KeyPair::generate().map_err(|e| format!("cannot make a leaf key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|e| format!("bad host name {host}: {e}"))?),
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| format!("cannot sign a leaf for {host}: {e}"))?;
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("leaf for {host}: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Writes the bundle (this CA, the system roots and `SSL_CERT_FILE`'s certificates, so the
    /// child still trusts what it trusted for tunnelled hosts) world-readable: it holds only
    /// public certificates, and the child may run as another uid.
    pub fn write_bundle(&self, path: &Path, roots_pem: &[u8]) -> std::io::Result<()> {
        let mut bundle = Vec::with_capacity(self.cert_pem.len() + roots_pem.len() + 1);
        bundle.extend_from_slice(self.cert_pem.as_bytes());
        bundle.push(b'\n');
        bundle.extend_from_slice(roots_pem);
        crate::fsutil::write_atomic(path, &bundle, Some(0o644))
    }

    /// The CA certificate, DER (for tests and clients that pin it).
    pub fn cert_der(&self) -> Option<CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_made_once_per_host() {
        let ca = ProxyCa::new().unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        ca.server_config("127.0.0.1").unwrap();
        assert!(ca.cert_der().is_some());
    }
}
