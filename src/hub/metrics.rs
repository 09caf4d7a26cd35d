//! Prometheus text exposition for the hub, served over a minimal HTTP/1.1
//! responder on `--metrics ADDR`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use listenmux::Stats;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::Code;

use crate::hub::state::HubState;

/// Hub-wide counters.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Backchannel sessions that completed their handshake.
    pub sessions_opened: AtomicU64,
    /// Sessions that ended.
    pub sessions_closed: AtomicU64,
    /// Routed calls (HTTP/2 streams) opened to peers.
    pub streams_opened: AtomicU64,
    /// Request bytes routed to peers.
    pub bytes_to_peers: AtomicU64,
    /// Response bytes routed back from peers.
    pub bytes_from_peers: AtomicU64,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    denied: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Counts a finished routed call by its status.
    pub fn call_finished(&self, code: Option<Code>) {
        let name = code.map(code_name).unwrap_or("UNKNOWN");
        *self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += 1;
    }

    /// Counts a refusal by the access policy, by reason.
    pub fn denied(&self, reason: &'static str) {
        *self
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Renders all metrics in the Prometheus text format (version 0.0.4).
pub fn render(state: &HubState, mux: &[Arc<Stats>]) -> String {
    let m = &state.metrics;
    let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    metric(
        "backchannel_hub_peers",
        "gauge",
        "Peers connected now.",
        &[("", state.registry().len() as u64)],
    );
    metric(
        "backchannel_hub_sessions_opened_total",
        "counter",
        "Backchannel sessions that completed their handshake.",
        &[("", r(&m.sessions_opened))],
    );
    metric(
        "backchannel_hub_sessions_closed_total",
        "counter",
        "Backchannel sessions that ended.",
        &[("", r(&m.sessions_closed))],
    );
    metric(
        "backchannel_hub_streams_opened_total",
        "counter",
        "Routed calls (HTTP/2 streams) opened to peers.",
        &[("", r(&m.streams_opened))],
    );
    metric(
        "backchannel_hub_streams_in_flight",
        "gauge",
        "Routed calls running now.",
        &[("", state.calls_in_flight().max(0) as u64)],
    );
    let calls: Vec<(String, u64)> = m
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (format!("code=\"{k}\""), *v))
        .collect();
    let calls: Vec<(&str, u64)> = calls.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metric(
        "backchannel_hub_calls_total",
        "counter",
        "Routed calls by final gRPC status (including routing failures).",
        &calls,
    );
    metric(
        "backchannel_hub_bytes_total",
        "counter",
        "Message bytes of routed calls, by direction.",
        &[
            ("direction=\"to_peer\"", r(&m.bytes_to_peers)),
            ("direction=\"from_peer\"", r(&m.bytes_from_peers)),
        ],
    );
    let denied: Vec<(String, u64)> = m
        .denied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (format!("reason=\"{k}\""), *v))
        .collect();
    let denied: Vec<(&str, u64)> = denied.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metric(
        "backchannel_hub_denied_total",
        "counter",
        "Calls, announces and sessions refused by the access policy, by reason.",
        &denied,
    );
    let s = mux
        .iter()
        .fold(listenmux::StatsSnapshot::default(), |a, s| a + s.snapshot());
    metric(
        "backchannel_hub_connections_total",
        "counter",
        "Accepted connections by kind.",
        &[
            ("kind=\"plain\"", s.plain),
            ("kind=\"backchannel\"", s.handshakes),
        ],
    );
    metric(
        "backchannel_hub_handshake_failures_total",
        "counter",
        "Connections that failed before becoming a gRPC connection, by reason.",
        &[
            ("reason=\"handshake_timeout\"", s.handshake_timeouts),
            ("reason=\"handshake_io\"", s.handshake_io_errors),
            ("reason=\"handshake_protocol\"", s.handshake_protocol_errors),
            ("reason=\"tls\"", s.tls_failures),
            ("reason=\"sniff_timeout\"", s.sniff_timeouts),
            ("reason=\"sniff_error\"", s.sniff_errors),
            ("reason=\"overload\"", s.rejected_overload),
        ],
    );
    out
}

/// Serves `GET /metrics` (any path) on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<HubState>, mux: Vec<Arc<Stats>>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        let mux = mux.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read_head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    let n = conn.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let first = line.lines().next().unwrap_or("");
            let (status, ctype, body) = if first.starts_with("GET ") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(&state, &mux),
                )
            } else {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
