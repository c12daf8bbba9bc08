//! Letting go: removing what a grant holds on the backend where the ledger recorded it
//! (a user left behind by a kind switch, a class move or a backend change), and revoking
//! a grant entirely (deleted, no longer permitted, its class deleted).

use std::time::Duration;

use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::write::{delete_secret, publish};
use super::Context;
use crate::api::{Held, HeldKind, S3Grant};
use crate::backend;
use crate::error::{Error, Result};
use crate::iam_user::{delete_user, Deleted};

/// How long a user recorded in the ledger may stay invisible to IAM reads before "not
/// found" is believed (AWS documents IAM changes as eventually consistent, usually within
/// seconds).
pub const IAM_VISIBILITY_WINDOW: Duration = Duration::from_secs(60);

/// A user never seen (no IAM id learnt) and recorded moments ago may exist unseen. One
/// seen before and not found now is gone.
fn recently_recorded(held: &Held) -> bool {
    held.id.is_none()
        && held
            .since
            .as_deref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .is_some_and(|since| {
                crate::validate::later(since, IAM_VISIBILITY_WINDOW) > jiff::Timestamp::now()
            })
}

/// Removes one held object. `in_use` is the IAM id of the user the grant uses now: the
/// same user reached through another class or endpoint of one account is never deleted.
pub async fn release(
    ctx: &Context,
    uid: &str,
    held: &Held,
    in_use: Option<&str>,
) -> Result<Deleted> {
    let HeldKind::IamUser = held.kind;
    let classes = ctx.classes.state();
    let Some(record) = backend::find(&classes, &held.class_name, &held.backend) else {
        return Err(Error::RevokeBlocked(format!(
            "IAM user {} lives on a backend of S3GrantClass {} that s3grant no longer knows (the class is gone, or its status was lost); restore the class or delete the user by hand",
            held.name, held.class_name
        )));
    };
    let _slot = ctx.enter_backend(&record, &held.class_name)?;
    let aws = ctx.aws_for(&record, &held.class_name).await?;
    let outcome = delete_user(&aws.iam, &held.name, uid, in_use).await;
    ctx.backends.record(&record.id, outcome.as_ref().err());
    let outcome = outcome?;
    if outcome == Deleted::Gone && recently_recorded(held) {
        // IAM is eventually consistent: a user created moments ago may not be visible to
        // reads yet. Forgetting it now could leave it behind; look again shortly.
        return Err(Error::Aws {
            operation: "iam:GetUser",
            code: Some("NoSuchEntity".into()),
            message: format!(
                "IAM user {} was recorded less than {} s ago and is not visible yet; IAM is eventually consistent, looking again",
                held.name,
                IAM_VISIBILITY_WINDOW.as_secs()
            ),
            transient: true,
        });
    }
    tracing::info!(user = %held.name, class = %held.class_name, backend = %held.backend, ?outcome, "released IAM user");
    Ok(outcome)
}

/// Releases every entry of `stale`; gives back those released and the first error.
pub async fn release_all(
    ctx: &Context,
    grant: &S3Grant,
    stale: &[Held],
    in_use: Option<&str>,
) -> (Vec<Held>, Option<Error>) {
    let uid = grant.uid().unwrap_or_default();
    let mut released = Vec::new();
    let mut first_error = None;
    for held in stale {
        match release(ctx, &uid, held, in_use).await {
            Ok(outcome) => {
                if outcome == Deleted::Deleted {
                    publish(
                        ctx,
                        grant,
                        EventType::Normal,
                        "Released",
                        format!(
                            "deleted IAM user {} and its access keys on the backend of class {}",
                            held.name, held.class_name
                        ),
                    )
                    .await;
                }
                released.push(held.clone());
            }
            Err(err) => {
                tracing::warn!(user = %held.name, class = %held.class_name, error = %err, "could not release IAM user yet");
                first_error.get_or_insert(err);
            }
        }
    }
    (released, first_error)
}

/// Removes everything the grant holds: its Secret, then every user in the ledger.
/// Gives back the ledger entries that could not be removed yet, and why.
pub async fn revoke(ctx: &Context, grant: &S3Grant, held: &[Held]) -> (Vec<Held>, Option<Error>) {
    let namespace = grant.namespace().unwrap_or_default();
    let uid = grant.uid().unwrap_or_default();
    let secret_name = grant
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| grant.secret_name());
    let mut removed = Vec::new();
    if let Err(err) = ctx.acting() {
        return (held.to_vec(), Some(err));
    }
    match delete_secret(&ctx.secrets(&namespace), &secret_name, &uid).await {
        Ok(true) => removed.push(format!("Secret {secret_name}")),
        Ok(false) => {}
        Err(err) => return (held.to_vec(), Some(err)),
    }
    let (released, error) = release_all(ctx, grant, held, None).await;
    if !removed.is_empty() {
        publish(
            ctx,
            grant,
            EventType::Normal,
            "Revoked",
            format!("removed {}", removed.join(" and ")),
        )
        .await;
    }
    let remaining = crate::ledger::settle(held, None, &released);
    (remaining, error)
}
