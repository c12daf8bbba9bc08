//! Every write to the Kubernetes API a grant's reconcile makes: its Secret (created with
//! POST, replaced with PUT: one field manager for the Secret's whole life, and exactly
//! the keys of the current credential), a dry run of that write before anything is
//! created in AWS, its status, its Events.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};

use super::{locked, Context};
use crate::api::{S3Grant, S3GrantStatus, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::secret::{inspect_secret, needs_write, replacing, ExistingSecret};

fn post_params(dry_run: bool) -> PostParams {
    PostParams {
        dry_run,
        field_manager: Some(FIELD_MANAGER.into()),
    }
}

/// A write the API server refused for a reason a retry will not fix soon (the name, a
/// quota, an admission webhook, a namespace being deleted).
fn refused(err: &kube::Error) -> Option<String> {
    match err {
        kube::Error::Api(status) if matches!(status.code, 400 | 403 | 404 | 413 | 422) => {
            Some(format!("{} ({})", status.message, status.reason))
        }
        _ => None,
    }
}

/// Writes `desired` over `existing` (or creates it), or with `dry_run` only asks the API
/// server whether it would. A missing Secret is created, so that a grant racing another
/// for the same name loses with a conflict instead of sharing it; an existing one is
/// replaced under its resourceVersion.
pub async fn put_secret(
    api: &Api<Secret>,
    existing: Option<&Secret>,
    desired: Secret,
    dry_run: bool,
) -> Result<()> {
    let name = desired.name_any();
    let namespace = desired.namespace().unwrap_or_default();
    let result = match existing {
        None => api.create(&post_params(dry_run), &desired).await.map(drop),
        Some(existing) => api
            .replace(&name, &post_params(dry_run), &replacing(existing, desired))
            .await
            .map(drop),
    };
    result.map_err(|err| match refused(&err) {
        Some(reason) => Error::SecretUnwritable {
            namespace,
            name,
            reason,
        },
        None => Error::Kube {
            action: if dry_run {
                "check the grant's Secret can be written"
            } else {
                "write the grant's Secret"
            },
            source: err,
        },
    })
}

/// Writes the Secret when it differs from what is stored.
pub async fn write_secret(
    api: &Api<Secret>,
    existing: Option<&Secret>,
    desired: Secret,
) -> Result<bool> {
    if !needs_write(existing, &desired) {
        return Ok(false);
    }
    put_secret(api, existing, desired, false).await?;
    Ok(true)
}

/// Deletes the grant's Secret if it is the grant's own. Returns whether it deleted one.
pub async fn delete_secret(api: &Api<Secret>, name: &str, uid: &str) -> Result<bool> {
    let existing = api
        .get_opt(name)
        .await
        .map_err(Error::kube("read the grant's Secret"))?;
    if !matches!(
        inspect_secret(existing.as_ref(), uid),
        ExistingSecret::Ours { .. }
    ) {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(Error::Kube {
            action: "delete the grant's Secret",
            source: err,
        }),
    }
}

/// Writes the grant's status when it changed, and remembers the resourceVersion written.
pub async fn write_status(
    ctx: &Context,
    grant: &S3Grant,
    previous: Option<&S3GrantStatus>,
    status: &S3GrantStatus,
) -> Result<()> {
    if previous == Some(status) {
        return Ok(());
    }
    ctx.acting()?;
    let patch = serde_json::json!({
        "apiVersion": S3Grant::api_version(&()),
        "kind": S3Grant::kind(&()),
        "status": status,
    });
    let written = ctx
        .grants_in(&grant.namespace().unwrap_or_default())
        .patch_status(
            &grant.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::kube("write the grant's status"))?;
    if let (Some(uid), Some(version)) = (grant.uid(), resource_version(&written)) {
        locked(&ctx.written).insert(uid, version);
    }
    Ok(())
}

pub fn resource_version(grant: &S3Grant) -> Option<u64> {
    grant.metadata.resource_version.as_deref()?.parse().ok()
}

/// The grant as the API server has it now, when the cache may not have caught up with a
/// status this operator wrote (the ledger in it must never be read stale).
pub async fn latest(ctx: &Context, grant: &S3Grant) -> Result<Option<S3Grant>> {
    let Some(uid) = grant.uid() else {
        return Ok(None);
    };
    let last_written = locked(&ctx.written).get(&uid).copied();
    let behind = match (last_written, resource_version(grant)) {
        (None, _) => false,
        (Some(written), Some(seen)) => seen < written,
        (Some(_), None) => true,
    };
    if !behind {
        return Ok(None);
    }
    ctx.grants_in(&grant.namespace().unwrap_or_default())
        .get_opt(&grant.name_any())
        .await
        .map_err(Error::kube("read the grant"))
}

pub async fn publish(ctx: &Context, grant: &S3Grant, type_: EventType, reason: &str, note: String) {
    if ctx.acting().is_err() {
        return;
    }
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &grant.object_ref(&())).await {
        tracing::warn!(error = %err, "could not publish event");
    }
}
