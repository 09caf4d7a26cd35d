//! Each agent session's flow, as the hub measures it from yamux pings and
//! windows: in `Peers.List` and in the metrics, so a window-limited peer
//! ("4 MiB at 80 ms RTT caps a stream at 50 MB/s") is visible instead of a
//! guess.

use std::sync::Arc;

use backchannel::{PeerId, Registry, SessionStats};

use crate::{hub::state::HubState, pb::hub::SessionFlow};

/// The flow of `stats` in the API's terms.
pub fn to_pb(stats: &SessionStats) -> SessionFlow {
    SessionFlow {
        rtt_us: stats.rtt.map_or(0, |d| d.as_micros() as u64),
        send_window: stats.send_window,
        recv_window: stats.recv_window,
        bytes_in_flight: stats.in_flight,
        send_ceiling_bytes_per_sec: stats.send_ceiling().unwrap_or(0),
        recv_ceiling_bytes_per_sec: stats.recv_ceiling().unwrap_or(0),
        buffered: stats.buffered as u64,
        max_buffered: stats.max_buffered as u64,
        window_stalls: stats.window_stalls,
        windows_grown: stats.windows_grown,
        data_sent: stats.data_sent,
        data_received: stats.data_received,
        streams: stats.streams as u64,
    }
}

/// Peer `id`'s flow, if it is connected.
pub fn of(registry: &Registry, id: u64) -> Option<SessionFlow> {
    registry.session_stats(PeerId::new(id)).map(|s| to_pb(&s))
}

/// Per-peer flow gauges, read at scrape time, labelled with the peer's
/// name (its ID while it has none). One series per peer and gauge: a hub
/// with many thousands of agents exports as many series.
pub struct FlowCollector(pub Arc<HubState>);

impl std::fmt::Debug for FlowCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for FlowCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
        };
        let peers = self.0.list_plain();
        let flows: Vec<(String, SessionFlow)> = peers
            .into_iter()
            .filter_map(|(id, name)| {
                let label = if name.is_empty() {
                    id.to_string()
                } else {
                    name
                };
                of(self.0.registry(), id).map(|f| (label, f))
            })
            .collect();
        type Get = fn(&SessionFlow) -> f64;
        let gauges: [(&str, &str, Get); 5] = [
            ("backchannel_hub_peer_rtt_seconds", "Smoothed yamux ping round-trip time of the peer's session", |f| f.rtt_us as f64 / 1e6),
            ("backchannel_hub_peer_send_ceiling_bytes_per_second", "What one stream can carry toward the peer: its window per round trip (0: unknown)", |f| f.send_ceiling_bytes_per_sec as f64),
            ("backchannel_hub_peer_recv_ceiling_bytes_per_second", "What one stream can carry from the peer: the hub's window per round trip (0: unknown)", |f| f.recv_ceiling_bytes_per_sec as f64),
            ("backchannel_hub_peer_bytes_in_flight", "Bytes sent to the peer not yet credited back", |f| f.bytes_in_flight as f64),
            ("backchannel_hub_peer_buffered_bytes", "Bytes held unread for the peer's streams", |f| f.buffered as f64),
        ];
        for (name, help, get) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (peer, f) in &flows {
                let labels = [("peer", peer.as_str())];
                let fam = m.encode_family(&labels)?;
                ConstGauge::new(get(f)).encode(fam)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "backchannel_hub_peer_window_stalls",
            "Times a hub writer waited for the peer's window",
            None,
            MetricType::Counter,
        )?;
        for (peer, f) in &flows {
            let labels = [("peer", peer.as_str())];
            let fam = m.encode_family(&labels)?;
            ConstCounter::new(f.window_stalls).encode(fam)?;
        }
        Ok(())
    }
}
