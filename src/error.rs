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

    #[error("no S3GrantClass for this grant: {0}; the credentials already issued are kept until a default class exists or their class is deleted")]
    NoDefaultClass(String),

    #[error("cannot revoke: {0}")]
    RevokeBlocked(String),

    #[error("S3GrantClass {class} is misconfigured: {reason}")]
    ClassMisconfigured { class: String, reason: String },

    #[error("not permitted by S3GrantClass {class}: {reason}")]
    NotPermitted { class: String, reason: String },

    #[error("Secret {namespace}/{name} exists and is not owned by this grant; it is left alone")]
    SecretConflict { namespace: String, name: String },

    #[error("Secret {namespace}/{name} cannot be written: {reason}; nothing was created in AWS")]
    SecretUnwritable {
        namespace: String,
        name: String,
        reason: String,
    },

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

    #[error("{0}")]
    BackendUnavailable(String),

    #[error("not the leader (lease lost or not renewed in time): no write")]
    NotLeader,

    #[error("the backend of {0} is busy with other grants; trying again shortly")]
    BackendBusy(String),

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
            Error::NoDefaultClass(_) => "NoDefaultClass",
            Error::RevokeBlocked(_) => "RevokeBlocked",
            Error::ClassMisconfigured { .. } => "ClassMisconfigured",
            Error::NotPermitted { .. } => "NotPermitted",
            Error::SecretConflict { .. } => "SecretConflict",
            Error::SecretUnwritable { .. } => "SecretUnwritable",
            Error::ForeignIamUser { .. } => "IamUserConflict",
            Error::Aws {
                transient: true, ..
            } => "AwsTransient",
            Error::Aws { .. } => "AwsError",
            Error::BackendUnavailable(_) => "BackendUnavailable",
            Error::BackendBusy(_) => "BackendBusy",
            Error::NotLeader => "NotLeader",
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
                | Error::BackendUnavailable(_)
                | Error::BackendBusy(_)
                | Error::NotLeader
        )
    }

    /// A call that got no answer at all: the backend is silent, not refusing.
    pub fn is_unanswered(&self) -> bool {
        matches!(self, Error::Aws { code: Some(code), .. } if code == crate::aws::NO_ANSWER)
    }

    /// How long to wait before attempt `attempt + 1` (the first retry is attempt 1):
    /// doubling from a base that fits the error, up to a cap, so a grant that cannot
    /// converge never loops on AWS. Errors that only a change can fix (and a change
    /// wakes the grant at once) wait long.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        const MINUTE: u64 = 60;
        let (base, cap) = match self {
            Error::Aws {
                transient: true, ..
            }
            | Error::Kube { .. }
            | Error::BackendUnavailable(_)
            | Error::NotLeader => (5, 5 * MINUTE),
            Error::BackendBusy(_) => (1, 2),
            Error::SecretUnwritable { .. } | Error::RevokeBlocked(_) => (15, 10 * MINUTE),
            Error::Aws { .. } => (30, 15 * MINUTE),
            Error::SecretConflict { .. }
            | Error::ClassNotFound(_)
            | Error::NoDefaultClass(_)
            | Error::AmbiguousDefaultClass(_)
            | Error::ForeignIamUser { .. }
            | Error::ClassMisconfigured { .. } => (5 * MINUTE, 30 * MINUTE),
            _ => (15 * MINUTE, 60 * MINUTE),
        };
        let doubled = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(16));
        Duration::from_secs(doubled.min(cap))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let throttled = Error::Aws {
            operation: "iam:GetUser",
            code: Some("Throttling".into()),
            message: "slow down".into(),
            transient: true,
        };
        let delays: Vec<u64> = (1..=9)
            .map(|n| throttled.retry_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(throttled.retry_delay(u32::MAX).as_secs(), 300);
        let unwritable = Error::SecretUnwritable {
            namespace: "ns".into(),
            name: "s".into(),
            reason: "quota".into(),
        };
        assert!(unwritable.retry_delay(1) >= Duration::from_secs(15));
        assert!(unwritable.retry_delay(30) <= Duration::from_secs(600));
    }
}
