//! Credentials a caller or an agent presents to the hub: the name in its
//! TLS client certificate and the bearer token on its calls.
//!
//! A certificate names its holder by its first URI SAN (SPIFFE-style
//! `spiffe://…`), else its first DNS SAN. A bearer token comes in the
//! `authorization: Bearer <token>` metadata of a call, and is only accepted
//! over TLS or on a loopback or Unix-socket connection: a token sent in
//! plaintext across a network could be sniffed and replayed.

use std::net::IpAddr;

use http::HeaderMap;
use listenmux::{ConnInfo, Transport};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The metadata key carrying a bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// The name a client certificate gives its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertName {
    /// A URI subject alternative name (`spiffe://example.org/agent/x`).
    Uri(String),
    /// A DNS subject alternative name (`ops.example.org`).
    Dns(String),
}

impl std::fmt::Display for CertName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertName::Uri(u) => write!(f, "{u}"),
            CertName::Dns(d) => write!(f, "{d}"),
        }
    }
}

/// The name in a DER certificate: its first URI SAN, else its first DNS
/// SAN; `None` for a certificate without either (or one that does not
/// parse: the TLS layer has verified it already, so that is only a
/// certificate without the extension).
///
/// ```
/// let cert = rcgen::generate_simple_self_signed(vec!["ops.example.org".into()]).unwrap();
/// assert_eq!(
///     backchannel_sidecar::hub::identity::cert_name(cert.cert.der()),
///     Some(backchannel_sidecar::hub::identity::CertName::Dns("ops.example.org".into()))
/// );
/// ```
pub fn cert_name(der: &[u8]) -> Option<CertName> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(CertName::Uri(u.to_string())),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(d) => Some(CertName::Dns(d.to_string())),
                _ => None,
            })
        })
}

/// The name of the leaf certificate a connection presented, if any.
pub fn conn_cert_name(info: Option<&ConnInfo>) -> Option<CertName> {
    let certs = info?.peer_certs()?;
    cert_name(certs.first()?.as_ref())
}

/// Why a call's `authorization` metadata was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The value is not `Bearer <token>`.
    #[error("the authorization metadata must be 'Bearer <token>'")]
    Malformed,
    /// A token arrived over plaintext TCP from a non-loopback address.
    #[error("bearer tokens are only accepted over TLS or on loopback and Unix-socket connections")]
    Plaintext,
}

/// The bearer token of a call, if it carries one. A token on a connection
/// that is neither TLS, nor loopback, nor a Unix socket is refused.
pub fn bearer_token(
    headers: &HeaderMap,
    info: Option<&ConnInfo>,
) -> Result<Option<String>, TokenError> {
    let Some(v) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    if !token_transport_ok(info) {
        return Err(TokenError::Plaintext);
    }
    let v = v.to_str().map_err(|_| TokenError::Malformed)?;
    let (scheme, token) = v.split_once(' ').ok_or(TokenError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(Some(token.to_string()))
}

/// Whether a secret may travel on this connection: TLS, a Unix socket, or
/// TCP whose both ends are loopback addresses.
///
/// ```
/// use listenmux::{ConnInfo, Transport};
/// use backchannel_sidecar::hub::identity::token_transport_ok;
/// let lan = ConnInfo::new(Transport::Tcp)
///     .with_remote_addr(Some("192.0.2.7:40000".parse().unwrap()))
///     .with_local_addr(Some("192.0.2.1:7443".parse().unwrap()));
/// assert!(!token_transport_ok(Some(&lan)));
/// let lo = ConnInfo::new(Transport::Tcp)
///     .with_remote_addr(Some("127.0.0.1:40000".parse().unwrap()))
///     .with_local_addr(Some("127.0.0.1:7443".parse().unwrap()));
/// assert!(token_transport_ok(Some(&lo)));
/// assert!(token_transport_ok(Some(&ConnInfo::new(Transport::Unix))));
/// ```
pub fn token_transport_ok(info: Option<&ConnInfo>) -> bool {
    let Some(info) = info else {
        return false;
    };
    if info.is_tls() || info.transport() == Transport::Unix {
        return true;
    }
    let loopback = |a: Option<std::net::SocketAddr>| a.is_some_and(|a| is_loopback(a.ip()));
    info.transport() == Transport::Tcp
        && loopback(info.remote_addr())
        && loopback(info.local_addr())
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v| v.is_loopback()),
    }
}

/// The SHA-256 of a token, as the policy stores it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses 64 hex digits into a SHA-256 digest.
pub fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(remote: &str, local: &str) -> ConnInfo {
        ConnInfo::new(Transport::Tcp)
            .with_remote_addr(Some(remote.parse().unwrap()))
            .with_local_addr(Some(local.parse().unwrap()))
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn tokens_only_over_tls_loopback_or_unix() {
        let h = headers("Bearer s3cret");
        let lan = tcp("10.1.2.3:5000", "10.1.2.1:7443");
        assert_eq!(bearer_token(&h, Some(&lan)), Err(TokenError::Plaintext));
        // A non-loopback local address reached from loopback is still a
        // network listener: refused.
        let mixed = tcp("127.0.0.1:5000", "10.1.2.1:7443");
        assert_eq!(bearer_token(&h, Some(&mixed)), Err(TokenError::Plaintext));
        assert_eq!(bearer_token(&h, None), Err(TokenError::Plaintext));
        // (Accepted over TLS on a non-loopback address: tests/security.rs,
        // with a real TLS connection.)
        let lo = tcp("127.0.0.1:5000", "127.0.0.1:7443");
        assert_eq!(bearer_token(&h, Some(&lo)), Ok(Some("s3cret".into())));
        let lo6 = tcp("[::1]:5000", "[::1]:7443");
        assert_eq!(bearer_token(&h, Some(&lo6)), Ok(Some("s3cret".into())));
        let unix = ConnInfo::new(Transport::Unix);
        assert_eq!(bearer_token(&h, Some(&unix)), Ok(Some("s3cret".into())));
        // No token: nothing to refuse, whatever the transport.
        assert_eq!(bearer_token(&HeaderMap::new(), Some(&lan)), Ok(None));
    }

    #[test]
    fn malformed_authorization() {
        let lo = tcp("127.0.0.1:5000", "127.0.0.1:7443");
        for v in ["s3cret", "Basic abc", "Bearer ", "Bearer"] {
            assert_eq!(
                bearer_token(&headers(v), Some(&lo)),
                Err(TokenError::Malformed),
                "{v:?}"
            );
        }
        assert_eq!(
            bearer_token(&headers("bearer  tok "), Some(&lo)),
            Ok(Some("tok".into()))
        );
    }

    #[test]
    fn sha256_hex_round_trip() {
        let d = token_sha256("abc");
        assert_eq!(
            hex(&d),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_sha256_hex(&hex(&d)), Some(d));
        assert_eq!(parse_sha256_hex("xyz"), None);
        assert_eq!(parse_sha256_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn uri_san_wins_over_dns_san() {
        use rcgen::{CertificateParams, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["a.example.org".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/agent/x".try_into().unwrap(),
        ));
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            cert_name(cert.der()),
            Some(CertName::Uri("spiffe://example.org/agent/x".into()))
        );
        let p =
            CertificateParams::new(vec!["b.example.org".into(), "c.example.org".into()]).unwrap();
        let cert = p.self_signed(&key).unwrap();
        assert_eq!(
            cert_name(cert.der()),
            Some(CertName::Dns("b.example.org".into()))
        );
        let cert = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(cert_name(cert.der()), None);
        assert_eq!(cert_name(b"not a certificate"), None);
    }
}
