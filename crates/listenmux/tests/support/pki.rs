//! An in-memory PKI for tests: a CA, a server certificate for `localhost`
//! and a client certificate, as rustls configs.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls;

pub struct Pki {
    pub server: Arc<rustls::ServerConfig>,
    /// Presents `client_cert`.
    pub client: Arc<rustls::ClientConfig>,
    /// Presents no certificate.
    pub anonymous_client: Arc<rustls::ClientConfig>,
    pub client_cert: CertificateDer<'static>,
}

/// `require_client_cert`: the server refuses clients without one; otherwise
/// it asks for one and accepts clients that send none.
pub fn pki(require_client_cert: bool) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("client");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone());
    let verifier = if require_client_cert {
        verifier.build().unwrap()
    } else {
        verifier.allow_unauthenticated().build().unwrap()
    };
    let server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert], server_key)
        .unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![client_cert.clone()], client_key)
        .unwrap();
    let anonymous_client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pki {
        server: Arc::new(server),
        client: Arc::new(client),
        anonymous_client: Arc::new(anonymous_client),
        client_cert,
    }
}
