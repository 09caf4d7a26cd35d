//! Wire compatibility with the Go implementation of the design.
//!
//! Every test runs the Go peer `tests/interop/go/gopeer` (hashicorp/yamux +
//! grpc-go, built from Debian's packages by `tests/interop/go/build.sh` into
//! `target/interop/gopeer`) as a real process talking to our library over real
//! TCP sockets. See `tests/interop/README.md`.
//!
//! Environment:
//! * `BACKCHANNEL_SKIP_INTEROP=1`: when Go is not installed (and no fresh
//!   gopeer binary exists), skip instead of failing.
//! * `BACKCHANNEL_INTEROP_BENCH_BYTES`: bytes per direction of the big
//!   transfers and sidechannel exchanges (default 256 MiB).

mod common;

use std::{
    collections::HashMap,
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use backchannel::{
    ClientBuilder, PeerChannel, PeerEvent, PeerInfo, Registry, ServerHandshaker, SessionConfig,
    SidechannelError,
};
use backchannel_demo::{
    pb::testing::{
        callback_client::CallbackClient, echo_client::EchoClient, echo_server::EchoServer,
        CallMeBackRequest, EchoRequest,
    },
    services::EchoService,
};
use backchannel_testkit::{
    fill_pattern,
    pattern::stream_slice,
    pb::bench::{
        bench_client::BenchClient,
        bench_server::{Bench, BenchServer},
        DownloadRequest, Payload, Summary,
    },
};
use bytes::Bytes;
use common::{Bind, TestServer};
use listenmux::MuxConfig;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{broadcast, mpsc},
};
use tonic::{Code, Status};

/// Bound for anything that should happen "at once" (connects, events).
const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Finding (and building) the Go peer
// ---------------------------------------------------------------------------

/// Writes to the real stderr, bypassing libtest's output capture, so skip
/// notices and benchmark numbers are visible in CI logs.
fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Whether `bin` exists and is newer than every Go source and build.sh.
fn fresh(bin: &Path) -> bool {
    let Some(built) = mtime(bin) else {
        return false;
    };
    let go = repo().join("tests/interop/go");
    let mut sources = vec![go.join("build.sh")];
    if let Ok(dir) = std::fs::read_dir(go.join("gopeer")) {
        sources.extend(dir.flatten().map(|e| e.path()));
    }
    sources
        .iter()
        .filter(|p| p.extension().is_none_or(|e| e == "go" || e == "sh"))
        .all(|p| mtime(p).is_none_or(|m| m <= built))
}

fn go_installed() -> bool {
    let ok = |cmd: &str| {
        Command::new(cmd)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok("go") || ok("/usr/lib/go/bin/go")
}

/// The gopeer binary, built if missing or stale; `None` means "skip" (Go is
/// not installed and `BACKCHANNEL_SKIP_INTEROP=1`). Panics otherwise.
fn gopeer() -> Option<PathBuf> {
    static BIN: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    let r = BIN.get_or_init(|| {
        let bin = repo().join("target/interop/gopeer");
        if fresh(&bin) {
            return Ok(Some(bin));
        }
        let skip = std::env::var("BACKCHANNEL_SKIP_INTEROP").is_ok_and(|v| v == "1");
        if skip && !go_installed() {
            loud(
                "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                 !!! SKIPPING Go interop tests: Go is not installed and\n\
                 !!! BACKCHANNEL_SKIP_INTEROP=1. Wire compatibility is NOT being tested.\n\
                 !!! Run tests/interop/go/build.sh to install Go and build the peer.\n\
                 !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n",
            );
            return Ok(None);
        }
        let script = repo().join("tests/interop/go/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&bin)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() || !bin.exists() {
            return Err(format!(
                "{} failed ({}); it needs Go and Debian's golang-github-hashicorp-yamux-dev, \
                 golang-google-grpc-dev (it installs them with apt-get when it may). \
                 Set BACKCHANNEL_SKIP_INTEROP=1 to skip these tests on a machine without Go.\n\
                 --- build.sh stderr ---\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Some(bin))
    });
    match r {
        Ok(bin) => bin.clone(),
        Err(e) => panic!("Go interop peer unavailable: {e}"),
    }
}

// ---------------------------------------------------------------------------
// A running Go peer process
// ---------------------------------------------------------------------------

/// A `gopeer` child process. Its stdin is a pipe we hold (gopeer exits when it
/// closes); it is killed when dropped.
struct GoPeer {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// stdout, line by line; closed when the process exits.
    lines: mpsc::UnboundedReceiver<String>,
    /// Everything it wrote to stderr so far.
    log: Arc<Mutex<String>>,
}

impl GoPeer {
    fn spawn(bin: &Path, label: &str, args: &[&str]) -> GoPeer {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin.display()));
        eprintln!("[{label}] started: gopeer {}", args.join(" "));
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout piped");
        let l = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{l}] {line}");
                let _ = tx.send(line);
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let (l, log2) = (label.to_string(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{l} log] {line}");
                let mut log = log2.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        GoPeer {
            label: label.to_string(),
            child,
            stdin,
            lines,
            log,
        }
    }

    /// The next stdout line, `None` once the process has exited.
    async fn next_line(&mut self, within: Duration) -> Option<String> {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(line) => line,
            Err(_) => panic!(
                "[{}] no output within {within:?}; its log:\n{}",
                self.label,
                self.log()
            ),
        }
    }

    /// Waits for the server's `LISTENING host:port` line.
    async fn listening(&mut self) -> String {
        loop {
            match self.next_line(T).await {
                Some(l) => {
                    if let Some(addr) = l.strip_prefix("LISTENING ") {
                        return addr.trim().to_string();
                    }
                }
                None => panic!("[{}] exited before LISTENING:\n{}", self.label, self.log()),
            }
        }
    }

    /// Reads `OK`/`FAIL` lines until `n` scenarios have reported.
    async fn results(&mut self, n: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left).await {
                Some(l) if l.starts_with("OK ") || l.starts_with("FAIL ") => out.push(l),
                Some(_) => {}
                None => break,
            }
        }
        out
    }

    /// Reads stdout to its end (the process exited) and reaps the process.
    async fn finish(&mut self, within: Duration) -> (Vec<String>, ExitStatus) {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left).await {
                Some(l) => out.push(l),
                None => break,
            }
        }
        // stdout is closed: the process has exited (or is exiting).
        let status = self.child.wait().expect("wait gopeer");
        (out, status)
    }

    /// Closes its stdin: gopeer stops.
    fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// `kill -9`.
    fn kill9(&mut self) {
        self.child.kill().expect("kill -9 gopeer");
        let _ = self.child.wait();
        eprintln!("[{}] killed with SIGKILL", self.label);
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for GoPeer {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `OK <scenario> <details>` lines; panics on any FAIL or missing
/// scenario. Returns scenario -> details.
fn expect_all_ok(lines: &[String], scenarios: &[&str], log: &str) -> HashMap<String, String> {
    let mut ok = HashMap::new();
    for l in lines {
        let mut parts = l.splitn(3, ' ');
        let (verdict, scen, rest) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        match verdict {
            "OK" => {
                ok.insert(scen.to_string(), rest.to_string());
            }
            "FAIL" => panic!("Go peer: {l}\nits log:\n{log}"),
            _ => {}
        }
    }
    for s in scenarios {
        assert!(
            ok.contains_key(*s),
            "scenario {s} did not report OK; output {lines:?}\nlog:\n{log}"
        );
    }
    ok
}

/// `key=value` from a details string.
fn field<'a>(details: &'a str, key: &str) -> Option<&'a str> {
    details
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn next_connected(events: &mut broadcast::Receiver<PeerEvent>) -> PeerInfo {
    tokio::time::timeout(T, async {
        loop {
            match events.recv().await {
                Ok(PeerEvent::Connected(info)) => return info,
                Ok(PeerEvent::Disconnected(_)) => {}
                Err(e) => panic!("registry events: {e}"),
            }
        }
    })
    .await
    .expect("the Go client did not appear in our registry")
}

async fn wait_empty(registry: &Registry, id: backchannel::PeerId, within: Duration) -> Duration {
    let t0 = Instant::now();
    tokio::time::timeout(within, registry.wait_gone(id))
        .await
        .unwrap_or_else(|_| panic!("peer {id} still in the registry after {within:?}"));
    assert!(registry.is_empty(), "registry: {:?}", registry.list());
    t0.elapsed()
}

async fn server_with_window(window: u32) -> TestServer {
    common::start_server(
        Bind::Tcp,
        MuxConfig::default(),
        SessionConfig::server().with_window(window),
    )
    .await
}

// ---------------------------------------------------------------------------
// 1. Go client -> our server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_to_rust_server() {
    let Some(bin) = gopeer() else { return };
    let server = common::tcp_server().await;
    let mut events = server.registry.subscribe();
    let name = "go-client-interop";
    let scenarios = [
        "forward-unary",
        "forward-stream",
        "callback-unary",
        "callback-stream",
    ];
    let run = scenarios.join(",");
    let mut go = GoPeer::spawn(
        &bin,
        "go-client",
        &[
            "client",
            "--server",
            &server.addr,
            "--name",
            name,
            "--run",
            &run,
        ],
    );

    let peer = next_connected(&mut events).await;
    assert!(peer.remote_addr.is_some_and(|a| a.ip().is_loopback()));

    let (lines, status) = go.finish(Duration::from_secs(30)).await;
    let ok = expect_all_ok(&lines, &scenarios, &go.log());
    assert!(status.success(), "Go client exit status {status}");
    // Forward calls were answered by our server ...
    assert_eq!(field(&ok["forward-unary"], "server"), Some("server"));
    assert_eq!(field(&ok["forward-stream"], "server"), Some("server"));
    // ... and our server's reverse calls by the Go client's backchannel.
    assert_eq!(field(&ok["callback-unary"], "server"), Some(name));
    assert_eq!(field(&ok["callback-unary"], "message"), Some("ping"));
    assert_eq!(field(&ok["callback-stream"], "server"), Some(name));
    // The peer ID our handler saw is the one our registry assigned.
    let printed: u64 = field(&ok["callback-unary"], "peer_id")
        .and_then(|v| v.parse().ok())
        .expect("peer_id in callback-unary output");
    assert_eq!(printed, peer.id.get());

    // The Go client has exited: its peer must be gone.
    let took = wait_empty(&server.registry, peer.id, Duration::from_secs(5)).await;
    eprintln!(
        "peer {} removed {took:?} after the Go client exited",
        peer.id
    );
}

// ---------------------------------------------------------------------------
// 2. Our client -> Go server, both :authority forms of the dial-back
// ---------------------------------------------------------------------------

/// Wraps a service and records the `:authority` of every request it gets
/// (after our `AuthorityFix`, which turns `/` and `%` into `-`).
#[derive(Clone)]
struct AuthoritySpy<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for AuthoritySpy<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let authority = req.uri().authority().map(|a| a.to_string());
        self.seen
            .lock()
            .unwrap()
            .push(authority.unwrap_or_default());
        self.inner.call(req)
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AuthoritySpy<S> {
    const NAME: &'static str = S::NAME;
}

async fn rust_client_to_go_server(authority: &str) {
    let Some(bin) = gopeer() else { return };
    let go_name = format!("go-server-{authority}");
    let mut go = GoPeer::spawn(
        &bin,
        "go-server",
        &["server", "--name", &go_name, "--authority", authority],
    );
    let addr = go.listening().await;
    let me = format!("rust-client-{authority}");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let routes = tonic::service::Routes::new(AuthoritySpy {
        inner: EchoServer::new(EchoService::new(&me)),
        seen: seen.clone(),
    });
    let client = ClientBuilder::new()
        .connect_tcp(&addr, routes)
        .await
        .expect("connect to the Go server");

    // Forward: answered by the Go server.
    let r = EchoClient::new(client.channel())
        .unary(EchoRequest {
            message: "hello".into(),
            count: 0,
        })
        .await
        .expect("forward Echo.Unary")
        .into_inner();
    assert_eq!(
        (r.message.as_str(), r.server.as_str()),
        ("hello", &*go_name)
    );

    // Reverse, unary: the Go server dials our client (:authority
    // multiplexed/<addr> or multiplexed%2F<addr>); our Echo answers.
    let mut cb = CallbackClient::new(client.channel());
    for i in 0..2 {
        let msg = format!("ping{i}");
        let r = cb
            .call_me_back(CallMeBackRequest {
                message: msg.clone(),
                count: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("CallMeBack ({authority}): {s:?}\nGo log:\n{}", go.log()))
            .into_inner();
        assert_eq!(r.peer_id, 1, "first peer of the Go server");
        let reply = r.reply.expect("reply");
        assert_eq!(
            (reply.message.as_str(), reply.server.as_str()),
            (&*msg, &*me)
        );
    }

    // Reverse, streaming.
    let mut stream = cb
        .stream_me_back(CallMeBackRequest {
            message: "s".into(),
            count: 5,
        })
        .await
        .unwrap_or_else(|s| panic!("StreamMeBack ({authority}): {s:?}\nGo log:\n{}", go.log()))
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = stream.message().await.expect("StreamMeBack message") {
        assert_eq!(r.server, me);
        got.push(r.message);
    }
    assert_eq!(got, ["s-0", "s-1", "s-2", "s-3", "s-4"]);

    // The Go server really sent the Gitaly form we asked for: what our
    // handlers saw is it with `/` or `%` rewritten to `-`.
    let want = match authority {
        "slash" => "multiplexed-127.0.0.1:", // multiplexed/127.0.0.1:port
        _ => "multiplexed-2F127.0.0.1:",     // multiplexed%2F127.0.0.1:port
    };
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "reverse calls seen: {seen:?}");
    assert!(
        seen.iter().all(|a| a.starts_with(want)),
        "reverse :authority {seen:?}, want {want}<port>"
    );
    eprintln!("reverse :authority as our handlers saw it ({authority}): {seen:?}");

    client.close();
    tokio::time::timeout(T, client.closed())
        .await
        .expect("client closes");
    go.close_stdin();
    let (_, status) = go.finish(T).await;
    assert!(status.success(), "Go server exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_to_go_server_authority_slash() {
    rust_client_to_go_server("slash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_to_go_server_authority_percent() {
    rust_client_to_go_server("percent").await;
}

// ---------------------------------------------------------------------------
// 3. Plain Go gRPC client -> our server (same port)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_plain_client_to_rust_server() {
    let Some(bin) = gopeer() else { return };
    let server = common::tcp_server().await;
    let mut events = server.registry.subscribe();
    let scenarios = ["forward-unary", "callback-unary"];
    let run = scenarios.join(",");
    let mut go = GoPeer::spawn(
        &bin,
        "go-plain",
        &["plain", "--server", &server.addr, "--run", &run],
    );
    let (lines, status) = go.finish(Duration::from_secs(30)).await;
    let ok = expect_all_ok(&lines, &scenarios, &go.log());
    assert!(status.success(), "Go plain client exit status {status}");
    assert_eq!(field(&ok["forward-unary"], "server"), Some("server"));
    // gopeer reports OK only if the callback failed with FAILED_PRECONDITION.
    assert_eq!(ok["callback-unary"], "FAILED_PRECONDITION");
    assert!(server.registry.is_empty());
    assert!(events.try_recv().is_err(), "a plain client became a peer");
    let stats = server.stats.snapshot();
    assert!(stats.plain >= 1 && stats.handshakes == 0, "{stats:?}");
}

// ---------------------------------------------------------------------------
// 5. 256 MiB each way through one stream, both window configurations
// ---------------------------------------------------------------------------

fn bench_bytes() -> u64 {
    std::env::var("BACKCHANNEL_INTEROP_BENCH_BYTES")
        .ok()
        .map(|v| {
            v.parse()
                .expect("BACKCHANNEL_INTEROP_BENCH_BYTES: a byte count")
        })
        .unwrap_or(256 * MIB)
}

const CHUNK: usize = 1 << 20;

/// The byte pattern (`backchannel_testkit::fill_pattern`) from offset 0, long enough
/// to slice any `CHUNK` at any offset modulo its period (251).
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v = vec![0u8; CHUNK + 251];
        fill_pattern(&mut v, 0);
        v
    })
}

fn pattern_at(offset: u64, n: usize) -> &'static [u8] {
    let start = (offset % 251) as usize;
    &pattern()[start..start + n]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// Uploads `total` pattern bytes to `ch`'s Bench.Upload; returns the time.
async fn upload(ch: PeerChannel, total: u64) -> Duration {
    let t0 = Instant::now();
    let msgs = futures::stream::unfold(0u64, move |off| async move {
        (off < total).then(|| {
            let n = (CHUNK as u64).min(total - off) as usize;
            let data = Bytes::copy_from_slice(pattern_at(off, n));
            (Payload { data }, off + n as u64)
        })
    });
    let sum = BenchClient::new(ch)
        .upload(msgs)
        .await
        .expect("Bench.Upload")
        .into_inner();
    assert_eq!(sum.bytes, total);
    assert_eq!(sum.messages, total.div_ceil(CHUNK as u64));
    t0.elapsed()
}

/// Downloads `total` bytes from `ch`'s Bench.Download, checking every byte.
async fn download(ch: PeerChannel, total: u64) -> Duration {
    let t0 = Instant::now();
    let mut s = BenchClient::new(ch)
        .max_decoding_message_size(2 * CHUNK)
        .download(DownloadRequest {
            bytes: total,
            chunk_size: CHUNK as u32,
        })
        .await
        .expect("Bench.Download")
        .into_inner();
    let mut got = 0u64;
    while let Some(p) = s.message().await.expect("Bench.Download message") {
        assert!(p.data.len() <= CHUNK);
        assert!(
            p.data[..] == *pattern_at(got, p.data.len()),
            "download: data mismatch at offset {got}"
        );
        got += p.data.len() as u64;
    }
    assert_eq!(got, total);
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transfers_both_windows() {
    let Some(bin) = gopeer() else { return };
    let total = bench_bytes();
    let spec = format!("{total}:{CHUNK}");
    let mut report = vec![format!(
        "interop bench: {total} bytes ({} MiB) each way per line, {CHUNK}-byte messages, {} build",
        total / MIB,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )];
    let t_all = Instant::now();
    for (window, go_window) in [(16u32 << 20, "16MiB"), (256 << 10, "256KiB")] {
        // (a) Go client -> our server: forward upload/download (Go drives,
        // our BenchService checks/produces), then our server calls the Go
        // client's Bench through the registry (reverse upload/download).
        let server = server_with_window(window).await;
        let mut events = server.registry.subscribe();
        let up = format!("bench-upload:{spec}");
        let down = format!("bench-download:{spec}");
        let run = format!("{up},{down}");
        let mut go = GoPeer::spawn(
            &bin,
            "go-client",
            &[
                "client",
                "--server",
                &server.addr,
                "--name",
                "go-bench",
                "--window",
                go_window,
                "--run",
                &run,
                "--hold",
            ],
        );
        let peer = next_connected(&mut events).await;
        let lines = go.results(2, Duration::from_secs(300)).await;
        let ok = expect_all_ok(&lines, &[&up, &down], &go.log());
        for (what, s) in [("upload", &up), ("download", &down)] {
            report.push(format!(
                "  window {go_window:>6}: Go client -> Rust server, forward {what:<8}: {} ms, {} MB/s (Go's clock)",
                field(&ok[s.as_str()], "ms").unwrap_or("?"),
                field(&ok[s.as_str()], "MB/s").unwrap_or("?"),
            ));
        }
        let ch = server.registry.backchannel(peer.id).expect("backchannel");
        let d = upload(ch.clone(), total).await;
        report.push(format!(
            "  window {go_window:>6}: Rust server -> Go client, reverse upload  : {} ms, {:.1} MB/s",
            d.as_millis(),
            mbps(total, d)
        ));
        let d = download(ch, total).await;
        report.push(format!(
            "  window {go_window:>6}: Rust server <- Go client, reverse download: {} ms, {:.1} MB/s",
            d.as_millis(),
            mbps(total, d)
        ));
        go.close_stdin();
        let (_, status) = go.finish(T).await;
        assert!(status.success(), "Go client exit status {status}");
        wait_empty(&server.registry, peer.id, Duration::from_secs(5)).await;
        drop(server);

        // (b) Our client -> Go server: the Go server uploads to and downloads
        // from our client's Bench over the reverse channel (REVERSE-BENCH).
        let mut go = GoPeer::spawn(&bin, "go-server", &["server", "--window", go_window]);
        let addr = go.listening().await;
        let client = ClientBuilder::new()
            .config(SessionConfig::client().with_window(window))
            .connect_tcp(&addr, common::client_routes("rust-bench"))
            .await
            .expect("connect to the Go server");
        let t0 = Instant::now();
        let r = BenchClient::new(client.channel())
            .echo(Payload {
                data: format!("REVERSE-BENCH:{spec}").into(),
            })
            .await
            .unwrap_or_else(|s| panic!("reverse bench: {s:?}\nGo log:\n{}", go.log()))
            .into_inner();
        let reply = String::from_utf8_lossy(&r.data).into_owned();
        assert_eq!(
            reply,
            format!(
                "OK up={total} down={total} ms={}",
                field(&reply, "ms").unwrap_or("?")
            )
        );
        let wall = t0.elapsed();
        // The Go server logs "... up <d> (<x> MB/s) down <d> (<y> MB/s)".
        let log = go.log();
        let detail = log
            .lines()
            .find_map(|l| {
                l.split_once("reverse bench peer")
                    .map(|(_, r)| r.to_string())
            })
            .unwrap_or_default();
        report.push(format!(
            "  window {go_window:>6}: Go server <-> Rust client, reverse up+down: {} ms wall ({:.1} MB/s avg); Go: {}",
            wall.as_millis(),
            mbps(2 * total, wall),
            detail.trim()
        ));
        client.close();
        tokio::time::timeout(T, client.closed())
            .await
            .expect("client closes");
    }
    report.push(format!("  total {:.1} s", t_all.elapsed().as_secs_f64()));
    loud(&report.join("\n"));
}

// ---------------------------------------------------------------------------
// 6. Go peer killed mid-call
// ---------------------------------------------------------------------------

/// Drains `stream` until it fails; panics if it ends cleanly.
async fn drain_until_error(stream: &mut tonic::Streaming<Payload>) -> (tonic::Status, u64) {
    let mut n = 0;
    loop {
        match stream.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("stream ended cleanly after its peer was killed"),
            Err(s) => return (s, n),
        }
    }
}

/// (a) Our server is in a reverse streaming call into a Go client that dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_killed_mid_reverse_call() {
    let Some(bin) = gopeer() else { return };
    let server = common::tcp_server().await;
    let mut events = server.registry.subscribe();
    let mut go = GoPeer::spawn(
        &bin,
        "go-victim",
        &[
            "client",
            "--server",
            &server.addr,
            "--name",
            "victim",
            "--hold",
        ],
    );
    let peer = next_connected(&mut events).await;
    let ch = server.registry.backchannel(peer.id).expect("backchannel");
    let mut stream = BenchClient::new(ch)
        .download(DownloadRequest {
            bytes: 1 << 40,
            chunk_size: 64 << 10,
        })
        .await
        .expect("reverse Bench.Download starts")
        .into_inner();
    let first = stream.message().await.expect("first message");
    assert!(first.is_some());

    go.kill9();
    let t0 = Instant::now();
    let (status, buffered) =
        tokio::time::timeout(Duration::from_secs(1), drain_until_error(&mut stream))
            .await
            .expect("our reverse call did not fail within 1 s of kill -9");
    eprintln!(
        "reverse call failed {:?} after kill -9 ({buffered} buffered messages first): code {:?}, {:?}",
        t0.elapsed(),
        status.code(),
        status.message()
    );
    // PeerChannel maps a lost transport to UNAVAILABLE (tonic alone says UNKNOWN).
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let took = wait_empty(&server.registry, peer.id, Duration::from_secs(5)).await;
    eprintln!("registry empty {took:?} after the error");
}

/// (b) Our client is in a forward streaming call to a Go server that dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_server_killed_mid_forward_call() {
    let Some(bin) = gopeer() else { return };
    let mut go = GoPeer::spawn(&bin, "go-victim-server", &["server"]);
    let addr = go.listening().await;
    let client = ClientBuilder::new()
        .connect_tcp(&addr, common::client_routes("rust-client"))
        .await
        .expect("connect to the Go server");
    let mut stream = BenchClient::new(client.channel())
        .download(DownloadRequest {
            bytes: 1 << 40,
            chunk_size: 64 << 10,
        })
        .await
        .expect("forward Bench.Download starts")
        .into_inner();
    assert!(stream.message().await.expect("first message").is_some());

    go.kill9();
    let t0 = Instant::now();
    let (status, buffered) =
        tokio::time::timeout(Duration::from_secs(1), drain_until_error(&mut stream))
            .await
            .expect("our forward call did not fail within 1 s of kill -9");
    eprintln!(
        "forward call failed {:?} after kill -9 ({buffered} buffered messages first): code {:?}, {:?}",
        t0.elapsed(),
        status.code(),
        status.message()
    );
    // PeerChannel maps a lost transport to UNAVAILABLE (tonic alone says UNKNOWN).
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(1), client.closed())
        .await
        .expect("client.closed() did not complete within 1 s of kill -9");
    assert!(client.is_closed());
    eprintln!("client closed {:?} after kill -9", t0.elapsed());
}

/// 4. Our sidecar agent -> a Go server (Gitaly-style: no name announcement
/// RPC). The agent keeps serving, and the Go server reaches the service the
/// agent exposes, through the agent's backchannel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_agent_to_go_server() {
    use backchannel_sidecar::agent::{Agent, AgentConfig};
    let Some(bin) = gopeer() else { return };
    let mut go = GoPeer::spawn(&bin, "go-server", &["server", "--name", "go-hub"]);
    let addr = go.listening().await;

    // The private service only the agent can reach.
    let private = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let private_addr = private.local_addr().unwrap().to_string();
    let private_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new("private-behind-agent")))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(private)),
    );

    let agent = Agent::start(AgentConfig::new(addr.clone(), "edge", private_addr)).unwrap();
    agent
        .wait_sessions(1, Duration::from_secs(10))
        .await
        .expect("agent connects to the Go server");
    let status = agent.status();
    assert!(status.connected);
    assert!(
        !status.announced,
        "a Go server has no announcement RPC: {status:?}"
    );

    // A plain client asks the Go server to call peer 1 (the agent) itself.
    let plain = common::plain_channel(&addr).await;
    for round in 0..3 {
        let mut req = tonic::Request::new(CallMeBackRequest {
            message: format!("through the agent {round}"),
            count: 0,
        });
        req.metadata_mut()
            .insert("target-peer", "1".parse().unwrap());
        let r = CallbackClient::new(plain.clone())
            .call_me_back(req)
            .await
            .expect("Go server reaches the exposed service through the agent")
            .into_inner();
        let reply = r.reply.unwrap();
        assert_eq!(reply.server, "private-behind-agent");
        assert_eq!(reply.message, format!("through the agent {round}"));
    }
    let mut req = tonic::Request::new(CallMeBackRequest {
        message: "s".into(),
        count: 4,
    });
    req.metadata_mut()
        .insert("target-peer", "1".parse().unwrap());
    let mut s = CallbackClient::new(plain)
        .stream_me_back(req)
        .await
        .expect("streaming through the agent")
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        assert_eq!(m.server, "private-behind-agent");
        assert_eq!(m.message, format!("s-{n}"));
        n += 1;
    }
    assert_eq!(n, 4);
    assert!(agent.status().connected, "the agent is still serving");
    assert_eq!(agent.status().sessions, 1, "no reconnects were needed");

    agent.stop().await;
    private_task.abort();
    drop(go);
}

// ---------------------------------------------------------------------------
// 7. Sidechannels (Gitaly's internal/grpc/sidechannel protocol), both roles
// ---------------------------------------------------------------------------

/// Writes `total` bytes of `stream_slice(seed, ..)` in 256 KiB writes.
async fn send_stream<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, total: u64) -> io::Result<()> {
    let mut off = 0;
    while off < total {
        let n = (total - off).min(256 * 1024) as usize;
        w.write_all(stream_slice(seed, off, n)).await?;
        off += n as u64;
    }
    Ok(())
}

/// Reads `r` to EOF, checking every byte against `stream_slice(seed, ..)`;
/// returns the count. A wrong byte is an `InvalidData` error naming it.
async fn recv_checked<R: AsyncRead + Unpin>(r: &mut R, seed: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(off);
        }
        let want = stream_slice(seed, off, n);
        if buf[..n] != *want {
            let bad = buf[..n].iter().zip(want).position(|(a, b)| a != b).unwrap();
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("stream {seed}: wrong byte at offset {}", off + bad as u64),
            ));
        }
        off += n as u64;
    }
}

/// What our server's sidechannel handler saw, one per call.
#[derive(Debug)]
enum SideSeen {
    /// It received `up` bytes (checked) up to the flush packet and sent `down`.
    Done { up: u64, down: u64 },
    /// `open_sidechannel` failed.
    Open(SidechannelError),
    /// Reading (or writing) the sidechannel failed.
    Failed(io::Error),
}

/// Bench.Echo, with the number of bytes to send back as its decimal payload,
/// opens the call's sidechannel: it reads the client's bytes (stream 1) to
/// the flush packet while it sends that many raw bytes (stream 2), shuts
/// down and answers the number of bytes it received. What it saw goes to
/// `seen`.
#[derive(Clone)]
struct SideBench {
    registry: Registry,
    seen: mpsc::UnboundedSender<SideSeen>,
}

#[tonic::async_trait]
impl Bench for SideBench {
    async fn echo(&self, req: tonic::Request<Payload>) -> Result<tonic::Response<Payload>, Status> {
        let down: u64 = std::str::from_utf8(&req.get_ref().data)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Status::invalid_argument("want the byte count to send back"))?;
        let side = match self.registry.open_sidechannel(&req).await {
            Ok(side) => side,
            Err(e) => {
                let status = Status::aborted(e.to_string());
                let _ = self.seen.send(SideSeen::Open(e));
                return Err(status);
            }
        };
        let (mut r, mut w) = tokio::io::split(side);
        let write = async {
            send_stream(&mut w, 2, down).await?;
            w.shutdown().await
        };
        match tokio::try_join!(recv_checked(&mut r, 1), write) {
            Ok((up, ())) => {
                let _ = self.seen.send(SideSeen::Done { up, down });
                Ok(tonic::Response::new(Payload {
                    data: up.to_string().into(),
                }))
            }
            Err(e) => {
                let status = Status::data_loss(format!("{:?}: {e}", e.kind()));
                let _ = self.seen.send(SideSeen::Failed(e));
                Err(status)
            }
        }
    }
    async fn upload(
        &self,
        _: tonic::Request<tonic::Streaming<Payload>>,
    ) -> Result<tonic::Response<Summary>, Status> {
        Err(Status::unimplemented(""))
    }
    type DownloadStream = futures::stream::Empty<Result<Payload, Status>>;
    async fn download(
        &self,
        _: tonic::Request<DownloadRequest>,
    ) -> Result<tonic::Response<Self::DownloadStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

/// Our server with `SideBench` on a free loopback port.
struct SideServer {
    addr: String,
    seen: mpsc::UnboundedReceiver<SideSeen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SideServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SideServer {
    async fn start() -> SideServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let registry = Registry::new();
        let incoming = listenmux::ListenMux::builder()
            .handshaker(ServerHandshaker::new(
                registry.clone(),
                SessionConfig::server(),
            ))
            .build()
            .incoming(listener);
        let (tx, seen) = mpsc::unbounded_channel();
        let routes =
            tonic::service::Routes::new(BenchServer::new(SideBench { registry, seen: tx }));
        let task = tokio::spawn(async move {
            let _ = listenmux::server_builder()
                .add_routes(routes)
                .serve_with_incoming(incoming)
                .await;
        });
        SideServer { addr, seen, task }
    }

    async fn next_seen(&mut self) -> SideSeen {
        tokio::time::timeout(T, self.seen.recv())
            .await
            .expect("our sidechannel handler reports")
            .expect("the server runs")
    }
}

/// Go client -> our server: the Go client registers a waiter and calls
/// Bench.Echo with its ID; our handler opens the sidechannel on the Go
/// client's session. 256 MiB (`BACKCHANNEL_INTEROP_BENCH_BYTES`) each way at
/// once, both sides checking every byte and the length; then an ID the Go
/// client never registered (it closes the stream: our open is refused), a
/// Go client that closes without the flush packet (our reader: unexpected
/// EOF), hand-made pkt-lines (split headers, an empty and an upper-case
/// packet are data; `0001` is invalid), and an empty exchange (just the
/// flush packet and the close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidechannel_go_client_to_rust_server() {
    let Some(bin) = gopeer() else { return };
    let total = bench_bytes();
    let mut srv = SideServer::start().await;
    let big = format!("sidechannel:{total}:{total}");
    let scenarios = [
        big.as_str(),
        "sidechannel-unknown",
        "sidechannel-noflush",
        "sidechannel-framing",
        "sidechannel-badpkt",
        "sidechannel:0:0",
    ];
    let run = scenarios.join(",");
    let mut go = GoPeer::spawn(
        &bin,
        "go-client",
        &["client", "--server", &srv.addr, "--run", &run],
    );
    let (lines, status) = go.finish(Duration::from_secs(300)).await;
    let ok = expect_all_ok(&lines, &scenarios, &go.log());
    assert!(status.success(), "Go client exit status {status}");

    // The big exchange: the Go client got all of stream 2 (checked), our
    // handler all of stream 1 (checked) up to the flush packet.
    let total_s = total.to_string();
    assert_eq!(field(&ok[&big], "up"), Some(total_s.as_str()));
    assert_eq!(field(&ok[&big], "down"), Some(total_s.as_str()));
    match srv.next_seen().await {
        SideSeen::Done { up, down } => assert_eq!((up, down), (total, total)),
        other => panic!("big exchange: {other:?}"),
    }
    // Unknown ID: the Go client closed the stream, our open was refused.
    match srv.next_seen().await {
        SideSeen::Open(SidechannelError::Refused(answer)) => assert_eq!(answer, ""),
        other => panic!("unknown ID: {other:?}"),
    }
    let unknown = &ok["sidechannel-unknown"];
    assert_eq!(field(unknown, "code"), Some("Aborted"), "{unknown}");
    assert!(unknown.contains("refused"), "{unknown}");
    // No flush packet: an unexpected EOF on our reader, DATA_LOSS for the Go client.
    match srv.next_seen().await {
        SideSeen::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}"),
        other => panic!("no flush packet: {other:?}"),
    }
    let noflush = &ok["sidechannel-noflush"];
    assert_eq!(field(noflush, "code"), Some("DataLoss"), "{noflush}");
    assert!(noflush.contains("UnexpectedEof"), "{noflush}");
    // Odd but valid framing (a header split across frames, an empty packet,
    // an upper-case header): all 12 payload bytes arrive.
    match srv.next_seen().await {
        SideSeen::Done { up, down } => assert_eq!((up, down), (12, 0)),
        other => panic!("framing: {other:?}"),
    }
    assert_eq!(field(&ok["sidechannel-framing"], "up"), Some("12"));
    // A delimiter packet 0001 is not data: invalid.
    match srv.next_seen().await {
        SideSeen::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}"),
        other => panic!("0001: {other:?}"),
    }
    let bad = &ok["sidechannel-badpkt"];
    assert_eq!(field(bad, "code"), Some("DataLoss"), "{bad}");
    assert!(bad.contains("InvalidData"), "{bad}");
    // Empty both ways.
    match srv.next_seen().await {
        SideSeen::Done { up, down } => assert_eq!((up, down), (0, 0)),
        other => panic!("empty exchange: {other:?}"),
    }
    assert_eq!(field(&ok["sidechannel:0:0"], "up"), Some("0"));
    assert_eq!(field(&ok["sidechannel:0:0"], "down"), Some("0"));
    loud(&format!(
        "sidechannel interop: Go client <-> Rust server, {} MiB each way at once: {} ms, {} MB/s both directions together (Go's clock)",
        total / MIB,
        field(&ok[&big], "ms").unwrap_or("?"),
        field(&ok[&big], "MB/s").unwrap_or("?"),
    ));
}

/// Calls the Go server's Bench.Echo `SIDECHANNEL:<down>` with `waiter`'s ID
/// and runs `exchange` on the sidechannel it opens; returns the call's
/// result.
async fn go_sidechannel_call<F, Fut>(
    client: &backchannel::Client,
    down: u64,
    exchange: F,
) -> Result<String, Status>
where
    F: FnOnce(backchannel::ClientSidechannel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut waiter = client.sidechannel();
    let mut req = tonic::Request::new(Payload {
        data: format!("SIDECHANNEL:{down}").into(),
    });
    waiter.attach(&mut req);
    let mut api = BenchClient::new(client.channel());
    let mut call = tokio::spawn(async move { api.echo(req).await });
    let side = tokio::select! {
        side = waiter.accept() => side.expect("the Go server opens the sidechannel"),
        r = &mut call => panic!("the call ended before its sidechannel opened: {r:?}"),
    };
    tokio::time::timeout(Duration::from_secs(120), exchange(side))
        .await
        .expect("the sidechannel exchange ends");
    let r = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the call ends")
        .unwrap();
    r.map(|r| String::from_utf8_lossy(&r.into_inner().data).into_owned())
}

/// Our client -> Go server: the Go server's Bench.Echo opens the sidechannel
/// on our client's session. 256 MiB each way at once, byte-checked on both
/// sides; an ID we never registered (or whose waiter is gone): our client
/// closes the stream and the Go server's open is refused; our client drops
/// its side without the flush packet: the Go server's reader sees an
/// unexpected EOF; an empty exchange; and the session still carries calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidechannel_rust_client_to_go_server() {
    let Some(bin) = gopeer() else { return };
    let total = bench_bytes();
    let mut go = GoPeer::spawn(&bin, "go-server", &["server"]);
    let addr = go.listening().await;
    let client = ClientBuilder::new()
        .connect_tcp(&addr, common::client_routes("rust-side"))
        .await
        .expect("connect to the Go server");

    let t0 = Instant::now();
    let reply = go_sidechannel_call(&client, total, |side| async move {
        let (mut r, mut w) = tokio::io::split(side);
        let up = async {
            send_stream(&mut w, 1, total).await?;
            w.shutdown().await // the flush packet
        };
        // A failure either way ends both (the Go side stops reading when it fails).
        let ((), down) = tokio::try_join!(up, recv_checked(&mut r, 2))
            .expect("the sidechannel exchange with the Go server");
        assert_eq!(down, total);
    })
    .await
    .unwrap_or_else(|s| panic!("sidechannel call: {s:?}\nGo log:\n{}", go.log()));
    let wall = t0.elapsed();
    let total_s = total.to_string();
    assert!(reply.starts_with("OK "), "{reply}");
    assert_eq!(field(&reply, "up"), Some(total_s.as_str()), "{reply}");
    assert_eq!(field(&reply, "down"), Some(total_s.as_str()), "{reply}");

    // An ID nobody here waits for, then a waiter dropped before the open.
    let mut api = BenchClient::new(client.channel());
    let mut req = tonic::Request::new(Payload {
        data: "SIDECHANNEL:0".into(),
    });
    req.metadata_mut()
        .insert("gitaly-sidechannel-id", "987654".parse().unwrap());
    let dropped = client.sidechannel();
    let mut req2 = tonic::Request::new(Payload {
        data: "SIDECHANNEL:0".into(),
    });
    dropped.attach(&mut req2);
    drop(dropped);
    for req in [req, req2] {
        let err = api.echo(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        // Refused by our close (EOF), not by a timeout.
        assert!(err.message().contains("refused"), "{err:?}");
        assert!(err.message().contains("EOF"), "{err:?}");
    }

    // No flush packet.
    let err = go_sidechannel_call(&client, 0, |mut side| async move {
        side.write_all(stream_slice(1, 0, 1000)).await.unwrap();
        side.flush().await.unwrap();
        drop(side);
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("unexpected EOF"), "{err:?}");

    // Empty both ways.
    let reply = go_sidechannel_call(&client, 0, |mut side| async move {
        side.shutdown().await.unwrap();
        let mut rest = Vec::new();
        side.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await
    .unwrap_or_else(|s| panic!("empty sidechannel call: {s:?}\nGo log:\n{}", go.log()));
    assert!(reply.starts_with("OK up=0 down=0 "), "{reply}");

    // The session still carries calls.
    let r = api
        .echo(Payload {
            data: "still here".into(),
        })
        .await
        .expect("Bench.Echo after the sidechannels");
    assert_eq!(r.into_inner().data, "still here".as_bytes());

    loud(&format!(
        "sidechannel interop: Rust client <-> Go server, {} MiB each way at once: {} ms, {:.1} MB/s both directions together",
        total / MIB,
        wall.as_millis(),
        mbps(2 * total, wall)
    ));
    client.close();
    tokio::time::timeout(T, client.closed())
        .await
        .expect("client closes");
}
