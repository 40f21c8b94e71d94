//! `status [--json]`: the fleet as the checkpoint bucket shows it, for an operator without the `nats`
//! CLI: the replicas alive (their presence keys) with the leases each holds, then every checkpoint of
//! every configured table with when it last moved and who holds its lease.

use dynamodb_stream_consumer::config::Config;
use serde_json::json;

use super::fleet::{self, Bucket, Fleet, Lease};
use super::{CommandError, bucket_error, open_bucket};

/// Prints the fleet's state: tables for a person, or one JSON document (`json`) for a script.
pub async fn status(config: &Config, json: bool) -> Result<String, CommandError> {
    let bucket = Bucket::new(config.bucket.clone(), open_bucket(config).await?);
    let fleet = Fleet::read(bucket.store.as_ref()).await.map_err(|err| bucket_error(&bucket, &err))?;
    let tables = super::selected_tables(config, &bucket).await?;
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    let rows = fleet::checkpoint_rows(&bucket, &fleet, &tables).await.map_err(|err| bucket_error(&bucket, &err))?;
    Ok(if json { as_json(&bucket, &fleet, &rows) } else { as_text(&bucket, &fleet, &rows) })
}

fn as_text(bucket: &Bucket, fleet: &Fleet, rows: &[fleet::Row]) -> String {
    let mut replicas = vec![["REPLICA".to_owned(), "INSTANCE".to_owned(), "GROUP".to_owned(), "LEASES".to_owned()]];
    replicas.extend(fleet.alive.iter().map(|(instance, presence)| {
        let leases = fleet.leases_held_by(instance).to_string();
        [presence.owner.replica.clone(), instance.clone(), presence.group.clone(), leases]
    }));
    let mut out = fleet::columns(&replicas);
    out.push(format!("{} alive in bucket {}", fleet::count(replicas.len() - 1, "replica"), bucket.name));
    out.push(String::new());
    let header = ["TABLE", "SHARD", "CHECKPOINT", "MOVED", "LEASE"].map(str::to_owned);
    let mut checkpoints = vec![header];
    checkpoints.extend(rows.iter().map(|row| {
        let moved = row.moved.map(fleet::ago).unwrap_or_else(|| "-".to_owned());
        [row.table.clone(), row.shard_id.clone(), row.value.clone(), moved, row.lease.to_string()]
    }));
    out.extend(fleet::columns(&checkpoints));
    out.push(fleet::count(rows.len(), "checkpoint"));
    out.join("\n")
}

/// The document README's "Operator commands" describes.
fn as_json(bucket: &Bucket, fleet: &Fleet, rows: &[fleet::Row]) -> String {
    let replicas: Vec<serde_json::Value> = fleet
        .alive
        .iter()
        .map(|(instance, presence)| {
            json!({
                "replica": presence.owner.replica,
                "instance": instance,
                "group": presence.group,
                "leases": fleet.leases_held_by(instance),
            })
        })
        .collect();
    let checkpoints: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let (lease, holder) = match &row.lease {
                Lease::Held { replica, .. } => ("held", Some(replica)),
                Lease::Expired { replica } => ("expired", Some(replica)),
                Lease::Free => ("free", None),
            };
            json!({
                "table": row.table,
                "shard": row.shard_id,
                "checkpoint": row.value,
                "moved_seconds_ago": row.moved.map(|moved| moved.as_secs()),
                "lease": lease,
                "holder": holder,
            })
        })
        .collect();
    json!({ "bucket": bucket.name, "replicas": replicas, "checkpoints": checkpoints }).to_string()
}
