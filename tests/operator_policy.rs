//! examples/operator-iam-policy.json is the IAM policy the README tells platform teams to
//! give the operator. This fails when the code calls an IAM action the policy lacks.

use std::collections::BTreeSet;

fn pascal_case(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Every `iam.<operation>(` call in the IAM code, as IAM action names.
fn iam_actions_called() -> BTreeSet<String> {
    let source: String = include_str!("../src/iam_user.rs")
        .split_whitespace()
        .collect();
    source
        .split("iam.")
        .skip(1)
        .filter_map(|rest| rest.split_once('(').map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|name| format!("iam:{}", pascal_case(name)))
        .collect()
}

#[test]
fn operator_policy_allows_every_iam_action_the_code_calls() {
    let text = include_str!("../examples/operator-iam-policy.json");
    let policy: serde_json::Value = serde_json::from_str(text).unwrap();
    let allowed: BTreeSet<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
            }
            _ => vec![],
        })
        .collect();
    let called = iam_actions_called();
    assert!(called.len() >= 10, "found the calls: {called:?}");
    let mut needed = called.clone();
    needed.insert("iam:TagUser".into()); // CreateUser with Tags needs it
    needed.insert("sts:AssumeRole".into());
    let missing: Vec<&String> = needed.iter().filter(|a| !allowed.contains(*a)).collect();
    assert!(
        missing.is_empty(),
        "examples/operator-iam-policy.json lacks {missing:?}"
    );
}

#[test]
fn user_creation_is_conditioned_on_the_boundary() {
    let policy: serde_json::Value =
        serde_json::from_str(include_str!("../examples/operator-iam-policy.json")).unwrap();
    let create = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["Action"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "iam:CreateUser"))
        })
        .unwrap();
    assert!(create["Condition"]["StringEquals"]["iam:PermissionsBoundary"].is_string());
    assert!(create["Resource"]
        .as_str()
        .unwrap()
        .contains(":user/s3grant/"));
}
