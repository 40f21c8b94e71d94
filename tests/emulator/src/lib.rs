//! A fault-injecting DynamoDB Streams endpoint, for the faults the moto emulator cannot produce.
//!
//! [`FaultyStreams`] is an HTTP server on 127.0.0.1 that speaks the AWS JSON 1.0 protocol of DynamoDB
//! Streams (`DescribeStream`, `GetShardIterator`, `GetRecords`, `ListStreams`) and of DynamoDB's
//! `DescribeTable` and `Scan` (parallel, paged, with consumed capacity: a backfill's reads), so the
//! production SDK clients talk to it unchanged once
//! `AWS_ENDPOINT_URL_DYNAMODB_STREAMS` and `AWS_ENDPOINT_URL_DYNAMODB` point at [`FaultyStreams::endpoint`].
//! Behind it is an in-memory model of tables, streams, shards and records that a test drives directly:
//! it writes items, splits and rolls over shards, expires iterators, trims and drops data, re-enables
//! and deletes streams, and queues per-operation faults (throttling, HTTP 500, delays that become SDK
//! time-outs, stale `DescribeTable` answers). A *synthetic* table generates its items from their
//! index whenever a `Scan` reads them, so the backfill benchmark scans a million items without
//! storing them.
//! A write goes to the one open shard that owns its key hash, so the same item always lands in the
//! same child after a split, and sequence numbers are unique across the whole server.
//!
//! Layout: `model` (state and its changes), `types` (the values tests pass), `names` (ids and ARNs),
//! `faults` (queued faults and call counts), `iterator` (stateless tokens), `ops` and `shapes` (the API
//! operations and their JSON), `scan` (segments, pages, item sizes and read units of `Scan`, and the
//! synthetic items), `http` (the server), `controls` (the methods tests call). The
//! `streams-fault` binary (`src/bin/streams-fault/`) serves the same endpoint as a process of its
//! own, with many shards that roll over and split on timers.

mod controls;
mod faults;
mod http;
mod iterator;
mod model;
mod names;
mod ops;
mod scan;
mod shapes;
mod types;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use faults::{Op, Throttle};
pub use names::{ACCOUNT, REGION};
pub use types::{Attributes, EventName, NewRecord, UserIdentity, ViewType, Written};

use model::Model;

/// A running fault-injecting endpoint. Clones share the model and the server; the server stops when
/// the last clone is dropped (a delayed call still waiting then gets a 503).
#[derive(Clone)]
pub struct FaultyStreams {
    model: Arc<Mutex<Model>>,
    address: SocketAddr,
    _server: Arc<StopOnDrop>,
}

/// Stops the server task when dropped.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl FaultyStreams {
    /// Binds a free port on 127.0.0.1 and serves on a task of the current tokio runtime (so a test that
    /// blocks its thread, on a current-thread runtime, blocks the endpoint too).
    pub async fn start() -> FaultyStreams {
        FaultyStreams::start_on(0)
            .await
            .unwrap_or_else(|err| panic!("bind the fault-injecting streams endpoint on 127.0.0.1: {err}"))
    }

    /// Like [`Self::start`] on 127.0.0.1:`port` (0: a free port the OS picks); an error when the port
    /// cannot be bound (in use, or privileged).
    pub async fn start_on(port: u16) -> std::io::Result<FaultyStreams> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
        let address = listener.local_addr()?;
        let model = Arc::new(Mutex::new(Model::default()));
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, model.clone(), stop.clone()));
        Ok(FaultyStreams { model, address, _server: Arc::new(StopOnDrop(stop)) })
    }

    /// The endpoint URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The environment that points the service's DynamoDB and DynamoDB Streams clients here.
    pub fn env(&self) -> Vec<(String, String)> {
        ["AWS_ENDPOINT_URL_DYNAMODB_STREAMS", "AWS_ENDPOINT_URL_DYNAMODB"]
            .into_iter()
            .map(|name| (name.to_owned(), self.endpoint()))
            .collect()
    }

    /// An SDK configuration for this endpoint: region [`REGION`], static test credentials.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "faulty"))
            .load()
            .await
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        http::lock(&self.model)
    }
}
