//! The hub-to-hub hop: a routed call forwarded by the hub that received it
//! (the first hub) to the hub holding the peer.
//!
//! The first hub keeps `backchannel-peer`, sets `backchannel-caller` to the
//! identity it checked against its policy, and adds `backchannel-hop` (its
//! hub ID) and, with a cluster token, `backchannel-hop-token`. The second
//! hub honours the hop only from a hub of its cluster (the token, compared
//! by SHA-256 in constant time, only over TLS or loopback; or a client
//! certificate identity listed with `--cluster-hub-identity`), routes it to
//! its own peers only (a hop is never routed further, so there are no
//! loops), and refuses it otherwise: a caller cannot forge a hop.

use std::{collections::HashMap, path::Path, sync::Mutex, time::Duration};

use http::{HeaderMap, HeaderValue};
use listenmux::ConnInfo;
use subtle::ConstantTimeEq;
use tonic::{
    transport::{Channel, Endpoint},
    Status,
};

use crate::hub::{
    identity::{conn_cert_name, token_sha256, token_transport_ok},
    routing::CALLER_HEADER,
};

/// Marks a hop; its value is the first hub's ID.
pub const HOP_HEADER: &str = "backchannel-hop";
/// The cluster token on a hop.
pub const HOP_TOKEN_HEADER: &str = "backchannel-hop-token";

/// How hubs of the cluster recognise each other.
pub struct HopAuth {
    /// The token sent on hops (kept to send it; never logged).
    token: Option<HeaderValue>,
    /// Its SHA-256, what incoming hops are compared with.
    token_hash: Option<[u8; 32]>,
    identities: Vec<String>,
}

impl std::fmt::Debug for HopAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopAuth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("identities", &self.identities)
            .finish()
    }
}

impl HopAuth {
    /// From a token file (one line; surrounding whitespace ignored) and
    /// hub certificate identities. At least one of them is needed: a hop
    /// must never be honoured on the caller's word.
    pub fn load(token_file: Option<&Path>, identities: Vec<String>) -> anyhow::Result<HopAuth> {
        let token = match token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("--cluster-token-file {}: {e}", p.display()))?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    anyhow::bail!(
                        "--cluster-token-file {}: the token must be at least 16 characters",
                        p.display()
                    );
                }
                Some(t)
            }
            None => None,
        };
        if token.is_none() && identities.is_empty() {
            anyhow::bail!(
                "a clustered hub needs --cluster-token-file or --cluster-hub-identity: hops between hubs must be authenticated"
            );
        }
        Self::new(token.as_deref(), identities)
    }

    /// From a token and identities directly.
    ///
    /// ```
    /// let a = backchannel_sidecar::hub::cluster::hop::HopAuth::new(Some("0123456789abcdef"), vec![]).unwrap();
    /// assert!(format!("{a:?}").contains("redacted"));
    /// ```
    pub fn new(token: Option<&str>, identities: Vec<String>) -> anyhow::Result<HopAuth> {
        let header = token
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| anyhow::anyhow!("the cluster token must be printable ASCII"))?
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        Ok(HopAuth {
            token: header,
            token_hash: token.map(token_sha256),
            identities,
        })
    }

    /// Marks an outgoing hop from hub `hub_id`.
    pub fn stamp(&self, headers: &mut HeaderMap, hub_id: &str) {
        if let Ok(v) = HeaderValue::from_str(hub_id) {
            headers.insert(HOP_HEADER, v);
        }
        match &self.token {
            Some(t) => {
                headers.insert(HOP_TOKEN_HEADER, t.clone());
            }
            None => {
                headers.remove(HOP_TOKEN_HEADER);
            }
        }
    }

    /// Marks an outgoing tunnel hop from hub `hub_id`: the same fields as
    /// [`stamp`](Self::stamp), as tunnel metadata.
    pub fn stamp_tunnel(
        &self,
        request: backchannel::TunnelRequest,
        hub_id: &str,
    ) -> backchannel::TunnelRequest {
        let request = request.with_metadata(HOP_HEADER, hub_id);
        match self.token.as_ref().and_then(|t| t.to_str().ok()) {
            Some(t) => request.with_metadata(HOP_TOKEN_HEADER, t),
            None => request,
        }
    }

    /// See [`super::Cluster::check_hop`].
    pub fn check(
        &self,
        info: Option<&ConnInfo>,
        headers: &HeaderMap,
    ) -> Option<Result<String, Status>> {
        headers.get(HOP_HEADER)?;
        let refuse = |why: &str| {
            Some(Err(Status::unauthenticated(format!(
                "{HOP_HEADER} is only accepted from the hubs of this cluster: {why}"
            ))))
        };
        let by_token = match (headers.get(HOP_TOKEN_HEADER), &self.token_hash) {
            (Some(v), Some(want)) => {
                if !token_transport_ok(info) {
                    return refuse("a cluster token over plaintext from a non-loopback address");
                }
                let got = token_sha256(v.to_str().unwrap_or_default());
                bool::from(got.ct_eq(want))
            }
            _ => false,
        };
        let by_cert = !by_token
            && conn_cert_name(info)
                .is_some_and(|n| self.identities.iter().any(|i| *i == n.to_string()));
        if !by_token && !by_cert {
            return refuse("no valid cluster credential");
        }
        match headers.get(CALLER_HEADER).and_then(|v| v.to_str().ok()) {
            Some(c) if !c.is_empty() => Some(Ok(c.to_string())),
            _ => Some(Err(Status::invalid_argument(format!(
                "a hop must carry {CALLER_HEADER}"
            )))),
        }
    }
}

/// How long connecting to another hub may take.
const HOP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// One lazily connected channel per hub address (over TLS when the
/// cluster has a CA for its hubs).
#[derive(Default)]
pub struct Channels {
    by_addr: Mutex<HashMap<String, Channel>>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Channels {
    /// Hops over TLS, verifying the other hubs with `ca`; `client` is this
    /// hub's certificate and key (its identity on the other hubs).
    pub fn tls(ca: &Path, client: Option<(&Path, &Path)>) -> anyhow::Result<Channels> {
        let cfg = crate::tls::client_config(ca, client)?;
        Ok(Channels {
            by_addr: Mutex::default(),
            tls: Some(tokio_rustls::TlsConnector::from(cfg)),
        })
    }
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

impl Channels {
    /// What opens raw connections to the other hubs (tunnels' hops).
    pub fn dialer(&self) -> Dialer {
        Dialer {
            tls: self.tls.clone(),
        }
    }
}

/// Opens raw connections to the other hubs, over TLS when the cluster has a
/// CA for its hubs.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Dialer {
    /// A raw connection to the hub at `addr` (TCP, then TLS when the
    /// cluster has a CA for its hubs), within `timeout`: a tunnel's hop.
    pub async fn dial(&self, addr: &str, timeout: Duration) -> std::io::Result<listenmux::BoxIo> {
        let tls = self.tls.clone();
        let connect = async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls else {
                return Ok(Box::new(tcp) as listenmux::BoxIo);
            };
            let io = tls.connect(server_name(addr)?, tcp).await?;
            Ok(Box::new(io) as listenmux::BoxIo)
        };
        tokio::time::timeout(timeout, connect).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to hub {addr} timed out"),
            )
        })?
    }
}

impl Channels {
    /// The channel to the hub at `addr`.
    pub fn get(&self, addr: &str) -> Channel {
        let mut m = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(addr) {
            return c.clone();
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap_or_else(|_| Endpoint::from_static("http://invalid.invalid:1"))
            .connect_timeout(HOP_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_stream_window_size(backchannel::H2_STREAM_WINDOW)
            .initial_connection_window_size(backchannel::H2_CONNECTION_WINDOW);
        let c = match &self.tls {
            None => ep.connect_lazy(),
            Some(_) => {
                let (dialer, addr) = (self.dialer(), addr.to_string());
                ep.connect_with_connector_lazy(tower::service_fn(move |_| {
                    let (dialer, addr) = (dialer.clone(), addr.clone());
                    async move {
                        let io = dialer.dial(&addr, HOP_CONNECT_TIMEOUT).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                    }
                }))
            }
        };
        if m.len() > 1024 {
            m.clear();
        }
        m.insert(addr.to_string(), c.clone());
        c
    }
}

/// The TLS name of the hub at `addr`: its host part.
fn server_name(addr: &str) -> std::io::Result<rustls_pki_types::ServerName<'static>> {
    let host = crate::addr::Target::parse_listen(addr)
        .ok()
        .and_then(|t| t.host().map(str::to_string))
        .unwrap_or_default();
    rustls_pki_types::ServerName::try_from(host)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}
