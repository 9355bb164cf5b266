//! A fault-injecting TCP proxy for tests: one-way delay, partitions and cut
//! connections between real hubs and clients on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Chunks buffered per direction of one connection (delay line).
const LINE_CHUNKS: usize = 1024;

/// A proxy from its own loopback port to `target`.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    partitioned: Arc<AtomicBool>,
    /// Bumped to close every open connection.
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let delay_us = Arc::new(AtomicU64::new(0));
        let partitioned = Arc::new(AtomicBool::new(false));
        let (cut, _) = watch::channel(0u64);
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            delay_us.clone(),
            partitioned.clone(),
            cut.clone(),
        ));
        Self {
            addr,
            delay_us,
            partitioned,
            cut,
            task,
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Delays every chunk by `d` in each direction (so a round trip is 2d).
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Cuts every connection and refuses new ones until [`heal`](Self::heal).
    pub fn partition(&self) {
        self.partitioned.store(true, Ordering::SeqCst);
        self.cut_all();
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.partitioned.store(false, Ordering::SeqCst);
    }

    /// Closes every open connection (new ones are accepted).
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay_us: Arc<AtomicU64>,
    partitioned: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if partitioned.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(upstream) = TcpStream::connect(target).await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let cut_rx = cut.subscribe();
        tokio::spawn(connection(client, upstream, delay_us.clone(), cut_rx));
    }
}

async fn connection(
    client: TcpStream,
    upstream: TcpStream,
    delay_us: Arc<AtomicU64>,
    mut cut: watch::Receiver<u64>,
) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let a = pipe(cr, uw, delay_us.clone());
    let b = pipe(ur, cw, delay_us);
    tokio::select! {
        _ = async { tokio::join!(a, b) } => {}
        _ = cut.changed() => {}
    }
}

/// Copies one direction through a delay line.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(LINE_CHUNKS);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
