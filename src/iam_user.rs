//! IAM-user grants: the user, its inline policy and its access keys, kept idempotently.
//! Only users tagged with this grant's uid are ever changed or deleted.

use std::time::Duration;

use aws_sdk_iam::types::Tag;
use jiff::Timestamp;

use crate::aws::{aws_error, timestamp, AwsFailure, Credentials};
use crate::error::{Error, Result};
use crate::naming::INLINE_POLICY_NAME;
use crate::plan::{GrantPlan, TAG_UID};
use crate::policy::PolicyDocument;

/// IAM allows two access keys per user.
pub const MAX_KEYS_PER_USER: usize = 2;

/// One access key as IAM lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessKey {
    pub id: String,
    pub created: Timestamp,
}

/// What to do with a user's keys, decided without IO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyActions {
    /// Keys to delete, before any key is created.
    pub delete: Vec<String>,
    /// Whether to create a new key and write it to the Secret.
    pub create: bool,
    /// When a kept previous key must be deleted; the next reconcile is due then.
    pub retire_previous_at: Option<Timestamp>,
    /// A rotation that must wait for the previous key's grace to end (I4), until then.
    pub rotation_waits_until: Option<Timestamp>,
}

/// What the key decision knows about the Secret.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecretKeys<'a> {
    /// The intact key in the Secret.
    pub current: Option<&'a str>,
    /// When the Secret got that key (its `issued-at` record).
    pub in_secret_since: Option<Timestamp>,
    /// The key the status last reported, when the Secret lost or garbled its own.
    pub last_known: Option<&'a str>,
}

/// Decides which keys to delete and whether to create one, keeping the rules:
/// - the key in the Secret (`current`) is kept unless a rotation replaces it;
/// - a key older than the current one is the previous key of a rotation: it lives until
///   `grace` after it left the Secret (when the current key was written there), so pods
///   reading the old Secret keep working; a rotation asked for meanwhile waits for it;
/// - a key newer than the current one was created by a reconcile that crashed before
///   writing the Secret: nobody holds it, so it goes at once;
/// - without a usable current key, the key pods may still hold (the one the status last
///   reported) is kept and becomes the previous key of the new one; the rest go (a key
///   the status never reported never reached a Secret that stayed);
/// - never more than two keys: room is made before a key is created.
pub fn decide_key_actions(
    keys: &[AccessKey],
    secret: SecretKeys<'_>,
    rotate: bool,
    now: Timestamp,
    grace: Duration,
) -> KeyActions {
    let mut sorted: Vec<&AccessKey> = keys.iter().collect();
    sorted.sort_by_key(|k| (k.created, k.id.clone()));
    let current_key = secret
        .current
        .and_then(|id| sorted.iter().copied().find(|k| k.id == id));

    let mut actions = KeyActions::default();
    match current_key {
        Some(current_key) => {
            // The grace starts when the key left the Secret; the record of that moment is
            // trusted only within [created, created + grace] (tenants can edit annotations).
            let created = current_key.created;
            let left_secret = secret
                .in_secret_since
                .unwrap_or(created)
                .clamp(created, crate::validate::later(created, grace));
            let retire_at = crate::validate::later(left_secret, grace);
            let mut previous_kept = false;
            for key in sorted.iter().filter(|k| k.id != current_key.id) {
                // Same-second ties count as previous keys: kept through the grace, never cut short.
                let orphan = key.created > created;
                if orphan || now >= retire_at {
                    actions.delete.push(key.id.clone());
                } else {
                    previous_kept = true;
                    actions.retire_previous_at = Some(retire_at);
                }
            }
            if rotate {
                if previous_kept {
                    actions.rotation_waits_until = Some(retire_at);
                } else {
                    actions.create = true;
                }
            }
        }
        None => {
            actions.create = true;
            // Only the key the status last reported can be held by pods; a key it never
            // reported never reached a Secret that stayed (its write failed or crashed).
            let keep = secret
                .last_known
                .and_then(|id| sorted.iter().find(|k| k.id == id))
                .map(|k| k.id.clone());
            for key in &sorted {
                if Some(&key.id) != keep.as_ref() {
                    actions.delete.push(key.id.clone());
                }
            }
        }
    }
    actions
}

/// Whether a key created at `created` is due for its scheduled rotation.
pub fn rotation_due(created: Timestamp, rotate_every: Option<Duration>, now: Timestamp) -> bool {
    rotate_every.is_some_and(|period| now >= crate::validate::later(created, period))
}

/// The user a grant holds, as IAM knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnsuredUser {
    /// IAM's unique id of the user (UserId).
    pub id: String,
    /// Whether this call created it.
    pub created: bool,
}

/// Ensures the user exists with our tags, path and boundary.
pub async fn ensure_user(iam: &aws_sdk_iam::Client, plan: &GrantPlan) -> Result<EnsuredUser> {
    let crate::plan::CredentialPlan::IamUser {
        user_name,
        path,
        permissions_boundary,
        tags,
        ..
    } = &plan.credential
    else {
        return Err(Error::InvalidSpec("not an IAM-user grant".into()));
    };
    let uid = tag_value(tags, TAG_UID);
    match get_user(iam, user_name).await? {
        Some(user) => {
            let ours = user
                .tags()
                .iter()
                .any(|t| t.key() == TAG_UID && Some(t.value()) == uid);
            if !ours {
                return Err(Error::ForeignIamUser {
                    user: user_name.clone(),
                });
            }
            let missing: Vec<Tag> = tags
                .iter()
                .filter(|(key, value)| {
                    !user
                        .tags()
                        .iter()
                        .any(|t| t.key() == key && t.value() == value)
                })
                .map(|(key, value)| tag(key, value))
                .collect();
            if !missing.is_empty() {
                iam.tag_user()
                    .user_name(user_name)
                    .set_tags(Some(missing))
                    .send()
                    .await
                    .map_err(on_user("iam:TagUser"))?;
            }
            let boundary_now = user
                .permissions_boundary()
                .and_then(|b| b.permissions_boundary_arn());
            if let Some(wanted) = permissions_boundary {
                if boundary_now != Some(wanted.as_str()) {
                    iam.put_user_permissions_boundary()
                        .user_name(user_name)
                        .permissions_boundary(wanted)
                        .send()
                        .await
                        .map_err(on_user("iam:PutUserPermissionsBoundary"))?;
                }
            }
            Ok(EnsuredUser {
                id: user.user_id,
                created: false,
            })
        }
        None => {
            let mut request = iam.create_user().user_name(user_name).path(path);
            for (key, value) in tags {
                request = request.tags(tag(key, value));
            }
            if let Some(boundary) = permissions_boundary {
                request = request.permissions_boundary(boundary);
            }
            match request.send().await {
                Ok(out) => Ok(EnsuredUser {
                    id: out.user.map(|u| u.user_id).unwrap_or_default(),
                    created: true,
                }),
                Err(err) => {
                    let failure = AwsFailure::from_sdk(err);
                    if failure.is_code("EntityAlreadyExists") {
                        // Created concurrently, or not yet visible to GetUser (IAM is
                        // eventually consistent); the next reconcile checks its tags.
                        return Err(Error::Aws {
                            operation: "iam:CreateUser",
                            code: failure.code,
                            message: failure.message,
                            transient: true,
                        });
                    }
                    Err(failure.into_error("iam:CreateUser"))
                }
            }
        }
    }
}

/// Converts an error of a call on a user that was just found or created. IAM is
/// eventually consistent: such a user may not be visible to the next call yet, so its
/// NoSuchEntity is transient (retried soon), not a failure to report.
fn on_user<E>(
    operation: &'static str,
) -> impl FnOnce(
    aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> Error
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
{
    move |err| {
        let mut failure = AwsFailure::from_sdk(err);
        if failure.is_code("NoSuchEntity") {
            failure.transient = true;
        }
        failure.into_error(operation)
    }
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder()
        .key(key)
        .value(value)
        .build()
        .expect("tag key and value are set")
}

fn tag_value<'a>(tags: &'a [(String, String)], key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn get_user(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
) -> Result<Option<aws_sdk_iam::types::User>> {
    match iam.get_user().user_name(user_name).send().await {
        Ok(out) => Ok(out.user),
        Err(err) => {
            let failure = AwsFailure::from_sdk(err);
            if failure.is_code("NoSuchEntity") {
                Ok(None)
            } else {
                Err(failure.into_error("iam:GetUser"))
            }
        }
    }
}

/// Makes the user's policies exactly ours: our inline policy with our document, no other
/// inline policy and no attached managed policy. Returns true when something was changed.
pub async fn ensure_policy(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
    policy: &PolicyDocument,
    known_new: bool,
) -> Result<bool> {
    if !known_new {
        let (kept, removed) = strip_policies(iam, user_name, Some(INLINE_POLICY_NAME)).await?;
        if kept && current_policy(iam, user_name).await?.as_ref() == Some(policy) {
            return Ok(removed);
        }
    }
    iam.put_user_policy()
        .user_name(user_name)
        .policy_name(INLINE_POLICY_NAME)
        .policy_document(policy.to_compact_json())
        .send()
        .await
        .map_err(on_user("iam:PutUserPolicy"))?;
    Ok(true)
}

/// Deletes every inline policy but `keep` and detaches every managed policy. Returns
/// whether `keep` is there, and whether anything was removed.
async fn strip_policies(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
    keep: Option<&str>,
) -> Result<(bool, bool)> {
    let names = iam
        .list_user_policies()
        .user_name(user_name)
        .send()
        .await
        .map_err(on_user("iam:ListUserPolicies"))?
        .policy_names;
    let mut removed = false;
    for name in names.iter().filter(|n| Some(n.as_str()) != keep) {
        let result = iam
            .delete_user_policy()
            .user_name(user_name)
            .policy_name(name)
            .send()
            .await;
        removed |= unless_gone(result, "iam:DeleteUserPolicy")?;
    }
    let attached = iam
        .list_attached_user_policies()
        .user_name(user_name)
        .send()
        .await
        .map_err(on_user("iam:ListAttachedUserPolicies"))?;
    for arn in attached
        .attached_policies()
        .iter()
        .filter_map(|p| p.policy_arn())
    {
        let result = iam
            .detach_user_policy()
            .user_name(user_name)
            .policy_arn(arn)
            .send()
            .await;
        removed |= unless_gone(result, "iam:DetachUserPolicy")?;
    }
    let kept = names.iter().any(|n| Some(n.as_str()) == keep);
    Ok((kept, removed))
}

async fn current_policy(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
) -> Result<Option<PolicyDocument>> {
    let out = iam
        .get_user_policy()
        .user_name(user_name)
        .policy_name(INLINE_POLICY_NAME)
        .send()
        .await
        .map_err(on_user("iam:GetUserPolicy"))?;
    // IAM returns the document URL-encoded; one that does not parse counts as drifted.
    let document = percent_decode(out.policy_document());
    Ok(serde_json::from_str(&document).ok())
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

pub async fn list_keys(iam: &aws_sdk_iam::Client, user_name: &str) -> Result<Vec<AccessKey>> {
    let out = iam
        .list_access_keys()
        .user_name(user_name)
        .send()
        .await
        .map_err(on_user("iam:ListAccessKeys"))?;
    Ok(out
        .access_key_metadata()
        .iter()
        .filter_map(|k| {
            Some(AccessKey {
                id: k.access_key_id()?.to_string(),
                created: k
                    .create_date()
                    .map(timestamp)
                    .unwrap_or(Timestamp::UNIX_EPOCH),
            })
        })
        .collect())
}

pub async fn create_key(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
) -> Result<(AccessKey, Credentials)> {
    let out = iam
        .create_access_key()
        .user_name(user_name)
        .send()
        .await
        .map_err(on_user("iam:CreateAccessKey"))?;
    let key = out.access_key.ok_or_else(|| Error::Aws {
        operation: "iam:CreateAccessKey",
        code: None,
        message: "the response held no access key".into(),
        transient: true,
    })?;
    let created = timestamp(
        key.create_date()
            .unwrap_or(&aws_smithy_types::DateTime::from_secs(
                Timestamp::now().as_second(),
            )),
    );
    Ok((
        AccessKey {
            id: key.access_key_id.clone(),
            created,
        },
        Credentials {
            access_key_id: key.access_key_id,
            secret_access_key: key.secret_access_key,
            session_token: None,
            expiration: None,
        },
    ))
}

pub async fn delete_key(iam: &aws_sdk_iam::Client, user_name: &str, key_id: &str) -> Result<()> {
    let result = iam
        .delete_access_key()
        .user_name(user_name)
        .access_key_id(key_id)
        .send()
        .await;
    unless_gone(result, "iam:DeleteAccessKey").map(drop)
}

/// IAM's NoSuchEntity means "already done": `Ok(true)` when the call acted, `Ok(false)`
/// when the entity was already gone, the error otherwise.
fn unless_gone<T, E>(
    result: std::result::Result<
        T,
        aws_smithy_runtime_api::client::result::SdkError<E, aws_smithy_runtime_api::http::Response>,
    >,
    operation: &'static str,
) -> Result<bool>
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata
        + std::error::Error
        + Send
        + Sync
        + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(err) => {
            let failure = AwsFailure::from_sdk(err);
            if failure.is_code("NoSuchEntity") {
                Ok(false)
            } else {
                Err(failure.into_error(operation))
            }
        }
    }
}

/// One IAM user as ListUsers shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedUser {
    pub name: String,
    pub created: Timestamp,
}

/// The users under `path`, every page.
pub async fn list_users(iam: &aws_sdk_iam::Client, path: &str) -> Result<Vec<ListedUser>> {
    let mut users = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_users()
            .path_prefix(path)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(aws_error("iam:ListUsers"))?;
        users.extend(out.users().iter().map(|u| ListedUser {
            name: u.user_name().to_string(),
            created: timestamp(u.create_date()),
        }));
        match out.marker {
            Some(next) if out.is_truncated => marker = Some(next),
            _ => return Ok(users),
        }
    }
}

/// A user's tags (ListUsers does not return them); `None` when the user is gone.
pub async fn user_tags(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
) -> Result<Option<Vec<(String, String)>>> {
    match iam.list_user_tags().user_name(user_name).send().await {
        Ok(out) => Ok(Some(
            out.tags()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect(),
        )),
        Err(err) => {
            let failure = AwsFailure::from_sdk(err);
            if failure.is_code("NoSuchEntity") {
                Ok(None)
            } else {
                Err(failure.into_error("iam:ListUserTags"))
            }
        }
    }
}

/// What deleting a held user found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// The user, its keys and policies are gone now.
    Deleted,
    /// There was no such user (already gone, or never created).
    Gone,
    /// The user is the one the grant uses now (same IAM UserId): left alone.
    InUse,
    /// The user does not carry this grant's uid tag: left alone.
    NotOurs,
}

/// Deletes the user and everything on it. Not-found is success; a user that does not
/// carry this grant's uid tag is left alone, and so is the user whose IAM id is `in_use`
/// (the same user reached through another class or endpoint of the same account).
pub async fn delete_user(
    iam: &aws_sdk_iam::Client,
    user_name: &str,
    uid: &str,
    in_use: Option<&str>,
) -> Result<Deleted> {
    let Some(user) = get_user(iam, user_name).await? else {
        return Ok(Deleted::Gone);
    };
    if in_use == Some(user.user_id()) {
        return Ok(Deleted::InUse);
    }
    if !user
        .tags()
        .iter()
        .any(|t| t.key() == TAG_UID && t.value() == uid)
    {
        tracing::warn!(
            user = user_name,
            "IAM user does not carry this grant's uid tag; left alone"
        );
        return Ok(Deleted::NotOurs);
    }
    for key in list_keys(iam, user_name).await? {
        delete_key(iam, user_name, &key.id).await?;
    }
    strip_policies(iam, user_name, None).await?;
    let deleted = unless_gone(
        iam.delete_user().user_name(user_name).send().await,
        "iam:DeleteUser",
    )?;
    Ok(if deleted {
        Deleted::Deleted
    } else {
        Deleted::Gone
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const CREATE_ONLY: KeyActions = KeyActions {
        delete: Vec::new(),
        create: true,
        retire_previous_at: None,
        rotation_waits_until: None,
    };

    fn key(id: &str, created_hours: i64) -> AccessKey {
        AccessKey {
            id: id.into(),
            created: Timestamp::from_second(created_hours * 3600).unwrap(),
        }
    }

    fn at(hours: i64) -> Timestamp {
        Timestamp::from_second(hours * 3600).unwrap()
    }

    fn holding(id: &str) -> SecretKeys<'_> {
        SecretKeys {
            current: Some(id),
            ..SecretKeys::default()
        }
    }

    const LOST: SecretKeys<'static> = SecretKeys {
        current: None,
        in_secret_since: None,
        last_known: None,
    };

    #[test]
    fn scheduled_rotation_is_due_once_the_period_has_passed() {
        assert!(!rotation_due(at(0), Some(HOUR), at(0)));
        assert!(rotation_due(at(0), Some(HOUR), at(1)));
        assert!(
            !rotation_due(at(0), None, at(10_000)),
            "no schedule: only on request"
        );
        assert!(!rotation_due(at(0), Some(Duration::MAX), at(10_000)));
    }

    #[test]
    fn first_reconcile_creates_one_key() {
        let actions = decide_key_actions(&[], LOST, false, at(0), HOUR);
        assert_eq!(actions, CREATE_ONLY);
    }

    #[test]
    fn steady_state_does_nothing() {
        let actions = decide_key_actions(&[key("A", 0)], holding("A"), false, at(100), HOUR);
        assert_eq!(actions, KeyActions::default());
    }

    #[test]
    fn rotation_keeps_the_old_key_through_the_grace() {
        let keys = [key("A", 0), key("B", 10)];
        let during = decide_key_actions(&keys, holding("B"), false, at(10), HOUR);
        assert_eq!(during.delete, Vec::<String>::new());
        assert_eq!(during.retire_previous_at, Some(at(11)));
        let after = decide_key_actions(&keys, holding("B"), false, at(11), HOUR);
        assert_eq!(after.delete, ["A"]);
        assert!(!after.create);
    }

    #[test]
    fn the_grace_runs_from_when_the_key_left_the_secret() {
        let keys = [key("A", 0), key("B", 10)];
        let written_late = SecretKeys {
            current: Some("B"),
            in_secret_since: Some(Timestamp::from_second(10 * 3600 + 1800).unwrap()),
            last_known: None,
        };
        let at_11 = decide_key_actions(&keys, written_late, false, at(11), HOUR);
        assert!(at_11.delete.is_empty(), "half an hour of grace left");
        assert_eq!(
            at_11.retire_previous_at,
            Some(Timestamp::from_second(11 * 3600 + 1800).unwrap())
        );
        // A record far in the future (an edited annotation) is capped at one more grace.
        let forged = SecretKeys {
            in_secret_since: Some(at(1000)),
            ..written_late
        };
        let capped = decide_key_actions(&keys, forged, false, at(12), HOUR);
        assert_eq!(capped.delete, ["A"]);
    }

    #[test]
    fn rotation_with_one_key_creates_a_second() {
        let actions = decide_key_actions(&[key("A", 0)], holding("A"), true, at(5), HOUR);
        assert_eq!(actions, CREATE_ONLY);
    }

    #[test]
    fn rotation_during_a_grace_waits_for_it_and_never_makes_a_third_key() {
        let keys = [key("A", 0), key("B", 10)];
        let actions = decide_key_actions(&keys, holding("B"), true, at(10), HOUR);
        assert!(actions.delete.is_empty(), "A keeps its grace");
        assert!(!actions.create);
        assert_eq!(actions.rotation_waits_until, Some(at(11)));
        let later = decide_key_actions(&keys, holding("B"), true, at(11), HOUR);
        assert_eq!(later.delete, ["A"]);
        assert!(later.create);
    }

    #[test]
    fn key_left_by_a_crash_before_the_secret_write_is_deleted_at_once() {
        let keys = [key("A", 0), key("B", 10)];
        let actions = decide_key_actions(&keys, holding("A"), false, at(10), HOUR);
        assert_eq!(actions.delete, ["B"]);
        assert!(!actions.create);
        let rotating = decide_key_actions(&keys, holding("A"), true, at(10), HOUR);
        assert_eq!(rotating.delete, ["B"]);
        assert!(rotating.create, "the crashed rotation is done again, once");
    }

    #[test]
    fn key_created_in_the_same_second_as_the_current_one_is_kept_through_the_grace() {
        let keys = [key("A", 10), key("B", 10)];
        let actions = decide_key_actions(&keys, holding("B"), false, at(10), HOUR);
        assert!(actions.delete.is_empty());
        assert_eq!(actions.retire_previous_at, Some(at(11)));
    }

    #[test]
    fn lost_secret_gets_a_new_key_and_the_key_pods_may_hold_stays() {
        let one = decide_key_actions(&[key("A", 0)], LOST, false, at(5), HOUR);
        assert_eq!(one.delete, ["A"], "a key whose Secret write failed");
        assert!(one.create);
        let two = decide_key_actions(&[key("A", 0), key("B", 3)], LOST, false, at(5), HOUR);
        assert_eq!(
            two.delete,
            ["A", "B"],
            "no key was ever reported: nobody holds one"
        );
        assert!(two.create);
        let known = SecretKeys {
            last_known: Some("A"),
            ..LOST
        };
        let by_status = decide_key_actions(&[key("A", 0), key("B", 3)], known, false, at(5), HOUR);
        assert_eq!(
            by_status.delete,
            ["B"],
            "the status says A was in the Secret"
        );
    }

    #[test]
    fn secret_naming_a_key_iam_no_longer_has_counts_as_lost() {
        let actions = decide_key_actions(&[key("A", 0)], holding("GONE"), false, at(5), HOUR);
        assert!(actions.create);
        assert_eq!(actions.delete, ["A"], "never reported, so never handed out");
        let reported = SecretKeys {
            last_known: Some("A"),
            ..holding("GONE")
        };
        let kept = decide_key_actions(&[key("A", 0)], reported, false, at(5), HOUR);
        assert!(
            kept.create && kept.delete.is_empty(),
            "pods may still hold A"
        );
    }

    #[test]
    fn at_most_two_keys_after_any_decision() {
        let keysets: [&[AccessKey]; 4] = [
            &[],
            &[key("A", 0)],
            &[key("A", 0), key("B", 1)],
            &[key("A", 2), key("B", 1)],
        ];
        for keys in keysets {
            for current in [None, Some("A"), Some("B"), Some("X")] {
                for last_known in [None, Some("A"), Some("B")] {
                    for rotate in [false, true] {
                        for now in [0, 1, 2, 5, 100] {
                            let secret = SecretKeys {
                                current,
                                in_secret_since: None,
                                last_known,
                            };
                            let actions = decide_key_actions(keys, secret, rotate, at(now), HOUR);
                            let after =
                                keys.len() - actions.delete.len() + usize::from(actions.create);
                            assert!(
                                after <= MAX_KEYS_PER_USER,
                                "{keys:?} {current:?} {rotate} {now}: {actions:?}"
                            );
                            assert!(
                                after >= 1,
                                "a grant always ends with a key: {keys:?} {current:?} {actions:?}"
                            );
                            let current_deleted =
                                current.is_some_and(|c| actions.delete.iter().any(|d| d == c));
                            assert!(!current_deleted, "the key in the Secret is never deleted");
                        }
                    }
                }
            }
        }
    }

    /// moto neither stores nor returns permissions boundaries, so the request itself is
    /// checked here: CreateUser must carry the class's boundary, path and our tags.
    #[tokio::test]
    async fn created_users_carry_the_class_boundary_path_and_tags() {
        use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
        use aws_smithy_types::body::SdkBody;

        let response = |status: u16, body: &str| {
            http::Response::builder()
                .status(status)
                .body(SdkBody::from(body.to_string()))
                .unwrap()
        };
        let request = || {
            http::Request::builder()
                .uri("https://iam.amazonaws.com/")
                .body(SdkBody::empty())
                .unwrap()
        };
        let replay = StaticReplayClient::new(vec![
            ReplayEvent::new(
                request(),
                response(404, "<ErrorResponse><Error><Type>Sender</Type><Code>NoSuchEntity</Code><Message>no such user</Message></Error></ErrorResponse>"),
            ),
            ReplayEvent::new(request(), response(200, "<CreateUserResponse><CreateUserResult><User><Path>/s3grant/</Path><UserName>u</UserName><UserId>X</UserId><Arn>arn:aws:iam::1:user/u</Arn><CreateDate>2026-01-01T00:00:00Z</CreateDate></User></CreateUserResult></CreateUserResponse>")),
        ]);
        let config = aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::for_tests())
            .http_client(replay.clone())
            .build();
        let iam = aws_sdk_iam::Client::from_conf(config);
        let plan = crate::plan::GrantPlan {
            namespace: "ns".into(),
            name: "g".into(),
            uid: "uid-1".into(),
            class_name: "c".into(),
            backend: crate::api::BackendRecord::default(),
            mode: crate::api::Mode::ReadOnly,
            credential: crate::plan::CredentialPlan::IamUser {
                user_name: "s3g-ns-g-abc".into(),
                path: "/s3grant/".into(),
                permissions_boundary: Some("arn:aws:iam::1:policy/boundary".into()),
                rotate_every: None,
                tags: vec![(TAG_UID.into(), "uid-1".into())],
            },
            bucket: crate::validate::BucketName::parse("acme-data").unwrap(),
            prefixes: vec![],
            policy: crate::policy::build_policy(
                &crate::validate::BucketName::parse("acme-data").unwrap(),
                &[],
                crate::api::Mode::ReadOnly,
            ),
            policy_size: 0,
            secret_name: "s".into(),
            region: "us-east-1".into(),
            endpoint: None,
        };
        let user = ensure_user(&iam, &plan).await.unwrap();
        assert!(user.created);
        assert_eq!(user.id, "X");
        let requests: Vec<String> = replay
            .actual_requests()
            .map(|r| String::from_utf8(r.body().bytes().unwrap().to_vec()).unwrap())
            .collect();
        assert!(requests[0].contains("Action=GetUser"), "{}", requests[0]);
        let create = &requests[1];
        assert!(create.contains("Action=CreateUser"), "{create}");
        assert!(
            create.contains("PermissionsBoundary=arn%3Aaws%3Aiam%3A%3A1%3Apolicy%2Fboundary"),
            "{create}"
        );
        assert!(create.contains("Path=%2Fs3grant%2F"), "{create}");
        assert!(
            create.contains("Tags.member.1.Key=s3grant.io%2Fuid")
                && create.contains("Tags.member.1.Value=uid-1"),
            "{create}"
        );
    }

    #[test]
    fn iam_policy_documents_are_url_decoded() {
        assert_eq!(percent_decode("%7B%22a%22%3A1%7D"), "{\"a\":1}");
        assert_eq!(percent_decode("{\"a\":1}"), "{\"a\":1}");
    }
}
