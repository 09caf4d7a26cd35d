//! TLS settings of the hub (server) and the agent (client), from PEM files.

use std::{path::Path, sync::Arc};

use anyhow::{anyhow, Context};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading the private key in {}", path.display()))
}

fn roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .with_context(|| format!("adding a CA certificate from {}", path.display()))?;
    }
    Ok(roots)
}

/// The hub's TLS config: its certificate chain and key, and (with
/// `client_ca`) required client certificates signed by that CA.
pub fn server_config(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_with(cert, key_path, client_ca, false)
}

/// Like [`server_config`]; with `optional_client_cert` a client may also
/// connect without a certificate (the hub's access policy then decides,
/// and callers may authenticate with a bearer token instead).
pub fn server_config_with(
    cert: &Path,
    key_path: &Path,
    client_ca: Option<&Path>,
    optional_client_cert: bool,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    provider();
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut b = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots(ca)?));
            if optional_client_cert {
                b = b.allow_unauthenticated();
            }
            let verifier = b
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs(cert)?, key(key_path)?)
        .context("using the hub's certificate and key")?;
    // gRPC callers negotiate h2 by ALPN; agents send no ALPN at all.
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The agent's TLS config: trust `ca`, optionally present a client
/// certificate.
pub fn client_config(
    ca: &Path,
    cert_key: Option<(&Path, &Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    provider();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots(ca)?);
    let cfg = match cert_key {
        None => builder.with_no_client_auth(),
        Some((c, k)) => builder
            .with_client_auth_cert(certs(c)?, key(k)?)
            .context("using the agent's client certificate")?,
    };
    Ok(Arc::new(cfg))
}
