//! The lease settings handed to the coordination crate, and the lease group of this replica.
//!
//! The TTL, renew interval and cap are checked against the fencing argument of
//! `coordination/DESIGN.md`. The group is a fingerprint of the table list (with patterns and tag
//! rules, their text) that every build must compute alike, or a rolling upgrade would split the fleet.

use std::collections::BTreeSet;

use super::Args;
use super::checker::Checker;

/// The lease settings: TTL, renew interval (TTL/3 unless set) and cap, checked against the fencing
/// argument of `coordination/DESIGN.md` (a renewal must fit well before the guard's deadline).
pub(super) fn lease_config(
    check: &mut Checker,
    args: &Args,
    replica_id: &str,
    selection: &[String],
) -> coordination::Config {
    // Below 2 s the safety margin (TTL/5) would not cover one publish batch.
    let ttl = check.secs("LEASE_TTL_SEC", &args.lease_ttl_sec, 2, 3_600);
    let mut lease = coordination::Config::new(replica_id, ttl);
    // Replicas share leases only with peers that read the same tables (coordination/DESIGN.md,
    // "Groups"): deployments with other table lists in the same bucket, or the other side of a rolling
    // change of this list, do not lower this replica's share. A selection by patterns or tags is
    // grouped by its rules (`TableSelection::fingerprint_parts`), which every replica of the fleet
    // shares whatever tables the rules select at the moment.
    lease.group = table_set_fingerprint(selection);
    if !args.lease_renew_interval_ms.trim().is_empty() {
        let renew = check.millis("LEASE_RENEW_INTERVAL_MS", &args.lease_renew_interval_ms, 100, 3_600_000);
        lease.renew_interval = renew;
        lease.poll_interval = renew / 2;
    }
    if !args.max_leases.trim().is_empty() {
        lease.max_leases = Some(check.number("MAX_LEASES", &args.max_leases, 1, 1_000_000) as usize);
    }
    let settings_ok = !check.0.iter().any(|(v, _)| v.starts_with("LEASE_") || *v == "MAX_LEASES");
    if settings_ok && let Err(err) = lease.validate() {
        check.fail("LEASE_RENEW_INTERVAL_MS", format!("{} (with LEASE_TTL_SEC {})", err.0, ttl.as_secs()));
    }
    lease
}

/// The lease group of a table list: 16 hex digits of FNV-1a 64 over the sorted, distinct names, each
/// followed by a NUL byte (which no table name contains, so `["ab"]` and `["a", "b"]` differ).
/// Written out here rather than taken from `std`'s `DefaultHasher`, whose output may change between
/// Rust versions: replicas built by different compilers meet in a rolling upgrade and must agree.
pub fn table_set_fingerprint(tables: &[String]) -> String {
    // FNV-1a 64 parameters (Fowler, Noll, Vo: the 64-bit offset basis and prime).
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let names: BTreeSet<&str> = tables.iter().map(String::as_str).collect();
    let bytes = names.into_iter().flat_map(|name| name.bytes().chain([0]));
    let hash = bytes.fold(OFFSET_BASIS, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    #[test]
    fn table_set_fingerprint_ignores_order_and_duplicates() {
        let list = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<String>>();
        let orders = table_set_fingerprint(&list(&["orders", "customers"]));
        assert_eq!(orders, table_set_fingerprint(&list(&["customers", "orders"])));
        assert_eq!(orders, table_set_fingerprint(&list(&["customers", "orders", "customers"])));
        assert_ne!(orders, table_set_fingerprint(&list(&["orders"])));
        assert_ne!(table_set_fingerprint(&list(&["ab"])), table_set_fingerprint(&list(&["a", "b"])));
        // Pinned: replicas of another build must compute the same group, so a change of the algorithm
        // (which would split a fleet during its rolling upgrade) fails here.
        assert_eq!(table_set_fingerprint(&list(&["orders"])), "ddc04b9f33c6b224");
        assert_eq!(orders, "6b6a17171bbcbaa9");
        let config = args(&[("dynamodb-tables", "customers, orders")]).validate().expect("valid");
        assert_eq!(config.lease.group, orders);
    }

    #[test]
    fn a_renew_interval_that_breaks_fencing_is_refused() {
        let error = args(&[("dynamodb-tables", "orders"), ("lease-ttl-sec", "3"), ("lease-renew-interval-ms", "2500")])
            .validate()
            .expect_err("renewal cannot fit");
        assert_eq!(error.0[0].0, "LEASE_RENEW_INTERVAL_MS", "{error}");
        let config = args(&[("dynamodb-tables", "orders"), ("lease-ttl-sec", "3"), ("max-leases", "4")])
            .validate()
            .expect("valid");
        assert_eq!(config.lease.max_leases, Some(4));
    }
}
