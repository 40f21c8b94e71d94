//! Shard leases over a compare-and-swap key-value store.
pub mod config;
pub mod coordinator;
mod driver;
pub mod guard;
pub mod keys;
pub mod lease;
mod messages;
pub mod plan;
pub mod store;

pub use config::{Config, ConfigError, DEFAULT_TTL};
pub use coordinator::{Coordinator, Event, Events, RevokeReason, Status};
pub use guard::{LeaseGuard, LeaseLost};
pub use keys::ShardKey;
pub use lease::{Owner, Term};
pub use store::{Change, LeaseStore, MemoryStore, NatsKvStore, Revision, StoreError, Versioned};
