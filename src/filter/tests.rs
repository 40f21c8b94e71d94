//! Filters pasted from AWS's documentation of Lambda event filtering for DynamoDB (and the CDK's
//! `FilterRule` helpers), matched against records of the documentation's example table (primary key
//! `CustomerName`, attributes `AccountManager` and `PaymentTerms`).

use serde_json::json;

use super::*;
use crate::record::{Map, UserIdentity, Value};

fn s(text: &str) -> Value {
    Value::S(text.to_owned())
}

fn customer(name: &str, manager: Option<&str>, terms: &str, quantity: &str) -> ChangeRecord {
    let mut image = vec![
        ("CustomerName".to_owned(), s(name)),
        ("PaymentTerms".to_owned(), s(terms)),
        ("Quantity".to_owned(), Value::N(quantity.to_owned())),
        ("Tags".to_owned(), Value::Ss(vec!["gold".to_owned(), "eu".to_owned()])),
    ];
    if let Some(manager) = manager {
        image.push(("AccountManager".to_owned(), s(manager)));
    }
    ChangeRecord {
        event_id: "1".to_owned(),
        event_name: "INSERT".to_owned(),
        sequence_number: "111".to_owned(),
        created_at: Some(1_678_831_218.0),
        keys: Some(Map::new(vec![("CustomerName".to_owned(), s(name))])),
        new_image: Some(Map::new(image)),
        size_bytes: Some(26),
        ..ChangeRecord::default()
    }
}

fn pattern(json: serde_json::Value) -> FilterCriteria {
    FilterCriteria::from_patterns([json.to_string().as_str()]).expect("a valid pattern")
}

#[test]
fn a_filter_criteria_is_read_as_lambda_takes_it_and_any_pattern_lets_a_record_through() {
    // The documentation's FilterCriteria, its pattern a JSON text inside a string.
    let criteria = FilterCriteria::parse(
        r#"{ "Filters": [ { "Pattern": "{ \"dynamodb\" : { \"Keys\" : { \"CustomerName\" : { \"S\" : [ \"AnyCompany Industries\" ] } } } }" } ] }"#,
    )
    .expect("parses");
    assert!(criteria.matches(&customer("AnyCompany Industries", None, "60 days", "3")));
    assert!(!criteria.matches(&customer("Example Corp", None, "60 days", "3")));

    let either = FilterCriteria::from_patterns([
        r#"{"dynamodb": {"Keys": {"CustomerName": {"S": ["Example Corp"]}}}}"#,
        r#"{"dynamodb": {"NewImage": {"PaymentTerms": {"S": ["30 days"]}}}}"#,
    ])
    .unwrap();
    assert!(either.matches(&customer("Example Corp", None, "60 days", "3")));
    assert!(either.matches(&customer("AnyCompany Industries", None, "30 days", "3")));
    assert!(!either.matches(&customer("AnyCompany Industries", None, "60 days", "3")));
    assert!(FilterCriteria::from_patterns([]).unwrap().matches(&customer("x", None, "y", "1")), "no pattern: all pass");
}

#[test]
fn attributes_booleans_and_exists_match_as_the_documentation_shows() {
    let pat = customer("AnyCompany Industries", Some("Pat Candella"), "60 days", "3");
    let nobody = customer("AnyCompany Industries", None, "60 days", "3");
    let by_manager = pattern(json!({"dynamodb": {"NewImage": {"AccountManager": {"S": ["Pat Candella"]}}}}));
    assert!(by_manager.matches(&pat) && !by_manager.matches(&nobody));
    // AND across fields.
    let both = pattern(json!({"dynamodb": {
        "Keys": {"CustomerName": {"S": ["AnyCompany Industries"]}},
        "NewImage": {"AccountManager": {"S": ["Pat Candella"]}}}}));
    assert!(both.matches(&pat) && !both.matches(&customer("Example Corp", Some("Pat Candella"), "60 days", "3")));
    let has_manager = pattern(json!({"dynamodb": {"NewImage": {"AccountManager": [{"exists": true}]}}}));
    // `exists` applies to a value, not to an object: the attribute's `S` holds the value.
    let has_manager_value = pattern(json!({"dynamodb": {"NewImage": {"AccountManager": {"S": [{"exists": true}]}}}}));
    let no_manager = pattern(json!({"dynamodb": {"NewImage": {"AccountManager": {"S": [{"exists": false}]}}}}));
    assert!(!has_manager.matches(&pat), "an attribute is an object in DynamoDB's JSON");
    assert!(has_manager_value.matches(&pat) && !has_manager_value.matches(&nobody));
    assert!(no_manager.matches(&nobody) && !no_manager.matches(&pat));
    // The CDK's FilterRule helpers: isEqual('INSERT'), BOOL isEqual(true).
    let mut flagged = pat.clone();
    flagged.new_image = Some(Map::new(vec![("id".to_owned(), Value::Bool(true))]));
    let insert_of_flagged =
        pattern(json!({"eventName": ["INSERT"], "dynamodb": {"NewImage": {"id": {"BOOL": [true]}}}}));
    assert!(insert_of_flagged.matches(&flagged) && !insert_of_flagged.matches(&pat));
    flagged.event_name = "MODIFY".to_owned();
    assert!(!insert_of_flagged.matches(&flagged));
}

#[test]
fn string_matchers_numbers_and_or() {
    let record = customer("AnyCompany Industries", Some("Pat Candella"), "60 days", "3");
    let cases = [
        (json!({"dynamodb": {"Keys": {"CustomerName": {"S": [{"prefix": "AnyCompany"}]}}}}), true),
        (json!({"dynamodb": {"Keys": {"CustomerName": {"S": [{"prefix": "Example"}]}}}}), false),
        (json!({"dynamodb": {"NewImage": {"PaymentTerms": {"S": [{"suffix": "days"}]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"AccountManager": {"S": [{"equals-ignore-case": "pat CANDELLA"}]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"PaymentTerms": {"S": [{"anything-but": ["30 days", "90 days"]}]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"PaymentTerms": {"S": [{"anything-but": "60 days"}]}}}}), false),
        (json!({"dynamodb": {"NewImage": {"PaymentTerms": {"S": [{"anything-but": {"prefix": "6"}}]}}}}), false),
        // An `N` is a string in DynamoDB's JSON; numeric matching reads the number it spells.
        (json!({"dynamodb": {"NewImage": {"Quantity": {"N": [{"numeric": [">", 0, "<=", 5]}]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"Quantity": {"N": [{"numeric": [">", 3]}]}}}}), false),
        (json!({"dynamodb": {"NewImage": {"Quantity": {"N": [3]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"Quantity": {"N": ["3"]}}}}), true),
        // A set matches when any member does.
        (json!({"dynamodb": {"NewImage": {"Tags": {"SS": ["eu"]}}}}), true),
        (json!({"dynamodb": {"NewImage": {"Tags": {"SS": ["us"]}}}}), false),
        (json!({"eventName": ["INSERT", "MODIFY"]}), true),
        (json!({"eventName": ["REMOVE"]}), false),
        (json!({"$or": [{"eventName": ["REMOVE"]}, {"dynamodb": {"NewImage": {"Quantity": {"N": [3]}}}}]}), true),
        (json!({"$or": [{"eventName": ["REMOVE"]}, {"dynamodb": {"NewImage": {"Quantity": {"N": [4]}}}}]}), false),
    ];
    for (json, expected) in cases {
        assert_eq!(pattern(json.clone()).matches(&record), expected, "{json}");
    }
}

#[test]
fn ttl_deletions_are_told_apart_by_their_user_identity() {
    let mut deletion = customer("AnyCompany Industries", None, "60 days", "3");
    deletion.event_name = "REMOVE".to_owned();
    deletion.user_identity =
        Some(UserIdentity { kind: "Service".to_owned(), principal_id: "dynamodb.amazonaws.com".to_owned() });
    let by_ttl = pattern(json!({"userIdentity": {"type": ["Service"], "principalId": ["dynamodb.amazonaws.com"]}}));
    assert!(by_ttl.matches(&deletion));
    deletion.user_identity = None;
    assert!(!by_ttl.matches(&deletion));
}

#[test]
fn a_criteria_that_cannot_be_read_is_refused_with_where_and_why() {
    let refused = |text: &str| FilterCriteria::parse(text).unwrap_err().to_string();
    assert!(refused("{}").contains("not a FilterCriteria"), "{}", refused("{}"));
    assert!(refused(r#"{"Filters": [{"Pattern": "{"}]}"#).contains("pattern 0: not JSON"));
    let six = format!(r#"{{"Filters": [{}]}}"#, [r#"{"Pattern": "{\"eventName\": [\"INSERT\"]}"}"#; 6].join(","));
    assert_eq!(FilterCriteria::parse(&six).unwrap_err(), FilterError::TooMany { count: 6 });
    let pattern_error =
        |json: serde_json::Value| FilterCriteria::from_patterns([json.to_string().as_str()]).unwrap_err().to_string();
    assert_eq!(pattern_error(json!([])), "pattern 0: a pattern is a JSON object");
    assert_eq!(
        pattern_error(json!({"dynamodb": {"Keys": {"pk": {"S": "x"}}}})),
        "pattern 0: dynamodb.Keys.pk.S: a field takes an object or a non-empty array of matchers"
    );
    assert_eq!(
        pattern_error(json!({"eventName": [{"contains": "INS"}]})),
        "pattern 0: eventName: unknown matcher \"contains\""
    );
    assert!(pattern_error(json!({"x": [{"numeric": [">"]}]})).contains("numeric takes"));
    assert!(pattern_error(json!({"x": [{"numeric": ["!=", 1]}]})).contains("numeric takes"));
    assert!(pattern_error(json!({"x": [{"exists": "yes"}]})).contains("exists takes true or false"));
    assert!(pattern_error(json!({"$or": [{"x": ["a"]}]})).contains("$or takes two or more patterns"));
}
