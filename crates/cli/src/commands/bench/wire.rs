//! A TCP relay that counts the bytes each way, to measure what a sync costs
//! on the wire (request and answer, headers included).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes relayed so far, client to server and server to client.
#[derive(Default)]
pub struct Counts {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

impl Counts {
    /// `(up, down)` now.
    pub fn read(&self) -> (u64, u64) {
        (self.up.load(Ordering::SeqCst), self.down.load(Ordering::SeqCst))
    }
}

/// Starts a relay to `upstream` (`host:port`); returns its URL and its counters.
pub async fn start_relay(upstream: String) -> anyhow::Result<(String, Arc<Counts>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let c = c.clone();
            tokio::spawn(async move {
                if let Ok(outbound) = TcpStream::connect(&upstream).await {
                    let _ = relay(inbound, outbound, c).await;
                }
            });
        }
    });
    Ok((url, counts))
}

async fn relay(inbound: TcpStream, outbound: TcpStream, counts: Arc<Counts>) -> anyhow::Result<()> {
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (ir, iw) = inbound.into_split();
    let (or, ow) = outbound.into_split();
    let (a, b) = tokio::join!(pump(ir, ow, &counts.up), pump(or, iw, &counts.down));
    a.and(b).context("relay")
}

/// Copies one direction until end of stream, counting the bytes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    count: &AtomicU64,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        count.fetch_add(n as u64, Ordering::SeqCst);
        to.write_all(&buf[..n]).await?;
    }
}
