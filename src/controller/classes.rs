//! Classes are deleted like grants. A class that a grant holds something on carries this
//! operator's finalizer and remembers the backend record in its status; deleting it wakes
//! every grant holding something there (they find the class being deleted and revoke),
//! and the finalizer goes once none holds anything on it any more.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::{Receiver, Sender};
use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use super::Context;
use crate::api::{BackendRecord, S3Grant, S3GrantClass};
use crate::backend::{is_recorded, record_of};
use crate::error::{Error, Result};

/// How often deleting classes are looked at when nothing wakes the loop.
const TICK: Duration = Duration::from_secs(5);

fn api(ctx: &Context) -> Api<S3GrantClass> {
    Api::all(ctx.client.clone())
}

/// Before a grant creates anything on `backend`: the class must not be being deleted,
/// must carry this operator's finalizer, and must remember the backend's record.
/// Written under the class's resourceVersion, retried on conflicts.
pub async fn hold(ctx: &Context, class: &S3GrantClass, backend: &BackendRecord) -> Result<()> {
    ctx.acting()?;
    let name = class.name_any();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let fresh = api(ctx)
            .get_opt(&name)
            .await
            .map_err(Error::kube("read the grant's class"))?
            .ok_or_else(|| Error::ClassNotFound(format!("S3GrantClass {name} does not exist")))?;
        if fresh.metadata.deletion_timestamp.is_some() {
            return Err(Error::ClassNotFound(format!(
                "S3GrantClass {name} is being deleted"
            )));
        }
        if record_of(&fresh.spec.backend) != *backend {
            // The class changed under us; the next reconcile plans again.
            return Err(Error::Kube {
                action: "hold the class's backend",
                source: kube::Error::Api(
                    kube::core::Status::failure("the class's backend just changed", "Conflict")
                        .with_code(409)
                        .boxed(),
                ),
            });
        }
        match write_hold(ctx, &fresh, backend).await {
            Ok(()) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 && attempt < 4 => continue,
            Err(err) => {
                return Err(Error::Kube {
                    action: "record the backend on the grant's class",
                    source: err,
                })
            }
        }
    }
}

async fn write_hold(
    ctx: &Context,
    class: &S3GrantClass,
    backend: &BackendRecord,
) -> kube::Result<()> {
    let name = class.name_any();
    let version = class.metadata.resource_version.clone();
    let mut finalizers = class.finalizers().to_vec();
    let resource_version = if !finalizers.contains(&ctx.class_finalizer) {
        finalizers.push(ctx.class_finalizer.clone());
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": version, "finalizers": finalizers}
        });
        let patched = api(ctx)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        patched.metadata.resource_version
    } else {
        version
    };
    if !is_recorded(class, backend) {
        let mut backends = class
            .status
            .as_ref()
            .map(|s| s.backends.clone())
            .unwrap_or_default();
        backends.retain(|b| b.id != backend.id);
        backends.push(backend.clone());
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": resource_version},
            "status": {"backends": backends}
        });
        api(ctx)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// The grants (read from the API server, not the cache: a grant that has just recorded
/// a user must be seen) that hold something on the class.
async fn holders(ctx: &Context, class: &str) -> Result<Vec<S3Grant>> {
    let api: Api<S3Grant> = match &ctx.config.watch_namespace {
        Some(namespace) => ctx.grants_in(namespace),
        None => Api::all(ctx.client.clone()),
    };
    let grants = api
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list grants"))?;
    Ok(grants
        .items
        .into_iter()
        .filter(|g| {
            g.status
                .as_ref()
                .is_some_and(|s| s.held.iter().any(|h| h.class_name == class))
        })
        .collect())
}

/// Releases deleting classes once nothing is held on them, waking their holders until then.
async fn settle_deleting(ctx: &Context, wake: &mut Sender<ObjectRef<S3Grant>>) -> Result<()> {
    ctx.acting()?;
    let deleting = ctx.classes.state().into_iter().filter(|c| {
        c.metadata.deletion_timestamp.is_some() && c.finalizers().contains(&ctx.class_finalizer)
    });
    for class in deleting {
        let name = class.name_any();
        let holders = holders(ctx, &name).await?;
        if holders.is_empty() {
            let finalizers: Vec<&String> = class
                .finalizers()
                .iter()
                .filter(|f| **f != ctx.class_finalizer)
                .collect();
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": class.metadata.resource_version, "finalizers": finalizers}
            });
            match api(ctx)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(class = %name, "class released: no grant holds anything on it")
                }
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
                Err(err) => {
                    tracing::warn!(class = %name, error = %err, "could not release the class")
                }
            }
        } else {
            tracing::info!(class = %name, grants = holders.len(), "class being deleted: revoking the grants that hold something on it");
            for grant in &holders {
                let _ = wake.try_send(ObjectRef::from_obj(grant));
            }
        }
    }
    Ok(())
}

/// Records no longer needed are dropped from classes' status, when this operator sees
/// every grant (a shard sees only its own namespace and leaves records alone). Only
/// classes whose backend changed have any to drop; the grants are then read fresh.
async fn prune_records(ctx: &Context) -> Result<()> {
    if ctx.config.watch_namespace.is_some() {
        return Ok(());
    }
    ctx.acting()?;
    let has_old = |class: &S3GrantClass| {
        let current = record_of(&class.spec.backend).id;
        class
            .status
            .as_ref()
            .is_some_and(|s| s.backends.iter().any(|b| b.id != current))
    };
    let classes: Vec<_> = ctx
        .classes
        .state()
        .into_iter()
        .filter(|c| has_old(c))
        .collect();
    if classes.is_empty() {
        return Ok(());
    }
    let grants = Api::<S3Grant>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list grants"))?
        .items;
    for class in classes {
        let Some(status) = &class.status else {
            continue;
        };
        let name = class.name_any();
        let current = record_of(&class.spec.backend).id;
        let kept: Vec<BackendRecord> = status
            .backends
            .iter()
            .filter(|b| {
                b.id == current
                    || grants.iter().any(|g| {
                        g.status.as_ref().is_some_and(|s| {
                            s.held
                                .iter()
                                .any(|h| h.class_name == name && h.backend == b.id)
                        })
                    })
            })
            .cloned()
            .collect();
        if kept.len() == status.backends.len() {
            continue;
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": class.metadata.resource_version},
            "status": {"backends": kept}
        });
        if let Err(err) = api(ctx)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(class = %name, error = %err, "could not prune backend records");
        }
    }
    Ok(())
}

/// The class loop: woken by class changes, and every few seconds while any is deleting.
pub async fn run(
    ctx: Arc<Context>,
    mut class_changed: Receiver<()>,
    mut wake: Sender<ObjectRef<S3Grant>>,
) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            changed = class_changed.next() => if changed.is_none() { return },
            () = tokio::time::sleep(TICK) => {}
        }
        if let Err(err) = settle_deleting(&ctx, &mut wake).await {
            tracing::warn!(error = %err, "could not settle deleting classes");
        }
        ticks += 1;
        if ticks.is_multiple_of(12) {
            if let Err(err) = prune_records(&ctx).await {
                tracing::debug!(error = %err, "could not prune backend records");
            }
        }
    }
}
