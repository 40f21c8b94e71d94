//! The container's memory limit and the budget derived from it.
//!
//! The limit comes from `MEMORY_LIMIT_MB` when set (it overrides; `0` turns the budget off), else
//! from the cgroup the process runs in: cgroup v2's `memory.max` (`max`: no limit), then cgroup v1's
//! `memory.limit_in_bytes` (a value near 2^63: no limit). The budget is what is left of 75 % of the
//! limit once the process's fixed memory is set aside: its resident size when the budget is made
//! (connections made, nothing read yet) plus [`RUNTIME_HEADROOM`] for what grows beside the pages,
//! divided by the allocator's slack ([`ALLOCATOR_SLACK_PERCENT`]).

use std::fmt;
use std::path::Path;

/// Where the cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The share of the limit the process aims to stay under: the rest is the margin for the
/// allocator's slack and for what this budget does not count.
pub const TARGET_PERCENT: u64 = 75;

/// Memory the process grows by beside the pages while it runs, set aside from the budget: a reader
/// per shard (an idle shard costs under 64 KiB, docs/benchmarks.md), the NATS client's buffers and
/// the HTTP clients' connection pools.
pub const RUNTIME_HEADROOM: u64 = 16 * 1024 * 1024;

/// Resident memory per byte charged, in percent: the allocator keeps pages freed by one thread until
/// it purges them, while others allocate the next pages. Measured with the budget spent: the resident
/// size beyond the fixed part was 1.1 to 1.3 times the bytes held (tests/faults/memory.rs, 32 busy
/// shards, sampled every 100 ms), once 1.8 times at the peak, and 1.6 times at the peak with 64 busy
/// shards under a 256 MiB limit on a loaded machine (the benchmark's `memory` part).
pub const ALLOCATOR_SLACK_PERCENT: u64 = 200;

/// The least budget ever used, when the limit leaves less: one page at a time still reads (a
/// reader's charge is capped at the budget), only slowly.
pub const MIN_BUDGET: u64 = 4 * 1024 * 1024;

/// A cgroup v1 limit at or above this means "no limit" (v1 reports 2^63 rounded down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

/// Where the limit was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `MEMORY_LIMIT_MB`.
    Setting,
    /// cgroup v2 `memory.max`.
    CgroupV2,
    /// cgroup v1 `memory.limit_in_bytes`.
    CgroupV1,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Setting => "MEMORY_LIMIT_MB",
            Source::CgroupV2 => "cgroup v2 memory.max",
            Source::CgroupV1 => "cgroup v1 memory.limit_in_bytes",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A memory limit and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub bytes: u64,
    pub source: Source,
}

/// What `MEMORY_LIMIT_MB` says (validated in `crate::config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Setting {
    /// Unset: the cgroup's limit, if any.
    #[default]
    Detect,
    /// `0`: no budget, whatever the cgroup says.
    Off,
    /// A limit in bytes.
    Bytes(u64),
}

/// The limit `setting` and the cgroup files under `root` (`/sys/fs/cgroup` in the service) give.
pub fn find(setting: Setting, root: &Path) -> Option<Limit> {
    match setting {
        Setting::Off => None,
        Setting::Bytes(bytes) => Some(Limit { bytes, source: Source::Setting }),
        Setting::Detect => {
            let read = |path: &str| std::fs::read_to_string(root.join(path)).ok();
            if let Some(text) = read("memory.max") {
                return cgroup_v2(&text).map(|bytes| Limit { bytes, source: Source::CgroupV2 });
            }
            read("memory/memory.limit_in_bytes")
                .and_then(|text| cgroup_v1(&text))
                .map(|bytes| Limit { bytes, source: Source::CgroupV1 })
        }
    }
}

/// cgroup v2 `memory.max`: a number of bytes, or `max`.
fn cgroup_v2(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// cgroup v1 `memory.limit_in_bytes`: a number of bytes, near 2^63 when unlimited.
fn cgroup_v1(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|bytes| *bytes < V1_UNLIMITED)
}

/// The budget for pages under `limit` for a process whose fixed memory is `fixed` bytes:
/// [`TARGET_PERCENT`] of the limit less `fixed` and [`RUNTIME_HEADROOM`], divided by the allocator's
/// slack ([`ALLOCATOR_SLACK_PERCENT`]); at least [`MIN_BUDGET`].
pub fn budget_for(limit: u64, fixed: u64) -> u64 {
    let target = limit / 100 * TARGET_PERCENT;
    let room = target.saturating_sub(fixed + RUNTIME_HEADROOM);
    (room / ALLOCATOR_SLACK_PERCENT * 100).max(MIN_BUDGET)
}

/// The process's resident memory now (`VmRSS` in `/proc/self/status`); 0 where there is none.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    #[test]
    fn cgroup_v2_limit_and_its_max() {
        let dir = root(&[("memory.max", "268435456\n"), ("memory/memory.limit_in_bytes", "1000\n")]);
        assert_eq!(find(Setting::Detect, dir.path()), Some(Limit { bytes: 256 << 20, source: Source::CgroupV2 }));
        let dir = root(&[("memory.max", "max\n"), ("memory/memory.limit_in_bytes", "1000\n")]);
        assert_eq!(find(Setting::Detect, dir.path()), None, "v2 present and unlimited: v1 is not asked");
    }

    #[test]
    fn cgroup_v1_limit_and_its_huge_unlimited_value() {
        let dir = root(&[("memory/memory.limit_in_bytes", "536870912\n")]);
        assert_eq!(find(Setting::Detect, dir.path()), Some(Limit { bytes: 512 << 20, source: Source::CgroupV1 }));
        let dir = root(&[("memory/memory.limit_in_bytes", "9223372036854771712\n")]);
        assert_eq!(find(Setting::Detect, dir.path()), None);
        let dir = root(&[]);
        assert_eq!(find(Setting::Detect, dir.path()), None, "no cgroup files: no limit");
    }

    #[test]
    fn the_setting_overrides_the_cgroup_and_zero_turns_the_budget_off() {
        let dir = root(&[("memory.max", "268435456\n")]);
        assert_eq!(
            find(Setting::Bytes(100 << 20), dir.path()),
            Some(Limit { bytes: 100 << 20, source: Source::Setting })
        );
        assert_eq!(find(Setting::Off, dir.path()), None);
    }

    #[test]
    fn the_budget_is_three_quarters_of_the_limit_less_the_fixed_memory() {
        let limit = 256 << 20;
        let room = limit / 100 * 75 - (30 << 20) - RUNTIME_HEADROOM;
        assert_eq!(budget_for(limit, 30 << 20), room / ALLOCATOR_SLACK_PERCENT * 100);
        assert!((72 << 20..74 << 20).contains(&budget_for(limit, 30 << 20)), "about 73 MiB under 256 MiB");
        assert_eq!(budget_for(64 << 20, 60 << 20), MIN_BUDGET, "too small a limit still reads a page at a time");
    }

    #[test]
    fn this_process_has_a_resident_size() {
        if Path::new("/proc/self/status").exists() {
            assert!(resident_bytes() > 1 << 20);
        }
    }
}
