//! The connection publishes go through, and the fence that throws away what it still holds.
//!
//! async-nats queues a publish in the client: what it has not written yet survives a reconnect and
//! is written on the next connection, whenever that comes (after a partition heals, say). A replica
//! whose lease ran out during a partition would then store records after the new owner's. So
//! publishes get a connection of their own, driven by a runtime of its own (one thread): to fence,
//! the runtime is shut down, which drops the client's task with its queue, its buffer and its
//! socket; nothing that was still in the process reaches NATS. The next publish connects anew.
//! Shutting the client down is not enough for what the kernel still holds: a closed socket goes on
//! sending its unsent bytes, and a partition that heals delivers them. So, for plain-text servers,
//! the client connects to a relay of ours on the loopback (`relay`), which owns the socket to the
//! server with a zero linger: when the runtime goes, that socket is reset and its unsent bytes
//! (those a partition kept from the server) are discarded, not retransmitted. (TLS connections are
//! verified against the server's name, so they go direct; for them, bytes on the wire when a
//! partition began may still arrive: at most one publish per item, see `coordination/DESIGN.md`.)
//! A batch's publish loop runs on that runtime too (see `Publisher::publish_in_order`), so a record
//! and its ack are handed between tasks of one thread rather than between two runtimes' threads.
//!
//! Invariant: a [`Connection`]'s generation names one client; [`PublishConnection::fence`] ends the
//! generation it is given and no other, so a late fence never tears down a newer connection.

use std::time::Duration;

use async_nats::jetstream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::runtime::Runtime;

use crate::config::Config;
use crate::nats;

mod relay;

/// Longest wait for a new publish connection; the publish counts as failed and is retried after.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One publish client and the runtime that drives it.
struct Live {
    generation: u64,
    client: async_nats::Client,
    js: jetstream::Context,
    runtime: Option<Runtime>,
}

impl Drop for Live {
    fn drop(&mut self) {
        // A runtime may not be dropped inside another one's context; shut it down in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A handle on the current publish client for one batch, and on the runtime that drives it (a
/// batch's publish loop runs there, beside the client's task: no hop between threads per record).
#[derive(Clone)]
pub struct Connection {
    pub generation: u64,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub runtime: tokio::runtime::Handle,
}

/// Why no publish connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot start the publish connection's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the publish connection's loopback relay: {0}")]
    Relay(std::io::Error),
    #[error("cannot connect the publish connection: {0}")]
    Nats(String),
    #[error("the publish connection did not connect within {0:?}")]
    TimedOut(Duration),
}

/// The publish connection of this process: made on first use and after every fence.
pub struct PublishConnection {
    config: Config,
    /// Through the relay (`relay`): the servers' plain-text addresses (`host:port`).
    relayed: Option<Vec<String>>,
    /// Held only for a moment (never across an await), so a fence is never delayed.
    live: Mutex<Option<Live>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    generations: AtomicU64,
}

impl PublishConnection {
    /// `server_info` is what the main connection's server said: a server that asks for TLS is
    /// connected to directly.
    pub fn new(config: Config, server_info: &async_nats::ServerInfo) -> PublishConnection {
        let relayed = relay::upstreams(&config, server_info);
        PublishConnection {
            config,
            relayed,
            live: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generations: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Option<Connection> {
        let live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        live.as_ref().and_then(|live| {
            Some(Connection {
                generation: live.generation,
                client: live.client.clone(),
                js: live.js.clone(),
                runtime: live.runtime.as_ref()?.handle().clone(),
            })
        })
    }

    /// The current connection, connecting first when there is none.
    pub async fn get(&self) -> Result<Connection, ConnectError> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats-publish")
            .enable_all()
            .build()
            .map_err(ConnectError::Runtime)?;
        let config = self.config.clone();
        let servers = match &self.relayed {
            Some(upstreams) => match relay::start(&runtime, upstreams.clone()) {
                Ok(address) => vec![address],
                Err(err) => {
                    runtime.shutdown_background();
                    return Err(ConnectError::Relay(err));
                }
            },
            None => nats::server_addresses(&config),
        };
        let relayed = self.relayed.is_some();
        let connecting = runtime.spawn(async move {
            let options = nats::connect_options(&config).await.map_err(|err| err.to_string())?;
            let options = if relayed { options.ignore_discovered_servers() } else { options };
            options
                .name(format!("{}-publish", config.replica_id))
                .max_reconnects(None)
                .connection_timeout(CONNECT_TIMEOUT)
                .event_callback(|event| async move {
                    tracing::debug!(event = %event, "NATS publish connection event");
                })
                .connect(servers)
                .await
                .map_err(|err| err.to_string())
        });
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connecting).await {
            Ok(Ok(connected)) => connected.map_err(ConnectError::Nats),
            Ok(Err(join)) => Err(ConnectError::Nats(join.to_string())),
            Err(_) => Err(ConnectError::TimedOut(CONNECT_TIMEOUT * 2)),
        };
        let client = match connected {
            Ok(client) => client,
            Err(err) => {
                runtime.shutdown_background();
                return Err(err);
            }
        };
        let generation = self.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let js = nats::jetstream(client.clone(), &self.config);
        let handle = runtime.handle().clone();
        let connection = Connection { generation, client: client.clone(), js: js.clone(), runtime: handle };
        let live = Live { generation, client, js, runtime: Some(runtime) };
        *self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(live);
        tracing::debug!(generation, relayed = self.relayed.is_some(), "publish connection made");
        Ok(connection)
    }

    /// Ends connection `generation` if it is still the current one: everything it still holds is
    /// dropped unsent. True if it was ended by this call.
    pub fn fence(&self, generation: u64) -> bool {
        let mut live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if live.as_ref().is_some_and(|live| live.generation == generation) {
            // Dropping `Live` shuts its runtime down: the client's task, queue and socket go with it.
            *live = None;
            return true;
        }
        false
    }
}
