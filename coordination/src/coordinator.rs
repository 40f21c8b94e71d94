//! The handle a service drives: [`Coordinator`], its [`Event`]s and its [`Status`].
//!
//! Owns the boundary between the caller and the driver task. Invariant kept: every lease the caller
//! may act on reaches it as [`Event::Acquired`] with a [`LeaseGuard`](crate::LeaseGuard); the caller learns of every loss
//! through the guard (always) and an [`Event::Revoked`] (as soon as the driver notices).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::driver::Driver;
use crate::keys::ShardKey;
use crate::messages::Command;
pub use crate::messages::{Event, RevokeReason, Status};
use crate::store::LeaseStore;

/// The stream of [`Event`]s. Unbounded on purpose: the driver must never wait for a slow caller
/// (that would delay renewals); its volume is bounded by the number of shards.
#[derive(Debug)]
pub struct Events(pub(crate) mpsc::UnboundedReceiver<Event>);

impl Events {
    /// The next event; `None` once the coordinator stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

/// One replica's side of the lease protocol. Dropping it without [`Coordinator::shutdown`] stops the
/// driver without releasing anything (as a crash would): peers take the leases after expiry.
#[derive(Debug)]
pub struct Coordinator {
    shards: watch::Sender<Option<BTreeSet<ShardKey>>>,
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<Status>,
    task: Option<JoinHandle<()>>,
}

impl Coordinator {
    /// Validates `config` and starts the driver task on the current tokio runtime.
    pub fn start(store: Arc<dyn LeaseStore>, config: Config) -> Result<(Coordinator, Events), ConfigError> {
        config.validate()?;
        let (shards, shards_rx) = watch::channel(None);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::default());
        let driver = Driver::new(store, config, shards_rx, commands_rx, events, status_tx);
        let task = tokio::spawn(driver.run());
        Ok((Coordinator { shards, commands, status, task: Some(task) }, Events(events_rx)))
    }

    /// Replaces the set of shards that are ready to be read.
    pub fn set_shards(&self, shards: impl IntoIterator<Item = ShardKey>) {
        self.shards.send_replace(Some(shards.into_iter().collect()));
    }

    /// Releases `shard` (after [`Event::HandOver`], once its final checkpoint is written): the guard
    /// turns invalid at once and peers may take the lease immediately.
    pub fn release(&self, shard: &ShardKey) {
        let _ = self.commands.send(Command::Release(shard.clone()));
    }

    /// `shard` was read to its end: its lease is deleted and not taken again by this replica.
    pub fn finish(&self, shard: &ShardKey) {
        let _ = self.commands.send(Command::Finish(shard.clone()));
    }

    /// Stops taking leases (the stop signal came): leases held are kept, renewed and handed over as
    /// before until [`Coordinator::shutdown`] releases them, but no new one is acquired, so nothing is
    /// taken only to be given back a moment later.
    pub fn drain(&self) {
        let _ = self.commands.send(Command::Drain);
    }

    /// The latest status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Releases every lease (guards turn invalid first) and removes this replica's presence, then
    /// stops. Call it after the final checkpoints are written.
    pub async fn shutdown(mut self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done)).is_ok() {
            let _ = finished.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
