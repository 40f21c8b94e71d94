//! The label values of the metrics, one enum per label: each knows its text ([`as_str`]) and lists
//! every value ([`ALL`]), so a series can be exported with 0 before it first moves, and no label value
//! is retyped as a string literal where it is counted.
//!
//! [`as_str`]: LeaseChange::as_str
//! [`ALL`]: LeaseChange::ALL

/// Declares a label enum: its variants with their label text, `ALL` and `as_str`.
macro_rules! label {
    ($(#[$doc:meta])* $name:ident { $($(#[$variant_doc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$variant_doc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label! {
    /// `event_name`: DynamoDB Streams' three record kinds.
    EventName {
        Insert = "INSERT",
        Modify = "MODIFY",
        Remove = "REMOVE",
    }
}

label! {
    /// `kind` of `publish_errors_total`: JetStream's answers, and the batches the service stopped itself.
    PublishErrorKind {
        TimedOut = "timed_out",
        StreamNotFound = "stream_not_found",
        BrokenPipe = "broken_pipe",
        MaxAckPending = "max_ack_pending",
        MaxPayloadExceeded = "max_payload_exceeded",
        /// The publish connection is down or cannot be made.
        Disconnected = "disconnected",
        /// The shard's lease guard stopped the batch.
        LeaseLost = "lease_lost",
        Other = "other",
    }
}

label! {
    /// `kind` of `get_records_errors_total` (and of `table_errors_total` for a failed call): what the
    /// caller does about a failed AWS call (`ReadError::kind`).
    ReadErrorKind {
        IteratorExpired = "iterator_expired",
        Trimmed = "trimmed",
        Throttled = "throttled",
        NotFound = "not_found",
        Transient = "transient",
        Other = "other",
    }
}

label! {
    /// `kind` of `table_errors_total` beside the read-error kinds (`TableError::kind`).
    TableErrorKind {
        Missing = "missing",
        NoStream = "no_stream",
        KeysOnly = "keys_only",
    }
}

label! {
    /// `state` of `shards_known` (set by the topology watch).
    ShardState {
        Reading = "reading",
        WaitingForParent = "waiting_for_parent",
        Finished = "finished",
    }
}

label! {
    /// `change` of `lease_changes_total`.
    LeaseChange {
        Acquired = "acquired",
        HandedOver = "handed_over",
        Released = "released",
        /// A lease this replica could not renew in time.
        Expired = "expired",
        /// A lease the table names another owner for (taken).
        Lost = "lost",
        Finished = "finished",
    }
}

label! {
    /// `reason` of `table_unreadable`: why a configured table cannot be read for a reason of the
    /// service's own (not AWS's: a missing table or stream is reported by `table_errors_total`).
    UnreadableReason {
        /// The table's shard topology does not fit the checkpoint bucket's max value size (or the
        /// server's max payload): it cannot be shared, so its shards are not read.
        ValueTooLarge = "value_too_large",
    }
}

label! {
    /// `omitted` of `oversize_events_total`: what an event over the max payload was published without.
    Omitted {
        /// Its old image: the new one, what a consumer upserts, is still there.
        OldImage = "old_image",
        /// Both images: keys only.
        Images = "images",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_distinct_snake_case_or_dynamodb_names() {
        let all: Vec<&str> = [
            PublishErrorKind::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
            ReadErrorKind::ALL.iter().map(|v| v.as_str()).collect(),
            TableErrorKind::ALL.iter().map(|v| v.as_str()).collect(),
            ShardState::ALL.iter().map(|v| v.as_str()).collect(),
            LeaseChange::ALL.iter().map(|v| v.as_str()).collect(),
            UnreadableReason::ALL.iter().map(|v| v.as_str()).collect(),
            Omitted::ALL.iter().map(|v| v.as_str()).collect(),
        ]
        .concat();
        for value in &all {
            assert!(value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{value}");
        }
        assert_eq!(EventName::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(), ["INSERT", "MODIFY", "REMOVE"]);
        assert_eq!(LeaseChange::ALL.len(), 6);
    }
}

label! {
    /// `outcome` of `table_set_refreshes_total`: one evaluation of the table patterns and tags from AWS
    /// (issue 20), by this replica.
    TableSetRefresh {
        /// The set changed and was written.
        Changed = "changed",
        /// The set was as stored; the head was written (the claim).
        Unchanged = "unchanged",
        /// Another replica wrote the set first; its set is adopted.
        Conflict = "conflict",
        /// An AWS or bucket call failed; the set stays as it was.
        Failed = "failed",
    }
}
