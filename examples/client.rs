//! A backchannel client: `cargo run --example client` while
//! `cargo run --example server` runs.
//!
//! It dials the server, serves an Echo service on the same connection (no
//! listening port of its own), and asks the server to call it back.

use backchannel::ClientBuilder;
use backchannel_demo::{
    pb::testing::{callback_client::CallbackClient, echo_server::EchoServer, CallMeBackRequest},
    services::EchoService,
};
use tonic::service::Routes;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // What the server may call on this client: its backchannel.
    let routes = Routes::new(EchoServer::new(EchoService::new("example-client")));
    let client = ClientBuilder::new()
        .connect_tcp("127.0.0.1:50051", routes)
        .await?;

    // A forward call; the server answers it by calling our Echo back.
    let mut api = CallbackClient::new(client.channel());
    let request = CallMeBackRequest {
        message: "hello".into(),
        count: 0,
    };
    let answer = api.call_me_back(request).await?.into_inner();
    let reply = answer.reply.unwrap_or_default();
    println!(
        "the server reached us as peer {}: {reply:?}",
        answer.peer_id
    );
    client.close();
    Ok(())
}
