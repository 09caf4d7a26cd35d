//! The hub's metrics: counters kept with `prometheus-client`, values read
//! at scrape time through [`Collector`]s, served in the OpenMetrics text
//! format at `GET /metrics` on `--metrics ADDR`.

use std::sync::Arc;

use axum::{http::header::CONTENT_TYPE, response::IntoResponse, routing::get, Router};
use listenmux::Stats;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tonic::Code;

/// The label of a counter by gRPC status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// The label of a byte counter by direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Hub-wide counters. Register them, and any collectors, in a [`Registry`]
/// with [`Metrics::register`].
#[derive(Debug)]
pub struct Metrics {
    /// Backchannel sessions that completed their handshake.
    pub sessions_opened: Counter,
    /// Sessions that ended.
    pub sessions_closed: Counter,
    /// Routed calls (HTTP/2 streams) opened to peers.
    pub streams_opened: Counter,
    /// Request bytes routed to peers.
    pub bytes_to_peers: Counter,
    /// Response bytes routed back from peers.
    pub bytes_from_peers: Counter,
    /// Sessions closed because they did not announce within `--announce-timeout`.
    pub announce_timeouts: Counter,
    /// Heap trims after peers left.
    pub heap_trims: Counter,
    calls: Family<CodeLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    denied: Family<ReasonLabel, Counter>,
    /// Tunnel counters (`backchannel tunnel`).
    pub tunnels: crate::tunnel::hub::TunnelMetrics,
}

/// The label of a refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let bytes = Family::<DirectionLabel, Counter>::default();
        let dir = |direction| bytes.get_or_create(&DirectionLabel { direction }).clone();
        Metrics {
            sessions_opened: Counter::default(),
            sessions_closed: Counter::default(),
            streams_opened: Counter::default(),
            bytes_to_peers: dir("to_peer"),
            bytes_from_peers: dir("from_peer"),
            announce_timeouts: Counter::default(),
            heap_trims: Counter::default(),
            calls: Family::default(),
            bytes,
            denied: Family::default(),
            tunnels: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a finished routed call by its status.
    pub fn call_finished(&self, code: Option<Code>) {
        let code = code.map(code_name).unwrap_or("UNKNOWN");
        self.calls.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a refusal by the access policy, by reason.
    pub fn denied(&self, reason: &'static str) {
        self.denied.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Registers the counters in `registry` (names get OpenMetrics'
    /// `_total` suffix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "backchannel_hub_sessions_opened",
            "Backchannel sessions that completed their handshake",
            self.sessions_opened.clone(),
        );
        registry.register(
            "backchannel_hub_sessions_closed",
            "Backchannel sessions that ended",
            self.sessions_closed.clone(),
        );
        registry.register(
            "backchannel_hub_streams_opened",
            "Routed calls (HTTP/2 streams) opened to peers",
            self.streams_opened.clone(),
        );
        registry.register(
            "backchannel_hub_calls",
            "Routed calls by final gRPC status (including routing failures)",
            self.calls.clone(),
        );
        registry.register(
            "backchannel_hub_announce_timeouts",
            "Sessions closed because they did not announce a name within --announce-timeout",
            self.announce_timeouts.clone(),
        );
        registry.register(
            "backchannel_hub_heap_trims",
            "Heap trims after peers left",
            self.heap_trims.clone(),
        );
        registry.register(
            "backchannel_hub_denied",
            "Calls, announces and sessions refused by the access policy, by reason",
            self.denied.clone(),
        );
        registry.register(
            "backchannel_hub_bytes",
            "Message bytes of routed calls, by direction",
            self.bytes.clone(),
        );
        self.tunnels.register(registry);
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

/// Encodes one counter family `name{label="value"}` from `samples`.
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    samples: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, n) in samples {
        let labels = [(label, *value)];
        let m = family.encode_family(&labels)?;
        ConstCounter::new(*n).encode(m)?;
    }
    Ok(())
}

/// The listeners' connection counters, read at scrape time.
#[derive(Debug)]
pub struct MuxCollector(pub Vec<Arc<Stats>>);

impl Collector for MuxCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self
            .0
            .iter()
            .fold(listenmux::StatsSnapshot::default(), |a, s| a + s.snapshot());
        encode_counters(
            &mut encoder,
            "backchannel_hub_connections",
            "Accepted connections by kind",
            "kind",
            &[("plain", s.plain), ("backchannel", s.handshakes)],
        )?;
        encode_counters(
            &mut encoder,
            "backchannel_hub_handshake_failures",
            "Connections that failed before becoming a gRPC connection, by reason",
            "reason",
            &[
                ("handshake_timeout", s.handshake_timeouts),
                ("handshake_io", s.handshake_io_errors),
                ("handshake_protocol", s.handshake_protocol_errors),
                ("tls", s.tls_failures),
                ("sniff_timeout", s.sniff_timeouts),
                ("sniff_error", s.sniff_errors),
                ("overload", s.rejected_overload),
                ("source_limit", s.rejected_source_limit),
                ("evicted", s.evicted),
            ],
        )?;
        encode_counters(
            &mut encoder,
            "backchannel_hub_pending_refused",
            "New connections closed at once: their source had its share of pending slots (source_limit), or all slots were taken and their source held the most (overload)",
            "reason",
            &[
                ("source_limit", s.rejected_source_limit),
                ("overload", s.rejected_overload),
            ],
        )?;
        let m = encoder.encode_descriptor(
            "backchannel_hub_pending_evicted",
            "Pending connections closed to make room for a newcomer from a source holding fewer",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(s.evicted).encode(m)
    }
}

/// Renders `registry` in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener` (axum, HTTP/1.1) until the task is
/// aborted.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
                    .into_response()
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}
