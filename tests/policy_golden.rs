//! s3grant's policies are s3-credentials' policies plus the documented additions, and
//! the documents in tests/golden/policies/ do not drift.

use s3grant::api::Mode;
use s3grant::policy::{build_policy, PolicyDocument, ADDITIONS};
use s3grant::validate::{parse_prefixes, BucketName};

const CASES: [(&str, Mode, Option<&str>); 6] = [
    ("read-write", Mode::ReadWrite, None),
    ("read-only", Mode::ReadOnly, None),
    ("write-only", Mode::WriteOnly, None),
    ("read-write-prefix", Mode::ReadWrite, Some("tenant-a/")),
    ("read-only-prefix", Mode::ReadOnly, Some("tenant-a/")),
    ("write-only-prefix", Mode::WriteOnly, Some("tenant-a/")),
];

fn golden(dir: &str, case: &str) -> String {
    let path = format!(
        "{}/tests/golden/{dir}/{case}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compile(mode: Mode, prefix: Option<&str>) -> PolicyDocument {
    let bucket = BucketName::parse("acme-data").unwrap();
    let prefixes = parse_prefixes(&prefix.into_iter().collect::<Vec<_>>()).unwrap();
    build_policy(&bucket, &prefixes, mode)
}

/// The only difference allowed: write statements (those with s3:PutObject) also abort
/// their own multipart uploads.
fn with_documented_additions(mut reference: PolicyDocument) -> PolicyDocument {
    assert_eq!(
        ADDITIONS.len(),
        1,
        "document every addition here and in README.md"
    );
    assert_eq!(ADDITIONS[0].0, "s3:AbortMultipartUpload");
    for statement in &mut reference.statements {
        if statement.actions.iter().any(|a| a == "s3:PutObject") {
            statement.actions.push("s3:AbortMultipartUpload".into());
        }
    }
    reference
}

#[test]
fn statements_match_s3_credentials_plus_documented_additions() {
    for (case, mode, prefix) in CASES {
        let reference: PolicyDocument =
            serde_json::from_str(&golden("s3-credentials", case)).unwrap();
        assert_eq!(
            compile(mode, prefix),
            with_documented_additions(reference),
            "{case}"
        );
    }
}

#[test]
fn read_only_documents_are_byte_identical_to_s3_credentials() {
    for case in ["read-only", "read-only-prefix"] {
        let (_, mode, prefix) = CASES.iter().find(|(c, ..)| *c == case).unwrap();
        assert_eq!(
            compile(*mode, *prefix).to_pretty_json() + "\n",
            golden("s3-credentials", case)
        );
    }
}

#[test]
fn golden_policies_do_not_drift() {
    for (case, mode, prefix) in CASES {
        assert_eq!(
            compile(mode, prefix).to_pretty_json() + "\n",
            golden("policies", case),
            "tests/golden/policies/{case}.json is stale: regenerate with `s3grant policy acme-data ...`"
        );
    }
    let two = {
        let bucket = BucketName::parse("acme-data").unwrap();
        build_policy(
            &bucket,
            &parse_prefixes(&["tenant-a/", "tenant-b"]).unwrap(),
            Mode::ReadWrite,
        )
    };
    assert_eq!(
        two.to_pretty_json() + "\n",
        golden("policies", "read-write-two-prefixes")
    );
}

#[test]
fn prefix_without_trailing_slash_means_the_same_folder() {
    for mode in Mode::ALL {
        assert_eq!(
            compile(mode, Some("tenant-a")),
            compile(mode, Some("tenant-a/"))
        );
    }
}
