//! Memory within a container limit (issue 18): many busy shards of 2 KB records read under a small
//! `MEMORY_LIMIT_MB`. The memory budget makes readers wait instead of holding a page (and a prefetched
//! one) per busy shard, so the process's peak RSS stays under 75 % of the limit, and nothing is lost,
//! doubled or reordered on the way.

use std::time::Duration;

use serde_json::json;

use super::harness::{Rig, TABLE, Window, keys};

/// The limit the test runs under. Without a budget (`MEMORY_LIMIT_MB=0`) the 32 busy shards below took
/// the service (debug build) to 178 MiB, far over 75 % of it (96 MiB); with the budget (23 MiB of
/// pages) it peaked at 71–76 MiB on a loaded 2-core machine.
const LIMIT_MB: u64 = 128;

/// The peak resident size of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn many_busy_shards_of_2_kb_records_stay_under_75_percent_of_a_small_memory_limit() {
    let mut rig = Rig::new(Window::Tiny).await;
    // 32 open leaf shards: five rounds of splitting every open shard.
    for _ in 0..5 {
        for shard in rig.streams.open_shards(TABLE) {
            rig.streams.split(TABLE, &shard);
        }
    }
    assert_eq!(rig.streams.open_shards(TABLE).len(), 32);
    // About 1500 records of 2 KB per shard (a GetRecords page holds about 450 of them): every shard
    // reads several full 1 MB pages, prefetching each next one.
    let payload = json!({ "payload": { "S": "x".repeat(2000) } });
    let keys = keys(2000);
    for _ in 0..24 {
        for key in &keys {
            rig.write_with(key, payload.clone());
        }
    }
    let limit = (LIMIT_MB << 20).to_string();
    rig.start(&[("MEMORY_LIMIT_MB", &LIMIT_MB.to_string())]).await;
    let pid = rig.pid().unwrap();
    assert_eq!(rig.metric("memory_limit_bytes", &[]).await.to_string(), limit);
    let budget = rig.metric("memory_budget_bytes", &[]).await;
    assert!(budget > 0.0, "a budget was derived from MEMORY_LIMIT_MB");
    rig.settle_within(Duration::from_secs(300), &rig.written).await;
    let peak = peak_rss(pid);
    let waits = rig.metric("memory_waits_total", &[]).await;
    // Caught up: only the polls of empty pages charge the budget now, for a moment each.
    rig.until("nothing held of the memory budget", || async {
        (rig.metric("memory_held_bytes", &[]).await == 0.0).then_some(())
    })
    .await;
    rig.stop().await;
    eprintln!(
        "peak RSS {:.1} MiB under a {LIMIT_MB} MiB limit; budget {:.1} MiB; {waits} waits",
        peak as f64 / f64::from(1 << 20),
        budget / f64::from(1 << 20)
    );
    let target = (LIMIT_MB << 20) / 100 * 75;
    assert!(
        peak < target,
        "peak RSS {} MiB is not under 75 % of the {LIMIT_MB} MiB limit ({} MiB); budget {} MiB, {waits} waits",
        peak >> 20,
        target >> 20,
        budget / f64::from(1 << 20),
    );
    assert!(waits > 0.0, "the budget was spent and readers waited for it (peak RSS {} MiB)", peak >> 20);
    assert_eq!(rig.log_lines(&["memory budget for pages of records"]).len(), 1, "the budget is logged once");
    rig.assert_exact(&rig.messages().await, &rig.written);
}
