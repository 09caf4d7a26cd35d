//! `backchannel.hub.v1.Peers` (admin) and `backchannel.hub.v1.Registration`.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::{
    hub::{access::Access, audit, state::HubState},
    pb::hub::{
        peer_event::Kind, peers_server::Peers, registration_server::Registration, AnnounceRequest,
        AnnounceResponse, LeaveRequest, LeaveResponse, ListPeersRequest, ListPeersResponse,
        PeerEvent, WatchPeersRequest,
    },
};

/// Serves both hub services over the shared [`HubState`].
#[derive(Clone)]
pub struct HubApi {
    /// The hub's state.
    pub state: Arc<HubState>,
    /// Who may announce which name.
    pub access: Arc<Access>,
    /// The cluster this hub belongs to, if any.
    pub cluster: Option<Arc<crate::hub::cluster::Cluster>>,
}

impl std::fmt::Debug for HubApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubApi").finish_non_exhaustive()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PeerEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Peers for HubApi {
    async fn list(
        &self,
        request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let mut peers = self.state.list();
        if let Some(c) = &self.cluster {
            for p in &mut peers {
                p.hub_id = c.hub_id().to_string();
            }
            if !request.get_ref().local_only {
                peers.extend(c.remote_peers().await?);
            }
        }
        Ok(Response::new(ListPeersResponse { peers }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<WatchPeersRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let WatchPeersRequest {
            skip_existing,
            local_only,
        } = request.into_inner();
        // Subscribed before the snapshots are taken: nothing is lost between.
        let cluster = self.cluster.clone();
        let remote_rx = cluster
            .as_ref()
            .filter(|_| !local_only)
            .map(|c| c.directory().events());
        let (snapshot, rx) = self.state.watch();
        let mut existing = if skip_existing { Vec::new() } else { snapshot };
        let hub_id = cluster.as_ref().map(|c| c.hub_id().to_string());
        if let Some(id) = &hub_id {
            for p in &mut existing {
                p.hub_id = id.clone();
            }
        }
        if let (Some(c), Some(_), false) = (&cluster, &remote_rx, skip_existing) {
            existing.extend(c.remote_peers().await?);
        }
        let first = futures::stream::iter(existing.into_iter().map(|p| {
            Ok(PeerEvent {
                kind: Kind::Existing as i32,
                peer: Some(p),
            })
        }));
        let live = futures::stream::unfold(rx, move |mut rx| {
            let hub_id = hub_id.clone();
            async move {
                match rx.recv().await {
                    Ok(mut ev) => {
                        if let (Some(p), Some(id)) = (ev.peer.as_mut(), hub_id) {
                            p.hub_id = id;
                        }
                        Some((Ok(ev), rx))
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => Some((
                        Err(Status::data_loss(format!(
                            "watcher fell {n} events behind; call List and Watch again"
                        ))),
                        rx,
                    )),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }
        });
        use futures::StreamExt;
        match (cluster, remote_rx) {
            (Some(c), Some(events)) => {
                let remote = c.remote_events(events);
                Ok(Response::new(Box::pin(
                    first.chain(futures::stream::select(live, remote)),
                )))
            }
            _ => Ok(Response::new(Box::pin(first.chain(live)))),
        }
    }
}

#[tonic::async_trait]
impl Registration for HubApi {
    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        let id = backchannel::RequestExt::peer_id(&request)?;
        let info = backchannel::RequestExt::conn_info(&request);
        let metrics = &self.state.metrics;
        let identity = match self.access.identify(info, request.metadata().as_ref()) {
            Ok(i) => i,
            Err(d) => {
                audit::refused(metrics, &d, None, "announce", &request.get_ref().name);
                return Err(d.status);
            }
        };
        let r = request.into_inner();
        if let Err(d) = self
            .access
            .authorize_announce(&identity, &r.name, &r.labels)
        {
            audit::refused(metrics, &d, Some(&identity), "announce", &r.name);
            return Err(d.status);
        }
        let name = r.name.clone();
        let labels = r.labels.clone();
        let mut done = match self.state.announce(id, r.name, r.labels, &identity) {
            Ok(a) => a,
            Err(status) => {
                if status.code() == tonic::Code::PermissionDenied {
                    let d = crate::hub::access::Denial {
                        status,
                        reason: "name_owned",
                    };
                    audit::refused(metrics, &d, Some(&identity), "announce", &name);
                    return Err(d.status);
                }
                return Err(status);
            }
        };
        // In a cluster the name is taken cluster-wide: the generation is the
        // cluster's, and another identity holding it elsewhere wins.
        if let Some(c) = &self.cluster {
            match c.claim(id, &name, &labels, &identity).await {
                Ok(Some(generation)) => done.generation = generation,
                Ok(None) => {}
                Err(status) => {
                    self.state.unname(id);
                    let d = crate::hub::access::Denial {
                        status,
                        reason: "name_owned",
                    };
                    audit::refused(metrics, &d, Some(&identity), "announce", &name);
                    return Err(d.status);
                }
            }
        }
        audit::announced(
            &identity,
            &name,
            id.get(),
            done.generation,
            done.replaced.map(|r| r.get()),
        );
        Ok(Response::new(AnnounceResponse {
            peer_id: id.get(),
            replaced_peer_id: done.replaced.map_or(0, |r| r.get()),
            generation: done.generation,
        }))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let id = backchannel::RequestExt::peer_id(&request)?;
        let in_flight = self.state.leave(id)?;
        Ok(Response::new(LeaveResponse {
            calls_in_flight: in_flight,
        }))
    }
}
