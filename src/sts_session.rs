//! STS grants: AssumeRole with the grant's policy as session policy, re-minted at about
//! two thirds of the lifetime so no pod reads an expired credential.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::aws::{aws_error, timestamp, Credentials};
use crate::error::{Error, Result};
use crate::policy::PolicyDocument;

/// AssumeRole called with role credentials (role chaining) is capped at one hour.
pub const ROLE_CHAINING_LIMIT: Duration = Duration::from_secs(3600);

/// The session duration to ask for, and why it differs from the grant's when it does.
pub fn effective_duration(requested: Duration, role_chaining: bool) -> (Duration, Option<String>) {
    if role_chaining && requested > ROLE_CHAINING_LIMIT {
        let note = format!(
            "duration clamped from {} to 1h: the operator runs on role credentials, and AWS caps chained role sessions at one hour",
            crate::validate::format_duration(requested)
        );
        (ROLE_CHAINING_LIMIT, Some(note))
    } else {
        (requested, None)
    }
}

/// The default point of a session's lifetime at which it is re-minted.
pub const DEFAULT_REFRESH_FRACTION: f64 = 2.0 / 3.0;

/// When to re-mint credentials that expire at `expires_at` and were issued for `lifetime`:
/// once `fraction` of the lifetime has passed, less a per-grant jitter of up to a tenth
/// of that wait (from `jitter_seed`, so the decision is stable across reconciles and many
/// grants issued together do not all call STS in the same second).
pub fn refresh_at(
    expires_at: Timestamp,
    lifetime: Duration,
    fraction: f64,
    jitter_seed: u64,
) -> Timestamp {
    let fraction = fraction.clamp(0.01, 0.95);
    let lifetime_secs = lifetime.as_secs_f64();
    let wait = lifetime_secs * fraction;
    let jitter_span = ((wait / 10.0) as u64).max(1);
    let jitter = (jitter_seed % jitter_span) as f64;
    let before_expiry = lifetime_secs - wait + jitter;
    expires_at
        .checked_sub(SignedDuration::from_secs_f64(before_expiry))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Calls AssumeRole and returns the session credentials.
pub async fn assume_role(
    sts: &aws_sdk_sts::Client,
    role_arn: &str,
    session_name: &str,
    policy: &PolicyDocument,
    duration: Duration,
) -> Result<Credentials> {
    let out = sts
        .assume_role()
        .role_arn(role_arn)
        .role_session_name(session_name)
        .policy(policy.to_compact_json())
        .duration_seconds(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX))
        .send()
        .await
        .map_err(aws_error("sts:AssumeRole"))?;
    let credentials = out.credentials.ok_or_else(|| Error::Aws {
        operation: "sts:AssumeRole",
        code: None,
        message: "the response held no credentials".into(),
        transient: true,
    })?;
    Ok(Credentials {
        expiration: Some(timestamp(credentials.expiration())),
        access_key_id: credentials.access_key_id,
        secret_access_key: credentials.secret_access_key,
        session_token: Some(credentials.session_token),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_at_about_two_thirds_of_the_lifetime() {
        let expires = Timestamp::from_second(3600).unwrap();
        let hour = Duration::from_secs(3600);
        let latest = refresh_at(expires, hour, DEFAULT_REFRESH_FRACTION, 0);
        assert_eq!(latest.as_second(), 2400, "no jitter: exactly two thirds");
        for seed in [1, 77, 239, 12345, u64::MAX] {
            let at = refresh_at(expires, hour, DEFAULT_REFRESH_FRACTION, seed).as_second();
            assert!((2160..=2400).contains(&at), "seed {seed}: {at}");
        }
    }

    #[test]
    fn refresh_of_the_shortest_session_leaves_minutes_of_validity() {
        let expires = Timestamp::from_second(900).unwrap();
        let at = refresh_at(
            expires,
            Duration::from_secs(900),
            DEFAULT_REFRESH_FRACTION,
            89,
        );
        assert!(
            900 - at.as_second() >= 300,
            "at least a third of 15m is left"
        );
    }

    #[test]
    fn refresh_never_comes_before_the_credentials_were_issued() {
        let expires = Timestamp::from_second(900).unwrap();
        for fraction in [0.0, 0.01, 0.05, 0.5, 0.9, 1.0, 7.0] {
            for seed in [0, 3, 44, 999_999] {
                let at = refresh_at(expires, Duration::from_secs(900), fraction, seed).as_second();
                assert!((0..900).contains(&at), "{fraction} {seed}: {at}");
            }
        }
    }

    #[test]
    fn role_chaining_clamps_to_one_hour_and_says_so() {
        let (d, note) = effective_duration(Duration::from_secs(4 * 3600), true);
        assert_eq!(d, ROLE_CHAINING_LIMIT);
        assert!(note.unwrap().contains("clamped from 4h to 1h"));
        assert_eq!(
            effective_duration(Duration::from_secs(4 * 3600), false),
            (Duration::from_secs(4 * 3600), None)
        );
        assert_eq!(
            effective_duration(Duration::from_secs(1800), true),
            (Duration::from_secs(1800), None)
        );
    }
}
