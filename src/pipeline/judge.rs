//! A page's stream records judged by their table's settings (`TABLES_FILE`, [`crate::tables`]) on
//! their way to the sink: the live reader and the backfill replay go through [`Judge`], so every
//! stream record of a table follows the same settings. A table without settings costs one lookup per
//! page.

use bytes::Bytes;

use super::Pipeline;
use crate::publish::Prepared;
use crate::publish::event::transcode::StreamEvent;
use crate::record::Origin;
use crate::tables::{PageDocuments, TableSettings};

/// A page's stream records of one table made ready to publish under the table's settings
/// (`TABLES_FILE`): each is prepared (projected, flagged, routed) or dropped and counted. A table
/// without settings goes straight to the sink, as before.
pub(crate) struct Judge<'p> {
    pipeline: &'p Pipeline,
    table: &'p str,
    shard_id: &'p str,
    settings: Option<&'p TableSettings>,
    /// The page's records as a filter sees them (only for a table with a filter).
    documents: Option<PageDocuments>,
}

impl<'p> Judge<'p> {
    /// The judge of a page of `table` read as `body`.
    pub(crate) fn new(pipeline: &'p Pipeline, table: &'p str, shard_id: &'p str, body: Bytes) -> Judge<'p> {
        let settings = pipeline.tables.lookup(table);
        let documents = settings.filter(|s| s.needs_documents()).and_then(|_| {
            let documents = PageDocuments::parse(body);
            if documents.is_none() {
                tracing::warn!(table, shard_id, "page body cannot be read for the filter: its records are published");
            }
            documents
        });
        Judge { pipeline, table, shard_id, settings, documents }
    }

    /// The record ready to publish as `origin`, or the `keys` JSON of a record dropped (counted in
    /// `records_filtered_total`).
    pub(crate) fn prepare(&mut self, event: StreamEvent, origin: Origin) -> Result<Prepared, Vec<u8>> {
        let (pipeline, table, shard_id) = (self.pipeline, self.table, self.shard_id);
        let Some(settings) = self.settings else {
            return Ok(pipeline.sink.prepare_stream(table, shard_id, event, origin));
        };
        if let Some(reason) = settings.drops(&event, self.documents.as_mut()) {
            pipeline.metrics.records_filtered.with_label_values(&[table, reason.as_str()]).inc();
            return Err(event.keys_json().to_vec());
        }
        let (event, subject) = settings.shape(&pipeline.subject_prefix, table, event);
        Ok(pipeline.sink.prepare_stream(table, shard_id, event, origin).routed(subject))
    }

    /// Whether the table has settings (else every record is prepared as it is).
    pub(crate) fn has_settings(&self) -> bool {
        self.settings.is_some()
    }
}
