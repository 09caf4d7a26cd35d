//! Tunnels through the sidecar over real sockets: a caller (the
//! `backchannel tunnel` dialer, or the binary with `--stdio`) → hub →
//! agent (`--expose-tcp`) → a TCP service.

use std::{path::Path, time::Duration};

use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{
        identity::{hex, token_sha256},
        Hub, HubConfig,
    },
    pb::hub::{peers_client::PeersClient, ListPeersRequest},
    tunnel::cli::{Dialer, TunnelArgs},
};
use backchannel_testkit::pattern::{check_stream, read_stream, write_stream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;

/// A TCP echo service that half-closes when its client does.
async fn echo_service() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A service that reads stream 3 to EOF, then sends 2 MiB of stream 4.
async fn half_close_service() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let got = read_stream(&mut tcp, 3).await.unwrap();
                assert_eq!(got, 3 * MIB);
                write_stream(&mut tcp, 4, 2 * MIB).await;
                tcp.shutdown().await.unwrap();
            });
        }
    });
    (addr, task)
}

/// A service that waits for one byte (so the agent's connect has long
/// completed: a reset racing the handshake would read as "cannot connect"),
/// sends 1 MiB of stream 6, then resets its connection.
async fn reset_service() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut go = [0u8; 1];
                if tcp.read_exact(&mut go).await.is_err() {
                    return;
                }
                write_stream(&mut tcp, 6, MIB).await;
                // A zero linger: dropping the socket sends RST.
                #[allow(deprecated)]
                tcp.set_linger(Some(Duration::ZERO)).unwrap();
                drop(tcp);
            });
        }
    });
    (addr, task)
}

fn args(hub: &str, peer: &str, service: &str) -> TunnelArgs {
    TunnelArgs {
        hub: hub.into(),
        peer: peer.into(),
        service: service.into(),
        listen: None,
        stdio: true,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_server_name: None,
        token_file: None,
        timeout: Duration::from_secs(10),
    }
}

struct Setup {
    hub: Hub,
    agent: Option<Agent>,
    hub_addr: String,
    _services: Vec<tokio::task::JoinHandle<()>>,
    dead_port: String,
}

async fn setup(policy: Option<&Path>, agent_token: Option<&Path>) -> Setup {
    let (echo, t1) = echo_service().await;
    let (half, t2) = half_close_service().await;
    let (rst, t3) = reset_service().await;
    // A port nothing listens on.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cfg = HubConfig {
        policy: policy.map(Path::to_path_buf),
        ..Default::default()
    };
    let hub = Hub::start(cfg).await.unwrap();
    let hub_addr = hub.addr.unwrap().to_string();
    let mut acfg = AgentConfig::new(hub_addr.clone(), "box", "127.0.0.1:1");
    acfg.expose_tcp = vec![
        ("echo".into(), echo),
        ("half".into(), half),
        ("rst".into(), rst),
        ("dead".into(), dead_port.clone()),
    ];
    acfg.token_file = agent_token.map(Path::to_path_buf);
    let agent = Agent::start(acfg).unwrap();
    hub.wait_for_name("box", T)
        .await
        .expect("the agent announces");
    Setup {
        hub,
        agent: Some(agent),
        hub_addr,
        _services: vec![t1, t2, t3],
        dead_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_through_hub_and_agent() {
    let s = setup(None, None).await;
    let dialer = Dialer::new(&args(&s.hub_addr, "box", "echo")).unwrap();
    let (mut r, mut w) = dialer.open().await.unwrap();
    let send = async {
        write_stream(&mut w, 21, 1024 * MIB).await;
        w.shutdown().await.unwrap();
    };
    let ((), got) = tokio::join!(send, read_stream(&mut r, 21));
    assert_eq!(got.unwrap(), 1024 * MIB);
    // Counted per peer in Peers.List.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", s.hub_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let peers = PeersClient::new(ch)
        .list(ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .peers;
    let p = peers.iter().find(|p| p.name == "box").unwrap();
    assert_eq!(p.tunnels_total, 1);
    assert!(p.tunnel_bytes_to_peer >= 1024 * MIB, "{p:?}");
    assert!(p.tunnel_bytes_from_peer >= 1024 * MIB, "{p:?}");
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_tunnels_and_half_close() {
    let s = setup(None, None).await;
    let dialer = Dialer::new(&args(&s.hub_addr, "box", "echo")).unwrap();
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = dialer.open().await.unwrap();
            let send = async {
                write_stream(&mut w, 200 + i, MIB).await;
                w.shutdown().await.unwrap();
            };
            let ((), got) = tokio::join!(send, read_stream(&mut r, 200 + i));
            got.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), MIB);
    }
    // Half-close: the caller shuts down writing; the service reads to EOF
    // and only then answers.
    let dialer = Dialer::new(&args(&s.hub_addr, "box", "half")).unwrap();
    let (mut r, mut w) = dialer.open().await.unwrap();
    write_stream(&mut w, 3, 3 * MIB).await;
    w.shutdown().await.unwrap();
    assert_eq!(read_stream(&mut r, 4).await.unwrap(), 2 * MIB);
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

#[tokio::test]
async fn unknown_peer_service_or_dead_service_get_clear_errors() {
    let s = setup(None, None).await;
    let err = |peer: &str, service: &str| {
        let d = Dialer::new(&args(&s.hub_addr, peer, service)).unwrap();
        async move { format!("{:#}", d.open().await.err().expect("refused")) }
    };
    let e = err("nobody", "echo").await;
    assert!(e.contains("no peer 'nobody'"), "{e}");
    let e = err("box", "nope").await;
    assert!(e.contains("no tunnel service 'nope'"), "{e}");
    let e = err("box", "dead").await;
    assert!(
        e.contains(&format!("cannot connect to {}", s.dead_port)),
        "{e}"
    );
    assert!(e.contains("unavailable"), "{e}");
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_tunnel_is_an_error_for_the_caller() {
    let mut s = setup(None, None).await;
    let dialer = Dialer::new(&args(&s.hub_addr, "box", "echo")).unwrap();
    let (mut r, mut w) = dialer.open().await.unwrap();
    write_stream(&mut w, 5, MIB).await;
    let mut buf = vec![0u8; MIB as usize];
    r.read_exact(&mut buf).await.unwrap();
    check_stream(5, 0, &buf);
    s.agent.take().unwrap().stop().await;
    let mut rest = Vec::new();
    let e = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest))
        .await
        .expect("the caller's side ends promptly")
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("peer 'box'"), "{e}");
    s.hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_resets_is_an_error_for_the_caller_not_an_end() {
    let s = setup(None, None).await;
    let dialer = Dialer::new(&args(&s.hub_addr, "box", "rst")).unwrap();
    let (mut r, mut w) = dialer.open().await.unwrap();
    w.write_all(b"g").await.unwrap();
    w.flush().await.unwrap();
    // The reset may discard some of what the service sent (the kernel
    // drops unread data on RST): whatever arrives is a correct prefix, and
    // then an error, never a clean end.
    let mut got = Vec::new();
    let e = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .expect("the caller's side ends promptly")
        .expect_err("a reset service connection read as a clean end");
    assert!(got.len() as u64 <= MIB);
    check_stream(6, 0, &got);
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    s.hub.shutdown().await;
}

#[tokio::test]
async fn the_policy_decides_who_opens_which_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let policy = write(
        "policy.toml",
        &format!(
            r#"
[identity.agent]
token_sha256 = "{}"
[identity.ops]
token_sha256 = "{}"
[identity.dev]
token_sha256 = "{}"

[[agents]]
identity = "agent"
names = ["box"]

[[callers]]
identity = "ops"
peers = ["box"]
tunnels = ["echo", "ha*"]

[[callers]]
identity = "dev"
peers = ["box"]
methods = ["/*"]
"#,
            hex(&token_sha256("agent-secret")),
            hex(&token_sha256("ops-secret")),
            hex(&token_sha256("dev-secret")),
        ),
    );
    let agent_token = write("agent.token", "agent-secret");
    let ops = write("ops.token", "ops-secret");
    let dev = write("dev.token", "dev-secret");
    let s = setup(Some(&policy), Some(&agent_token)).await;
    let open = |token: Option<&Path>, service: &str| {
        let mut a = args(&s.hub_addr, "box", service);
        a.token_file = token.map(Path::to_path_buf);
        let d = Dialer::new(&a).unwrap();
        async move { d.open().await.map(|_| ()).map_err(|e| format!("{e:#}")) }
    };
    open(Some(&ops), "echo").await.unwrap();
    let e = open(Some(&ops), "dead").await.unwrap_err();
    assert!(e.contains("may not open tunnel 'dead'"), "{e}");
    // A rule with methods but no tunnels allows no tunnel.
    let e = open(Some(&dev), "echo").await.unwrap_err();
    assert!(e.contains("may not open tunnel 'echo'"), "{e}");
    let e = open(None, "echo").await.unwrap_err();
    assert!(e.contains("requires credentials"), "{e}");
    // A rule with tunnels and no methods allows no call.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", s.hub_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(backchannel_demo::pb::testing::EchoRequest {
        message: "hi".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("backchannel-peer", "box".parse().unwrap());
    req.metadata_mut()
        .insert("authorization", "Bearer ops-secret".parse().unwrap());
    let st = backchannel_demo::pb::testing::echo_client::EchoClient::new(ch)
        .unary(req)
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st}");
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

/// `backchannel tunnel --stdio` is a real process whose stdin/stdout are
/// the tunnel, as for an ssh ProxyCommand; the far side here is the echo
/// service, driven through the process's pipes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_with_stdio_relays_and_exits_when_the_far_side_ends() {
    let s = setup(None, None).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args([
            "tunnel",
            "--hub",
            &s.hub_addr,
            "--peer",
            "box",
            "--service",
            "echo",
            "--stdio",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let send = async {
        write_stream(&mut stdin, 6, 16 * MIB).await;
        drop(stdin); // EOF: the tunnel half-closes, the echo service ends
    };
    let ((), got) = tokio::join!(send, read_stream(&mut stdout, 6));
    assert_eq!(got.unwrap(), 16 * MIB);
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    // A refused tunnel: exit status 1 and the reason on stderr.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args([
            "tunnel",
            "--hub",
            &s.hub_addr,
            "--peer",
            "box",
            "--service",
            "nope",
            "--stdio",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tunnel service 'nope'"), "{err}");
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

/// `backchannel tunnel --listen`: each accepted connection becomes its own
/// tunnel; a refused tunnel resets its local connection (never a clean
/// end); SIGTERM stops the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_with_listen_makes_one_tunnel_per_connection() {
    use tokio::io::AsyncBufReadExt;
    let s = setup(None, None).await;
    let spawn = |service: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
            .args([
                "tunnel",
                "--hub",
                &s.hub_addr,
                "--peer",
                "box",
                "--service",
                service,
                "--listen",
                "127.0.0.1:0",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    // "tunnel to 'echo' on peer 'box' listening on 127.0.0.1:PORT"
    async fn listening_on(child: &mut tokio::process::Child) -> String {
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        line.trim().rsplit(' ').next().unwrap().to_string()
    }
    let mut child = spawn("echo");
    let addr = listening_on(&mut child).await;
    let mut conns = Vec::new();
    for i in 0..3u64 {
        let addr = addr.clone();
        conns.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let (mut r, mut w) = tcp.into_split();
            let send = async {
                write_stream(&mut w, 40 + i, 4 * MIB).await;
                w.shutdown().await.unwrap();
            };
            let ((), got) = tokio::join!(send, read_stream(&mut r, 40 + i));
            got.unwrap()
        }));
    }
    for c in conns {
        assert_eq!(c.await.unwrap(), 4 * MIB);
    }
    let pid = child.id().unwrap().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    // A service the agent does not offer: the local connection is reset
    // and the reason is on stderr.
    let mut child = spawn("nope");
    let addr = listening_on(&mut child).await;
    // The refusal is quick: the reset may arrive before the connect
    // completes on this side, so either step may be the one that sees it.
    let r = tokio::time::timeout(T, async {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await?;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await
    })
    .await
    .expect("the local connection ends promptly");
    let e = r.expect_err("a refused tunnel must not end cleanly");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tunnel service 'nope'"), "{err}");
    s.agent.unwrap().stop().await;
    s.hub.shutdown().await;
}

/// A real OpenSSH client and sshd (loopback only, a throwaway host key and
/// user key made here) with `backchannel tunnel --stdio` as the
/// ProxyCommand, running a remote command. Skipped, saying why, where the
/// OpenSSH binaries are missing or sshd cannot run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_through_the_tunnel_as_proxy_command() {
    let sshd = Path::new("/usr/sbin/sshd");
    let have = |bin: &str| {
        std::process::Command::new(bin)
            .arg("-V")
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    if !sshd.exists() || !have("ssh") || !have("ssh-keygen") {
        eprintln!("SKIPPED: OpenSSH (ssh, ssh-keygen, /usr/sbin/sshd) is not installed; scripts/test.sh installs it");
        return;
    }
    // sshd's privilege separation directory.
    if std::fs::create_dir_all("/run/sshd").is_err() {
        eprintln!("SKIPPED: /run/sshd cannot be created, sshd cannot run here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for key in ["host_key", "user_key"] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(key))
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
         PermitRootLogin prohibit-password\n",
        d.join("host_key").display(),
        d.join("authorized_keys").display(),
        d.join("sshd.pid").display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let mut server = tokio::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // sshd says when it listens.
    let mut lines = tokio::io::BufReader::new(server.stderr.take().unwrap());
    let listening = tokio::time::timeout(T, async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                return Err(line.clone());
            }
            if line.contains("Server listening") {
                return Ok(());
            }
            eprintln!("sshd: {}", line.trim_end());
        }
    })
    .await
    .expect("sshd starts");
    if let Err(last) = listening {
        eprintln!("SKIPPED: sshd cannot run here: {last}");
        return;
    }
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
            eprintln!("sshd: {}", line.trim_end());
            line.clear();
        }
    });

    let (echo, _t) = echo_service().await;
    let hub = Hub::start(HubConfig::default()).await.unwrap();
    let hub_addr = hub.addr.unwrap().to_string();
    let mut acfg = AgentConfig::new(hub_addr.clone(), "box", "127.0.0.1:1");
    acfg.expose_tcp = vec![
        ("ssh".into(), format!("127.0.0.1:{port}")),
        ("echo".into(), echo),
    ];
    let agent = Agent::start(acfg).unwrap();
    hub.wait_for_name("box", T).await.unwrap();

    let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    let mut parts = host_pub.split_whitespace();
    let known = format!("box {} {}\n", parts.next().unwrap(), parts.next().unwrap());
    std::fs::write(d.join("known_hosts"), known).unwrap();
    let user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let proxy = format!(
        "{} tunnel --hub {hub_addr} --peer box --service ssh --stdio",
        env!("CARGO_BIN_EXE_backchannel")
    );
    let out = tokio::time::timeout(
        T,
        tokio::process::Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                d.join("known_hosts").display()
            ))
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg("-i")
            .arg(d.join("user_key"))
            .arg(format!("{user}@box"))
            .arg("echo through-the-tunnel; head -c 1000000 /dev/zero | wc -c")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("ssh finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "through-the-tunnel\n1000000\n");
    agent.stop().await;
    hub.shutdown().await;
    let _ = server.kill().await;
}
