//! The sweep: IAM users s3grant created whose grant no longer exists (deleted while its
//! finalizer was stripped, its namespace gone) are found and deleted. It runs at start
//! and every resync period, per backend a class points at or remembers. Only users
//! carrying s3grant's tags and this cluster's identity are candidates, only those older
//! than `--sweep-min-age` (IAM is eventually consistent), and only when the API server
//! itself says the grant is gone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;

use super::Context;
use crate::api::{S3GrantClass, DEFAULT_IAM_PATH};
use crate::backend::record_of;
use crate::error::{Error, Result};
use crate::iam_user::{delete_user, list_users, user_tags, Deleted};
use crate::plan::{TAG_CLUSTER, TAG_MANAGED_BY, TAG_NAME, TAG_NAMESPACE, TAG_UID};
use crate::validate::later;

/// What a user's tags say about it.
#[derive(Debug, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// The grant a user was created for, if it was created by s3grant in this cluster (and,
/// for a one-namespace operator, in its namespace).
pub fn owner_of(
    tags: &[(String, String)],
    cluster: &str,
    watch_namespace: Option<&str>,
) -> Option<Owner> {
    let tag = |key: &str| tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    if tag(TAG_MANAGED_BY).as_deref() != Some("s3grant")
        || tag(TAG_CLUSTER).as_deref() != Some(cluster)
    {
        return None;
    }
    let owner = Owner {
        namespace: tag(TAG_NAMESPACE)?,
        name: tag(TAG_NAME)?,
        uid: tag(TAG_UID)?,
    };
    if watch_namespace.is_some_and(|ns| ns != owner.namespace) {
        return None;
    }
    Some(owner)
}

pub async fn run(ctx: Arc<Context>) {
    let Some(cluster) = ctx.cluster_id.clone() else {
        return;
    };
    while tokio::time::timeout(Duration::from_secs(1), ctx.grants.wait_until_ready())
        .await
        .is_err()
    {}
    loop {
        let result = sweep(&ctx, &cluster).await;
        ctx.metrics.sweep_done();
        match result {
            Ok(0) => tracing::debug!("sweep found no orphaned IAM users"),
            Ok(swept) => tracing::info!(swept, "sweep deleted orphaned IAM users"),
            Err(err) => {
                tracing::warn!(error = %err, "sweep failed; trying again at the next resync")
            }
        }
        tokio::time::sleep(ctx.config.resync_period).await;
    }
}

/// One sweep over every backend of every class. Returns how many users it deleted.
pub async fn sweep(ctx: &Context, cluster: &str) -> Result<usize> {
    let grants = ctx.grants.state();
    let held: HashSet<(String, String)> = grants
        .iter()
        .filter_map(|g| g.status.as_ref())
        .flat_map(|s| s.held.iter().map(|h| (h.backend.clone(), h.name.clone())))
        .collect();
    let live_uids: HashSet<String> = grants.iter().filter_map(|g| g.uid()).collect();
    let old_enough =
        |created: Timestamp| later(created, ctx.config.sweep_min_age) <= Timestamp::now();
    let mut swept = 0;
    let mut visited = HashSet::new();
    for class in ctx.classes.state() {
        for (record, path) in backends_of(&class) {
            if !visited.insert((record.id.clone(), path.clone())) {
                continue;
            }
            let class_name = class.name_any();
            let aws = match ctx.aws_for(&record, &class_name).await {
                Ok(aws) => aws,
                Err(err) => {
                    tracing::debug!(class = %class_name, error = %err, "sweep skips a backend it cannot reach");
                    continue;
                }
            };
            let users = match list_users(&aws.iam, &path).await {
                Ok(users) => users,
                Err(err) => {
                    // One backend down must not stop the sweep of the others.
                    tracing::warn!(class = %class_name, error = %err, "sweep skips a backend that did not answer");
                    continue;
                }
            };
            for user in users {
                if held.contains(&(record.id.clone(), user.name.clone()))
                    || !old_enough(user.created)
                {
                    continue;
                }
                let Some(tags) = user_tags(&aws.iam, &user.name).await? else {
                    continue;
                };
                let Some(owner) = owner_of(&tags, cluster, ctx.config.watch_namespace.as_deref())
                else {
                    continue;
                };
                if live_uids.contains(&owner.uid) || grant_exists(ctx, &owner).await? {
                    continue;
                }
                if delete_user(&aws.iam, &user.name, &owner.uid, None).await? == Deleted::Deleted {
                    tracing::info!(user = %user.name, namespace = %owner.namespace, grant = %owner.name, class = %class_name, "deleted an IAM user whose grant is gone");
                    ctx.metrics.swept();
                    swept += 1;
                }
            }
        }
    }
    Ok(swept)
}

/// The class's backends (current and remembered) with the IAM path its users live under.
fn backends_of(class: &S3GrantClass) -> Vec<(crate::api::BackendRecord, String)> {
    let path = class
        .spec
        .backend
        .iam_path
        .clone()
        .unwrap_or_else(|| DEFAULT_IAM_PATH.to_string());
    let mut records = vec![record_of(&class.spec.backend)];
    records.extend(class.status.iter().flat_map(|s| s.backends.iter().cloned()));
    records.into_iter().map(|r| (r, path.clone())).collect()
}

/// Asks the API server (not the cache) whether the grant still exists with this uid.
async fn grant_exists(ctx: &Context, owner: &Owner) -> Result<bool> {
    let grant = ctx
        .grants_in(&owner.namespace)
        .get_opt(&owner.name)
        .await
        .map_err(Error::kube("read a grant for the sweep"))?;
    Ok(grant.and_then(|g| g.uid()).as_deref() == Some(owner.uid.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(cluster: &str, namespace: &str) -> Vec<(String, String)> {
        [
            (TAG_MANAGED_BY, "s3grant"),
            (TAG_CLUSTER, cluster),
            (TAG_NAMESPACE, namespace),
            (TAG_NAME, "g"),
            (TAG_UID, "u1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn only_this_clusters_users_are_candidates() {
        let owner = owner_of(&tags("c1", "ns"), "c1", None).unwrap();
        assert_eq!(
            owner,
            Owner {
                namespace: "ns".into(),
                name: "g".into(),
                uid: "u1".into()
            }
        );
        assert_eq!(
            owner_of(&tags("c2", "ns"), "c1", None),
            None,
            "another cluster"
        );
        let mut untagged = tags("c1", "ns");
        untagged.retain(|(k, _)| k != TAG_CLUSTER);
        assert_eq!(
            owner_of(&untagged, "c1", None),
            None,
            "no cluster tag: never swept"
        );
        assert_eq!(
            owner_of(&tags("c1", "ns"), "c1", Some("other")),
            None,
            "another shard"
        );
        assert!(owner_of(&tags("c1", "ns"), "c1", Some("ns")).is_some());
    }
}
