//! The desired state of one grant, built without any IO: what kind of credential, under
//! which name, with which policy, written to which Secret. `s3grant plan` prints it, and
//! the controller acts on it.

use std::time::Duration;

use crate::api::{BackendRecord, Mode, S3GrantClass, DEFAULT_IAM_PATH, DEFAULT_REGION};
use crate::backend::record_of;
use crate::error::{shown, Error, Result};
use crate::naming::{iam_user_name, role_session_name, INLINE_POLICY_NAME};
use crate::policy::{build_policy, PolicyDocument, SESSION_POLICY_LIMIT, USER_INLINE_POLICY_LIMIT};
use crate::request::{GrantRequest, Wanted};
use crate::validate::{format_duration, BucketName, Prefix};

/// Tag keys every IAM user created by s3grant carries; only users with them are touched.
pub const TAG_MANAGED_BY: &str = "s3grant.io/managed-by";
pub const TAG_CLUSTER: &str = "s3grant.io/cluster";
pub const TAG_NAMESPACE: &str = "s3grant.io/namespace";
pub const TAG_NAME: &str = "s3grant.io/name";
pub const TAG_UID: &str = "s3grant.io/uid";

#[derive(Clone, Debug, PartialEq)]
pub enum CredentialPlan {
    /// A long-lived access key of a dedicated IAM user.
    IamUser {
        user_name: String,
        path: String,
        permissions_boundary: Option<String>,
        rotate_every: Option<Duration>,
        tags: Vec<(String, String)>,
    },
    /// Session credentials from AssumeRole with the grant's policy as session policy.
    StsSession {
        role_arn: String,
        session_name: String,
        duration: Duration,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GrantPlan {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub class_name: String,
    /// Where the credentials come from: the class's current backend.
    pub backend: BackendRecord,
    pub credential: CredentialPlan,
    pub bucket: BucketName,
    pub prefixes: Vec<Prefix>,
    pub mode: Mode,
    pub policy: PolicyDocument,
    pub policy_size: usize,
    pub secret_name: String,
    pub region: String,
    pub endpoint: Option<String>,
}

/// Builds the grant's desired state. The class is assumed to permit the grant (see
/// [`crate::guardrails`]). `cluster_id` tags IAM users so that clusters sharing an
/// account never sweep each other's users.
pub fn plan_grant(
    request: &GrantRequest,
    class: &S3GrantClass,
    cluster_id: Option<&str>,
) -> Result<GrantPlan> {
    let (namespace, name, uid) = (&request.namespace, &request.name, &request.uid);
    let class_name = class.metadata.name.clone().unwrap_or_default();
    let misconfigured = |reason: &str| Error::ClassMisconfigured {
        class: class_name.clone(),
        reason: reason.to_string(),
    };
    let policy = build_policy(&request.bucket, &request.prefixes, request.mode);
    let backend = &class.spec.backend;

    let (credential, policy_size) = match request.wanted {
        Wanted::StsSession { duration } => {
            let role_arn = backend.role_arn.clone().ok_or_else(|| {
                misconfigured("backend.roleArn is required for grants with a duration")
            })?;
            let size = policy.check_size(SESSION_POLICY_LIMIT, "an STS session policy")?;
            let credential = CredentialPlan::StsSession {
                role_arn,
                session_name: role_session_name(namespace, name, uid),
                duration,
            };
            (credential, size)
        }
        Wanted::IamUser { rotate_every } => {
            let path = backend
                .iam_path
                .clone()
                .unwrap_or_else(|| DEFAULT_IAM_PATH.to_string());
            if !path.starts_with('/') || !path.ends_with('/') || path.len() > 512 {
                return Err(misconfigured("backend.iamPath must start and end with '/'"));
            }
            let size = policy.check_size(USER_INLINE_POLICY_LIMIT, "a user's inline policies")?;
            let mut tags = vec![(TAG_MANAGED_BY.to_string(), "s3grant".to_string())];
            if let Some(cluster) = cluster_id {
                tags.push((TAG_CLUSTER.into(), cluster.to_string()));
            }
            tags.extend([
                (TAG_NAMESPACE.to_string(), namespace.clone()),
                (TAG_NAME.to_string(), name.clone()),
                (TAG_UID.to_string(), uid.clone()),
            ]);
            let credential = CredentialPlan::IamUser {
                user_name: iam_user_name(namespace, name, uid),
                path,
                permissions_boundary: backend.permissions_boundary.clone(),
                rotate_every,
                tags,
            };
            (credential, size)
        }
    };

    Ok(GrantPlan {
        secret_name: request.secret_name.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        uid: uid.clone(),
        class_name,
        backend: record_of(backend),
        credential,
        bucket: request.bucket.clone(),
        prefixes: request.prefixes.clone(),
        mode: request.mode,
        policy,
        policy_size,
        region: backend
            .region
            .clone()
            .unwrap_or_else(|| DEFAULT_REGION.to_string()),
        endpoint: backend.endpoint.clone(),
    })
}

impl GrantPlan {
    /// The IAM user the plan wants, when it wants one.
    pub fn user_name(&self) -> Option<&str> {
        match &self.credential {
            CredentialPlan::IamUser { user_name, .. } => Some(user_name),
            CredentialPlan::StsSession { .. } => None,
        }
    }

    /// Where the credentials reach, for messages: `s3://bucket/a/, s3://bucket/b/`.
    pub fn scope(&self) -> String {
        if self.prefixes.is_empty() {
            return format!("s3://{}", self.bucket);
        }
        self.prefixes
            .iter()
            .map(|p| format!("s3://{}/{p}", self.bucket))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn credential_kind(&self) -> &'static str {
        match self.credential {
            CredentialPlan::IamUser { .. } => "IamUser",
            CredentialPlan::StsSession { .. } => "StsSession",
        }
    }

    /// The AWS calls the controller makes for a grant it has never seen, in order.
    pub fn aws_calls(&self) -> Vec<String> {
        match &self.credential {
            CredentialPlan::IamUser {
                user_name,
                path,
                permissions_boundary,
                tags,
                ..
            } => {
                let tag_keys: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
                let tag_keys = tag_keys.join(", ");
                let boundary = permissions_boundary
                    .as_deref()
                    .map(|b| format!(", PermissionsBoundary={b}"))
                    .unwrap_or_default();
                vec![
                    format!("iam:GetUser UserName={user_name}"),
                    format!(
                        "iam:CreateUser UserName={user_name}, Path={path}{boundary}, Tags=[{tag_keys}]  (only if GetUser found none)"
                    ),
                    format!(
                        "iam:PutUserPolicy UserName={user_name}, PolicyName={INLINE_POLICY_NAME}, PolicyDocument=<the policy above>"
                    ),
                    format!("iam:ListAccessKeys UserName={user_name}"),
                    format!("iam:CreateAccessKey UserName={user_name}"),
                ]
            }
            CredentialPlan::StsSession {
                role_arn,
                session_name,
                duration,
            } => vec![format!(
                "sts:AssumeRole RoleArn={role_arn}, RoleSessionName={session_name}, DurationSeconds={} ({}), Policy=<the policy above>",
                duration.as_secs(),
                format_duration(*duration)
            )],
        }
    }

    /// The human-readable plan `s3grant plan` prints.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, key: &str, value: String| {
            out.push_str(&format!("{key:<12}{value}\n"));
        };
        line(
            &mut out,
            "grant:",
            format!("{}/{}", self.namespace, self.name),
        );
        line(&mut out, "class:", self.class_name.clone());
        match &self.credential {
            CredentialPlan::IamUser {
                user_name,
                path,
                rotate_every,
                ..
            } => {
                let rotation = rotate_every
                    .map(|d| format!("rotated every {}", format_duration(d)))
                    .unwrap_or_else(|| "rotated on request".into());
                line(
                    &mut out,
                    "credential:",
                    format!("IAM user with an access key ({rotation})"),
                );
                line(&mut out, "iam user:", format!("{user_name} (path {path})"));
            }
            CredentialPlan::StsSession {
                session_name,
                duration,
                ..
            } => {
                line(
                    &mut out,
                    "credential:",
                    format!(
                        "STS session of {}, re-minted at about two thirds of it",
                        format_duration(*duration)
                    ),
                );
                line(&mut out, "session:", session_name.clone());
            }
        }
        let limit = match self.credential {
            CredentialPlan::IamUser { .. } => USER_INLINE_POLICY_LIMIT,
            CredentialPlan::StsSession { .. } => SESSION_POLICY_LIMIT,
        };
        line(
            &mut out,
            "secret:",
            format!("{}/{}", self.namespace, self.secret_name),
        );
        line(
            &mut out,
            "region:",
            match &self.endpoint {
                Some(endpoint) => format!("{} at {endpoint}", self.region),
                None => self.region.clone(),
            },
        );
        line(
            &mut out,
            "policy:",
            format!("{} of {limit} characters", self.policy_size),
        );
        out.push_str(&self.policy.to_pretty_json());
        out.push_str("\nAWS calls:\n");
        for (i, call) in self.aws_calls().iter().enumerate() {
            out.push_str(&format!("  {}. {call}\n", i + 1));
        }
        out
    }
}

/// Parses a manifest of the given kind, with the same messages the operator would give.
pub fn parse_manifest<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_yaml::from_str(text).map_err(|e| Error::Manifest {
        what: what.to_string(),
        reason: shown(&e.to_string()),
    })
}
