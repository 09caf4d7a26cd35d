//! Example services: `Echo` (served by both roles, answers with its name)
//! and `Callback` (server: calls the caller back through its backchannel).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::testing::{
    callback_server::Callback, echo_client::EchoClient, echo_server::Echo, CallMeBackRequest,
    CallMeBackResponse, EchoRequest, EchoResponse,
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers every call with its own `name`, so callers can tell who answered.
#[derive(Clone, Debug)]
pub struct EchoService {
    /// Put into every response's `server` field.
    pub name: String,
}

impl EchoService {
    /// An Echo service answering as `name`.
    pub fn new(name: impl Into<String>) -> Self {
        EchoService { name: name.into() }
    }

    fn reply(&self, message: String) -> EchoResponse {
        EchoResponse {
            message,
            server: self.name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(self.reply(request.into_inner().message)))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        let s = futures::stream::iter(0..r.count)
            .map(move |i| Ok(this.reply(format!("{}-{i}", r.message))));
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut stream = request.into_inner();
        let mut all = String::new();
        while let Some(m) = stream.message().await? {
            all.push_str(&m.message);
        }
        Ok(Response::new(self.reply(all)))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let this = self.clone();
        let s = request
            .into_inner()
            .map(move |m| m.map(|m| this.reply(m.message)));
        Ok(Response::new(Box::pin(s)))
    }
}

/// The server's Callback service: calls the calling peer back through the
/// registry.
#[derive(Clone)]
pub struct CallbackService {
    /// Where the peers' backchannels are.
    pub registry: backchannel::Registry,
}

#[tonic::async_trait]
impl Callback for CallbackService {
    async fn call_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<CallMeBackResponse>, Status> {
        let peer_id = backchannel::RequestExt::peer_id(&request)?;
        let channel = self.registry.backchannel(peer_id)?;
        let r = request.into_inner();
        let reply = EchoClient::new(channel)
            .unary(EchoRequest {
                message: r.message,
                count: 0,
            })
            .await?
            .into_inner();
        Ok(Response::new(CallMeBackResponse {
            peer_id: peer_id.get(),
            reply: Some(reply),
        }))
    }

    type StreamMeBackStream = BoxStream<EchoResponse>;

    async fn stream_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<Self::StreamMeBackStream>, Status> {
        let channel = self.registry.backchannel_for(&request)?;
        let r = request.into_inner();
        let stream = EchoClient::new(channel)
            .server_stream(EchoRequest {
                message: r.message,
                count: r.count,
            })
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}
