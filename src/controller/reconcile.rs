//! The reconcile driver: the finalizer, then for a live grant [`issue`], or, when that
//! fails for a reason the grant's author or the platform team must fix, a refusal that
//! revokes what the grant may no longer hold. The status is written once, from one
//! value; failures back off exponentially per grant.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::ResourceExt;

use super::issue::{issue, requeue_at};
use super::release::revoke;
use super::write::{latest, publish, write_status};
use super::Context;
use crate::api::{S3Grant, S3GrantStatus, FINALIZER};
use crate::error::{Error, Result};
use crate::ledger::held_of;
use crate::status::READY as READY_CONDITION;
use crate::status::{failed_status, ready_status};

pub async fn reconcile(grant: Arc<S3Grant>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let _in_flight = ctx.health.reconcile_started();
    ctx.acting()?;
    let grant = match latest(&ctx, &grant).await? {
        Some(fresh) => Arc::new(fresh),
        None => grant,
    };
    let api = ctx.grants_in(&grant.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, grant, |event| async {
        match event {
            FinalizerEvent::Apply(grant) => apply(&grant, &ctx).await,
            FinalizerEvent::Cleanup(grant) => cleanup(&grant, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        kube::runtime::finalizer::Error::AddFinalizer(e)
        | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Error::Kube {
            action: "update finalizers",
            source: e,
        },
        other => Error::InvalidSpec(other.to_string()),
    });
    ctx.metrics
        .reconciled(started.elapsed(), result.as_ref().err());
    result
}

pub fn error_policy(grant: Arc<S3Grant>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Error::BackendBusy(_) = error {
        // Not a failure: the grant waits for its backend's share of the slots.
        return Action::requeue(Duration::from_millis(rand::random_range(500..2000)));
    }
    let delay = ctx.back_off(&grant.uid().unwrap_or_default(), error);
    tracing::warn!(grant = %grant.name_any(), namespace = grant.namespace().as_deref().unwrap_or(""), category = error.category(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Whether a refusal takes away what the grant holds: it is no longer permitted, its
/// class (named, or the default being deleted) is gone, or its Secret's name is taken.
/// A missing or ambiguous default is a platform mistake in progress: nothing is revoked.
fn revokes(error: &Error) -> bool {
    matches!(
        error,
        Error::NotPermitted { .. } | Error::ClassNotFound(_) | Error::SecretConflict { .. }
    )
}

fn is_ready(status: Option<&S3GrantStatus>) -> bool {
    status.is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == READY_CONDITION && c.status == "True")
    })
}

async fn apply(grant: &S3Grant, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let uid = grant.uid().unwrap_or_default();
    let mut status = grant.status.clone();
    let outcome = issue(ctx, grant, &mut status, now).await;
    let previous = status.as_ref();
    match outcome {
        Ok(outcome) => {
            let new_status = ready_status(
                &outcome.plan,
                &outcome.issued,
                outcome.held,
                grant.metadata.generation,
                previous,
                now,
            );
            write_status(ctx, grant, previous, &new_status).await?;
            let plan = &outcome.plan;
            if let Some(reason) = outcome.changed {
                tracing::info!(grant = %plan.name, namespace = %plan.namespace, reason, access_key_id = %outcome.issued.access_key_id, "credentials written");
                if reason != "Refreshed" {
                    let note = format!(
                        "{} credentials for {} ({}) written to Secret {} (access key {})",
                        plan.credential_kind(),
                        plan.scope(),
                        plan.mode,
                        plan.secret_name,
                        outcome.issued.access_key_id
                    );
                    publish(ctx, grant, EventType::Normal, reason, note).await;
                }
            }
            ctx.metrics
                .set_expiry(&plan.namespace, &plan.name, outcome.issued.expires_at);
            let wait = requeue_at(outcome.next_due, now, ctx.config.resync_period);
            match &outcome.release_error {
                Some(err) => Ok(Action::requeue(wait.min(ctx.back_off(&uid, err)))),
                None => {
                    ctx.succeeded(&uid);
                    Ok(Action::requeue(wait))
                }
            }
        }
        Err(error) if error.is_user_error() => {
            let held = held_of(previous, &ctx.classes.state());
            let mut message = error.to_string();
            let (held, revoked) = if revokes(&error) {
                let (remaining, blocked) = revoke(ctx, grant, &held).await;
                if let Some(blocked) = &blocked {
                    message.push_str(&format!("; not everything could be revoked yet: {blocked}"));
                }
                let revoked = remaining.is_empty() && blocked.is_none();
                (remaining, revoked)
            } else {
                (held, false)
            };
            let new_status = failed_status(
                previous,
                error.category(),
                message.clone(),
                grant.metadata.generation,
                held.clone(),
                revoked,
                now,
            );
            if Some(&new_status) != previous {
                publish(ctx, grant, EventType::Warning, error.category(), message).await;
            }
            write_status(ctx, grant, previous, &new_status).await?;
            if revoked {
                ctx.metrics
                    .forget(&grant.namespace().unwrap_or_default(), &grant.name_any());
            }
            tracing::info!(grant = %grant.name_any(), category = error.category(), error = %error, "grant not ready");
            // What could not be revoked is retried soon; the rest waits for a change.
            let retry = if held.is_empty() {
                &error
            } else {
                &Error::RevokeBlocked(String::new())
            };
            Ok(Action::requeue(ctx.back_off(&uid, retry)))
        }
        Err(error) => {
            // A transient failure: credentials that work stay Ready; a grant that never
            // got any says why it is still waiting.
            if !is_ready(previous) {
                let new_status = failed_status(
                    previous,
                    error.category(),
                    format!("{error}; retrying"),
                    grant.metadata.generation,
                    held_of(previous, &ctx.classes.state()),
                    false,
                    now,
                );
                if let Err(write_error) = write_status(ctx, grant, previous, &new_status).await {
                    tracing::debug!(error = %write_error, "could not report the failure in the status");
                }
            }
            Err(error)
        }
    }
}

/// The grant is being deleted: revoke everything, then let the finalizer go. What cannot
/// be removed yet (a backend down) keeps the finalizer and is retried with backoff.
async fn cleanup(grant: &S3Grant, ctx: &Context) -> Result<Action> {
    let previous = grant.status.as_ref();
    let held = held_of(previous, &ctx.classes.state());
    let (remaining, error) = revoke(ctx, grant, &held).await;
    if let Some(error) = error {
        if remaining != held {
            let mut status = previous.cloned().unwrap_or_default();
            status.held = remaining;
            write_status(ctx, grant, previous, &status).await?;
        }
        return Err(error);
    }
    ctx.metrics
        .forget(&grant.namespace().unwrap_or_default(), &grant.name_any());
    ctx.forget(&grant.uid().unwrap_or_default());
    tracing::info!(grant = %grant.name_any(), namespace = grant.namespace().as_deref().unwrap_or(""), "grant deleted; AWS side cleaned up");
    Ok(Action::await_change())
}
