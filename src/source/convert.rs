//! DynamoDB Streams records → [`ChangeRecord`]s, and DynamoDB items (a backfill's `Scan`) → [`Map`]s:
//! the one place the SDKs' record and attribute types become ours.
//!
//! Stream records no longer take this path in the service: `GetRecords` bodies are transcoded
//! straight into events (`publish::event::transcode`, issue 19). [`change_record`] stays as the
//! reference the transcoder is held to: its property tests read each body with the SDK, convert it
//! here and compare the events byte for byte.
//!
//! Everything is moved, nothing copied: strings, number texts and blobs change hands as they are; a
//! map becomes a sorted list of its fields (the order events are written in). A record without its
//! `dynamodb` section or sequence number can be neither published nor checkpointed: it is returned
//! as [`Unusable`] for the reader to log and count (DynamoDB always sends both).

use aws_sdk_dynamodbstreams::types::{AttributeValue, Record};

pub use crate::record::Unusable;
use crate::record::{ChangeRecord, Map, Origin, UserIdentity, Value};

/// Converts one record.
pub fn change_record(record: Record) -> Result<ChangeRecord, Unusable> {
    let Record { event_id, event_name, dynamodb, user_identity, .. } = record;
    let Some(mut stream) = dynamodb else {
        return Err(Unusable { reason: "record has no `dynamodb` section", event_id });
    };
    let Some(sequence_number) = stream.sequence_number.take() else {
        return Err(Unusable { reason: "record has no sequence number", event_id });
    };
    Ok(ChangeRecord {
        event_id: event_id.unwrap_or_default(),
        event_name: event_name.map(|name| name.as_str().to_owned()).unwrap_or_default(),
        sequence_number,
        created_at: stream.approximate_creation_date_time.map(|time| time.as_secs_f64()),
        keys: stream.keys.map(map),
        new_image: stream.new_image.map(map),
        old_image: stream.old_image.map(map),
        user_identity: user_identity.map(|identity| UserIdentity {
            kind: identity.r#type.unwrap_or_default(),
            principal_id: identity.principal_id.unwrap_or_default(),
        }),
        size_bytes: stream.size_bytes,
        origin: Origin::Stream,
    })
}

/// The conversions of one SDK's attribute type. DynamoDB Streams' `AttributeValue` (stream images)
/// and DynamoDB's (`Scan` items) are distinct types of the same shape, so one body serves both and a
/// type added to one cannot be forgotten in the other. Values are moved, not copied.
macro_rules! attribute_conversions {
    ($(#[$doc:meta])* $visibility:vis fn $map:ident, fn $value:ident, $attribute:ty) => {
        $(#[$doc])*
        $visibility fn $map(attributes: std::collections::HashMap<String, $attribute>) -> Map {
            attributes.into_iter().map(|(name, value)| (name, $value(value))).collect()
        }

        fn $value(attribute: $attribute) -> Value {
            use $attribute as A;
            match attribute {
                A::S(text) => Value::S(text),
                A::N(text) => Value::N(text),
                A::B(blob) => Value::B(blob.into_inner()),
                A::Ss(texts) => Value::Ss(texts),
                A::Ns(texts) => Value::Ns(texts),
                A::Bs(blobs) => Value::Bs(blobs.into_iter().map(|blob| blob.into_inner()).collect()),
                A::M(attributes) => Value::M($map(attributes)),
                A::L(items) => Value::L(items.into_iter().map($value).collect()),
                A::Null(_) => Value::Null,
                A::Bool(flag) => Value::Bool(flag),
                // The SDK's enums are non-exhaustive: a type added after this build is described for
                // the log rather than dropped.
                other => Value::Unknown(format!("{other:?}")),
            }
        }
    };
}

attribute_conversions!(fn map, fn value, AttributeValue);
attribute_conversions!(
    /// A whole item as `Scan` returns it (a backfill's snapshot row).
    pub fn item, fn item_value, aws_sdk_dynamodb::types::AttributeValue
);

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aws_sdk_dynamodbstreams::types::{Identity, OperationType, StreamRecord};
    use proptest::prelude::*;

    use super::*;

    /// Whether `ours` holds exactly what `theirs` held.
    fn same(theirs: &AttributeValue, ours: &Value) -> bool {
        match (theirs, ours) {
            (AttributeValue::S(a), Value::S(b)) | (AttributeValue::N(a), Value::N(b)) => a == b,
            (AttributeValue::B(a), Value::B(b)) => a.as_ref() == b.as_slice(),
            (AttributeValue::Ss(a), Value::Ss(b)) | (AttributeValue::Ns(a), Value::Ns(b)) => a == b,
            (AttributeValue::Bs(a), Value::Bs(b)) => a.iter().map(|blob| blob.as_ref()).eq(b.iter().map(Vec::as_slice)),
            (AttributeValue::L(a), Value::L(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b)),
            (AttributeValue::M(a), Value::M(b)) => same_map(a, b),
            (AttributeValue::Null(_), Value::Null) => true,
            (AttributeValue::Bool(a), Value::Bool(b)) => a == b,
            _ => false,
        }
    }

    fn same_map(theirs: &HashMap<String, AttributeValue>, ours: &Map) -> bool {
        let sorted = ours.fields().windows(2).all(|pair| pair[0].0 <= pair[1].0);
        sorted
            && theirs.len() == ours.len()
            && ours.fields().iter().all(|(name, value)| theirs.get(name).is_some_and(|theirs| same(theirs, value)))
    }

    fn attribute() -> impl Strategy<Value = AttributeValue> {
        let leaf = prop_oneof![
            any::<String>().prop_map(AttributeValue::S),
            "-?[0-9]{1,38}(\\.[0-9]{1,5})?".prop_map(AttributeValue::N),
            any::<bool>().prop_map(AttributeValue::Bool),
            Just(AttributeValue::Null(true)),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| AttributeValue::B(b.into())),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..3)
                .prop_map(|blobs| AttributeValue::Bs(blobs.into_iter().map(Into::into).collect())),
            proptest::collection::vec("[0-9]{1,5}", 1..4).prop_map(AttributeValue::Ns),
            proptest::collection::vec(any::<String>(), 1..4).prop_map(AttributeValue::Ss),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(AttributeValue::L),
                proptest::collection::hash_map("[a-zA-Z0-9_]{0,6}", inner, 0..5).prop_map(AttributeValue::M),
            ]
        })
    }

    proptest! {
        /// Every attribute arrives with exactly its value, maps sorted by field name.
        #[test]
        fn attributes_keep_their_values(image in proptest::collection::hash_map("[a-z]{1,8}", attribute(), 0..8)) {
            let converted = map(image.clone());
            prop_assert!(same_map(&image, &converted), "{image:?} became {converted:?}");
        }

        /// A `Scan` item becomes exactly what the same attributes in a stream image become, so snapshot
        /// rows and stream events of an item are written alike.
        #[test]
        fn items_convert_like_stream_images(image in proptest::collection::hash_map("[a-z]{1,8}", attribute(), 0..8)) {
            let scanned = image.iter().map(|(name, value)| (name.clone(), as_item_attribute(value))).collect();
            prop_assert_eq!(item(scanned), map(image));
        }
    }

    /// The same attribute as DynamoDB's own type (what `Scan` returns).
    fn as_item_attribute(attribute: &AttributeValue) -> aws_sdk_dynamodb::types::AttributeValue {
        use aws_sdk_dynamodb::types::AttributeValue as D;
        match attribute {
            AttributeValue::S(text) => D::S(text.clone()),
            AttributeValue::N(text) => D::N(text.clone()),
            AttributeValue::B(blob) => D::B(blob.clone()),
            AttributeValue::Ss(texts) => D::Ss(texts.clone()),
            AttributeValue::Ns(texts) => D::Ns(texts.clone()),
            AttributeValue::Bs(blobs) => D::Bs(blobs.clone()),
            AttributeValue::M(attributes) => {
                D::M(attributes.iter().map(|(name, value)| (name.clone(), as_item_attribute(value))).collect())
            }
            AttributeValue::L(items) => D::L(items.iter().map(as_item_attribute).collect()),
            AttributeValue::Null(flag) => D::Null(*flag),
            AttributeValue::Bool(flag) => D::Bool(*flag),
            other => panic!("the strategy makes no {other:?}"),
        }
    }

    #[test]
    fn a_record_keeps_its_fields() {
        let record = Record::builder()
            .event_id("e1")
            .event_name(OperationType::Remove)
            .user_identity(Identity::builder().r#type("Service").principal_id("dynamodb.amazonaws.com").build())
            .dynamodb(
                StreamRecord::builder()
                    .keys("pk", AttributeValue::S("a".to_owned()))
                    .sequence_number("000000000000000000001")
                    .size_bytes(12)
                    .approximate_creation_date_time(aws_smithy_types::DateTime::from_secs(1_767_225_600))
                    .build(),
            )
            .build();
        let converted = change_record(record).expect("usable");
        assert_eq!(converted.event_id, "e1");
        assert_eq!(converted.event_name, "REMOVE");
        assert_eq!(converted.sequence_number, "000000000000000000001");
        assert_eq!(converted.created_at, Some(1_767_225_600.0));
        assert_eq!(converted.keys, Some(Map::new(vec![("pk".to_owned(), Value::S("a".to_owned()))])));
        assert_eq!(converted.new_image, None);
        assert_eq!(converted.size_bytes, Some(12));
        assert_eq!(
            converted.user_identity,
            Some(UserIdentity { kind: "Service".to_owned(), principal_id: "dynamodb.amazonaws.com".to_owned() })
        );
    }

    #[test]
    fn a_record_without_its_stream_section_or_sequence_number_is_unusable() {
        let bare = Record::builder().event_id("e1").build();
        assert_eq!(change_record(bare).map_err(|err| err.reason), Err("record has no `dynamodb` section"));
        let unnumbered = Record::builder().dynamodb(StreamRecord::builder().build()).build();
        assert_eq!(change_record(unnumbered).map_err(|err| err.reason), Err("record has no sequence number"));
    }
}
