//! `START_FROM_LATEST=true` (issue 14, item 3): everything written from the table's first sighting on
//! is published exactly once, and nothing written before it, whichever shards exist then (a closed
//! parent with history, open children) and whoever reads them.

use super::harness::{BUCKET, Rig, TABLE, Window, epoch_second, keys};

/// Before the fix the closed parent was read from `TRIM_HORIZON` (its history published) and the open
/// children took `LATEST` only once the parent was finished, losing what was written meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn start_from_latest_publishes_everything_from_the_first_sighting_and_nothing_before() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(8);
    let parent = rig.streams.open_shards(TABLE).remove(0);
    // History: in the parent, which is then split (closed), and in its open children.
    rig.write_all(&keys);
    rig.streams.split(TABLE, &parent);
    rig.write_all(&keys);
    let before = rig.written.len();
    // DynamoDB's creation times, and so the first sighting, are whole seconds: the service first sees
    // the table in a later second than the history was written in.
    let history = epoch_second();
    rig.until("the next second", || async { (epoch_second() > history).then_some(()) }).await;
    rig.start(&[("START_FROM_LATEST", "true")]).await;
    rig.until("the table's first sighting to be recorded", || async {
        let kv = rig.js.get_key_value(BUCKET).await.ok()?;
        kv.get(format!("topology/{TABLE}/table")).await.ok()?.map(drop)
    })
    .await;
    for _ in 0..3 {
        rig.write_all(&keys);
    }
    let after = rig.written[before..].to_vec();
    rig.settle(&after).await;
    // The skipped history is checkpointed: the parent is read to its end without publishing.
    rig.until_finished(&parent).await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &after);
    // Restarted, nothing more is published: the children's checkpoints cover the skipped history too.
    rig.start(&[("START_FROM_LATEST", "true")]).await;
    rig.write_all(&keys);
    let after = rig.written[before..].to_vec();
    rig.settle(&after).await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &after);
}
