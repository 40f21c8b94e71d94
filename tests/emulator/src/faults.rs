//! Which calls fail, and how: a queue of faults per operation, and a count of calls per operation.
//!
//! Every request is counted before anything else happens to it, then takes the next queued fault of its
//! operation, if any: one fault is consumed by exactly one call, in the order the test queued them.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// An operation of the endpoint, named by its `X-Amz-Target` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `DynamoDB_20120810.DescribeTable`.
    DescribeTable,
    /// `DynamoDBStreams_20120810.DescribeStream`.
    DescribeStream,
    /// `DynamoDBStreams_20120810.GetShardIterator`.
    GetShardIterator,
    /// `DynamoDBStreams_20120810.GetRecords`.
    GetRecords,
    /// `DynamoDBStreams_20120810.ListStreams`.
    ListStreams,
    /// `DynamoDB_20120810.Scan`.
    Scan,
}

impl Op {
    /// Every operation, for looking one up by its target.
    pub const ALL: [Op; 6] =
        [Op::DescribeTable, Op::DescribeStream, Op::GetShardIterator, Op::GetRecords, Op::ListStreams, Op::Scan];

    /// The `X-Amz-Target` header value that selects this operation.
    pub fn target(self) -> &'static str {
        match self {
            Op::DescribeTable => "DynamoDB_20120810.DescribeTable",
            Op::DescribeStream => "DynamoDBStreams_20120810.DescribeStream",
            Op::GetShardIterator => "DynamoDBStreams_20120810.GetShardIterator",
            Op::GetRecords => "DynamoDBStreams_20120810.GetRecords",
            Op::ListStreams => "DynamoDBStreams_20120810.ListStreams",
            Op::Scan => "DynamoDB_20120810.Scan",
        }
    }

    /// The operation an `X-Amz-Target` header names.
    pub fn from_target(target: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.target() == target)
    }
}

/// The throttling error a throttled call gets; both are classified as throttling by the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// `LimitExceededException`: what DynamoDB Streams answers to too many `GetRecords` per shard.
    LimitExceeded,
    /// `ProvisionedThroughputExceededException`: DynamoDB's answer to exceeded table throughput.
    ProvisionedThroughputExceeded,
}

impl Throttle {
    /// The AWS error code.
    pub fn code(self) -> &'static str {
        match self {
            Throttle::LimitExceeded => "LimitExceededException",
            Throttle::ProvisionedThroughputExceeded => "ProvisionedThroughputExceededException",
        }
    }
}

/// What happens to one call instead of (or before) its normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer with this AWS error.
    Error { status: u16, code: &'static str, message: &'static str },
    /// Hold the normal answer back this long.
    Delay(Duration),
    /// Answer `DescribeTable` as an eventually consistent read that has not seen the table's newest
    /// stream yet: `LatestStreamArn` names this (older) stream.
    StaleTable { stream_arn: String },
}

impl Fault {
    pub(crate) fn throttle(kind: Throttle) -> Fault {
        Fault::Error { status: 400, code: kind.code(), message: "Rate exceeded (injected)" }
    }

    pub(crate) fn internal_server_error() -> Fault {
        Fault::Error { status: 500, code: "InternalServerError", message: "Internal server error (injected)" }
    }
}

/// The queued faults and the call counts.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    queues: HashMap<Op, VecDeque<Fault>>,
    calls: HashMap<Op, usize>,
}

impl Faults {
    /// Queues `fault` for the next `n` calls of `op` (after the faults already queued for it).
    pub(crate) fn push(&mut self, op: Op, fault: Fault, n: usize) {
        self.queues.entry(op).or_default().extend(std::iter::repeat_n(fault, n));
    }

    /// Counts a call of `op` and takes the fault it gets, if any.
    pub(crate) fn on_call(&mut self, op: Op) -> Option<Fault> {
        *self.calls.entry(op).or_default() += 1;
        self.queues.get_mut(&op).and_then(VecDeque::pop_front)
    }

    /// How many calls of `op` arrived so far, failed ones included.
    pub(crate) fn calls(&self, op: Op) -> usize {
        self.calls.get(&op).copied().unwrap_or(0)
    }

    /// How many faults are still queued for `op`.
    pub(crate) fn pending(&self, op: Op) -> usize {
        self.queues.get(&op).map_or(0, VecDeque::len)
    }

    /// Drops every queued fault (the counts stay).
    pub(crate) fn clear(&mut self) {
        self.queues.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_consumed_in_order_one_per_call() {
        let mut faults = Faults::default();
        faults.push(Op::GetRecords, Fault::throttle(Throttle::LimitExceeded), 2);
        faults.push(Op::GetRecords, Fault::internal_server_error(), 1);
        assert_eq!(faults.on_call(Op::DescribeStream), None);
        assert_eq!(faults.on_call(Op::GetRecords), Some(Fault::throttle(Throttle::LimitExceeded)));
        assert_eq!(faults.on_call(Op::GetRecords), Some(Fault::throttle(Throttle::LimitExceeded)));
        assert_eq!(faults.on_call(Op::GetRecords), Some(Fault::internal_server_error()));
        assert_eq!(faults.on_call(Op::GetRecords), None);
        assert_eq!((faults.calls(Op::GetRecords), faults.calls(Op::DescribeStream)), (4, 1));
        assert_eq!(faults.calls(Op::ListStreams), 0);
    }

    #[test]
    fn targets_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_target(op.target()), Some(op));
        }
        assert_eq!(Op::from_target("DynamoDB_20120810.PutItem"), None);
    }
}
