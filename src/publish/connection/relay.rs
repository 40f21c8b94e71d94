//! The loopback relay between the publish client and a plain-text NATS server: the socket to the
//! server is ours, with a zero linger, so dropping it (with the publish runtime, at a fence) resets
//! the connection: its unsent bytes are discarded, not delivered when a partition heals.
//!
//! Invariant: the relay forwards bytes unchanged between one client connection and one server
//! connection; it keeps nothing across connections, and it runs only on the publish runtime, so it
//! ends with that runtime.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::config::Config;
use crate::nats;

/// Bytes read at once in each direction: a page of publishes moves in few system calls.
const BUFFER: usize = 64 * 1024;

/// Longest wait for one server's TCP connection before the next server is tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The servers' `host:port` when every publish may go through the relay: plain-text URLs without
/// credentials in them, no TLS configured, and a server that does not ask for TLS (the client
/// verifies a certificate against the name it connects to, which would be the relay's).
pub(super) fn upstreams(config: &Config, server_info: &async_nats::ServerInfo) -> Option<Vec<String>> {
    if config.nats_tls.required() || server_info.tls_required {
        return None;
    }
    let servers = nats::server_addresses(config);
    let plain =
        |server: &async_nats::ServerAddr| !server.tls_required() && !server.is_websocket() && !server.has_user_pass();
    if servers.is_empty() || !servers.iter().all(plain) {
        return None;
    }
    let mut upstreams: Vec<String> =
        servers.iter().map(|server| format!("{}:{}", server.host(), server.port())).collect();
    // The cluster's other servers, as the main connection learned them (the client behind the
    // relay cannot learn them itself: it ignores discovered servers, or it would bypass the relay).
    for discovered in &server_info.connect_urls {
        if !upstreams.contains(discovered) {
            upstreams.push(discovered.clone());
        }
    }
    Some(upstreams)
}

/// Starts the relay on `runtime`: it listens on a free loopback port and dials `upstreams` in turn
/// for each client connection. Returns the URL the client connects to.
pub(super) fn start(runtime: &Runtime, upstreams: Vec<String>) -> std::io::Result<async_nats::ServerAddr> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let url = format!("nats://{address}");
    let server = url.parse().map_err(|err| std::io::Error::other(format!("relay address {url}: {err}")))?;
    let _guard = runtime.enter();
    let listener = TcpListener::from_std(listener)?;
    runtime.spawn(serve(listener, upstreams));
    Ok(server)
}

async fn serve(listener: TcpListener, upstreams: Vec<String>) {
    let mut next = 0;
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(err) => {
                tracing::warn!(error = %err, "publish relay cannot accept; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A client whose server cannot be reached is dropped: it reconnects, and the next
        // server is tried then.
        if let Some(server) = dial(&upstreams, &mut next).await {
            tokio::spawn(forward(client, server));
        }
    }
}

/// The first of `upstreams` that answers, starting at `next` (moved on past it).
async fn dial(upstreams: &[String], next: &mut usize) -> Option<TcpStream> {
    for _ in 0..upstreams.len() {
        let upstream = &upstreams[*next % upstreams.len()];
        *next = (*next + 1) % upstreams.len();
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(server)) => return Some(server),
            Ok(Err(err)) => tracing::debug!(server = %upstream, error = %err, "publish relay cannot reach the server"),
            Err(_) => tracing::debug!(server = %upstream, "publish relay timed out reaching the server"),
        }
    }
    None
}

async fn forward(mut client: TcpStream, mut server: TcpStream) {
    if let Err(err) = server.set_zero_linger() {
        // Without it a fence still drops what the process holds; only the kernel's unsent bytes
        // could still arrive late.
        tracing::warn!(error = %err, "publish relay cannot set a zero linger on its server connection");
    }
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER).await;
}
