//! The grant's status, computed without IO and deterministically: the same facts give
//! the same status, so writing it does not cause another reconcile or another write.

use jiff::Timestamp;

use crate::api::{Condition, Held, S3GrantStatus};
use crate::plan::{CredentialPlan, GrantPlan};
use crate::secret::rfc3339;

pub const READY: &str = "Ready";

/// The Ready condition, keeping the previous transition time when the status is unchanged.
pub fn ready_condition(
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: Option<&S3GrantStatus>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let previous_ready = previous.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let last_transition_time = match previous_ready {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => None,
    }
    .or_else(|| Some(rfc3339(now)));
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// What an issue produced, as the status reports it (no secret value).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Issued {
    pub access_key_id: String,
    pub expires_at: Option<Timestamp>,
    /// Whether new credentials were written this time.
    pub changed: bool,
    /// Things the reader should know (a clamped duration, a waiting rotation, a user
    /// not yet released on an old backend).
    pub notes: Vec<String>,
    /// The rotation request the credentials in the Secret answer.
    pub handled_rotation_request: Option<String>,
}

/// The status of a grant whose Secret holds working credentials.
pub fn ready_status(
    plan: &GrantPlan,
    issued: &Issued,
    held: Vec<Held>,
    generation: Option<i64>,
    previous: Option<&S3GrantStatus>,
    now: Timestamp,
) -> S3GrantStatus {
    let mut message = format!(
        "{} credentials for {} ({}) are in Secret {}",
        plan.credential_kind(),
        plan.scope(),
        plan.mode,
        plan.secret_name
    );
    for note in &issued.notes {
        message.push_str("; ");
        message.push_str(note);
    }
    let last_rotated = if issued.changed {
        Some(rfc3339(now))
    } else {
        previous.and_then(|s| s.last_rotated.clone())
    };
    let (iam_user, role_session_name) = match &plan.credential {
        CredentialPlan::IamUser { user_name, .. } => (Some(user_name.clone()), None),
        CredentialPlan::StsSession { session_name, .. } => (None, Some(session_name.clone())),
    };
    S3GrantStatus {
        observed_generation: generation,
        conditions: vec![ready_condition(
            true, "Issued", message, generation, previous, now,
        )],
        credential_kind: Some(plan.credential_kind().into()),
        class_name: Some(plan.class_name.clone()),
        secret_name: Some(plan.secret_name.clone()),
        iam_user,
        role_session_name,
        access_key_id: Some(issued.access_key_id.clone()),
        expires_at: issued.expires_at.map(rfc3339),
        last_rotated,
        handled_rotation_request: issued.handled_rotation_request.clone(),
        policy_size: Some(plan.policy_size as i64),
        held,
    }
}

/// A status that reports a failure and keeps the facts that are still true. With
/// `revoked`, the credentials are gone: only the ledger (what could not be removed yet)
/// and the last handled rotation request stay.
pub fn failed_status(
    previous: Option<&S3GrantStatus>,
    reason: &str,
    message: String,
    generation: Option<i64>,
    held: Vec<Held>,
    revoked: bool,
    now: Timestamp,
) -> S3GrantStatus {
    let mut status = if revoked {
        S3GrantStatus {
            handled_rotation_request: previous.and_then(|s| s.handled_rotation_request.clone()),
            ..S3GrantStatus::default()
        }
    } else {
        previous.cloned().unwrap_or_default()
    };
    status.observed_generation = generation;
    status.conditions = vec![ready_condition(
        false, reason, message, generation, previous, now,
    )];
    status.held = held;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn unchanged_readiness_keeps_its_transition_time() {
        let first = S3GrantStatus {
            conditions: vec![ready_condition(
                true,
                "Issued",
                "ok".into(),
                Some(1),
                None,
                at(100),
            )],
            ..Default::default()
        };
        let again = ready_condition(true, "Issued", "ok".into(), Some(1), Some(&first), at(500));
        assert_eq!(again, first.conditions[0], "same facts, same condition");
        let failed = ready_condition(
            false,
            "NotPermitted",
            "no".into(),
            Some(2),
            Some(&first),
            at(600),
        );
        assert_eq!(
            failed.last_transition_time.as_deref(),
            Some("1970-01-01T00:10:00Z")
        );
    }

    #[test]
    fn revoked_status_forgets_credentials_facts() {
        let previous = S3GrantStatus {
            access_key_id: Some("AKID".into()),
            iam_user: Some("u".into()),
            handled_rotation_request: Some("t".into()),
            ..Default::default()
        };
        let revoked = failed_status(
            Some(&previous),
            "NotPermitted",
            "m".into(),
            Some(3),
            Vec::new(),
            true,
            at(0),
        );
        assert_eq!(revoked.access_key_id, None);
        assert_eq!(revoked.iam_user, None);
        assert_eq!(revoked.handled_rotation_request.as_deref(), Some("t"));
        let kept = failed_status(
            Some(&previous),
            "AwsError",
            "m".into(),
            Some(3),
            Vec::new(),
            false,
            at(0),
        );
        assert_eq!(kept.access_key_id.as_deref(), Some("AKID"));
    }
}
