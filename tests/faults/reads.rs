//! Faults of the Streams calls: expired iterators, data trimmed past the checkpoint, throttling and
//! server errors, calls that never answer.

use std::time::Duration;

use streams_emulator::{Op, Throttle};

use super::harness::{Rig, TABLE, Window, keys};

#[tokio::test(flavor = "multi_thread")]
async fn expired_iterators_resume_from_the_last_published_record() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(5);
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    let iterators = rig.streams.calls(Op::GetShardIterator);

    // Three times: records wait in the shard when every iterator expires.
    for round in 1..=3 {
        rig.write_all(&keys);
        let issued = rig.streams.calls(Op::GetShardIterator);
        rig.streams.expire_iterators();
        rig.until(&format!("expired iterator #{round} to be seen"), || async {
            (rig.metric("get_records_errors_total", &[("kind", "iterator_expired")]).await >= f64::from(round))
                .then_some(())
        })
        .await;
        // The next round's expiry must find the reader on the iterator it gets for this one (one
        // issued after that expiry would never expire): wait for the new iterator's request, then
        // for a read after it, which comes only once the iterator was issued.
        rig.until(&format!("a new iterator after expiry #{round}"), || async {
            (rig.streams.calls(Op::GetShardIterator) > issued).then_some(())
        })
        .await;
        let reads = rig.streams.calls(Op::GetRecords);
        rig.until(&format!("a read with the new iterator after expiry #{round}"), || async {
            (rig.streams.calls(Op::GetRecords) > reads).then_some(())
        })
        .await;
    }
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    assert!(rig.streams.calls(Op::GetShardIterator) >= iterators + 3, "a new iterator after each expiry");
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

#[tokio::test(flavor = "multi_thread")]
async fn data_trimmed_past_the_checkpoint_is_a_counted_gap_and_reading_goes_on_from_trim_horizon() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(5);
    let gaps = "trimmed_data_gaps_total";
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    rig.stop().await;

    // While the service is stopped: v2 and v3 are written, and the stream drops all of v2 but its last
    // two records, as if the service had been down past the 24 h retention.
    let v2 = rig.write_all(&keys);
    rig.write_all(&keys);
    rig.streams.trim_before(TABLE, &v2[3].sequence_number);
    let mut expected: Vec<_> = rig.written.iter().filter(|r| !v2[..3].contains(r)).cloned().collect();
    rig.start(&[]).await;
    rig.settle(&expected).await;
    assert_eq!(rig.metric(gaps, &[]).await, 1.0, "one gap, counted once");
    let errors = rig.log_lines(&["ERROR", "trimmed"]);
    assert_eq!(errors.len(), 1, "one error log for the gap: {errors:?}\n{}", rig.log_tail());
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &expected);

    // Again with only the newest two records of the shard left (`trim_all_but_last`).
    let v4 = rig.write_all(&keys);
    rig.streams.trim_all_but_last(TABLE, 2);
    expected.extend(v4[3..].iter().cloned());
    rig.start(&[]).await;
    rig.settle(&expected).await;
    assert_eq!(rig.metric(gaps, &[]).await, 1.0);
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_and_server_errors_are_retried_with_backoff_and_nothing_is_lost() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(5);
    // The SDK makes three attempts per call (its standard retry), so three faults in a row reach the
    // service as one error; each queue below holds one or more such runs.
    let queued = [
        (Op::DescribeStream, vec![Some(Throttle::LimitExceeded), None]),
        (Op::GetShardIterator, vec![Some(Throttle::ProvisionedThroughputExceeded), None]),
        (Op::GetRecords, vec![Some(Throttle::LimitExceeded), Some(Throttle::ProvisionedThroughputExceeded), None]),
    ];
    let mut faults = Vec::new();
    for (op, runs) in &queued {
        for run in runs {
            match run {
                Some(kind) => rig.streams.throttle(*op, *kind, 3),
                None => rig.streams.fail_5xx(*op, 3),
            }
        }
        faults.push((*op, 3 * runs.len()));
    }
    rig.write_all(&keys);
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    for (op, count) in faults {
        assert_eq!(rig.streams.pending_faults(op), 0, "{op:?}: every fault was met");
        assert!(rig.streams.calls(op) > count, "{op:?}: retried past {count} faults");
    }
    // Each operation met a run of throttles and a run of server errors.
    let throttled = rig.metric("get_records_errors_total", &[("kind", "throttled")]).await;
    let transient = rig.metric("get_records_errors_total", &[("kind", "transient")]).await;
    assert!(throttled >= 3.0 && transient >= 3.0, "throttled {throttled}, transient {transient}");
    assert!(!rig.log_lines(&["GetRecords failed; retrying", "LimitExceededException"]).is_empty());
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// A `GetRecords` call that gets no answer (a stalled connection; here the endpoint holds its answer
/// back for five minutes) must time out and be retried: the shard may not stall behind it.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_records_call_that_hangs_times_out_and_the_shard_goes_on() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(5);
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    let calls = rig.streams.calls(Op::GetRecords);
    rig.streams.delay(Op::GetRecords, Duration::from_secs(300), 1);
    rig.until("a GetRecords call to hang", || async { (rig.streams.calls(Op::GetRecords) > calls).then_some(()) })
        .await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// A `DescribeStream` call that gets no answer must not hold up a graceful stop: SIGTERM still ends the
/// service with exit 0 within its shutdown timeout (10 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_describe_stream_call_that_hangs_does_not_hold_up_a_graceful_stop() {
    let mut rig = Rig::new(Window::Tiny).await;
    rig.start(&[]).await;
    rig.write_all(&keys(5));
    rig.settle(&rig.written).await;
    let calls = rig.streams.calls(Op::DescribeStream);
    rig.streams.delay(Op::DescribeStream, Duration::from_secs(300), 1);
    rig.until("a DescribeStream call to hang", || async {
        (rig.streams.calls(Op::DescribeStream) > calls).then_some(())
    })
    .await;
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// Issue 14, item 6: a `GetRecords` call that gets no answer (here for longer than the shutdown
/// timeout, every attempt the SDK makes) must not hold up a graceful stop: the read is abandoned,
/// nothing being in hand, the lease is released, and the service exits 0 within its shutdown timeout
/// (10 s here). Before the fix it waited for the call (three attempts of 10 s) and exited 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_records_call_that_hangs_does_not_hold_up_a_graceful_stop() {
    let mut rig = Rig::new(Window::Tiny).await;
    rig.start(&[]).await;
    rig.write_all(&keys(5));
    rig.settle(&rig.written).await;
    let calls = rig.streams.calls(Op::GetRecords);
    rig.streams.delay(Op::GetRecords, Duration::from_secs(300), 3);
    rig.until("a GetRecords call to hang", || async { (rig.streams.calls(Op::GetRecords) > calls).then_some(()) })
        .await;
    rig.stop().await;
    let released = rig.log_lines(&["fleet: leases released", "released=1"]);
    assert_eq!(released.len(), 1, "the lease is released at the stop: {}", rig.log_tail());
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// `GetRecords` answers with at most 1 MB: a page of large records cut by that limit is not the end of
/// the shard, so the next page is read at once. Were it taken for a caught-up shard, the reader would
/// wait `POLL_GAP_MS` (ten minutes here) after the first page and the records would not arrive.
#[tokio::test(flavor = "multi_thread")]
async fn pages_cut_at_one_megabyte_are_followed_at_once() {
    let mut rig = Rig::new(Window::Tiny).await;
    let blob = serde_json::json!({ "blob": { "S": "x".repeat(3000) } });
    for key in keys(1200) {
        rig.write_with(&key, blob.clone());
    }
    rig.start(&[("POLL_GAP_MS", "600000"), ("POLL_INTERVAL_MS", "600000")]).await;
    rig.settle(&rig.written).await;
    let pages = rig.streams.calls(Op::GetRecords);
    assert!(pages >= 4, "1200 records of 3 KB come in pages of under 1 MB: {pages} GetRecords calls");
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// Issue 14, item 4: AWS answers `ResourceNotFoundException` transiently (just after a stream is
/// enabled, say). On a shard the topology lists as open that is no end: the reader retries with
/// backoff and the shard goes on; before the fix, one such answer wrote `SHARD_END` and no replica
/// ever read the shard again.
#[tokio::test(flavor = "multi_thread")]
async fn a_not_found_answer_for_an_open_shard_is_retried_not_taken_as_its_end() {
    let mut rig = Rig::new(Window::Tiny).await;
    let keys = keys(5);
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;

    // The next four iterator requests are refused (a 400 the SDK does not retry: four errors).
    rig.streams.fail_with(Op::GetShardIterator, 400, "ResourceNotFoundException", 4);
    rig.streams.expire_iterators();
    rig.write_all(&keys);
    rig.until("the not-found answers to be met", || async {
        (rig.streams.pending_faults(Op::GetShardIterator) == 0).then_some(())
    })
    .await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;
    let shard = &rig.written[0].shard_id;
    let checkpoint = rig.checkpoint(shard).await.unwrap_or_default();
    assert!(!checkpoint.starts_with("SHARD_END"), "an open shard was marked finished: {checkpoint}");
    assert!(rig.metric("get_records_errors_total", &[("kind", "not_found")]).await >= 1.0);
    assert!(!rig.log_lines(&["shard not found although listed open"]).is_empty(), "{}", rig.log_tail());
    rig.stop().await;
    rig.assert_exact(&rig.messages().await, &rig.written);
}

/// Issue 14, item 8: data trimmed again at `TRIM_HORIZON` (the horizon moved between the iterator and
/// the read) is one gap, not one per attempt, and is retried after a pause, not in a tight loop.
#[tokio::test(flavor = "multi_thread")]
async fn trimmed_data_at_trim_horizon_is_one_gap_retried_with_backoff() {
    let mut rig = Rig::new(Window::Seed).await;
    let keys = keys(5);
    rig.start(&[]).await;
    rig.write_all(&keys);
    rig.settle(&rig.written).await;

    let calls = rig.streams.calls(Op::GetRecords);
    // The next six reads say the data was trimmed (a 400 the SDK does not retry): the first is the
    // gap, the next five meet TRIM_HORIZON trimmed as well.
    rig.streams.fail_with(Op::GetRecords, 400, "TrimmedDataAccessException", 6);
    rig.write_all(&keys);
    rig.until("the trimmed answers to be met", || async {
        (rig.streams.pending_faults(Op::GetRecords) == 0).then_some(())
    })
    .await;
    rig.settle(&rig.written).await;
    assert_eq!(rig.metric("trimmed_data_gaps_total", &[]).await, 1.0, "one gap, counted once");
    let retries = rig.log_lines(&["trimmed at TRIM_HORIZON as well; retrying"]);
    assert!(!retries.is_empty(), "{}", rig.log_tail());
    assert!(rig.streams.calls(Op::GetRecords) >= calls + 6);
    rig.stop().await;
    // Reading from TRIM_HORIZON re-reads what was published; the duplicate window absorbs it.
    rig.assert_exact(&rig.messages().await, &rig.written);
}
