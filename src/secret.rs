//! The Secret a grant's pods read: built here without IO, and inspected before it is
//! written so a Secret s3grant does not own is never overwritten.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use crate::api::MANAGED_BY_LABEL;
use crate::aws::Credentials;
use crate::plan::GrantPlan;

/// A digest of the credential fields, so an edited Secret is noticed and replaced.
pub const CREDENTIAL_HASH_ANNOTATION: &str = "s3grant.io/credential-hash";
/// A digest of what the credentials were issued for (policy, role, duration, user), so
/// credentials are replaced when the grant changes.
pub const ISSUED_FOR_ANNOTATION: &str = "s3grant.io/issued-for";
/// When the credentials were written into the Secret: the previous key's grace starts then.
pub const ISSUED_AT_ANNOTATION: &str = "s3grant.io/issued-at";
/// The rotation request these credentials answer. Written with the new key, so a crash
/// after the Secret write never rotates twice for one request.
pub const ROTATION_HANDLED_ANNOTATION: &str = "s3grant.io/rotation-handled";
pub const GRANT_ANNOTATION: &str = "s3grant.io/grant";

pub const KEY_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const KEY_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
pub const KEY_SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
pub const KEY_EXPIRATION: &str = "AWS_CREDENTIAL_EXPIRATION";

/// What the Secret records besides the credentials: the commit record of an issue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssueRecord {
    pub issued_for: String,
    pub issued_at: Option<Timestamp>,
    pub rotation_handled: Option<String>,
}

/// Builds the grant's Secret: exactly the keys of the credential's kind, nothing else.
pub fn build_secret(
    plan: &GrantPlan,
    owner: OwnerReference,
    credentials: &Credentials,
    record: &IssueRecord,
) -> Secret {
    let mut data: BTreeMap<String, String> = BTreeMap::new();
    data.insert(KEY_ACCESS_KEY_ID.into(), credentials.access_key_id.clone());
    data.insert(
        KEY_SECRET_ACCESS_KEY.into(),
        credentials.secret_access_key.clone(),
    );
    if let Some(token) = &credentials.session_token {
        data.insert(KEY_SESSION_TOKEN.into(), token.clone());
    }
    let expiration = credentials.expiration.map(rfc3339);
    if let Some(expiration) = &expiration {
        data.insert(KEY_EXPIRATION.into(), expiration.clone());
    }
    data.insert("AWS_REGION".into(), plan.region.clone());
    if let Some(endpoint) = &plan.endpoint {
        data.insert("AWS_ENDPOINT_URL_S3".into(), endpoint.clone());
    }
    data.insert("S3_BUCKET".into(), plan.bucket.to_string());
    if let Some(first) = plan.prefixes.first() {
        data.insert("S3_PREFIX".into(), first.to_string());
    }
    if plan.prefixes.len() > 1 {
        let all: Vec<&str> = plan.prefixes.iter().map(|p| p.as_str()).collect();
        data.insert("S3_PREFIXES".into(), all.join(","));
    }
    data.insert("credentials".into(), shared_credentials_file(credentials));
    data.insert(
        "credential_process.json".into(),
        credential_process_json(credentials, expiration.as_deref()),
    );

    let mut annotations = BTreeMap::from([
        (
            CREDENTIAL_HASH_ANNOTATION.to_string(),
            credential_hash(credentials),
        ),
        (ISSUED_FOR_ANNOTATION.to_string(), record.issued_for.clone()),
        (GRANT_ANNOTATION.to_string(), plan.name.clone()),
    ]);
    if let Some(at) = record.issued_at {
        annotations.insert(ISSUED_AT_ANNOTATION.to_string(), rfc3339(at));
    }
    if let Some(handled) = &record.rotation_handled {
        annotations.insert(ROTATION_HANDLED_ANNOTATION.to_string(), handled.clone());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(plan.secret_name.clone()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.0.to_string(),
                MANAGED_BY_LABEL.1.to_string(),
            )])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The Secret to PUT over `existing`: our data exactly (stale keys of another kind go),
/// our labels and annotations over whatever others added to the metadata, and the
/// existing resourceVersion as a precondition.
pub fn replacing(existing: &Secret, desired: Secret) -> Secret {
    let merge = |theirs: &Option<BTreeMap<String, String>>,
                 ours: Option<BTreeMap<String, String>>| {
        let mut merged = theirs.clone().unwrap_or_default();
        merged.extend(ours.unwrap_or_default());
        Some(merged)
    };
    Secret {
        metadata: ObjectMeta {
            labels: merge(&existing.metadata.labels, desired.metadata.labels),
            annotations: merge(&existing.metadata.annotations, desired.metadata.annotations),
            resource_version: existing.metadata.resource_version.clone(),
            ..desired.metadata
        },
        ..desired
    }
}

fn shared_credentials_file(credentials: &Credentials) -> String {
    let mut ini = format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        credentials.access_key_id, credentials.secret_access_key
    );
    if let Some(token) = &credentials.session_token {
        ini.push_str(&format!("aws_session_token = {token}\n"));
    }
    ini
}

/// The output format of an AWS `credential_process`: `cat` of this file is a valid one.
fn credential_process_json(credentials: &Credentials, expiration: Option<&str>) -> String {
    let mut document = serde_json::json!({
        "Version": 1,
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
    });
    if let Some(token) = &credentials.session_token {
        document["SessionToken"] = token.clone().into();
    }
    if let Some(expiration) = expiration {
        document["Expiration"] = expiration.into();
    }
    document.to_string()
}

pub fn rfc3339(time: Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A digest of the credential fields; also a fingerprint that never reveals them.
pub fn credential_hash(credentials: &Credentials) -> String {
    let mut hasher = Sha256::new();
    hasher.update(credentials.access_key_id.as_bytes());
    hasher.update(b"\n");
    hasher.update(credentials.secret_access_key.as_bytes());
    hasher.update(b"\n");
    hasher.update(
        credentials
            .session_token
            .as_deref()
            .unwrap_or_default()
            .as_bytes(),
    );
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What is there now under the Secret's name.
#[derive(Debug)]
pub enum ExistingSecret {
    Missing,
    /// Not controlled by this grant: never overwritten.
    Foreign,
    /// Ours. `credentials` is set when the credential fields are intact (unedited).
    Ours {
        credentials: Option<Credentials>,
        record: IssueRecord,
    },
}

pub fn inspect_secret(secret: Option<&Secret>, grant_uid: &str) -> ExistingSecret {
    let Some(secret) = secret else {
        return ExistingSecret::Missing;
    };
    let controlled_by_grant = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| {
            owner.controller == Some(true) && owner.uid == grant_uid && owner.kind == "S3Grant"
        });
    if !controlled_by_grant {
        return ExistingSecret::Foreign;
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    let credentials = match (field(KEY_ACCESS_KEY_ID), field(KEY_SECRET_ACCESS_KEY)) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token: field(KEY_SESSION_TOKEN),
            expiration: field(KEY_EXPIRATION).and_then(|t| t.parse().ok()),
        }),
        _ => None,
    }
    .filter(|c| annotations.get(CREDENTIAL_HASH_ANNOTATION) == Some(&credential_hash(c)));
    ExistingSecret::Ours {
        credentials,
        record: IssueRecord {
            issued_for: annotations
                .get(ISSUED_FOR_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
            issued_at: annotations
                .get(ISSUED_AT_ANNOTATION)
                .and_then(|t| t.parse().ok()),
            rotation_handled: annotations.get(ROTATION_HANDLED_ANNOTATION).cloned(),
        },
    }
}

/// True when writing `desired` would change what is stored: the data (exactly), our
/// labels and annotations, the owner, the type.
pub fn needs_write(existing: Option<&Secret>, desired: &Secret) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    let contains_all = |have: &Option<BTreeMap<String, String>>,
                        want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    existing.data.clone().unwrap_or_default() != desired.data.clone().unwrap_or_default()
        || existing.type_ != desired.type_
        || !contains_all(&existing.metadata.labels, &desired.metadata.labels)
        || !contains_all(
            &existing.metadata.annotations,
            &desired.metadata.annotations,
        )
        || owner_uids(&existing.metadata.owner_references)
            != owner_uids(&desired.metadata.owner_references)
}

fn owner_uids(owners: &Option<Vec<OwnerReference>>) -> Vec<&str> {
    owners.iter().flatten().map(|o| o.uid.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Backend, S3Grant, S3GrantClass, S3GrantClassSpec, S3GrantSpec};
    use crate::plan::plan_grant;
    use crate::request::GrantRequest;
    use kube::Resource;

    fn grant_and_plan(duration: Option<&str>) -> (S3Grant, GrantPlan) {
        let spec: S3GrantSpec = serde_yaml::from_str(&format!(
            "{{bucket: acme-data, prefixes: [a/, b/], mode: ReadOnly{}}}",
            duration
                .map(|d| format!(", duration: {d}"))
                .unwrap_or_default()
        ))
        .unwrap();
        let mut grant = S3Grant::new("reports", spec);
        grant.metadata.namespace = Some("tenant-a".into());
        grant.metadata.uid = Some("uid-1".into());
        let class = S3GrantClass::new(
            "c",
            S3GrantClassSpec {
                backend: Backend {
                    endpoint: Some("http://127.0.0.1:9000".into()),
                    role_arn: Some("arn:aws:iam:::role/r".into()),
                    ..Backend::default()
                },
                namespace_selector: None,
                buckets: vec!["acme-data".into()],
                prefix_template: None,
                allow_whole_bucket: false,
                modes: None,
                max_duration: None,
                allow_iam_users: None,
            },
        );
        let plan = plan_grant(&GrantRequest::parse(&grant).unwrap(), &class, None).unwrap();
        (grant, plan)
    }

    fn build(grant: &S3Grant, plan: &GrantPlan, credentials: &Credentials, for_: &str) -> Secret {
        let record = IssueRecord {
            issued_for: for_.into(),
            issued_at: Some(Timestamp::from_second(1_700_000_000).unwrap()),
            rotation_handled: Some("r1".into()),
        };
        build_secret(
            plan,
            grant.controller_owner_ref(&()).unwrap(),
            credentials,
            &record,
        )
    }

    fn session() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "secret/key".into(),
            session_token: Some("token".into()),
            expiration: Some(Timestamp::from_second(1_800_000_000).unwrap()),
        }
    }

    fn access_key() -> Credentials {
        Credentials {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "secret/key2".into(),
            session_token: None,
            expiration: None,
        }
    }

    fn text(secret: &Secret, key: &str) -> String {
        String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
    }

    fn keys(secret: &Secret) -> Vec<&str> {
        secret
            .data
            .as_ref()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn secret_has_the_documented_keys_and_owner() {
        let (grant, plan) = grant_and_plan(Some("1h"));
        let secret = build(&grant, &plan, &session(), "x");
        assert_eq!(
            keys(&secret),
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_CREDENTIAL_EXPIRATION",
                "AWS_ENDPOINT_URL_S3",
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "S3_BUCKET",
                "S3_PREFIX",
                "S3_PREFIXES",
                "credential_process.json",
                "credentials"
            ]
        );
        assert_eq!(
            text(&secret, "AWS_CREDENTIAL_EXPIRATION"),
            "2027-01-15T08:00:00Z"
        );
        assert_eq!(text(&secret, "S3_PREFIXES"), "a/,b/");
        assert_eq!(secret.metadata.name.as_deref(), Some("reports-s3"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("S3Grant", "uid-1", Some(true))
        );
        let process: serde_json::Value =
            serde_json::from_str(&text(&secret, "credential_process.json")).unwrap();
        assert_eq!(process["Version"], 1);
        assert_eq!(process["SessionToken"], "token");
        assert_eq!(process["Expiration"], "2027-01-15T08:00:00Z");
        assert!(text(&secret, "credentials").contains("aws_session_token = token\n"));
    }

    #[test]
    fn intact_secret_gives_back_its_credentials_and_its_record() {
        let (grant, plan) = grant_and_plan(Some("1h"));
        let secret = build(&grant, &plan, &session(), "issued");
        match inspect_secret(Some(&secret), "uid-1") {
            ExistingSecret::Ours {
                credentials,
                record,
            } => {
                assert_eq!(credentials, Some(session()));
                assert_eq!(record.issued_for, "issued");
                assert_eq!(record.issued_at.unwrap().as_second(), 1_700_000_000);
                assert_eq!(record.rotation_handled.as_deref(), Some("r1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edited_credentials_are_not_trusted() {
        let (grant, plan) = grant_and_plan(None);
        let mut secret = build(&grant, &plan, &session(), "x");
        secret.data.as_mut().unwrap().insert(
            KEY_SECRET_ACCESS_KEY.into(),
            ByteString(b"tampered".to_vec()),
        );
        assert!(matches!(
            inspect_secret(Some(&secret), "uid-1"),
            ExistingSecret::Ours {
                credentials: None,
                ..
            }
        ));
    }

    #[test]
    fn secret_of_another_owner_is_foreign() {
        let (grant, plan) = grant_and_plan(None);
        let secret = build(&grant, &plan, &session(), "x");
        assert!(matches!(
            inspect_secret(Some(&secret), "uid-2"),
            ExistingSecret::Foreign
        ));
        let mut unowned = secret.clone();
        unowned.metadata.owner_references = None;
        assert!(matches!(
            inspect_secret(Some(&unowned), "uid-1"),
            ExistingSecret::Foreign
        ));
        assert!(matches!(
            inspect_secret(None, "uid-1"),
            ExistingSecret::Missing
        ));
    }

    #[test]
    fn unchanged_secret_needs_no_write_and_any_extra_key_does() {
        let (grant, plan) = grant_and_plan(None);
        let desired = build(&grant, &plan, &session(), "x");
        let mut stored = desired.clone();
        stored.metadata.resource_version = Some("7".into());
        stored
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("other".into(), "kept".into());
        assert!(!needs_write(Some(&stored), &desired));
        let mut extra = stored.clone();
        extra
            .data
            .as_mut()
            .unwrap()
            .insert("NOT_OURS".into(), ByteString(b"x".to_vec()));
        assert!(
            needs_write(Some(&extra), &desired),
            "a key we did not write"
        );
        stored.data.as_mut().unwrap().remove("S3_BUCKET");
        assert!(needs_write(Some(&stored), &desired));
        assert!(needs_write(None, &desired));
    }

    /// The STS → IAM switch: the Secret written over an STS one holds no session keys.
    #[test]
    fn replacing_a_session_secret_with_an_access_key_leaves_no_session_keys() {
        let (sts_grant, sts_plan) = grant_and_plan(Some("1h"));
        let mut stored = build(&sts_grant, &sts_plan, &session(), "x");
        stored.metadata.resource_version = Some("42".into());
        stored
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "a".into());
        let (grant, mut plan) = grant_and_plan(None);
        plan.prefixes.truncate(1);
        plan.endpoint = None;
        let written = replacing(&stored, build(&grant, &plan, &access_key(), "user"));
        assert_eq!(
            keys(&written),
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_REGION",
                "AWS_SECRET_ACCESS_KEY",
                "S3_BUCKET",
                "S3_PREFIX",
                "credential_process.json",
                "credentials"
            ]
        );
        assert_eq!(written.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(written.metadata.labels.as_ref().unwrap()["team"], "a");
        assert!(matches!(
            inspect_secret(Some(&written), "uid-1"),
            ExistingSecret::Ours { credentials: Some(c), .. } if c == access_key()
        ));
    }
}
