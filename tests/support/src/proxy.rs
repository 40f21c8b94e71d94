//! A real TCP proxy on 127.0.0.1 between a client (the service) and a server (`nats-server`) that
//! produces the faults real networks produce, on command:
//! - **reset**: after N more bytes from client to server, the next M bytes the client sends are
//!   swallowed (the client's kernel took them, they never arrive), then the client's connection is
//!   reset (RST) and the server's closed after the bytes passed on: what a connection reset does to
//!   the bytes a client has just written;
//! - **pause**: no byte moves in either direction and nothing is refused (new connections are accepted
//!   and then hang): a partition, in which the kernels' buffers fill and the peers notice nothing
//!   until their own time-outs; what was already read is passed on, what is not stays in the
//!   kernels until the pause ends. A client that resets its connection during the pause gave up
//!   what it sent: a real partition drops packets and leaves the bytes to the sender's
//!   retransmissions, which a reset ends. So such a connection's unread bytes are dropped;
//! - **latency**: each chunk waits before it is passed on, in order;
//! - **resume**: everything held is passed on.
//!
//! Every accepted connection is proxied by one task; the proxy and its tasks stop when it is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A reset armed with [`FaultProxy::reset_after`]: fired once, by the first connection to pass `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reset {
    /// Arms are numbered, so a connection can tell a new arm from the one it already counted.
    id: u64,
    after: u64,
    swallow: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct State {
    paused: bool,
    latency: Duration,
    reset: Option<Reset>,
}

/// What the proxy did, for a test's assertions.
#[derive(Default)]
struct Counters {
    connections: AtomicUsize,
    resets: AtomicUsize,
    to_server: AtomicU64,
    to_client: AtomicU64,
    swallowed: AtomicU64,
    /// Connections the client reset during a pause (what they held was dropped).
    discarded_by_reset: AtomicUsize,
    /// The id of the last reset fired, so that one arm fires once whichever connection gets there.
    fired: AtomicU64,
}

/// A fault-injecting TCP proxy; see the module docs.
pub struct FaultProxy {
    pub port: u16,
    state: watch::Sender<State>,
    counters: Arc<Counters>,
    acceptor: JoinHandle<()>,
    next_reset: u64,
}

/// Bytes read at once from either side.
const CHUNK: usize = 16 * 1024;
/// A swallow that the client stops feeding ends after this long without bytes: the reset fires then.
const SWALLOW_IDLE: Duration = Duration::from_millis(200);

impl FaultProxy {
    /// Listens on a free loopback port and proxies every connection to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy on 127.0.0.1");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (state, watcher) = watch::channel(State::default());
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let acceptor = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let (watcher, counters) = (watcher.clone(), Arc::clone(&shared));
                connections.push(AbortOnDrop(tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        proxy(client, server, watcher, counters).await;
                    }
                })));
                connections.retain(|task| !task.0.is_finished());
            }
        });
        FaultProxy { port, state, counters, acceptor, next_reset: 0 }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Arms a reset: the first connection to pass `after` more bytes towards the server swallows the
    /// next `swallow` bytes (or what comes within 200 ms) and is then reset on both sides.
    pub fn reset_after(&mut self, after: u64, swallow: u64) {
        self.next_reset += 1;
        let reset = Reset { id: self.next_reset, after, swallow };
        self.state.send_modify(|state| state.reset = Some(reset));
    }

    /// A partition: nothing moves in either direction until [`FaultProxy::resume`].
    pub fn pause(&self) {
        self.state.send_modify(|state| state.paused = true);
    }

    /// Heals a partition: whatever was held is passed on.
    pub fn resume(&self) {
        self.state.send_modify(|state| state.paused = false);
    }

    /// Delays every chunk by `latency` before passing it on.
    pub fn set_latency(&self, latency: Duration) {
        self.state.send_modify(|state| state.latency = latency);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Resets fired so far.
    pub fn resets(&self) -> usize {
        self.counters.resets.load(Ordering::SeqCst)
    }

    /// Connections that the client reset during a pause, whose unread bytes were dropped.
    pub fn resets_during_pause(&self) -> usize {
        self.counters.discarded_by_reset.load(Ordering::SeqCst)
    }

    /// Bytes swallowed by resets so far.
    pub fn swallowed(&self) -> u64 {
        self.counters.swallowed.load(Ordering::SeqCst)
    }

    /// Bytes passed on towards the server so far.
    pub fn bytes_to_server(&self) -> u64 {
        self.counters.to_server.load(Ordering::SeqCst)
    }

    /// Bytes passed on towards the client so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.counters.to_client.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the acceptor drops the connection tasks it owns.
        self.acceptor.abort();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Which way a chunk goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// At the end of a pause: passes on `held` (a chunk towards the server read as the pause began) and
/// what the client sent meanwhile, not counted against a reset arm; false, passing nothing on, when
/// the client reset its connection during the pause. What the client sent during the partition
/// would have been lost with the packets and retransmitted by its kernel; a client that reset its
/// connection gave those bytes up. The proxy's kernel holds them only because it acknowledged them.
async fn end_pause(
    client: &tokio::net::tcp::OwnedReadHalf,
    server: &mut tokio::net::tcp::OwnedWriteHalf,
    held: &[u8],
    counters: &Counters,
) -> bool {
    let Some(rest) = after_pause(client) else {
        counters.discarded_by_reset.fetch_add(1, Ordering::SeqCst);
        return false;
    };
    let all = [held, &rest[..]].concat();
    if !all.is_empty() && server.write_all(&all).await.is_err() {
        return false;
    }
    counters.to_server.fetch_add(all.len() as u64, Ordering::SeqCst);
    true
}

/// What the client's connection holds, read until it would block, or `None` when the client reset
/// the connection (a reset shows after the bytes).
fn after_pause(client: &tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; CHUNK];
    let mut held = Vec::new();
    loop {
        match client.try_read(&mut buffer) {
            Ok(0) => return Some(held),
            Ok(n) => held.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return Some(held),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(_) => return Some(held),
        }
    }
}

/// Proxies one connection until either side closes, or a reset fires.
async fn proxy(client: TcpStream, server: TcpStream, mut state: watch::Receiver<State>, counters: Arc<Counters>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (mut up, mut down) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    // Bytes towards the server counted against the armed reset, and which arm they count for.
    let mut counted: Option<(u64, u64)> = None;
    loop {
        let current = state.borrow_and_update().clone();
        if current.paused {
            if state.changed().await.is_err() {
                return;
            }
            if !state.borrow().paused && !end_pause(&client_read, &mut server_write, &[], &counters).await {
                return;
            }
            continue;
        }
        let (direction, read) = tokio::select! {
            read = client_read.read(&mut up) => (Direction::ToServer, read),
            read = server_read.read(&mut down) => (Direction::ToClient, read),
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // A chunk read just as a pause began is held until the pause ends: it is in the network,
        // and lost with the connection if the client resets it meanwhile.
        if state.borrow().paused {
            while state.borrow().paused {
                if state.changed().await.is_err() {
                    return;
                }
            }
            let held = if direction == Direction::ToServer { &up[..n] } else { &[][..] };
            if !end_pause(&client_read, &mut server_write, held, &counters).await {
                return;
            }
            if direction == Direction::ToServer {
                continue;
            }
        }
        let latency = state.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if direction == Direction::ToClient {
            if client_write.write_all(&down[..n]).await.is_err() {
                return;
            }
            counters.to_client.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        let reset = state.borrow().reset.filter(|reset| counters.fired.load(Ordering::SeqCst) < reset.id);
        let pass = match reset {
            None => n,
            Some(reset) => {
                let seen = match counted {
                    Some((id, seen)) if id == reset.id => seen,
                    _ => 0,
                };
                counted = Some((reset.id, seen + n as u64));
                if seen + n as u64 <= reset.after {
                    n
                } else if counters.fired.fetch_max(reset.id, Ordering::SeqCst) < reset.id {
                    let pass = (reset.after - seen) as usize;
                    if server_write.write_all(&up[..pass]).await.is_ok() {
                        counters.to_server.fetch_add(pass as u64, Ordering::SeqCst);
                    }
                    let swallowed = (n - pass) as u64
                        + swallow(&mut client_read, reset.swallow.saturating_sub((n - pass) as u64)).await;
                    counters.swallowed.fetch_add(swallowed, Ordering::SeqCst);
                    counters.resets.fetch_add(1, Ordering::SeqCst);
                    // The client sees a reset; the server reads what was passed on, then the end
                    // (a reset would make its kernel drop bytes it has not read yet).
                    if let Ok(client) = client_read.reunite(client_write) {
                        let _ = client.set_zero_linger();
                    }
                    let _ = server_write.shutdown().await;
                    return;
                } else {
                    n
                }
            }
        };
        if server_write.write_all(&up[..pass]).await.is_err() {
            return;
        }
        counters.to_server.fetch_add(pass as u64, Ordering::SeqCst);
    }
}

/// Reads and drops up to `bytes` bytes from the client, stopping early once it sends nothing for
/// [`SWALLOW_IDLE`]; returns how many were dropped.
async fn swallow(client: &mut tokio::net::tcp::OwnedReadHalf, bytes: u64) -> u64 {
    let mut buffer = vec![0u8; CHUNK];
    let mut dropped = 0;
    while dropped < bytes {
        let want = ((bytes - dropped) as usize).min(CHUNK);
        match tokio::time::timeout(SWALLOW_IDLE, client.read(&mut buffer[..want])).await {
            Ok(Ok(n)) if n > 0 => dropped += n as u64,
            _ => break,
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An echo server on a free port that also keeps every byte it received; returns its port.
    async fn echo() -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = read.read(&mut buffer).await {
                        if n == 0 || write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buffer[..n]);
                    }
                });
            }
        });
        (port, received)
    }

    #[tokio::test]
    async fn passes_bytes_holds_them_while_paused_and_resets_after_n_swallowing_m() {
        let (upstream, received) = echo().await;
        let mut proxy = FaultProxy::start(upstream).await;
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut buffer = [0u8; 5];
        stream.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"hello");

        proxy.pause();
        stream.write_all(b"held").await.unwrap();
        let mut held = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut held)).await;
        assert!(early.is_err(), "nothing may move during a pause");
        proxy.resume();
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut held)).await.unwrap().unwrap();
        assert_eq!(&held, b"held");

        proxy.reset_after(3, 4);
        stream.write_all(b"abcdefgh").await.unwrap();
        let mut rest = Vec::new();
        let result = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.unwrap();
        assert!(result.is_err(), "the connection is reset, not closed: {result:?}");
        assert_eq!(proxy.resets(), 1);
        assert_eq!(proxy.swallowed(), 5);
        wait_for_bytes(&received, b"helloheldabc").await;
        assert_eq!(proxy.bytes_to_server(), 12);
    }

    #[tokio::test]
    async fn bytes_sent_during_a_pause_by_a_client_that_resets_are_dropped() {
        let (upstream, received) = echo().await;
        let proxy = FaultProxy::start(upstream).await;
        let mut kept = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        let reset = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        kept.write_all(b"a").await.unwrap();
        let mut echoed = [0u8; 1];
        kept.read_exact(&mut echoed).await.unwrap();
        proxy.pause();
        kept.write_all(b"b").await.unwrap();
        let mut reset = reset;
        reset.write_all(b"lost").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), kept.read_exact(&mut echoed)).await;
        assert!(early.is_err(), "nothing may move during a pause");
        reset.set_zero_linger().unwrap();
        drop(reset);
        proxy.resume();
        // The connection that was not reset delivers what it sent during the pause.
        wait_for_bytes(&received, b"ab").await;
        for _ in 0..250 {
            if proxy.resets_during_pause() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(proxy.resets_during_pause(), 1);
        assert_eq!(received.lock().unwrap().as_slice(), b"ab");
    }

    async fn wait_for_bytes(received: &std::sync::Mutex<Vec<u8>>, want: &[u8]) {
        for _ in 0..250 {
            if received.lock().unwrap().as_slice() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(received.lock().unwrap().as_slice(), want);
    }
}
