//! The grant's status, computed without IO and deterministically: the same facts give
//! the same status, so writing it does not cause another reconcile or another write.

use jiff::Timestamp;

use crate::api::{Condition, S3GrantStatus};
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

/// A status that reports a failure and keeps the facts that are still true.
pub fn failed_status(
    previous: Option<&S3GrantStatus>,
    reason: &str,
    message: String,
    generation: Option<i64>,
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
            false,
            at(0),
        );
        assert_eq!(kept.access_key_id.as_deref(), Some("AKID"));
    }
}
