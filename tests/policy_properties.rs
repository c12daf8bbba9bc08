//! Properties of the policy compiler for any input it accepts, and no panic for any input.

use proptest::prelude::*;
use s3grant::api::Mode;
use s3grant::policy::build_policy;
use s3grant::validate::{parse_prefixes, BucketName};

fn mode_actions(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::ReadWrite => &[
            "s3:ListBucket",
            "s3:GetBucketLocation",
            "s3:GetObject",
            "s3:GetObjectAcl",
            "s3:GetObjectLegalHold",
            "s3:GetObjectRetention",
            "s3:GetObjectTagging",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
        Mode::ReadOnly => &[
            "s3:ListBucket",
            "s3:GetBucketLocation",
            "s3:GetObject",
            "s3:GetObjectAcl",
            "s3:GetObjectLegalHold",
            "s3:GetObjectRetention",
            "s3:GetObjectTagging",
        ],
        Mode::WriteOnly => &["s3:PutObject", "s3:AbortMultipartUpload"],
    }
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::ReadWrite),
        Just(Mode::ReadOnly),
        Just(Mode::WriteOnly)
    ]
}

/// Segments drawn from an alphabet that includes every character the validator must
/// refuse, so accepted and rejected inputs are both common.
fn hostile_prefix() -> impl Strategy<Value = String> {
    prop::collection::vec(
        "[a-zA-Z0-9._ -]{0,6}|[*?${}\\x00-\\x1f\\x7f/.]{1,3}|\\.\\.?",
        1..5,
    )
    .prop_map(|segments| segments.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn accepted_input_stays_inside_bucket_prefix_and_mode(
        bucket in "[a-z0-9][a-z0-9-]{1,30}[a-z0-9]",
        raw_prefixes in prop::collection::vec(hostile_prefix(), 0..4),
        mode in mode(),
    ) {
        // The pattern can still hit S3's reserved names (xn--…, …-s3alias): those are rejected.
        let Ok(bucket) = BucketName::parse(&bucket) else { return Ok(()) };
        let Ok(prefixes) = parse_prefixes(&raw_prefixes) else { return Ok(()) };
        for raw in &raw_prefixes {
            let widening = raw.contains(['*', '?', '$', '{', '}']) || raw.starts_with('/');
            prop_assert!(!widening, "accepted {:?}", raw);
            let escapes = raw.split('/').any(|s| s == ".." || s == ".");
            prop_assert!(!escapes, "accepted {:?}", raw);
            let folder = format!("{raw}/");
            let covered = prefixes.iter().any(|p| folder.starts_with(p.as_str()) || raw.starts_with(p.as_str()));
            prop_assert!(covered, "{:?} not covered by {:?}", raw, prefixes);
        }
        let doc = build_policy(&bucket, &prefixes, mode);
        let bucket_arn = format!("arn:aws:s3:::{bucket}");
        let allowed_objects: Vec<String> = if prefixes.is_empty() {
            vec![format!("{bucket_arn}/*")]
        } else {
            prefixes.iter().map(|p| format!("{bucket_arn}/{p}*")).collect()
        };
        for statement in &doc.statements {
            prop_assert_eq!(&statement.effect, "Allow");
            for action in &statement.actions {
                prop_assert!(mode_actions(mode).contains(&action.as_str()), "{} in {:?}", action, mode);
            }
            for resource in &statement.resources {
                prop_assert!(resource == &bucket_arn || allowed_objects.contains(resource), "{}", resource);
            }
            let lists = statement.actions.iter().any(|a| a == "s3:ListBucket");
            if lists && !prefixes.is_empty() {
                let condition = statement.condition.as_ref().expect("ListBucket needs a prefix condition");
                let patterns = &condition["StringLike"]["s3:prefix"];
                let expected: Vec<String> = prefixes.iter().map(|p| format!("{p}*")).collect();
                prop_assert_eq!(patterns, &expected);
                prop_assert_eq!(statement.actions.len(), 1, "nothing else may ride on the conditioned statement");
            }
        }
        for prefix in &prefixes {
            prop_assert!(prefix.as_str().ends_with('/'));
            prop_assert!(!prefix.as_str().contains("//"));
        }
    }

    #[test]
    fn any_string_is_rejected_or_scoped_never_a_panic(bucket in any::<String>(), prefix in any::<String>()) {
        if let (Ok(bucket), Ok(prefixes)) = (BucketName::parse(&bucket), parse_prefixes(&[prefix])) {
            let json = build_policy(&bucket, &prefixes, Mode::ReadWrite).to_compact_json();
            prop_assert_eq!(json.matches('*').count(), json.matches("/*\"").count());
        }
    }
}
