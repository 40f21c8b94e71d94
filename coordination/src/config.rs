//! Timing and identity settings of a coordinator, with the defaults and the checks that keep the
//! fencing argument true.
//!
//! Invariant kept by [`Config::validate`]: a renewal attempt (started every `renew_interval`, given up
//! after `op_timeout`) fits before the guard's deadline (`ttl - safety_margin` after the previous
//! successful start), with room for a retry, so a healthy replica never fences itself.

use std::time::Duration;

use crate::lease::Owner;

/// Default lease TTL (SPEC §4: lease TTL default 10 s).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// The longest group fingerprint: it is written in every heartbeat, so it should be a hash (16 hex
/// digits for 64 bits), not the list it stands for.
pub const MAX_GROUP_LEN: usize = 64;

/// Settings of one coordinator.
#[derive(Clone, Debug)]
pub struct Config {
    /// The replica's name (the host name by default in the service); shown in lease values.
    pub replica_id: String,
    /// The process's uuid; a fresh random one unless set (the simulation sets it for determinism).
    pub instance: String,
    /// A lease whose revision has not changed for this long (locally observed) is expired.
    pub ttl: Duration,
    /// How often held leases and the presence key are rewritten (SPEC §7: TTL/3).
    pub renew_interval: Duration,
    /// How often the lease table is read (default renew_interval/2, so a dead owner's lease is seen
    /// expiring within half a renew interval and its shards move within TTL + one renew interval).
    pub poll_interval: Duration,
    /// A guard turns invalid this long before peers may consider its lease expired. It absorbs clock
    /// rate differences between hosts and the time between a guard check and the side effect it
    /// allows (one publish batch or checkpoint write must take less than this).
    pub safety_margin: Duration,
    /// A store operation not answered within this is treated as failed (it may still land).
    pub op_timeout: Duration,
    /// At most this many leases held at once (`None`: unlimited).
    pub max_leases: Option<usize>,
    /// Which shards this replica can serve, as a short fingerprint given by the caller (the service
    /// hashes its table list). Replicas count only peers of the same group when they share out and
    /// balance leases, so deployments with different shard sets can share one bucket. Empty by
    /// default, which is also how a presence value written before groups existed reads.
    pub group: String,
    /// Whether held leases live through one session key renewed every renew interval (the default)
    /// or each through its own renewals, as the previous version did. `false` exists so that the
    /// simulation can run fleets that mix both versions; see `DESIGN.md`, "Sessions".
    pub sessions: bool,
}

/// A setting that breaks the timing argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid coordination setting: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// The defaults for `ttl`: renew every TTL/3, poll every TTL/6, margin TTL/5, op timeout TTL/6.
    pub fn new(replica_id: impl Into<String>, ttl: Duration) -> Self {
        Config {
            replica_id: replica_id.into(),
            instance: uuid::Uuid::new_v4().to_string(),
            ttl,
            renew_interval: ttl / 3,
            poll_interval: ttl / 6,
            // TTL/5 = 2 s at the default TTL: far above clock rate drift (<0.1% of 10 s = 10 ms) and
            // room for a publish batch; it leaves TTL − margin − renew = 4.7 s for a renewal retry.
            safety_margin: ttl / 5,
            op_timeout: ttl / 6,
            max_leases: None,
            group: String::new(),
            sessions: true,
        }
    }

    pub fn owner(&self) -> Owner {
        Owner { replica: self.replica_id.clone(), instance: self.instance.clone() }
    }

    /// Checks the relations the fencing argument needs (see `DESIGN.md`, "Timing").
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |why: String| Err(ConfigError(why));
        if self.replica_id.is_empty() {
            return fail("replica id is empty".into());
        }
        if crate::keys::check_kv_key(&self.instance).is_err() {
            return fail(format!("instance {:?} is not a valid key fragment", self.instance));
        }
        if self.ttl.is_zero() || self.renew_interval.is_zero() || self.poll_interval.is_zero() {
            return fail("ttl, renew interval and poll interval must be positive".into());
        }
        if self.safety_margin.is_zero() || self.safety_margin >= self.ttl {
            return fail(format!("safety margin {:?} must be in (0, ttl {:?})", self.safety_margin, self.ttl));
        }
        if self.op_timeout.is_zero() {
            return fail("op timeout must be positive".into());
        }
        let budget = self.ttl - self.safety_margin;
        if self.renew_interval + self.op_timeout >= budget {
            return fail(format!(
                "renew interval {:?} + op timeout {:?} must stay below ttl - safety margin {:?}",
                self.renew_interval, self.op_timeout, budget
            ));
        }
        if self.max_leases == Some(0) {
            return fail("max leases must be at least 1".into());
        }
        if self.group.len() > MAX_GROUP_LEN {
            return fail(format!("group {:?} is longer than {MAX_GROUP_LEN} bytes", self.group));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_timings_are_refused() {
        let config = Config::new("r1", DEFAULT_TTL);
        config.validate().unwrap();
        assert_eq!(config.renew_interval, Duration::from_millis(3333) + Duration::from_nanos(333_333));
        let mut slow = config.clone();
        slow.renew_interval = Duration::from_secs(7);
        assert!(slow.validate().is_err());
        let mut no_margin = config.clone();
        no_margin.safety_margin = Duration::ZERO;
        assert!(no_margin.validate().is_err());
        let mut long_group = config;
        long_group.group = "0123456789abcdef".into();
        long_group.validate().unwrap();
        long_group.group = "x".repeat(MAX_GROUP_LEN + 1);
        assert!(long_group.validate().is_err());
    }
}
