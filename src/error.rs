//! The one error type. Every variant names the action that failed and the
//! identifiers involved; none ever carries a secret value.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid bucket name {bucket}: {reason}")]
    InvalidBucket { bucket: String, reason: String },

    #[error("invalid prefix {prefix}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },

    #[error("invalid {field} {value}: {reason}")]
    InvalidDuration {
        field: &'static str,
        value: String,
        reason: String,
    },

    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    #[error("policy document is {size} characters, over the {limit}-character limit of {what}")]
    PolicyTooLarge {
        size: usize,
        limit: usize,
        what: &'static str,
    },

    #[error("no S3GrantClass for this grant: {0}")]
    ClassNotFound(String),

    #[error("cannot choose a default S3GrantClass: {0}")]
    AmbiguousDefaultClass(String),

    #[error("cannot revoke: {0}")]
    RevokeBlocked(String),

    #[error("S3GrantClass {class} is misconfigured: {reason}")]
    ClassMisconfigured { class: String, reason: String },

    #[error("not permitted by S3GrantClass {class}: {reason}")]
    NotPermitted { class: String, reason: String },

    #[error("Secret {namespace}/{name} exists and is not owned by this grant; it is left alone")]
    SecretConflict { namespace: String, name: String },

    #[error(
        "IAM user {user} exists but was not created by s3grant for this grant; it is left alone"
    )]
    ForeignIamUser { user: String },

    #[error("{operation} failed: {message}")]
    Aws {
        operation: &'static str,
        code: Option<String>,
        message: String,
        transient: bool,
    },

    #[error("kubernetes API: {action} failed: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },

    #[error("cannot read {what}: {reason}")]
    Manifest { what: String, reason: String },
}

impl Error {
    /// A bounded label, used for metrics and as the Ready condition's reason.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidBucket { .. }
            | Error::InvalidPrefix { .. }
            | Error::InvalidDuration { .. }
            | Error::InvalidSpec(_)
            | Error::Manifest { .. } => "InvalidSpec",
            Error::PolicyTooLarge { .. } => "PolicyTooLarge",
            Error::ClassNotFound(_) => "ClassNotFound",
            Error::AmbiguousDefaultClass(_) => "AmbiguousDefaultClass",
            Error::RevokeBlocked(_) => "RevokeBlocked",
            Error::ClassMisconfigured { .. } => "ClassMisconfigured",
            Error::NotPermitted { .. } => "NotPermitted",
            Error::SecretConflict { .. } => "SecretConflict",
            Error::ForeignIamUser { .. } => "IamUserConflict",
            Error::Aws {
                transient: true, ..
            } => "AwsTransient",
            Error::Aws { .. } => "AwsError",
            Error::Kube { .. } => "KubernetesError",
        }
    }

    /// Errors the grant's author (or the platform team) must fix; retrying soon will not help.
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            Error::Aws {
                transient: true,
                ..
            } | Error::Kube { .. }
        )
    }

    /// How long to wait before the next attempt.
    pub fn requeue_after(&self) -> Duration {
        match self {
            Error::Aws {
                transient: true, ..
            }
            | Error::Kube { .. } => Duration::from_secs(15),
            Error::Aws { .. } => Duration::from_secs(120),
            Error::SecretConflict { .. }
            | Error::ClassNotFound(_)
            | Error::AmbiguousDefaultClass(_)
            | Error::RevokeBlocked(_) => Duration::from_secs(300),
            _ => Duration::from_secs(900),
        }
    }

    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { action, source }
    }
}

/// Shows untrusted text in a message: quoted, control characters escaped, long input cut.
pub fn shown(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    if text.chars().count() <= MAX_CHARS {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX_CHARS).collect();
        format!("{head:?}… ({} bytes)", text.len())
    }
}
