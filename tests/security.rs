//! The hub's access policy end to end: identities from client certificates
//! (URI and DNS SANs, real TLS with rcgen certificates) and bearer tokens,
//! the deny matrix, name ownership and handover, the caller identity the
//! private service sees, SIGHUP reload of the real binary, the safe default.

mod common;

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use backchannel_demo::pb::testing::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoRequest, EchoResponse,
};
use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{
        identity::{hex, token_sha256},
        Hub, HubConfig,
    },
    pb::hub::{
        peers_client::PeersClient, registration_client::RegistrationClient, AnnounceRequest,
        ListPeersRequest, WatchPeersRequest,
    },
};
use futures::Stream;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code, Request, Response, Status, Streaming,
};

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- PKI

/// A CA, the hub's certificate for `localhost`, and client certificates
/// with URI and DNS SANs, as PEM files.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let w = |name: &str, data: &str| {
            let p = path.join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let leaf = |file: &str, dns: &[&str], uri: Option<&str>| {
            let key = KeyPair::generate().unwrap();
            let mut p =
                CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            if let Some(u) = uri {
                p.subject_alt_names
                    .insert(0, SanType::URI(u.try_into().unwrap()));
            }
            let cert = p.signed_by(&key, &issuer).unwrap();
            (
                w(&format!("{file}.pem"), &cert.pem()),
                w(&format!("{file}.key"), &key.serialize_pem()),
            )
        };
        let server = leaf("server", &["localhost"], None);
        // The URI SAN names the holder even when DNS SANs come along.
        leaf(
            "inventory",
            &["inventory.example.org"],
            Some("spiffe://example.org/agent/inventory"),
        );
        leaf("backup", &[], Some("spiffe://example.org/agent/backup"));
        leaf("rogue", &[], Some("spiffe://example.org/agent/rogue"));
        leaf("ops", &["ops.example.org", "other.example.org"], None);
        leaf("stranger", &["stranger.example.org"], None);
        Pki {
            ca: w("ca.pem", &ca_cert.pem()),
            server,
            dir: path,
            _dir: dir,
        }
    }

    fn cert(&self, who: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{who}.pem")),
            self.dir.join(format!("{who}.key")),
        )
    }
}

fn sha(token: &str) -> String {
    hex(&token_sha256(token))
}

fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("policy.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn matrix_policy() -> String {
    format!(
        r#"
[identity.billing]
token_sha256 = "{billing}"
[identity.batch]
token_sha256 = "{batch}"
[identity.inventory-agent]
cert_uri = "spiffe://example.org/agent/inventory"
[identity.backup-agent]
cert_uri = "spiffe://example.org/agent/backup"
[identity.rogue]
cert_uri = "spiffe://example.org/agent/rogue"
[identity.ops]
cert_dns = "ops.example.org"

[[agents]]
identity = "inventory-agent"
names = ["inventory", "inventory-*"]
[[agents]]
identity = "backup-agent"
names = ["inventory"]
[[agents]]
identity = "rogue"
names = ["rogue-*"]
labels = ["team=*"]

[[callers]]
identity = "billing"
peers = ["inventory"]
methods = ["/backchannel.testing.v1.Echo/Unary", "/backchannel.testing.v1.Echo/Bidi"]

[[callers]]
identity = "ops"
peers = ["label:env=prod"]

[[callers]]
identity = "batch"
peers = ["inventory"]
max_concurrent = 1

[[admins]]
identity = "ops"
"#,
        billing = sha("billing-token"),
        batch = sha("batch-token"),
    )
}

// ---------------------------------------------------------------- the private service

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Echo that reports what the hub told it: `server` is
/// "<name> caller=<backchannel-caller> auth=<saw authorization>".
#[derive(Clone)]
struct Svc {
    name: String,
}

impl Svc {
    fn who<T>(&self, r: &Request<T>) -> String {
        let caller = r
            .metadata()
            .get("backchannel-caller")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let auth = r.metadata().get("authorization").is_some();
        format!("{} caller={caller} auth={auth}", self.name)
    }
}

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, r: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let server = self.who(&r);
        Ok(Response::new(EchoResponse {
            message: r.into_inner().message,
            server,
        }))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    /// "hold": one message, then the stream stays open until cancelled.
    async fn server_stream(
        &self,
        r: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let server = self.who(&r);
        let req = r.into_inner();
        let hold = req.message == "hold";
        let first = futures::stream::iter((0..req.count.max(1)).map(move |i| {
            Ok(EchoResponse {
                message: format!("{}-{i}", req.message),
                server: server.clone(),
            })
        }));
        if hold {
            use futures::StreamExt;
            return Ok(Response::new(Box::pin(
                first.chain(futures::stream::pending()),
            )));
        }
        Ok(Response::new(Box::pin(first)))
    }

    async fn client_stream(
        &self,
        r: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let server = self.who(&r);
        let mut s = r.into_inner();
        let mut all = String::new();
        while let Some(m) = s.message().await? {
            all.push_str(&m.message);
        }
        Ok(Response::new(EchoResponse {
            message: all,
            server,
        }))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        r: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let server = self.who(&r);
        let s = r.into_inner();
        Ok(Response::new(Box::pin(futures::stream::unfold(
            (s, server),
            |(mut s, server)| async move {
                match s.message().await {
                    Ok(Some(m)) => Some((
                        Ok(EchoResponse {
                            message: m.message,
                            server: server.clone(),
                        }),
                        (s, server),
                    )),
                    _ => None,
                }
            },
        ))))
    }
}

/// The private service on a loopback port, stopped on drop.
struct Private {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Private {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn private(name: &str) -> Private {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let svc = Svc { name: name.into() };
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    Private { addr, task }
}

// ---------------------------------------------------------------- fixtures

async fn tls_hub(pki: &Pki, policy: &Path) -> Hub {
    Hub::start(HubConfig {
        tls_cert: Some(pki.server.0.clone()),
        tls_key: Some(pki.server.1.clone()),
        client_ca: Some(pki.ca.clone()),
        policy: Some(policy.to_path_buf()),
        metrics: Some("127.0.0.1:0".into()),
        grace: Duration::from_secs(2),
        ..HubConfig::default()
    })
    .await
    .expect("hub starts")
}

fn hub_host(hub: &Hub) -> String {
    format!("localhost:{}", hub.addr.unwrap().port())
}

fn tls_agent(hub: &Hub, pki: &Pki, who: &str, name: &str, env: &str, svc: &Private) -> Agent {
    let mut cfg = AgentConfig::new(hub_host(hub), name, svc.addr.clone());
    cfg.labels = vec![("env".into(), env.into())];
    cfg.tls_ca = Some(pki.ca.clone());
    let (c, k) = pki.cert(who);
    cfg.tls_cert = Some(c);
    cfg.tls_key = Some(k);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    Agent::start(cfg).unwrap()
}

/// A TLS gRPC channel to the hub, with the client certificate of `who`.
async fn tls_channel(hub: &Hub, pki: &Pki, who: Option<&str>) -> Channel {
    let read = |p: &Path| std::fs::read(p).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&pki.ca)))
        .domain_name("localhost");
    if let Some(w) = who {
        let (c, k) = pki.cert(w);
        tls = tls.identity(Identity::from_pem(read(&c), read(&k)));
    }
    Endpoint::from_shared(format!("https://{}", hub_host(hub)))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A raw backchannel session over TLS with `who`'s certificate, serving
/// Echo named `svc_name` on its backchannel.
async fn raw_session(hub: &Hub, pki: &Pki, who: &str, svc_name: &str) -> backchannel::Client {
    let (c, k) = pki.cert(who);
    let cfg = backchannel_sidecar::tls::client_config(&pki.ca, Some((&c, &k))).unwrap();
    let routes = tonic::service::Routes::new(EchoServer::new(Svc {
        name: svc_name.into(),
    }));
    backchannel::ClientBuilder::new()
        .tls(
            tokio_rustls::TlsConnector::from(cfg),
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
        )
        .connect_tcp(&hub_host(hub), routes)
        .await
        .unwrap()
}

async fn announce(
    c: &backchannel::Client,
    name: &str,
) -> Result<backchannel_sidecar::pb::hub::AnnounceResponse, Status> {
    let mut rc = RegistrationClient::new(c.channel());
    rc.announce(AnnounceRequest {
        name: name.into(),
        labels: Default::default(),
    })
    .await
    .map(|r| r.into_inner())
}

fn req<T>(peer: &str, token: Option<&str>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().unwrap());
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn echo(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
    }
}

async fn unary(ch: &Channel, peer: &str, token: Option<&str>) -> Result<EchoResponse, Status> {
    EchoClient::new(ch.clone())
        .unary(req(peer, token, echo("hi", 0)))
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Err(s) if s.code() == code => s,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait_for_name(hub: &Hub, name: &str) -> u64 {
    hub.wait_for_name(name, T)
        .await
        .unwrap_or_else(|| panic!("'{name}' was not announced"))
        .get()
}

// ---------------------------------------------------------------- the deny matrix

#[tokio::test]
async fn the_deny_matrix() {
    let pki = Pki::new();
    let policy = write_policy(&pki.dir, &matrix_policy());
    let hub = tls_hub(&pki, &policy).await;
    let svc_test = private("private-test").await;
    let svc_prod = private("private-prod").await;
    let a1 = tls_agent(&hub, &pki, "inventory", "inventory", "test", &svc_test);
    let a2 = tls_agent(&hub, &pki, "inventory", "inventory-eu", "prod", &svc_prod);
    let inv = wait_for_name(&hub, "inventory").await;
    let eu = wait_for_name(&hub, "inventory-eu").await;

    let anon = tls_channel(&hub, &pki, None).await;
    let ops = tls_channel(&hub, &pki, Some("ops")).await;
    let stranger = tls_channel(&hub, &pki, Some("stranger")).await;

    // No credentials; a wrong token; a CA-signed certificate the policy
    // does not know.
    assert_code(
        unary(&anon, "inventory", None).await,
        Code::Unauthenticated,
        "no creds",
    );
    assert_code(
        unary(&anon, "inventory", Some("billing-token-x")).await,
        Code::Unauthenticated,
        "wrong token",
    );
    let s = assert_code(
        unary(&stranger, "inventory", None).await,
        Code::Unauthenticated,
        "unknown certificate",
    );
    assert!(s.message().contains("stranger.example.org"), "{s:?}");

    // The right token to an allowed peer and method. The service learns the
    // caller from the hub: a forged backchannel-caller is replaced, and the
    // caller's token is not passed on.
    let mut r = req("inventory", Some("billing-token"), echo("ok", 0));
    r.metadata_mut()
        .insert("backchannel-caller", "ops".parse().unwrap());
    let got = EchoClient::new(anon.clone())
        .unary(r)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.server, "private-test caller=billing auth=false");
    // By numeric ID too.
    let got = unary(&anon, &inv.to_string(), Some("billing-token")).await;
    assert_eq!(
        got.unwrap().server,
        "private-test caller=billing auth=false"
    );

    // The right token to a forbidden method, a forbidden peer, an unknown
    // peer, by name and by ID: PERMISSION_DENIED, and an unknown peer reads
    // exactly like a forbidden one.
    let forbidden_method = EchoClient::new(anon.clone())
        .server_stream(req("inventory", Some("billing-token"), echo("s", 1)))
        .await;
    assert_code(forbidden_method, Code::PermissionDenied, "forbidden method");
    let forbidden = assert_code(
        unary(&anon, "inventory-eu", Some("billing-token")).await,
        Code::PermissionDenied,
        "forbidden peer",
    );
    let unknown = assert_code(
        unary(&anon, "no-such-peer", Some("billing-token")).await,
        Code::PermissionDenied,
        "unknown peer",
    );
    assert_eq!(
        forbidden.message().replace("'inventory-eu'", "'X'"),
        unknown.message().replace("'no-such-peer'", "'X'")
    );
    assert_eq!(forbidden.metadata().len(), unknown.metadata().len());
    let forbidden_id = assert_code(
        unary(&anon, &eu.to_string(), Some("billing-token")).await,
        Code::PermissionDenied,
        "forbidden peer by id",
    );
    let unknown_id = assert_code(
        unary(&anon, "987654", Some("billing-token")).await,
        Code::PermissionDenied,
        "unknown peer by id",
    );
    assert_eq!(
        forbidden_id.message().replace(&format!("'{eu}'"), "'X'"),
        unknown_id.message().replace("'987654'", "'X'")
    );

    // A DNS-SAN identity selecting peers by label: env=prod only.
    let got = EchoClient::new(ops.clone())
        .server_stream(req("inventory-eu", None, echo("s", 2)))
        .await
        .unwrap()
        .into_inner();
    let msgs: Vec<_> = futures::StreamExt::collect::<Vec<_>>(got).await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0].as_ref().unwrap().server,
        "private-prod caller=ops auth=false"
    );
    assert_code(
        unary(&ops, "inventory", None).await,
        Code::PermissionDenied,
        "env=test",
    );

    // The admin API: ops is an admin, billing is not, nobody is nothing.
    let peers = PeersClient::new(ops.clone())
        .list(ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .peers;
    let p = peers.iter().find(|p| p.name == "inventory").unwrap();
    assert_eq!(p.identity, "inventory-agent");
    assert!(p.generation > 0, "{p:?}");
    let mut list = Request::new(ListPeersRequest::default());
    list.metadata_mut()
        .insert("authorization", "Bearer billing-token".parse().unwrap());
    assert_code(
        PeersClient::new(anon.clone()).list(list).await,
        Code::PermissionDenied,
        "non-admin List",
    );
    let mut watch = Request::new(WatchPeersRequest::default());
    watch
        .metadata_mut()
        .insert("authorization", "Bearer billing-token".parse().unwrap());
    assert_code(
        PeersClient::new(anon.clone())
            .watch(watch)
            .await
            .map(|_| ()),
        Code::PermissionDenied,
        "non-admin Watch",
    );
    assert_code(
        PeersClient::new(anon.clone())
            .list(ListPeersRequest::default())
            .await,
        Code::Unauthenticated,
        "anonymous List",
    );
    // Health stays open.
    let health = tonic_health::pb::health_client::HealthClient::new(anon.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(health.into_inner().status, 1); // SERVING
    let mut w = PeersClient::new(ops.clone())
        .watch(WatchPeersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = w.message().await.unwrap().unwrap();
    assert!(first.peer.unwrap().generation > 0);

    // max_concurrent = 1: a second call while one is in flight is
    // RESOURCE_EXHAUSTED; once the first ends the slot is free again.
    let mut held = EchoClient::new(anon.clone())
        .server_stream(req("inventory", Some("batch-token"), echo("hold", 1)))
        .await
        .unwrap()
        .into_inner();
    assert!(held.message().await.unwrap().is_some());
    assert_code(
        unary(&anon, "inventory", Some("batch-token")).await,
        Code::ResourceExhausted,
        "over max_concurrent",
    );
    // Another identity is not limited by batch's calls.
    unary(&anon, "inventory", Some("billing-token"))
        .await
        .unwrap();
    drop(held);
    let start = Instant::now();
    loop {
        match unary(&anon, "inventory", Some("batch-token")).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && start.elapsed() < T => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(s) => panic!("slot not released: {s:?}"),
        }
    }

    let text = http_get(&hub.metrics_addr.unwrap().to_string(), "/metrics").await;
    for reason in [
        "unauthenticated",
        "permission_denied",
        "not_admin",
        "max_concurrent",
    ] {
        assert!(
            text.contains(&format!(
                "backchannel_hub_denied_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {text}"
        );
    }
    a1.stop().await;
    a2.stop().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------- names

#[tokio::test]
async fn names_belong_to_identities() {
    let pki = Pki::new();
    let policy = write_policy(&pki.dir, &matrix_policy());
    let hub = tls_hub(&pki, &policy).await;
    let anon = tls_channel(&hub, &pki, None).await;

    // An identity that may not announce the name is refused, and the name
    // stays unroutable.
    let rogue = raw_session(&hub, &pki, "rogue", "rogue-svc").await;
    let s = assert_code(
        announce(&rogue, "inventory").await,
        Code::PermissionDenied,
        "rogue announce",
    );
    assert!(s.message().contains("may not announce"), "{s:?}");
    assert_eq!(hub.state().peer_named("inventory"), None);
    assert_code(
        unary(&anon, "inventory", Some("billing-token")).await,
        Code::PermissionDenied,
        "unroutable name",
    );
    // Its own names are fine, but not with a label it may not announce
    // (which would let it attract calls meant for `label:env=prod` peers).
    let mut rc = RegistrationClient::new(rogue.channel());
    let with_label = |k: &str, v: &str| AnnounceRequest {
        name: "rogue-1".into(),
        labels: [(k.to_string(), v.to_string())].into(),
    };
    assert_code(
        rc.announce(with_label("env", "prod")).await,
        Code::PermissionDenied,
        "forbidden label",
    );
    rc.announce(with_label("team", "red")).await.unwrap();

    // The owner announces.
    let a = raw_session(&hub, &pki, "inventory", "svc-a").await;
    let ra = announce(&a, "inventory").await.unwrap();
    assert_eq!(ra.replaced_peer_id, 0);
    let g1 = ra.generation;
    assert!(g1 > 0);
    let got = unary(&anon, "inventory", Some("billing-token"))
        .await
        .unwrap();
    assert!(got.server.starts_with("svc-a "), "{got:?}");

    // Another identity, allowed to announce the name and newer, cannot
    // steal it: the owner keeps it.
    let backup = raw_session(&hub, &pki, "backup", "svc-backup").await;
    let s = assert_code(
        announce(&backup, "inventory").await,
        Code::PermissionDenied,
        "steal",
    );
    assert!(s.message().contains("another identity"), "{s:?}");
    assert_eq!(
        hub.state().peer_named("inventory").map(|p| p.get()),
        Some(ra.peer_id)
    );
    assert!(!a.is_closed());
    let got = unary(&anon, "inventory", Some("billing-token"))
        .await
        .unwrap();
    assert!(got.server.starts_with("svc-a "), "{got:?}");

    // The same identity reconnecting takes the name over: the generation
    // grows, new calls go to the new session, and none to the old one, not
    // even by its peer ID.
    let b = raw_session(&hub, &pki, "inventory", "svc-b").await;
    let rb = announce(&b, "inventory").await.unwrap();
    assert_eq!(rb.replaced_peer_id, ra.peer_id);
    assert!(rb.generation > g1, "{g1} -> {}", rb.generation);
    let listed = hub
        .state()
        .list()
        .into_iter()
        .find(|p| p.name == "inventory")
        .unwrap();
    assert_eq!((listed.id, listed.generation), (rb.peer_id, rb.generation));
    let got = unary(&anon, "inventory", Some("billing-token"))
        .await
        .unwrap();
    assert!(got.server.starts_with("svc-b "), "{got:?}");
    assert_code(
        unary(&anon, &ra.peer_id.to_string(), Some("billing-token")).await,
        Code::PermissionDenied,
        "superseded session by id",
    );
    // A late announce from the superseded session does not take it back.
    assert!(announce(&a, "inventory").await.is_err());
    assert_eq!(
        hub.state().peer_named("inventory").map(|p| p.get()),
        Some(rb.peer_id)
    );
    hub.shutdown().await;
}

/// On an open hub too, a superseded session gets no new call, not even by
/// its peer ID, from the moment the new session has the name.
#[tokio::test]
async fn no_call_is_routed_to_a_superseded_session() {
    let hub = Hub::start(HubConfig::default()).await.unwrap();
    let addr = hub.addr.unwrap().to_string();
    let session = |name: &'static str| {
        let addr = addr.clone();
        async move {
            let routes = tonic::service::Routes::new(EchoServer::new(Svc { name: name.into() }));
            backchannel::ClientBuilder::new()
                .connect_tcp(&addr, routes)
                .await
                .unwrap()
        }
    };
    let a = session("svc-a").await;
    let ra = announce(&a, "svc").await.unwrap();
    let ch = common::plain_channel(&addr).await;
    let got = unary(&ch, &ra.peer_id.to_string(), None).await.unwrap();
    assert_eq!(got.server, "svc-a caller=anonymous auth=false");
    let b = session("svc-b").await;
    let rb = announce(&b, "svc").await.unwrap();
    assert_eq!(rb.replaced_peer_id, ra.peer_id);
    assert!(rb.generation > ra.generation);
    // Refused whether the superseded session is still closing or gone.
    assert_code(
        unary(&ch, &ra.peer_id.to_string(), None).await,
        Code::NotFound,
        "superseded by id",
    );
    let got = unary(&ch, "svc", None).await.unwrap();
    assert!(got.server.starts_with("svc-b "), "{got:?}");
    hub.shutdown().await;
}

/// Under a policy a session must announce within `--announce-timeout`, or
/// the hub closes it; one that announced stays.
#[tokio::test]
async fn sessions_that_never_announce_are_closed_under_a_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            "[identity.a]\ntoken_sha256 = \"{}\"\n[[agents]]\nidentity = \"a\"\nnames = [\"svc\"]\n",
            sha("agent-secret")
        ),
    );
    let hub = Hub::start(HubConfig {
        policy: Some(policy),
        announce_timeout: Some(Duration::from_millis(300)),
        metrics: Some("127.0.0.1:0".into()),
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let addr = hub.addr.unwrap().to_string();
    let connect =
        || backchannel::ClientBuilder::new().connect_tcp(&addr, tonic::service::Routes::default());
    let silent = connect().await.unwrap();
    let named = connect().await.unwrap();
    let mut rc = RegistrationClient::new(named.channel());
    let mut r = Request::new(AnnounceRequest {
        name: "svc".into(),
        labels: Default::default(),
    });
    r.metadata_mut()
        .insert("authorization", "Bearer agent-secret".parse().unwrap());
    rc.announce(r).await.unwrap();
    tokio::time::timeout(T, silent.closed())
        .await
        .expect("the silent session is closed");
    assert!(!named.is_closed(), "the announced session stays");
    assert_eq!(hub.state().list().len(), 1);
    let text = http_get(&hub.metrics_addr.unwrap().to_string(), "/metrics").await;
    assert!(
        text.contains("backchannel_hub_denied_total{reason=\"announce_timeout\"} 1"),
        "{text}"
    );
    hub.shutdown().await;
}

// ---------------------------------------------------------------- tokens

/// An agent with `--token-file` and a Python grpcio caller with a bearer
/// token, through a plaintext hub on loopback.
#[tokio::test]
async fn token_agent_and_python_caller() {
    let have_grpc = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_grpc {
        if std::env::var("BACKCHANNEL_SKIP_PYTHON").as_deref() == Ok("1") {
            eprintln!("skipping: python3 with grpcio not found (BACKCHANNEL_SKIP_PYTHON=1)");
            return;
        }
        panic!("python3 with grpcio is needed: `python3 -m pip install grpcio`");
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        &format!(
            r#"
[identity.py-agent]
token_sha256 = "{}"
[identity.py-caller]
token_sha256 = "{}"
[[agents]]
identity = "py-agent"
names = ["py-svc"]
[[callers]]
identity = "py-caller"
peers = ["py-svc"]
"#,
            sha("agent-secret"),
            sha("caller-secret")
        ),
    );
    let hub = Hub::start(HubConfig {
        policy: Some(policy),
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let svc = private("private").await;
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, "agent-secret\n").unwrap();
    let mut cfg = AgentConfig::new(hub.addr.unwrap().to_string(), "py-svc", svc.addr.clone());
    cfg.token_file = Some(token_file);
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    wait_for_name(&hub, "py-svc").await;
    let peer = hub.state().list().into_iter().find(|p| p.name == "py-svc");
    assert_eq!(peer.unwrap().identity, "py-agent");

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/call_with_token.py"
    );
    let addr = hub.addr.unwrap().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args([script, &addr, "py-svc", "caller-secret"])
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("python client finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all 4 checks ok"), "{stdout}");
    agent.stop().await;
    hub.shutdown().await;
}

/// A local address that is not loopback, if this network namespace has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks a source address.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A token over plaintext TCP on a non-loopback address is refused, even
/// the right one; over TLS on the same address it is accepted. (The rule
/// itself is unit-tested in `hub::identity`.)
#[tokio::test]
async fn token_over_plaintext_non_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The agent refuses to send its token that way in the first place.
    let token_file = dir.path().join("t");
    std::fs::write(&token_file, "agent-secret").unwrap();
    let mut cfg = AgentConfig::new("192.0.2.1:7443", "x", "127.0.0.1:1");
    cfg.token_file = Some(token_file);
    let err = Agent::start(cfg).expect_err("refused").to_string();
    assert!(err.contains("--tls-ca"), "{err}");

    let Some(ip) = non_loopback_ip() else {
        eprintln!(
            "no non-loopback address in this network namespace; the unit test covers the rule"
        );
        return;
    };
    let pki = Pki::new();
    let policy = write_policy(&pki.dir, &matrix_policy());
    for tls in [false, true] {
        let hub = Hub::start(HubConfig {
            listen: Some(format!("{}:0", ip)),
            tls_cert: tls.then(|| pki.server.0.clone()),
            tls_key: tls.then(|| pki.server.1.clone()),
            policy: Some(policy.clone()),
            ..HubConfig::default()
        })
        .await
        .unwrap();
        let addr = hub.addr.unwrap();
        let ch = if tls {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
                .domain_name("localhost");
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap()
        } else {
            common::plain_channel(&addr.to_string()).await
        };
        let r = unary(&ch, "inventory", Some("billing-token")).await;
        if tls {
            // Authenticated as billing; there is just no such agent (which
            // reads like any forbidden peer).
            let s = assert_code(r, Code::PermissionDenied, "token over TLS");
            assert!(s.message().contains("'billing'"), "{s:?}");
        } else {
            let s = assert_code(r, Code::Unauthenticated, "token over plaintext");
            assert!(s.message().contains("only accepted over TLS"), "{s:?}");
        }
        hub.shutdown().await;
    }
}

// ---------------------------------------------------------------- safe default

#[tokio::test]
async fn an_open_hub_only_listens_on_loopback_unless_told_otherwise() {
    let err = Hub::start(HubConfig {
        listen: Some("0.0.0.0:0".into()),
        ..HubConfig::default()
    })
    .await
    .expect_err("an open hub on 0.0.0.0 is refused")
    .to_string();
    assert!(
        err.contains("--policy") && err.contains("--allow-anyone"),
        "{err}"
    );
    let hub = Hub::start(HubConfig {
        listen: Some("0.0.0.0:0".into()),
        allow_anyone: true,
        ..HubConfig::default()
    })
    .await
    .unwrap();
    hub.shutdown().await;
    // Loopback without a policy: open (the demo's case).
    let hub = Hub::start(HubConfig::default()).await.unwrap();
    assert!(!hub.enforcing());
    hub.shutdown().await;
}

// ---------------------------------------------------------------- the real binary

/// A child process killed on drop, with its stdout and stderr lines.
struct Child {
    child: std::process::Child,
    out: std::sync::mpsc::Receiver<String>,
    err: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, out) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            println!("hub: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("hub stderr: {line}");
            all.push(line);
        }
        all
    });
    Child {
        child,
        out,
        err: Some(err),
    }
}

impl Child {
    /// The first stdout line starting with `prefix`.
    fn line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .out
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line starting with '{prefix}'"));
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Everything the process wrote to stderr (call after it exited).
    fn stderr(&mut self) -> String {
        self.err.take().unwrap().join().unwrap().join("\n")
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(start.elapsed() < T, "the hub did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn reload_policy(extra: &str) -> String {
    format!(
        r#"
[identity.agent]
token_sha256 = "{}"
[identity.billing]
token_sha256 = "{}"
[[agents]]
identity = "agent"
names = ["svc"]
[[callers]]
identity = "billing"
peers = ["svc"]
{extra}
"#,
        sha("agent-secret"),
        sha("billing-secret")
    )
}

#[tokio::test]
async fn sighup_reloads_the_policy_without_dropping_sessions_or_calls() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), &reload_policy(""));

    // A bad file at start stops the hub with an error naming the line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[identity.x]\ncert_dns = \"x\"\nwat = 1\n").unwrap();
    let mut h = spawn(&[
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        bad.to_str().unwrap(),
    ]);
    let st = h.wait_exit();
    assert!(!st.success(), "{st:?}");
    let err = h.stderr();
    assert!(err.contains("line 3"), "{err}");
    drop(h);

    let mut hub = spawn(&[
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    let addr = hub.line("hub listening on ");
    let addr = addr
        .trim_start_matches("hub listening on ")
        .trim()
        .to_string();

    let svc = private("private").await;
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, "agent-secret").unwrap();
    let mut cfg = AgentConfig::new(addr.clone(), "svc", svc.addr.clone());
    cfg.token_file = Some(token_file);
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    let peer_id = agent.status().peer_id;
    assert!(agent.status().announced);

    let ch = common::plain_channel(&addr).await;
    // A call that spans the reloads: a bidi stream of billing's.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = EchoClient::new(ch.clone())
        .bidi(req(
            "svc",
            Some("billing-secret"),
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .await
        .unwrap()
        .into_inner();
    tx.send(echo("before", 0)).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "before");

    // "late" is denied before.
    assert_code(
        unary(&ch, "svc", Some("late-secret")).await,
        Code::Unauthenticated,
        "late before",
    );

    // A bad file is rejected with its line; the previous policy stays.
    std::fs::write(
        &policy,
        reload_policy("[[callers]]\nidentity = \"late\"\npeers = [\"svc\"]\n"),
    )
    .unwrap();
    hub.signal("-HUP");
    let line = hub.line("policy reload failed");
    assert!(
        line.contains("line ") && line.contains("unknown identity 'late'"),
        "{line}"
    );
    assert_code(
        unary(&ch, "svc", Some("late-secret")).await,
        Code::Unauthenticated,
        "late after a bad reload",
    );
    unary(&ch, "svc", Some("billing-secret")).await.unwrap();

    // A good file: "late" is allowed after.
    std::fs::write(
        &policy,
        reload_policy(&format!(
            "[identity.late]\ntoken_sha256 = \"{}\"\n[[callers]]\nidentity = \"late\"\npeers = [\"svc\"]\n",
            sha("late-secret")
        )),
    )
    .unwrap();
    hub.signal("-HUP");
    hub.line("policy reloaded");
    let got = unary(&ch, "svc", Some("late-secret")).await.unwrap();
    assert_eq!(got.server, "private caller=late auth=false");

    // Nothing was dropped: the stream goes on, the agent kept its session.
    tx.send(echo("after", 0)).await.unwrap();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "after");
    drop(tx);
    assert!(stream.message().await.unwrap().is_none());
    let st = agent.status();
    assert_eq!((st.sessions, st.connected, st.peer_id), (1, true, peer_id));

    agent.stop().await;
    hub.signal("-TERM");
    assert!(hub.wait_exit().success());
    let err = hub.stderr();
    // The audit trail: announces, calls with the caller, refusals, reloads.
    for needle in [
        "event=\"announce\"",
        "event=\"call\"",
        "caller=late",
        "event=\"refused\"",
        "event=\"policy_reload\"",
    ] {
        assert!(err.contains(needle), "{needle} not in:\n{err}");
    }
    assert!(
        !err.contains("late-secret") && !err.contains("billing-secret"),
        "a token was logged"
    );
}
