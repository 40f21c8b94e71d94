//! Backpressure: shards whose in-flight windows together exceed the process-wide cap on unacknowledged
//! publishes (`MAX_ACKS_IN_FLIGHT`).

use streams_emulator::Op;

use super::harness::{Rig, TABLE, Window, keys};

/// Broke once: with async-nats waiting for an ack permit inside a publish, shards that each held
/// unawaited acks blocked one another for good once their windows together passed the cap (5000 by
/// default, so any 6 busy shards). Eight shards of full pages under a cap of 1500 must all drain.
#[tokio::test(flavor = "multi_thread")]
async fn busy_shards_beyond_the_ack_cap_all_drain_instead_of_deadlocking() {
    let mut rig = Rig::new(Window::Tiny).await;
    // Eight open leaf shards: split the shard, then each child, then each grandchild.
    for _ in 0..3 {
        for shard in rig.streams.open_shards(TABLE) {
            rig.streams.split(TABLE, &shard);
        }
    }
    assert_eq!(rig.streams.open_shards(TABLE).len(), 8);
    // About 1500 records per shard, so every shard reads full pages of 1000.
    let keys = keys(400);
    for _ in 0..30 {
        rig.write_all(&keys);
    }
    rig.start(&[("MAX_IN_FLIGHT", "1000"), ("MAX_ACKS_IN_FLIGHT", "1500")]).await;
    rig.settle(&rig.written).await;
    // Full pages on eight shards: their windows (8 × 1000) are far past the cap, so it was reached.
    assert!(rig.streams.calls(Op::GetRecords) >= 16, "full pages were read");
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}
