//! Whom Connect over https trusts: the system's CA bundle and `SSL_CERT_FILE`, checked by
//! webpki, with one allowance webpki does not make: a server certificate that is itself one of
//! those trusted certificates (a self-signed certificate given in `SSL_CERT_FILE`; the usual
//! `openssl req -x509` marks it CA:TRUE, which webpki refuses as an end entity) is accepted
//! when it names the server and is within its validity period, as curl, Python and `op`
//! accept it. Everything else webpki refuses stays refused.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// Where distributions keep the system's CA bundle (the first one found is used).
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A rustls client configuration trusting `anchors` (DER certificates).
pub fn client_config(anchors: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(anchors.iter().cloned());
    // No usable anchor: every server is refused (with the message that says what to give).
    let webpki = if roots.is_empty() {
        None
    } else {
        let built = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build();
        Some(built.map_err(|err| err.to_string())?)
    };
    let verifier = AnchorOrChain { webpki, anchors, algorithms: provider.signature_verification_algorithms };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(config)
}

/// The webpki verifier, and the exact-anchor allowance around it.
#[derive(Debug)]
struct AnchorOrChain {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    anchors: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnchorOrChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let refused = match &self.webpki {
            Some(webpki) => match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            {
                Ok(verified) => return Ok(verified),
                Err(err) => err,
            },
            None => Error::InvalidCertificate(CertificateError::UnknownIssuer),
        };
        if !self.anchors.iter().any(|anchor| anchor.as_ref() == end_entity.as_ref()) {
            return Err(refused);
        }
        // Trusted as given, byte for byte: the name and the dates are all left to check (the
        // handshake's signature, checked below, proves the server holds its key).
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
        let (not_before, not_after) =
            validity(end_entity.as_ref()).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = now.as_secs();
        if now < not_before {
            return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
        }
        if now > not_after {
            return Err(Error::InvalidCertificate(CertificateError::Expired));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether an error (or one of its causes) is a refused server certificate.
pub fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        // An io::Error hides the error it wraps from `source()`: look inside it too.
        let inner =
            err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|e| e as &dyn std::error::Error);
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<Error>()
                && matches!(tls, Error::InvalidCertificate(_) | Error::NoCertificatesPresented)
            {
                return true;
            }
        }
        // rustls's own wording, for a layer that wraps the error as text only.
        if err.to_string().contains("invalid peer certificate") {
            return true;
        }
        next = err.source();
    }
    false
}

/// The validity period of a DER certificate, in seconds since the epoch:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
/// signature, issuer, validity SEQUENCE { notBefore, notAfter }, … }, … }`.
fn validity(der: &[u8]) -> Option<(u64, u64)> {
    let (_, certificate, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(certificate)?;
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..3 {
        tbs = tlv(tbs)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = tlv(tbs)?;
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = tlv(rest)?;
    Some((not_before, time(tag, not_after)?))
}

/// One DER element: (tag, contents, what follows).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let bytes = usize::from(first & 0x7f);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let length = rest[..bytes].iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        rest = &rest[bytes..];
        length
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, 0x18) as seconds
/// since the epoch.
fn time(tag: u8, text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?;
    let full = match (tag, text.len()) {
        (0x17, 13) => {
            let yy: u32 = text[..2].parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        (0x18, 15) => text.to_string(),
        _ => return None,
    };
    if !full.ends_with('Z') || !full[..14].bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let stamp =
        format!("{}-{}-{}T{}:{}:{}Z", &full[..4], &full[4..6], &full[6..8], &full[8..10], &full[10..12], &full[12..14]);
    let at = crate::time::parse_rfc3339(&stamp)?;
    at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_times_are_read_in_both_forms() {
        assert_eq!(time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(time(0x17, b"240101000000Z"), Some(1_704_067_200));
        assert_eq!(time(0x18, b"20240101000000Z"), Some(1_704_067_200));
        assert_eq!(time(0x17, b"2401010000Z"), None);
        assert_eq!(time(0x18, b"2024010100000aZ"), None);
        assert_eq!(time(0x05, b"240101000000Z"), None);
    }

    #[test]
    fn truncated_der_is_refused_without_panicking() {
        assert_eq!(validity(&[]), None);
        assert_eq!(validity(&[0x30, 0x82, 0xff]), None);
        assert_eq!(validity(&[0x30, 0x03, 0x30, 0x01]), None);
    }
}
