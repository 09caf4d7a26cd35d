//! `cargo run --example server`, then `cargo run --example client`. `CallMeBack`
//! calls the caller's own Echo back over the connection the caller opened.

use backchannel::{Registry, RequestExt, ServerHandshaker, SessionConfig};
use backchannel_demo::pb::testing::{
    callback_server::{Callback, CallbackServer},
    echo_client::EchoClient,
    CallMeBackRequest, CallMeBackResponse, EchoRequest, EchoResponse,
};
use listenmux::ListenMux;
use tonic::{Request, Response, Status};

struct Api(Registry); // the registry of connected peers

#[tonic::async_trait]
impl Callback for Api {
    async fn call_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<CallMeBackResponse>, Status> {
        let peer_id = request.peer_id()?; // FAILED_PRECONDITION for plain clients
        let channel = self.0.backchannel(peer_id)?;
        let CallMeBackRequest { message, count } = request.into_inner();
        let mut echo = EchoClient::new(channel);
        let reply = echo
            .unary(EchoRequest { message, count })
            .await?
            .into_inner();
        let reply = Some(reply);
        let peer_id = peer_id.get();
        Ok(Response::new(CallMeBackResponse { peer_id, reply }))
    }

    type StreamMeBackStream = tonic::codec::Streaming<EchoResponse>;
    async fn stream_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<Self::StreamMeBackStream>, Status> {
        let channel = self.0.backchannel_for(&request)?;
        let CallMeBackRequest { message, count } = request.into_inner();
        Ok(EchoClient::new(channel)
            .server_stream(EchoRequest { message, count })
            .await?)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Registry::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
    let handshaker = ServerHandshaker::new(registry.clone(), SessionConfig::server());
    let mux = ListenMux::builder().handshaker(handshaker).build();
    let incoming = mux.incoming(listener);
    listenmux::server_builder() // tonic's Server, with request.remote_addr() behind the mux
        .add_service(CallbackServer::new(Api(registry)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
