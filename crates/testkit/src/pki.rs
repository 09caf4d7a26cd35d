//! Certificates for tests: a CA, a server certificate for `localhost` and
//! client certificates, written as PEM files, and ready rustls configs.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls;

/// A CA, a server certificate for `localhost` and a client certificate (DNS
/// SAN `agent`), as PEM files in a directory the caller owns.
#[derive(Debug)]
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server's certificate (`localhost`), signed by the CA.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A client certificate (DNS SAN `agent`), signed by the CA.
    pub client_cert: PathBuf,
    /// The client certificate's private key.
    pub client_key: PathBuf,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// A subject alternative name of a generated client certificate.
#[derive(Debug, Clone)]
pub enum San {
    /// A DNS name.
    Dns(String),
    /// A URI, such as `spiffe://example.org/agent/inventory`.
    Uri(String),
}

impl Pki {
    /// Generates the CA and the two leaf certificates into `dir`.
    pub fn new(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Subject names of their own (OpenSSL, as in redis-server, takes a
        // leaf whose subject is its issuer's for a self-signed certificate).
        ca_params.distinguished_name = dn("backchannel test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, data: &str| {
            let p = dir.join(name);
            std::fs::write(&p, data).expect("write PEM");
            p
        };
        let ca = write("ca.pem", &ca_cert.pem());
        let mut pki = Pki {
            ca,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            dir: dir.to_path_buf(),
            issuer,
        };
        (pki.server_cert, pki.server_key) = pki.leaf("server", &[San::Dns("localhost".into())]);
        (pki.client_cert, pki.client_key) = pki.leaf("client", &[San::Dns("agent".into())]);
        pki
    }

    /// Another certificate signed by the CA, with `sans`, written as
    /// `<name>.pem` and `<name>.key`: (certificate path, key path).
    pub fn leaf(&self, name: &str, sans: &[San]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = dn(name);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s {
                San::Dns(d) => SanType::DnsName(d.clone().try_into().expect("DNS name")),
                San::Uri(u) => SanType::URI(u.clone().try_into().expect("URI")),
            })
            .collect();
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let c = self.dir.join(format!("{name}.pem"));
        let k = self.dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).expect("write PEM");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }
}

fn dn(common_name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, common_name);
    dn
}

/// A self-signed certificate for `localhost`: (server config with ALPN `h2`,
/// client config trusting it, the certificate as PEM).
pub fn self_signed() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let pem = cert.cert.pem();
    let cert_der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .expect("server config");
    // Plain gRPC TLS clients insist on ALPN h2; backchannel clients need none.
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client), pem)
}

/// In-memory rustls configs from one CA: a server certificate for
/// `localhost`, a client that presents a certificate (DNS SAN `client`) and
/// one that presents none.
#[derive(Debug)]
pub struct MemoryPki {
    /// The server's config.
    pub server: Arc<rustls::ServerConfig>,
    /// A client config that presents `client_cert`.
    pub client: Arc<rustls::ClientConfig>,
    /// A client config that presents no certificate.
    pub anonymous_client: Arc<rustls::ClientConfig>,
    /// The client's certificate.
    pub client_cert: CertificateDer<'static>,
}

/// A [`MemoryPki`]. `require_client_cert`: the server refuses clients
/// without one; otherwise it asks for one and accepts clients that send none.
pub fn in_memory(require_client_cert: bool) -> MemoryPki {
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
    MemoryPki {
        server: Arc::new(server),
        client: Arc::new(client),
        anonymous_client: Arc::new(anonymous_client),
        client_cert,
    }
}
