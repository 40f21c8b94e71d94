//! The DynamoDB Streams side: which shards exist ([`discovery`], [`topology`], [`layout`]), the AWS
//! calls ([`api`]) and their error classification ([`error`]), and the records they return turned
//! into the service's own [`ChangeRecord`]s ([`convert`]). The one place this side hands over
//! something publishing defines: a `GetRecords` body is transcoded straight into its events
//! (`publish::event::transcode`, issue 19), the cheapest form a stream record takes on its way to
//! NATS. The shard reader (`crate::pipeline`) reads through [`ShardSource`].

pub mod api;
pub mod convert;
pub mod discovery;
pub mod error;
pub mod layout;
#[cfg(test)]
pub mod memory;
pub mod raw_body;
pub mod scan;
pub mod topology;

use async_trait::async_trait;

use crate::publish::event::transcode::StreamEvent;
use convert::Unusable;
use error::ReadError;

/// Where a shard iterator starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    After(String),
}

/// A page of records, their events written, and the iterator for the next call (`None`: the shard
/// has ended).
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<StreamEvent>,
    /// Records that could not be converted (DynamoDB always sends what they lack): the reader logs
    /// and counts them.
    pub unusable: Vec<Unusable>,
    pub next_iterator: Option<String>,
    /// The response body the records were transcoded from: a table with a `filter` reads its records
    /// again from it, as Lambda shows them (`tables::PageDocuments`).
    pub body: bytes::Bytes,
}

/// Reading one shard: DynamoDB Streams in the service ([`api::StreamsApi`]), memory in unit tests.
#[async_trait]
pub trait ShardSource: Send + Sync {
    /// An iterator at `start` of `shard_id`.
    async fn iterator(&self, stream_arn: &str, shard_id: &str, start: &StartAt) -> Result<String, ReadError>;

    /// The page at `iterator`.
    async fn records(&self, iterator: &str) -> Result<Page, ReadError>;
}

/// The tables of the account and their tags, for table discovery (issue 20): DynamoDB in the service
/// ([`api::StreamsApi`]), memory in unit tests.
#[async_trait]
pub trait TableCatalog: Send + Sync {
    /// Every table name (`ListTables`, every page).
    async fn list_tables(&self) -> Result<Vec<String>, ReadError>;

    /// The table's ARN (`DescribeTable`), which `ListTagsOfResource` takes.
    async fn table_arn(&self, table: &str) -> Result<String, ReadError>;

    /// Every tag of the resource `arn` (`ListTagsOfResource`, every page).
    async fn tags(&self, arn: &str) -> Result<Vec<(String, String)>, ReadError>;
}
