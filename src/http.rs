//! The HTTP endpoints of SPEC §8: `/livez`, `/readyz`, `/metrics` and `/status`.
//!
//! Readiness is one shared flag set by the service's lifecycle (connected and serving, not shutting
//! down) combined, at the moment of the probe, with the NATS connection's state and whether the
//! coordinator could read the lease table at its last try ("serving its leases"), and with the tables
//! that cannot be read for a reason of ours (each named in the 503's body). Every probe and every
//! scrape also sets the `ready` and `nats_connected` gauges from that same answer.
//!
//! `/status` field names are stable: `replica_id`, `serving`, `nats_connected`, `live_replicas`,
//! `lease_renewal` (`session`: one write per renew interval; `each_lease`: while a replica of the
//! previous version is present), `leases` (held shard lease keys), `shards` (see
//! [`crate::status::ShardStatus`]), `tables_unreadable` (table → `reason`, `message`) and `backfills`
//! (table → its latest backfill: `epoch`, `phase`, `segments_done`, `segments`, `replays_done`,
//! `replays_due`, `items_estimate`, `items_published_here`, `elapsed_s`, `eta_s`) and `memory` (the
//! memory budget: `limit_bytes`, `limit_source`, `fixed_bytes`, `budget_bytes`, `held_bytes`, `waits`;
//! null limit and budget without a memory limit) and `table_settings` (table → its effective
//! `TABLES_FILE` settings: `matched` (the file's key, or null), `filter`, `include_attributes`,
//! `exclude_attributes`, `subject`, `ttl_deletes`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::backfill::watch::{Backfills, eta_secs, now_ms};
use crate::status::UnreadableTables;

/// What the endpoints report on.
pub struct Health {
    /// Set while the service serves its shards; cleared first thing at shutdown.
    pub serving: AtomicBool,
    /// The NATS client, once connected.
    pub nats: std::sync::OnceLock<async_nats::Client>,
    pub metrics: Arc<Metrics>,
    pub replica_id: String,
    /// The coordinator's status, once it runs.
    pub leases: std::sync::OnceLock<watch::Receiver<coordination::Status>>,
    /// Configured tables that cannot be read for a reason of ours.
    pub unreadable: Arc<UnreadableTables>,
    /// The tables' backfills, once the fleet runs.
    pub backfills: std::sync::OnceLock<watch::Receiver<Backfills>>,
    /// The tables selected now and why (issue 20), once the fleet started.
    pub tables: std::sync::OnceLock<watch::Receiver<crate::pipeline::tables::Selected>>,
    /// The memory budget, once start-up sized it.
    pub memory: std::sync::OnceLock<crate::memory::Sizing>,
    /// `TABLES_FILE`'s settings and the tables named in `DYNAMODB_TABLES`, for each table's
    /// effective settings.
    pub settings: std::sync::OnceLock<(Arc<crate::tables::TablesFile>, Vec<String>)>,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, replica_id: String) -> Self {
        Health {
            serving: AtomicBool::new(false),
            nats: std::sync::OnceLock::new(),
            metrics,
            replica_id,
            leases: std::sync::OnceLock::new(),
            unreadable: Arc::default(),
            backfills: std::sync::OnceLock::new(),
            tables: std::sync::OnceLock::new(),
            memory: std::sync::OnceLock::new(),
            settings: std::sync::OnceLock::new(),
        }
    }

    fn leases(&self) -> coordination::Status {
        self.leases.get().map(|status| status.borrow().clone()).unwrap_or_default()
    }

    fn nats_connected(&self) -> bool {
        let connected =
            self.nats.get().is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
        self.metrics.nats_connected.set(i64::from(connected));
        connected
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

impl Health {
    /// The readiness answer, also kept in the `ready` gauge. A configured table that cannot be read
    /// for a reason of ours makes it 503, its body naming the table and why.
    fn readiness(&self) -> (StatusCode, String) {
        let serving = self.serving.load(Ordering::SeqCst);
        let connected = self.nats_connected();
        let leases = self.leases().store_reachable;
        let unreadable = self.unreadable.snapshot();
        let answer = match (serving, connected, leases) {
            (true, true, true) if unreadable.is_empty() => (StatusCode::OK, "ready\n".to_owned()),
            (true, true, true) => {
                let lines: Vec<String> = unreadable
                    .iter()
                    .map(|(table, why)| format!("table {table} cannot be read ({}): {}\n", why.reason, why.message))
                    .collect();
                (StatusCode::SERVICE_UNAVAILABLE, lines.concat())
            }
            (false, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "not serving\n".to_owned()),
            (true, false, _) => (StatusCode::SERVICE_UNAVAILABLE, "NATS not connected\n".to_owned()),
            (true, true, false) => (StatusCode::SERVICE_UNAVAILABLE, "lease table not readable\n".to_owned()),
        };
        self.metrics.ready.set(i64::from(answer.0 == StatusCode::OK));
        answer
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.readiness()
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.readiness();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], health.metrics.encode())
}

async fn status(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let leases = health.leases();
    axum::Json(serde_json::json!({
        "replica_id": health.replica_id,
        "serving": health.serving.load(Ordering::SeqCst),
        "nats_connected": health.nats_connected(),
        "live_replicas": leases.live_replicas,
        "lease_renewal": if leases.renews_each_lease { "each_lease" } else { "session" },
        "leases": leases.held.iter().map(|shard| shard.as_str()).collect::<Vec<_>>(),
        "shards": health.metrics.progress().snapshot(),
        "tables": health.selected_tables(),
        "tables_unreadable": health.unreadable.snapshot(),
        "backfills": health.backfills(),
        "memory": health.memory.get().map(|sizing| sizing.status(health.metrics.memory_waits.get())),
        "table_settings": health.table_settings(),
    }))
}

impl Health {
    /// Each table's effective settings (`TABLES_FILE`): the tables named in `DYNAMODB_TABLES`, the
    /// tables selected now (patterns, tags) and any other table read here.
    fn table_settings(&self) -> std::collections::BTreeMap<String, crate::tables::EffectiveSettings> {
        let Some((file, named)) = self.settings.get() else { return Default::default() };
        let selected: Vec<String> = self
            .tables
            .get()
            .and_then(|tables| tables.borrow().clone())
            .map(|set| set.keys().cloned().collect())
            .unwrap_or_default();
        let read_here = self.metrics.progress().snapshot().into_iter().map(|shard| shard.table);
        let tables = named.iter().cloned().chain(selected).chain(read_here);
        tables.map(|table| (table.clone(), file.effective(&table))).collect()
    }

    /// Each selected table with how it was selected (`name`, `pattern` or `tags`); `null` while the
    /// fleet's set is not known yet.
    fn selected_tables(&self) -> serde_json::Value {
        let selected = self.tables.get().and_then(|tables| tables.borrow().clone());
        match selected {
            Some(set) => set.iter().map(|(table, by)| (table.clone(), serde_json::json!(by.as_str()))).collect(),
            None => serde_json::Value::Null,
        }
    }

    /// Each table's latest backfill as this replica last read it.
    fn backfills(&self) -> serde_json::Map<String, serde_json::Value> {
        let Some(backfills) = self.backfills.get() else { return serde_json::Map::new() };
        let backfills = backfills.borrow().clone();
        backfills
            .tables
            .iter()
            .map(|(table, backfill)| {
                let state = &backfill.state;
                let end = if state.phase.is_over() { state.since } else { now_ms() };
                let elapsed_s = end.saturating_sub(state.started) / 1000;
                let items_here = self.metrics.backfill_items.with_label_values(&[table]).get();
                let status = serde_json::json!({
                    "epoch": state.epoch,
                    "phase": state.phase.as_str(),
                    "segments_done": backfill.segments_done,
                    "segments": state.segments,
                    "replays_done": backfill.replays_done,
                    "replays_due": backfill.replays_due,
                    "items_estimate": state.items,
                    "items_published_here": items_here,
                    "elapsed_s": elapsed_s,
                    "eta_s": eta_secs(backfill, elapsed_s),
                });
                (table.clone(), status)
            })
            .collect()
    }
}

/// Listens on `address`. The unspecified IPv6 address (`BIND=*`) takes IPv4 connections too, as the
/// original's `:port` did (whatever the host's `bindv6only`), so IPv4-only and IPv6-only clusters
/// both reach it; a host without IPv6 gets `0.0.0.0` instead.
async fn listen(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if address.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return tokio::net::TcpListener::bind(address).await;
    }
    let dual_stack = || -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    match dual_stack() {
        Ok(listener) => tokio::net::TcpListener::from_std(listener),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Err(err),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen on IPv6 ([::]); listening on IPv4 only (0.0.0.0)");
            tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), address.port())).await
        }
    }
}

/// Binds the listener (so a bad BIND or a taken PORT fails start-up) and returns the server task.
pub async fn serve(
    address: SocketAddr,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    let listener = listen(address).await?;
    tracing::info!(address = %listener.local_addr()?, "http server listening");
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(health);
    Ok(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(err) = server.await {
            tracing::error!(error = %err, "http server failed");
        }
    })
}
