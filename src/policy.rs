//! The policy compiler: (bucket, prefixes, mode) → a least-privilege IAM policy document.
//!
//! The statements are those `s3-credentials policy` (0.17) prints for the same inputs,
//! plus the additions listed in [`ADDITIONS`]. Only validated [`BucketName`] and
//! [`Prefix`] values reach it, so nothing here can widen the scope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::Mode;
use crate::error::{Error, Result};
use crate::validate::{BucketName, Prefix};

/// IAM counts a user's inline policies together against this many characters (whitespace excluded).
pub const USER_INLINE_POLICY_LIMIT: usize = 2048;
/// STS AssumeRole's `Policy` parameter limit.
pub const SESSION_POLICY_LIMIT: usize = 2048;

const READ_ACTIONS: [&str; 5] = [
    "s3:GetObject",
    "s3:GetObjectAcl",
    "s3:GetObjectLegalHold",
    "s3:GetObjectRetention",
    "s3:GetObjectTagging",
];
/// s3-credentials' write actions, then ours: clients abort failed multipart uploads.
const READ_WRITE_WRITE_ACTIONS: [&str; 3] =
    ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"];
const WRITE_ONLY_ACTIONS: [&str; 2] = ["s3:PutObject", "s3:AbortMultipartUpload"];

/// What s3grant allows beyond `s3-credentials policy`, and why. README.md lists these too.
pub const ADDITIONS: [(&str, &str); 1] = [(
    "s3:AbortMultipartUpload",
    "write modes: SDK upload managers abort their own failed multipart uploads; \
     without it the parts stay (and are billed) until a lifecycle rule removes them. \
     It is scoped to the same object resources as s3:PutObject.",
)];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDocument {
    #[serde(rename = "Version")]
    pub version: String,
    #[serde(rename = "Statement")]
    pub statements: Vec<Statement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "Effect")]
    pub effect: String,
    #[serde(rename = "Action")]
    pub actions: Vec<String>,
    #[serde(rename = "Resource")]
    pub resources: Vec<String>,
    #[serde(rename = "Condition", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<BTreeMap<String, BTreeMap<String, Vec<String>>>>,
}

impl Statement {
    fn allow(actions: &[&str], resources: Vec<String>) -> Self {
        Statement {
            effect: "Allow".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            resources,
            condition: None,
        }
    }

    fn when_prefix_like(mut self, patterns: Vec<String>) -> Self {
        let prefix = BTreeMap::from([("s3:prefix".to_string(), patterns)]);
        self.condition = Some(BTreeMap::from([("StringLike".to_string(), prefix)]));
        self
    }
}

/// Compiles the policy for one bucket. An empty `prefixes` means the whole bucket.
/// `prefixes` should come from [`crate::validate::parse_prefixes`] (sorted, no overlaps).
pub fn build_policy(bucket: &BucketName, prefixes: &[Prefix], mode: Mode) -> PolicyDocument {
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let object_arns: Vec<String> = if prefixes.is_empty() {
        vec![format!("{bucket_arn}/*")]
    } else {
        prefixes
            .iter()
            .map(|p| format!("{bucket_arn}/{p}*"))
            .collect()
    };
    let list_patterns: Vec<String> = prefixes.iter().map(|p| format!("{p}*")).collect();

    let mut statements = Vec::new();
    if mode != Mode::WriteOnly {
        if prefixes.is_empty() {
            statements.push(Statement::allow(
                &["s3:ListBucket", "s3:GetBucketLocation"],
                vec![bucket_arn.clone()],
            ));
        } else {
            statements.push(Statement::allow(
                &["s3:GetBucketLocation"],
                vec![bucket_arn.clone()],
            ));
            statements.push(
                Statement::allow(&["s3:ListBucket"], vec![bucket_arn.clone()])
                    .when_prefix_like(list_patterns),
            );
        }
        statements.push(Statement::allow(&READ_ACTIONS, object_arns.clone()));
    }
    match mode {
        Mode::ReadWrite => {
            statements.push(Statement::allow(&READ_WRITE_WRITE_ACTIONS, object_arns))
        }
        Mode::WriteOnly => statements.push(Statement::allow(&WRITE_ONLY_ACTIONS, object_arns)),
        Mode::ReadOnly => {}
    }
    PolicyDocument {
        version: "2012-10-17".into(),
        statements,
    }
}

impl PolicyDocument {
    /// The compact form sent to IAM and STS (RGW rejects pretty JSON).
    pub fn to_compact_json(&self) -> String {
        serde_json::to_string(self).expect("a policy document always serializes")
    }

    /// The form `s3-credentials policy` prints: four-space indentation.
    pub fn to_pretty_json(&self) -> String {
        let mut out = Vec::new();
        let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
        self.serialize(&mut serializer)
            .expect("a policy document always serializes");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }

    /// The size as IAM counts it: characters of the document, whitespace excluded.
    pub fn size(&self) -> usize {
        policy_size(&self.to_compact_json())
    }

    /// Fails with `PolicyTooLarge` when the document exceeds `limit`.
    pub fn check_size(&self, limit: usize, what: &'static str) -> Result<usize> {
        let size = self.size();
        if size > limit {
            return Err(Error::PolicyTooLarge { size, limit, what });
        }
        Ok(size)
    }
}

/// Counts characters the way IAM does for its policy size limits: whitespace is free.
pub fn policy_size(json: &str) -> usize {
    json.chars().filter(|c| !c.is_whitespace()).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::parse_prefixes;

    fn compile(prefixes: &[&str], mode: Mode) -> PolicyDocument {
        let bucket = BucketName::parse("acme-data").unwrap();
        build_policy(&bucket, &parse_prefixes(prefixes).unwrap(), mode)
    }

    #[test]
    fn prefix_without_slash_cannot_reach_sibling_folders() {
        let json = compile(&["tenant-a"], Mode::ReadWrite).to_compact_json();
        assert!(json.contains("arn:aws:s3:::acme-data/tenant-a/*"));
        assert!(json.contains("\"tenant-a/*\""));
        assert!(!json.contains("tenant-a*"));
    }

    #[test]
    fn several_prefixes_share_statements() {
        let one = compile(&["a/"], Mode::ReadWrite);
        let two = compile(&["a/", "b/"], Mode::ReadWrite);
        assert_eq!(one.statements.len(), two.statements.len());
        let list = &two.statements[1];
        assert_eq!(list.actions, ["s3:ListBucket"]);
        assert_eq!(
            list.condition.as_ref().unwrap()["StringLike"]["s3:prefix"],
            ["a/*", "b/*"]
        );
        assert_eq!(
            two.statements[2].resources,
            ["arn:aws:s3:::acme-data/a/*", "arn:aws:s3:::acme-data/b/*"]
        );
    }

    #[test]
    fn size_ignores_whitespace() {
        assert_eq!(policy_size("{ \"a\" :\n [1, 2] }"), 11);
        let doc = compile(&["a/"], Mode::ReadOnly);
        assert_eq!(doc.size(), policy_size(&doc.to_pretty_json()));
    }

    #[test]
    fn too_many_prefixes_fail_early_with_size_and_limit() {
        let prefixes: Vec<String> = (0..40).map(|i| format!("tenant-{i:03}/reports/")).collect();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let doc = compile(&refs, Mode::ReadWrite);
        let err = doc
            .check_size(USER_INLINE_POLICY_LIMIT, "a user's inline policies")
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&doc.size().to_string()), "{message}");
        assert!(message.contains("2048"), "{message}");
        assert_eq!(err.category(), "PolicyTooLarge");
    }
}
