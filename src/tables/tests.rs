//! Parsing, validation, lookup, projection, subject templates and TTL deletions.

use super::*;
use crate::publish::event::transcode::{StreamEvent, transcode};
use crate::record::{ChangeRecord, Map, Origin, UserIdentity, Value};

fn parse(text: &str) -> TablesFile {
    TablesFile::parse(text).expect("a valid file")
}

fn error(text: &str) -> String {
    TablesFile::parse(text).expect_err("refused").to_string()
}

/// A `GetRecords` body of one record of `Orders` (key `pk`, attributes `email`, `total`).
fn body(event_name: &str, identity: Option<(&str, &str)>) -> String {
    let image = r#"{"pk":{"S":"o.1 x"},"email":{"S":"a@b"},"total":{"N":"12"}}"#;
    let images = match event_name {
        "REMOVE" => format!(r#""OldImage":{image}"#),
        "MODIFY" => format!(r#""NewImage":{image},"OldImage":{image}"#),
        _ => format!(r#""NewImage":{image}"#),
    };
    let identity = identity
        .map(|(kind, principal)| format!(r#","userIdentity":{{"Type":"{kind}","PrincipalId":"{principal}"}}"#))
        .unwrap_or_default();
    format!(
        r#"{{"Records":[{{"eventID":"e1","eventName":"{event_name}","eventVersion":"1.1","eventSource":"aws:dynamodb","awsRegion":"us-east-1","dynamodb":{{"ApproximateCreationDateTime":1767225600,"Keys":{{"pk":{{"S":"o.1 x"}}}},{images},"SequenceNumber":"100","SizeBytes":40,"StreamViewType":"NEW_AND_OLD_IMAGES"}}{identity}}}],"NextShardIterator":"i"}}"#
    )
}

fn event(body: &str) -> StreamEvent {
    transcode(body.as_bytes()).expect("transcodes").events.remove(0)
}

fn json(event: &StreamEvent) -> serde_json::Value {
    serde_json::from_slice(&event.encode("Orders", Origin::Stream).payload).expect("json")
}

fn judge(settings: &TableSettings, body: &str) -> Verdict<StreamEvent> {
    let mut documents = PageDocuments::parse(bytes::Bytes::from(body.to_owned()));
    settings.judge_stream("dynamodb_streams", "Orders", event(body), documents.as_mut())
}

#[test]
fn a_file_maps_names_and_patterns_and_an_exact_name_wins_over_patterns_in_file_order() {
    let file = parse(
        r#"
tables:
  "itx-*":
    ttl_deletes: drop
  "itx-orders":
    ttl_deletes: flag
  "itx-?rders-*":
    ttl_deletes: publish
  "*":
    exclude_attributes: [ssn]
"#,
    );
    assert_eq!(file.lookup("itx-orders").map(|s| s.key.as_str()), Some("itx-orders"));
    assert_eq!(file.lookup("itx-orders-eu").map(|s| s.key.as_str()), Some("itx-*"), "the first pattern in file order");
    assert_eq!(file.lookup("other").map(|s| s.key.as_str()), Some("*"));
    assert!(parse("tables: {}").lookup("t").is_none());
    assert!(parse("").lookup("t").is_none(), "an empty file is no settings");
    let status = file.effective("itx-orders");
    assert_eq!(status.ttl_deletes, TtlDeletes::Flag);
    assert_eq!(file.effective("x").exclude_attributes, Some(vec!["ssn".to_owned()]));
}

#[test]
fn globs_match_whole_names() {
    let glob = |p: &str| Glob::parse(p).expect("a pattern");
    assert!(glob("itx-*").matches("itx-"));
    assert!(glob("itx-*").matches("itx-a.b"));
    assert!(!glob("itx-*").matches("xitx-a"));
    assert!(glob("*-prod").matches("orders-prod"));
    assert!(!glob("*-prod").matches("orders-prod2"));
    assert!(glob("a*b*c").matches("aXbYbZc"));
    assert!(!glob("a?c").matches("ac"));
    assert!(Glob::parse("a/*").is_err());
}

#[test]
fn a_bad_file_is_refused_naming_the_table_the_setting_and_why() {
    assert_eq!(
        error("tables:\n  t1x:\n    include_attributes: [a]\n    exclude_attributes: [b]\n"),
        "table \"t1x\", setting `include_attributes`: set together with `exclude_attributes`: choose one"
    );
    let bad_filter = error("tables:\n  orders:\n    filter: '{\"Filters\": [{\"Pattern\": \"{nope\"}]}'\n");
    assert!(bad_filter.starts_with("table \"orders\", setting `filter`: pattern 0: not JSON"), "{bad_filter}");
    let subject = error("tables:\n  orders:\n    subject: '{prefix}.{tabel}'\n");
    assert!(subject.starts_with("table \"orders\", setting `subject`:") && subject.contains("{tabel}"), "{subject}");
    let dots = error("tables:\n  orders:\n    subject: '{prefix}..{table}'\n");
    assert!(dots.contains("empty token"), "{dots}");
    let ttl = error("tables:\n  orders:\n    ttl_deletes: keep\n");
    assert!(ttl.starts_with("table \"orders\":") && ttl.contains("keep"), "{ttl}");
    let typo = error("tables:\n  orders:\n    fitler: x\n");
    assert!(typo.contains("fitler"), "{typo}");
    assert!(error("tables:\n  'a b':\n    {}\n").contains("not a DynamoDB table name"));
    assert!(error("tables:\n  'a/*':\n    {}\n").starts_with("table \"a/*\":"));
    assert!(error("tabels: {}").contains("tabels"));
    assert!(error("tables: [").starts_with("not YAML"));
    assert!(error("tables:\n  orders:\n    exclude_attributes: []\n").contains("empty list"));
}

#[test]
fn a_filter_is_taken_as_a_json_string_or_as_yaml_with_patterns_as_strings_or_mappings() {
    let as_string = parse(
        r#"
tables:
  Orders:
    filter: '{"Filters":[{"Pattern":"{\"eventName\":[\"INSERT\"]}"}]}'
"#,
    );
    let as_yaml = parse(
        r#"
tables:
  Orders:
    filter:
      Filters:
        - Pattern: '{"eventName": ["INSERT"]}'
        - Pattern:
            dynamodb:
              NewImage:
                total:
                  N: [{numeric: [">", 100]}]
"#,
    );
    for file in [&as_string, &as_yaml] {
        let settings = file.lookup("Orders").expect("settings");
        assert!(matches!(judge(settings, &body("INSERT", None)), Verdict::Publish(..)));
        assert!(matches!(judge(settings, &body("MODIFY", None)), Verdict::Drop(Dropped::Filter)));
    }
    let status = as_yaml.effective("Orders").filter.expect("shown");
    assert!(status.contains(r#"\"numeric\":[\">\",100]"#), "{status}");
}

#[test]
fn a_filter_sees_the_record_as_lambda_does_keys_and_images_in_dynamodb_json() {
    let file = parse(
        r#"
tables:
  Orders:
    filter: '{"Filters":[{"Pattern":"{\"dynamodb\":{\"Keys\":{\"pk\":{\"S\":[{\"prefix\":\"o.1\"}]}},\"NewImage\":{\"total\":{\"N\":[{\"numeric\":[\">\",10,\"<=\",12]}]}}}}"}]}'
"#,
    );
    let settings = file.lookup("Orders").expect("settings");
    assert!(matches!(judge(settings, &body("INSERT", None)), Verdict::Publish(..)));
    assert!(matches!(judge(settings, &body("REMOVE", None)), Verdict::Drop(Dropped::Filter)), "no NewImage");
}

#[test]
fn projection_cuts_image_attributes_and_never_keys() {
    let exclude = parse("tables:\n  Orders:\n    exclude_attributes: [email, pk]\n");
    let Verdict::Publish(projected, None) = judge(exclude.lookup("Orders").unwrap(), &body("MODIFY", None)) else {
        panic!("published to the default subject")
    };
    let event = json(&projected);
    assert_eq!(event["keys"], serde_json::json!({"pk": "o.1 x"}));
    assert_eq!(event["new_image"], serde_json::json!({"total": 12}));
    assert_eq!(event["old_image"], serde_json::json!({"total": 12}));
    // The item hash and the rest of the event are those of the full event.
    let full = event_of(&body("MODIFY", None));
    assert_eq!(projected.keys_json(), full.keys_json());
    let include = parse("tables:\n  Orders:\n    include_attributes: [email]\n");
    let Verdict::Publish(projected, _) = judge(include.lookup("Orders").unwrap(), &body("INSERT", None)) else {
        panic!("published")
    };
    let event = json(&projected);
    assert_eq!(event["new_image"], serde_json::json!({"email": "a@b"}));
    assert_eq!(event["old_image"], serde_json::Value::Null);
    // Reductions still work on a projected event.
    let reduced: serde_json::Value =
        serde_json::from_slice(&projected.reduced("Orders", Origin::Stream)).expect("json");
    assert_eq!(reduced["images_omitted"], true);

    // A snapshot row the same way.
    let row = ChangeRecord {
        event_name: "INSERT".to_owned(),
        keys: Some(Map::new(vec![("pk".to_owned(), Value::S("a".to_owned()))])),
        new_image: Some(Map::new(vec![
            ("pk".to_owned(), Value::S("a".to_owned())),
            ("email".to_owned(), Value::S("x".to_owned())),
        ])),
        origin: Origin::Snapshot { epoch: 1 },
        ..ChangeRecord::default()
    };
    let Verdict::Publish(row, None) = exclude.lookup("Orders").unwrap().judge_record("p", "Orders", row) else {
        panic!("published")
    };
    assert_eq!(row.new_image.map(|image| image.len()), Some(0));
    assert_eq!(row.keys.map(|keys| keys.len()), Some(1));
}

fn event_of(body: &str) -> StreamEvent {
    event(body)
}

#[test]
fn subject_templates_render_sanitised_tokens_per_record() {
    let file = parse("tables:\n  Orders:\n    subject: '{prefix}.{table}.{event_name}.k-{key.pk}.{key.none}'\n");
    let settings = file.lookup("Orders").unwrap();
    let Verdict::Publish(_, Some(subject)) = judge(settings, &body("INSERT", None)) else { panic!("routed") };
    assert_eq!(subject, "dynamodb_streams.Orders.INSERT.k-o_1_x._");
    let template = SubjectTemplate::parse("{prefix}.{table}").unwrap();
    assert_eq!(template.render("a.b", "my.table", "X", |_| None), "a.b.my_table");
    assert_eq!(sanitize_token("a*b>c\td"), "a_b_c_d");
    assert_eq!(sanitize_token(""), "_");
    // The subjects it can make, as a filter the stream's subjects must cover.
    let template = SubjectTemplate::parse("{prefix}.{table}.x{event_name}.{key.pk}").unwrap();
    assert_eq!(template.shape("dynamodb_streams", Some("my.t")), "dynamodb_streams.my_t.*.*");
    assert_eq!(template.shape("p", None), "p.*.*.*");
    assert!(SubjectTemplate::parse("{prefix}.a b").is_err());
    assert!(SubjectTemplate::parse("{prefix}.>").is_err());
    assert!(SubjectTemplate::parse("{prefix}.{table").is_err());
    assert!(SubjectTemplate::parse("{prefix}}").is_err());
}

#[test]
fn ttl_deletions_are_published_dropped_or_flagged() {
    let ttl = body("REMOVE", Some(("Service", "dynamodb.amazonaws.com")));
    let by_user = body("REMOVE", Some(("Service", "someone.else")));
    assert!(event(&ttl).is_ttl_delete());
    assert!(!event(&by_user).is_ttl_delete());
    assert!(!event(&body("REMOVE", None)).is_ttl_delete());
    assert!(!event(&body("MODIFY", Some(("Service", "dynamodb.amazonaws.com")))).is_ttl_delete());

    let publish = parse("tables:\n  Orders:\n    ttl_deletes: publish\n");
    let Verdict::Publish(published, _) = judge(publish.lookup("Orders").unwrap(), &ttl) else { panic!() };
    assert_eq!(
        published.encode("Orders", Origin::Stream).payload,
        event(&ttl).encode("Orders", Origin::Stream).payload
    );

    let drop = parse("tables:\n  Orders:\n    ttl_deletes: drop\n");
    assert!(matches!(judge(drop.lookup("Orders").unwrap(), &ttl), Verdict::Drop(Dropped::TtlDelete)));
    assert!(matches!(judge(drop.lookup("Orders").unwrap(), &by_user), Verdict::Publish(..)));

    let flag = parse("tables:\n  Orders:\n    ttl_deletes: flag\n");
    let Verdict::Publish(flagged, _) = judge(flag.lookup("Orders").unwrap(), &ttl) else { panic!() };
    let text = String::from_utf8(flagged.encode("Orders", Origin::Stream).payload.to_vec()).unwrap();
    assert!(text.ends_with(r#""principal_id":"dynamodb.amazonaws.com"},"ttl_delete":true}"#), "{text}");
    let replayed = String::from_utf8(flagged.encode("Orders", Origin::Replay { epoch: 2 }).payload.to_vec()).unwrap();
    assert!(replayed.ends_with(r#""replay":true,"ttl_delete":true}"#), "{replayed}");
    let Verdict::Publish(not_flagged, _) = judge(flag.lookup("Orders").unwrap(), &by_user) else { panic!() };
    assert!(!json(&not_flagged).as_object().unwrap().contains_key("ttl_delete"));

    // A change record (the backfill path) is recognised the same way.
    let record = ChangeRecord {
        event_name: "REMOVE".to_owned(),
        user_identity: Some(UserIdentity {
            kind: "Service".to_owned(),
            principal_id: "dynamodb.amazonaws.com".to_owned(),
        }),
        ..ChangeRecord::default()
    };
    assert!(matches!(drop.lookup("Orders").unwrap().judge_record("p", "Orders", record), Verdict::Drop(_)));
}

/// The sample record of Lambda's documentation for DynamoDB, as `GetRecords` returns it, matched by
/// patterns from Lambda's "Filter DynamoDB events" page through the page's documents (the path a
/// table with a filter takes).
#[test]
fn filters_from_the_documentation_match_records_read_from_a_get_records_body() {
    let body = |keys: &str, new_image: &str| {
        format!(
            r#"{{"Records":[{{"eventID":"1","eventVersion":"1.0","dynamodb":{{"Keys":{keys},"NewImage":{new_image},"StreamViewType":"NEW_AND_OLD_IMAGES","SequenceNumber":"111","SizeBytes":26}},"awsRegion":"us-west-2","eventName":"INSERT","eventSourceARN":"arn:aws:dynamodb:us-west-2:123456789012:table/Example/stream/2015-06-27T00:48:05.899","eventSource":"aws:dynamodb"}}]}}"#
        )
    };
    let sample = body(r#"{"Id":{"N":"101"}}"#, r#"{"Message":{"S":"New item!"},"Id":{"N":"101"}}"#);
    let city = body(r#"{"CA":{"S":"San Francisco"}}"#, r#"{"CA":{"S":"San Francisco"},"Population":{"N":"808437"}}"#);
    let passes = |pattern: &str, body: &str| {
        let file = format!("tables:\n  Example:\n    filter:\n      Filters:\n        - Pattern: '{pattern}'\n");
        let file = parse(&file);
        let settings = file.lookup("Example").expect("settings");
        let mut documents = PageDocuments::parse(bytes::Bytes::from(body.to_owned()));
        let event = transcode(body.as_bytes()).expect("transcodes").events.remove(0);
        settings.drops(&event, documents.as_mut()).is_none()
    };
    let key_is_sf = r#"{"dynamodb":{"Keys":{"CA":{"S":["San Francisco"]}}}}"#;
    assert!(passes(key_is_sf, &city));
    assert!(!passes(key_is_sf, &sample));
    let population = r#"{"dynamodb":{"NewImage":{"Population":{"N":[{"numeric":[">=",500000,"<",1000000]}]}}}}"#;
    assert!(passes(population, &city));
    assert!(!passes(population, &sample), "no such attribute");
    assert!(passes(r#"{"eventName":["INSERT"]}"#, &sample));
    assert!(!passes(r#"{"eventName":["REMOVE"]}"#, &sample));
    assert!(passes(r#"{"dynamodb":{"Keys":{"Id":{"N":[101]}}}}"#, &sample));
    assert!(passes(r#"{"dynamodb":{"NewImage":{"Message":{"S":[{"prefix":"New"}]}}}}"#, &sample));
    assert!(passes(r#"{"dynamodb":{"OldImage":{"Message":{"S":[{"exists":false}]}}}}"#, &sample));
    assert!(!passes(r#"{"dynamodb":{"NewImage":{"Message":{"S":[{"exists":false}]}}}}"#, &sample));
    assert!(!passes(r#"{"awsRegion":["us-west-2"]}"#, &sample), "as `filter::document`: no awsRegion");
}

/// The README's example file is a valid file that means what the README says.
#[test]
fn the_readme_example_parses() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Per-table settings").expect("the section")..];
    let start = section.find("```yaml\n").expect("an example") + "```yaml\n".len();
    let example = &section[start..start + section[start..].find("```").expect("its end")];
    let file = parse(example);
    let orders = file.lookup("orders").expect("orders");
    assert!(orders.filter.is_some());
    assert_eq!(orders.ttl_deletes, TtlDeletes::Drop);
    let customers = file.lookup("customers-eu").expect("a pattern");
    assert_eq!(customers.projection, Projection::Exclude(vec!["ssn".to_owned(), "date_of_birth".to_owned()]));
    let sessions = file.lookup("sessions").expect("sessions");
    assert_eq!(sessions.ttl_deletes, TtlDeletes::Flag);
    assert!(sessions.subject.as_ref().is_some_and(SubjectTemplate::uses_keys));
    assert!(file.lookup("customers").is_none());
}
