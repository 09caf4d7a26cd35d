//! The listenmux sniffer through its public API: a `ListenMux` with one
//! registered handshaker, fed a connection whose bytes arrive in
//! fuzzer-chosen pieces (and pauses). Whatever the bytes, the connection is
//! routed without panic or hang, and no byte is lost or duplicated: the
//! handshaker gets exactly what follows its magic, the plain server gets
//! every byte (the sniffed ones replayed first).
#![no_main]

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use listenmux::{
    BoxFuture, BoxIo, ConnInfo, HandshakeError, Handshaked, Handshaker, ListenMux, Listener,
    Magic, MuxConfig,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    sync::mpsc,
};

const MAGIC: Magic = *b"backchannel";

/// Reads what follows the magic to the end and records it.
struct Recorder(Arc<Mutex<Option<Vec<u8>>>>);

impl Handshaker for Recorder {
    fn magic(&self) -> Magic {
        MAGIC
    }
    fn handshake(&self, mut io: BoxIo, _info: ConnInfo) -> BoxFuture<Result<Handshaked, HandshakeError>> {
        let got = self.0.clone();
        Box::pin(async move {
            let mut rest = Vec::new();
            io.read_to_end(&mut rest).await?;
            *got.lock().unwrap() = Some(rest);
            Ok(Handshaked::Dispatched)
        })
    }
}

/// Hands out the connections it is given.
struct Pipes(mpsc::Receiver<DuplexStream>);

impl Listener for Pipes {
    type Io = DuplexStream;
    async fn accept(&mut self) -> io::Result<(DuplexStream, ConnInfo)> {
        match self.0.recv().await {
            Some(io) => Ok((io, ConnInfo::default())),
            None => std::future::pending().await,
        }
    }
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&shape, input)) = data.split_first() else {
        return;
    };
    RT.with(|rt| {
        rt.block_on(async {
            let recorded = Arc::new(Mutex::new(None));
            let config = MuxConfig::default().with_sniff_timeout(Duration::from_millis(4500));
            let (tx, rx) = mpsc::channel(1);
            let mux = ListenMux::builder()
                .config(config)
                .handshaker(Recorder(recorded.clone()))
                .build();
            let stats = mux.stats();
            let mut incoming = mux.incoming(Pipes(rx));
            let (client, server) = tokio::io::duplex(4096);
            tx.send(server).await.unwrap();
            // Pieces of 1..=16 bytes at first (so the magic may be split),
            // then a pause of up to 7 s (past the sniff timeout), the rest,
            // and EOF.
            let piece = usize::from(shape % 16) + 1;
            let pause = Duration::from_secs(u64::from(shape >> 5));
            let writer = {
                let input = input.to_vec();
                tokio::spawn(async move {
                    let mut client = client;
                    let (head, tail) = input.split_at(input.len().min(piece));
                    let _ = client.write_all(head).await;
                    tokio::time::sleep(pause).await;
                    let _ = client.write_all(tail).await;
                    let _ = client.shutdown().await;
                    client
                })
            };
            let magic = input.len() >= MAGIC.len() && input[..MAGIC.len()] == MAGIC;
            // The sniffer decides as soon as the bytes cannot be a magic; if
            // what came before a pause past the sniff timeout is still a
            // proper prefix of the magic, the connection is closed.
            let head = &input[..input.len().min(piece)];
            let waiting = head.len() < MAGIC.len() && MAGIC[..head.len()] == *head;
            let late = pause >= Duration::from_secs(5) && waiting;
            tokio::time::timeout(Duration::from_secs(60), async {
                if input.is_empty() && !late {
                    // Closed before sending anything: closed, not routed.
                    while stats.snapshot().sniff_errors == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                } else if late {
                    while stats.snapshot().sniff_timeouts == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    assert!(recorded.lock().unwrap().is_none());
                } else if magic {
                    let rest = loop {
                        if let Some(rest) = recorded.lock().unwrap().take() {
                            break rest;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    };
                    assert_eq!(rest, &input[MAGIC.len()..], "the handshaker got other bytes");
                } else {
                    let conn = incoming.next().await.expect("no connection").unwrap();
                    let (mut io, _) = conn.into_parts();
                    let mut all = Vec::new();
                    io.read_to_end(&mut all).await.unwrap();
                    assert_eq!(all, input, "the plain connection's bytes differ");
                }
            })
            .await
            .expect("no routing decision within 60 s of virtual time: a hang");
            drop(incoming);
            let _ = writer.await;
        })
    });
});
