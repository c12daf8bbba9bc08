//! Deterministic names for what s3grant creates in AWS. The uid makes a name unique
//! per grant, so deleting and recreating a grant of the same name never inherits the
//! old user, and no tenant can choose a name that collides with another's.

use sha2::{Digest, Sha256};

/// IAM user names and STS role session names share this limit.
pub const MAX_AWS_NAME: usize = 64;
const NAME_PREFIX: &str = "s3g";
const UID_HASH_HEX: usize = 12;

/// The name of the IAM inline policy s3grant puts on each user.
pub const INLINE_POLICY_NAME: &str = "s3grant";

/// The IAM user name for a grant: `s3g-<namespace>-<name>-<hash of uid>`, cut to 64 characters.
pub fn iam_user_name(namespace: &str, name: &str, uid: &str) -> String {
    aws_name(namespace, name, uid)
}

/// The STS role session name for a grant (shows up in CloudTrail as the caller).
pub fn role_session_name(namespace: &str, name: &str, uid: &str) -> String {
    aws_name(namespace, name, uid)
}

fn aws_name(namespace: &str, name: &str, uid: &str) -> String {
    let hash = Sha256::digest(uid.as_bytes());
    let suffix: String = hash
        .iter()
        .flat_map(|b| [b >> 4, b & 0xf])
        .take(UID_HASH_HEX)
        .map(|nibble| char::from_digit(nibble.into(), 16).expect("a nibble is a hex digit"))
        .collect();
    let readable_budget = MAX_AWS_NAME - NAME_PREFIX.len() - UID_HASH_HEX - 2;
    let readable: String = format!("{namespace}-{name}")
        .chars()
        .map(|c| if is_aws_name_char(c) { c } else { '-' })
        .take(readable_budget)
        .collect();
    format!("{NAME_PREFIX}-{readable}-{suffix}")
}

/// A short digest of arbitrary text (128 bits as hex): fingerprints and ids that never
/// reveal what they were computed from.
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// IAM's character set for user names and role session names: `[\w+=,.@-]`.
pub fn is_aws_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_readable_and_deterministic() {
        let a = iam_user_name("tenant-a", "reports", "0b6f7c1e-uid");
        assert!(a.starts_with("s3g-tenant-a-reports-"), "{a}");
        assert_eq!(a, iam_user_name("tenant-a", "reports", "0b6f7c1e-uid"));
    }

    #[test]
    fn a_recreated_grant_gets_a_new_name() {
        assert_ne!(
            iam_user_name("ns", "grant", "uid-1"),
            iam_user_name("ns", "grant", "uid-2")
        );
    }

    proptest! {
        #[test]
        fn names_fit_iam_limits(ns in "[a-z0-9-]{1,63}", name in "[a-z0-9.-]{1,253}", uid in ".{1,64}") {
            for generated in [iam_user_name(&ns, &name, &uid), role_session_name(&ns, &name, &uid)] {
                prop_assert!(generated.len() <= MAX_AWS_NAME);
                prop_assert!(generated.len() >= 2);
                prop_assert!(generated.chars().all(is_aws_name_char));
            }
        }
    }
}
