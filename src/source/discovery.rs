//! One table's shards: which exist, which may be read, and a reader for each that may.
//!
//! Every `SHARD_REFRESH_INTERVAL_SEC` (and at once when a reader finishes a shard) the watcher asks
//! `DescribeTable` for the stream and pages through `DescribeStream`. Lineage: a shard is read only
//! after its parent is finished (or its parent has left the stream), so per-item order holds across
//! splits. When the stream ARN changes, the old stream's shards are finished before the new stream's
//! are read. Finished checkpoints of shards that left the stream are deleted.
//!
//! A table that cannot be read (missing, no stream, `KEYS_ONLY`) is logged and counted at each
//! refresh and retried at the next; the other tables go on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Services;
use super::api::{ShardInfo, StartAt};
use super::shard::{Outcome, ShardReader};
use crate::checkpoint::{self, Position};

/// Watches one table and runs its shard readers.
pub struct TableWatcher {
    pub services: Arc<Services>,
    pub table: String,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// What the watcher knows between refreshes.
#[derive(Default)]
struct State {
    /// Stream ARNs oldest first; shards of all but the first wait until the first is finished.
    streams: VecDeque<String>,
    /// Shards with a finished checkpoint.
    finished: HashSet<String>,
    /// Shards being read, and how to stop each.
    running: HashMap<String, CancellationToken>,
    /// Shards that start at LATEST when they have no checkpoint (START_FROM_LATEST, first sighting).
    start_latest: HashSet<String>,
    /// Set once the bucket's checkpoints of this table have been loaded.
    loaded: bool,
}

impl TableWatcher {
    pub async fn run(self) {
        let (ended_tx, mut ended_rx) = mpsc::channel::<(String, Outcome)>(256);
        let mut state = State::default();
        loop {
            self.refresh(&mut state, &ended_tx).await;
            let wait = tokio::time::sleep(self.services.config.shard_refresh_interval);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = &mut wait => break,
                    Some((shard_id, outcome)) = ended_rx.recv() => {
                        state.running.remove(&shard_id);
                        if outcome == Outcome::Finished {
                            state.finished.insert(shard_id);
                            // Its children may start now.
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn refresh(&self, state: &mut State, ended: &mpsc::Sender<(String, Outcome)>) {
        let table = self.table.as_str();
        let metrics = &self.services.metrics;
        let stream = match self.services.api.table_stream(table).await {
            Ok(stream) => stream,
            Err(err) => {
                metrics.table_errors.with_label_values(&[table, err.kind()]).inc();
                tracing::error!(table, error = %err, "table cannot be read; retrying at the next refresh");
                return;
            }
        };
        if state.streams.back() != Some(&stream.stream_arn) {
            if !state.streams.is_empty() {
                tracing::warn!(table, new_stream = %stream.stream_arn, "stream ARN changed; the old stream's shards are finished first");
            }
            state.streams.push_back(stream.stream_arn.clone());
        }
        if !state.loaded {
            match self.load_finished(state).await {
                Ok(()) => state.loaded = true,
                Err(err) => {
                    tracing::warn!(table, error = %err, "cannot list checkpoints; retrying at the next refresh");
                    return;
                }
            }
        }
        let mut listed: Vec<(String, Vec<ShardInfo>)> = Vec::new();
        for arn in state.streams.clone() {
            match self.services.api.shards(&arn).await {
                Ok(shards) => listed.push((arn, shards)),
                Err(super::error::ReadError::NotFound(_))
                    if state.streams.len() > 1 && state.streams.front() == Some(&arn) =>
                {
                    tracing::warn!(table, stream = %arn, "old stream is gone; following the new one");
                    state.streams.pop_front();
                }
                Err(err) => {
                    metrics.get_records_errors.with_label_values(&[table, err.kind()]).inc();
                    tracing::warn!(table, stream = %arn, error = %err, "DescribeStream failed; retrying at the next refresh");
                    return;
                }
            }
        }
        // An old stream whose shards are all finished is done with.
        while state.streams.len() > 1 {
            let Some((arn, shards)) = listed.first() else { break };
            let done = shards.iter().all(|s| s.closed && state.finished.contains(&s.shard_id));
            if !done || state.streams.front() != Some(arn) {
                break;
            }
            tracing::info!(table, stream = %arn, "old stream finished");
            state.streams.pop_front();
            listed.remove(0);
        }
        let all: Vec<&ShardInfo> = listed.iter().flat_map(|(_, shards)| shards).collect();
        let present: HashSet<&str> = all.iter().map(|s| s.shard_id.as_str()).collect();
        let (mut reading, mut waiting) = (0i64, 0i64);
        for (index, (arn, shards)) in listed.iter().enumerate() {
            for shard in shards {
                let id = &shard.shard_id;
                if state.finished.contains(id) {
                    continue;
                }
                let parent_done = match &shard.parent_shard_id {
                    Some(parent) => state.finished.contains(parent) || !present.contains(parent.as_str()),
                    None => true,
                };
                if index > 0 || !parent_done {
                    waiting += 1;
                    continue;
                }
                reading += 1;
                if state.running.contains_key(id) {
                    continue;
                }
                let fresh_start = if state.start_latest.contains(id) { StartAt::Latest } else { StartAt::TrimHorizon };
                self.spawn_reader(state, arn, id, fresh_start, ended.clone());
            }
        }
        let finished_listed = all.iter().filter(|s| state.finished.contains(&s.shard_id)).count() as i64;
        metrics.shards_known.with_label_values(&[table, "reading"]).set(reading);
        metrics.shards_known.with_label_values(&[table, "waiting_for_parent"]).set(waiting);
        metrics.shards_known.with_label_values(&[table, "finished"]).set(finished_listed);
        self.clean_up(state, &present).await;
    }

    fn spawn_reader(
        &self,
        state: &mut State,
        arn: &str,
        shard_id: &str,
        fresh_start: StartAt,
        ended: mpsc::Sender<(String, Outcome)>,
    ) {
        let cancel = self.cancel.child_token();
        state.running.insert(shard_id.to_owned(), cancel.clone());
        let reader = ShardReader {
            services: self.services.clone(),
            table: self.table.clone(),
            subject: self.services.config.subject_for(&self.table),
            stream_arn: arn.to_owned(),
            shard_id: shard_id.to_owned(),
            fresh_start,
            cancel,
        };
        let shard_id = shard_id.to_owned();
        self.tracker.spawn(async move {
            let outcome = reader.run().await;
            // The watcher may be gone during shutdown; nothing waits for the news then.
            let _ = ended.send((shard_id, outcome)).await;
        });
    }

    /// Loads which shards are finished; on a table's first sighting with `START_FROM_LATEST`, marks
    /// the open leaf shards to start at LATEST.
    async fn load_finished(&self, state: &mut State) -> Result<(), checkpoint::CheckpointError> {
        let checkpoints = &self.services.checkpoints;
        let keys = checkpoints.shards_of(&self.table).await?;
        for (key, shard_id) in &keys {
            if let Some(Position::Finished { .. }) = checkpoints.load(key).await?.position {
                state.finished.insert(shard_id.clone());
            }
        }
        if keys.is_empty() && self.services.config.start_from_latest {
            let arn = state.streams.back().cloned().unwrap_or_default();
            let shards = self
                .services
                .api
                .shards(&arn)
                .await
                .map_err(|err| checkpoint::CheckpointError::Nats { key: self.table.clone(), source: err.into() })?;
            let parents: HashSet<&str> = shards.iter().filter_map(|s| s.parent_shard_id.as_deref()).collect();
            for shard in &shards {
                if !shard.closed && !parents.contains(shard.shard_id.as_str()) {
                    state.start_latest.insert(shard.shard_id.clone());
                }
            }
            tracing::info!(table = %self.table, shards = state.start_latest.len(), "first sighting with START_FROM_LATEST: open shards start at LATEST");
        }
        Ok(())
    }

    /// Deletes finished checkpoints of shards that have left every stream we follow.
    async fn clean_up(&self, state: &mut State, present: &HashSet<&str>) {
        let gone: Vec<String> = state.finished.iter().filter(|id| !present.contains(id.as_str())).cloned().collect();
        for shard_id in gone {
            let key = checkpoint::key(&self.table, &shard_id);
            let result = async {
                let stored = self.services.checkpoints.load(&key).await?;
                if matches!(stored.position, Some(Position::Finished { .. })) {
                    self.services.checkpoints.delete(&key, stored.revision).await?;
                }
                Ok::<(), checkpoint::CheckpointError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    tracing::info!(table = %self.table, shard_id, "finished shard left the stream; checkpoint deleted");
                    state.finished.remove(&shard_id);
                }
                Err(err) => {
                    tracing::warn!(table = %self.table, shard_id, error = %err, "cannot delete finished checkpoint; retrying later")
                }
            }
        }
    }
}
