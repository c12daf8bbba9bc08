//! The controller: one pipeline per grant — resolve class → check guardrails → plan →
//! check the Secret → ensure AWS → write the Secret → write status → requeue at the next
//! deadline. Deleting a grant runs `cleanup` behind a finalizer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::OnceCell;

use crate::api::{
    S3Grant, S3GrantClass, S3GrantStatus, FIELD_MANAGER, FINALIZER, MANAGED_BY_LABEL,
    ROTATE_REQUESTED_ANNOTATION,
};
use crate::aws::{clients_for, load_base_config, AwsClients, Credentials};
use crate::error::{Error, Result};
use crate::guardrails::{check_permitted, select_class};
use crate::iam_user::{
    create_key, decide_key_actions, delete_key, delete_user, ensure_policy, ensure_user, list_keys,
    rotation_due,
};
use crate::metrics::Metrics;
use crate::naming::iam_user_name;
use crate::plan::{plan_grant, CredentialPlan, GrantPlan};
use crate::secret::{build_secret, digest, inspect_secret, needs_write, rfc3339, ExistingSecret};
use crate::status::{failed_status, ready_condition};
use crate::sts_session::{assume_role, effective_duration, refresh_at};
use crate::validate::{later, parse_duration};

/// `s3grant run` flags; each also reads an environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Grants reconciled at once (IAM rate-limits its API).
    #[arg(long, env = "S3GRANT_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// How long a replaced access key stays valid after a rotation, for pods still using it.
    #[arg(long, env = "S3GRANT_KEY_GRACE_PERIOD", default_value = "24h", value_parser = duration_arg)]
    pub key_grace_period: Duration,
    /// How often an unchanged IAM-user grant is checked for drift in AWS.
    #[arg(long, env = "S3GRANT_RESYNC_PERIOD", default_value = "1h", value_parser = duration_arg)]
    pub resync_period: Duration,
    /// The fraction of an STS session's lifetime after which it is re-minted (0.05 to 0.9).
    #[arg(long, env = "S3GRANT_STS_REFRESH_FRACTION", default_value_t = crate::sts_session::DEFAULT_REFRESH_FRACTION, value_parser = fraction_arg)]
    pub sts_refresh_fraction: f64,
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "S3GRANT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: std::net::SocketAddr,
    /// Only reconcile grants in this namespace (all namespaces when unset).
    #[arg(long, env = "S3GRANT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "S3GRANT_LOG_JSON")]
    pub log_json: bool,
    /// Take a coordination.k8s.io Lease before acting, for running more than one replica.
    #[arg(long, env = "S3GRANT_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(
        long,
        env = "S3GRANT_LEASE_NAMESPACE",
        default_value = "s3grant-system"
    )]
    pub lease_namespace: String,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, env = "S3GRANT_LEASE_DURATION", default_value = "15s", value_parser = duration_arg)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (the pod name in a Deployment).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

fn fraction_arg(text: &str) -> std::result::Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.05..=0.9).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0.05 and 0.9".into())
    }
}

fn duration_arg(text: &str) -> std::result::Result<Duration, String> {
    parse_duration(text)
}

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub aws_base: aws_config::SdkConfig,
    pub classes: Store<S3GrantClass>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    default_chain_is_role: OnceCell<bool>,
    /// IAM-user grants whose AWS side was checked, by uid: see [`Verified`].
    verified: std::sync::Mutex<HashMap<String, Verified>>,
}

/// An IAM-user grant whose user, policy and keys were checked in AWS. Until `next_due`,
/// a reconcile of the same grant (same generation, annotations and class) whose Secret
/// still holds `access_key_id` needs no AWS call: that is the reconcile our own Secret
/// write triggers. Drift in AWS is looked for at `next_due` (at most the resync period).
struct Verified {
    fingerprint: String,
    access_key_id: String,
    next_due: Timestamp,
}

impl Context {
    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn aws_for(&self, class: &S3GrantClass) -> Result<AwsClients> {
        let client = self.client.clone();
        clients_for(
            &self.aws_base,
            class,
            |ns| Api::namespaced(client.clone(), ns),
            self.metrics.clone(),
            &self.default_chain_is_role,
        )
        .await
    }

    async fn publish(&self, grant: &S3Grant, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &grant.object_ref(&())).await {
            tracing::warn!(error = %err, "could not publish event");
        }
    }
}

/// What an issue step produced, for the status and the next requeue.
struct Issued {
    credentials: Credentials,
    changed: Option<&'static str>,
    next_due: Timestamp,
    note: Option<String>,
    handled_rotation_request: Option<String>,
}

pub async fn reconcile(grant: Arc<S3Grant>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let namespace = grant.namespace().unwrap_or_default();
    let api: Api<S3Grant> = Api::namespaced(ctx.client.clone(), &namespace);
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

pub fn error_policy(grant: Arc<S3Grant>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(grant = %grant.name_any(), namespace = grant.namespace().as_deref().unwrap_or(""), category = error.category(), error = %error, "reconcile failed");
    Action::requeue(error.requeue_after())
}

async fn apply(grant: &S3Grant, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let previous = grant.status.as_ref();
    match issue(grant, ctx, now).await {
        Ok((plan, issued)) => {
            let status = ready_status(grant, &plan, &issued, previous, now);
            write_status(grant, ctx, &status).await?;
            if let Some(reason) = issued.changed {
                let note = format!(
                    "{} credentials for s3://{}/{} ({}) written to Secret {} (access key {})",
                    plan.credential_kind(),
                    plan.bucket,
                    plan.prefixes.first().map(|p| p.as_str()).unwrap_or(""),
                    grant.spec.mode,
                    plan.secret_name,
                    issued.credentials.access_key_id
                );
                tracing::info!(grant = %grant.name_any(), namespace = %plan.namespace, reason, access_key_id = %issued.credentials.access_key_id, "credentials written");
                if reason != "Refreshed" {
                    ctx.publish(grant, EventType::Normal, reason, note).await;
                }
            }
            ctx.metrics
                .set_expiry(&plan.namespace, &plan.name, issued.credentials.expiration);
            let wait = (issued.next_due.as_second() - now.as_second()).max(1) as u64;
            Ok(Action::requeue(
                Duration::from_secs(wait).min(ctx.config.resync_period),
            ))
        }
        Err(error) if error.is_user_error() => {
            // The status may have changed during this reconcile (the IAM user is named
            // before it is created): build on what the server has now.
            let api: Api<S3Grant> =
                Api::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
            let latest = api
                .get(&grant.name_any())
                .await
                .map_err(Error::kube("read the grant"))?;
            let (grant, previous) = (&latest, latest.status.as_ref());
            // A grant its class no longer permits, whose class is gone, or that lost its Secret's
            // name to another owner, loses what it holds in AWS.
            let revoke = matches!(
                error,
                Error::NotPermitted { .. } | Error::ClassNotFound(_) | Error::SecretConflict { .. }
            );
            let mut message = error.to_string();
            let mut revoked = false;
            if revoke {
                match revoke_grant(grant, ctx).await {
                    Ok(()) => revoked = true,
                    Err(blocked) => message.push_str(&format!("; {blocked}")),
                }
            }
            let status = failed_status(
                previous,
                error.category(),
                message.clone(),
                grant.metadata.generation,
                revoked,
                now,
            );
            if Some(&status) != previous {
                ctx.publish(grant, EventType::Warning, error.category(), message)
                    .await;
            }
            write_status(grant, ctx, &status).await?;
            tracing::info!(grant = %grant.name_any(), category = error.category(), error = %error, "grant not ready");
            Ok(Action::requeue(error.requeue_after()))
        }
        Err(error) => Err(error),
    }
}

/// Steps 1–6 of the pipeline for a grant that exists.
async fn issue(grant: &S3Grant, ctx: &Context, now: Timestamp) -> Result<(GrantPlan, Issued)> {
    let namespace = grant.namespace().unwrap_or_default();
    let classes = ctx.classes.state();
    let class = select_class(grant.spec.class_name.as_deref(), &classes)?;
    let labels = if class.spec.namespace_selector.is_some() {
        namespace_labels(ctx, &namespace).await?
    } else {
        BTreeMap::new()
    };
    check_permitted(class, &namespace, &labels, &grant.spec)?;
    let plan = plan_grant(grant, class)?;

    let secrets = ctx.secrets(&namespace);
    let existing = secrets
        .get_opt(&plan.secret_name)
        .await
        .map_err(Error::kube("read the grant's Secret"))?;
    let uid = grant.uid().unwrap_or_default();
    let (current, issued_for) = match inspect_secret(existing.as_ref(), &uid) {
        ExistingSecret::Foreign => {
            return Err(Error::SecretConflict {
                namespace,
                name: plan.secret_name.clone(),
            })
        }
        ExistingSecret::Ours {
            credentials,
            issued_for,
        } => (credentials, issued_for),
        ExistingSecret::Missing => (None, None),
    };

    let aws = ctx.aws_for(class).await?;
    let fingerprint = digest(&format!(
        "{uid}\n{:?}\n{:?}\n{:?}",
        grant.metadata.generation, grant.metadata.annotations, class.metadata.resource_version
    ));
    let step = Step {
        grant,
        fingerprint,
        ctx,
        aws: &aws,
        plan: &plan,
        secrets,
        existing,
        now,
    };
    let issued = match &plan.credential {
        CredentialPlan::IamUser {
            user_name,
            rotate_every,
            ..
        } => {
            mark_user_pending(grant, ctx, &plan, user_name).await?;
            // Credentials issued for another user (or an STS session) are not this user's key.
            let current =
                current.filter(|_| issued_for.as_deref() == Some(digest(user_name).as_str()));
            issue_iam_user(&step, user_name, *rotate_every, current).await?
        }
        CredentialPlan::StsSession {
            role_arn,
            session_name,
            duration,
        } => {
            if grant.status.as_ref().is_some_and(|s| s.iam_user.is_some()) {
                // The grant moved from an IAM user to STS: the user goes.
                delete_user(
                    &aws.iam,
                    &iam_user_name(&namespace, &grant.name_any(), &uid),
                    &uid,
                )
                .await?;
            }
            issue_sts_session(
                &step,
                role_arn,
                session_name,
                *duration,
                current,
                issued_for,
            )
            .await?
        }
    };
    Ok((plan, issued))
}

/// What one issue step works with.
struct Step<'a> {
    grant: &'a S3Grant,
    /// What the grant's AWS side depends on besides its Secret: uid, generation, annotations, class.
    fingerprint: String,
    ctx: &'a Context,
    aws: &'a AwsClients,
    plan: &'a GrantPlan,
    secrets: Api<Secret>,
    existing: Option<Secret>,
    now: Timestamp,
}

impl Step<'_> {
    async fn write_secret(&self, credentials: &Credentials, issued_for: &str) -> Result<()> {
        write_secret(
            self.grant,
            &self.secrets,
            self.plan,
            self.existing.as_ref(),
            credentials,
            issued_for,
        )
        .await
    }
}

async fn issue_iam_user(
    step: &Step<'_>,
    user_name: &str,
    rotate_every: Option<Duration>,
    current: Option<Credentials>,
) -> Result<Issued> {
    let (aws, config, now) = (step.aws, &step.ctx.config, step.now);
    let uid = step.grant.uid().unwrap_or_default();
    let requested = rotation_request(step.grant);
    if let Some(current) = &current {
        let verified = step
            .ctx
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = verified.get(&uid).filter(|v| {
            v.fingerprint == step.fingerprint
                && v.access_key_id == current.access_key_id
                && now < v.next_due
        }) {
            return Ok(Issued {
                credentials: current.clone(),
                changed: None,
                next_due: entry.next_due,
                note: None,
                handled_rotation_request: requested,
            });
        }
    }
    let existed = ensure_user(&aws.iam, step.plan).await?;
    ensure_policy(&aws.iam, user_name, &step.plan.policy, !existed).await?;
    let keys = if existed {
        list_keys(&aws.iam, user_name).await?
    } else {
        Vec::new()
    };
    let current_key = current
        .as_ref()
        .and_then(|c| keys.iter().find(|k| k.id == c.access_key_id));
    let handled = step
        .grant
        .status
        .as_ref()
        .and_then(|s| s.handled_rotation_request.clone());
    let rotate = (requested.is_some() && requested != handled)
        || current_key.is_some_and(|key| rotation_due(key.created, rotate_every, now));
    let actions = decide_key_actions(
        &keys,
        current_key.map(|k| k.id.as_str()),
        rotate,
        now,
        config.key_grace_period,
    );
    for key_id in &actions.delete {
        tracing::info!(user = user_name, access_key_id = %key_id, "deleting access key");
        delete_key(&aws.iam, user_name, key_id).await?;
    }
    let (credentials, changed, created_at) = match (actions.create, current, current_key) {
        (false, Some(current), Some(key)) => (current, None, key.created),
        (_, previous, _) => {
            let (key, fresh) = create_key(&aws.iam, user_name).await?;
            let reason = if previous.is_some() || !keys.is_empty() {
                "Rotated"
            } else {
                "Issued"
            };
            (fresh, Some(reason), key.created)
        }
    };
    step.write_secret(&credentials, &digest(user_name)).await?;

    // Next: the resync, a previous key's retirement, or the scheduled rotation.
    let mut deadlines = vec![later(now, config.resync_period)];
    deadlines.extend(actions.retire_previous_at);
    if changed.is_some() && keys.len() > actions.delete.len() {
        deadlines.push(later(now, config.key_grace_period));
    }
    deadlines.extend(rotate_every.map(|period| later(created_at, period)));
    let next_due = deadlines.into_iter().min().unwrap_or(now);
    step.ctx
        .verified
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            uid,
            Verified {
                fingerprint: step.fingerprint.clone(),
                access_key_id: credentials.access_key_id.clone(),
                next_due,
            },
        );
    Ok(Issued {
        credentials,
        changed,
        next_due,
        note: None,
        handled_rotation_request: requested,
    })
}

async fn issue_sts_session(
    step: &Step<'_>,
    role_arn: &str,
    session_name: &str,
    requested: Duration,
    current: Option<Credentials>,
    issued_for: Option<String>,
) -> Result<Issued> {
    let (duration, note) = effective_duration(requested, step.aws.role_chaining);
    // A session is reused only if it was issued for exactly this role, name, lifetime and policy.
    let wanted_for = digest(&format!(
        "{role_arn}\n{session_name}\n{}\n{}",
        duration.as_secs(),
        step.plan.policy.to_compact_json()
    ));
    let current = current.filter(|_| issued_for.as_deref() == Some(wanted_for.as_str()));
    let uid = step.grant.uid().unwrap_or_default();
    let seed = u64::from_str_radix(&digest(&uid)[..12], 16).unwrap_or_default();
    let fraction = step.ctx.config.sts_refresh_fraction;
    let refresh = |c: &Credentials| {
        c.expiration
            .map(|exp| refresh_at(exp, duration, fraction, seed))
    };
    let (credentials, changed) = match current {
        Some(current) if refresh(&current).is_some_and(|due| step.now < due) => (current, None),
        previous => {
            let fresh = assume_role(
                &step.aws.sts,
                role_arn,
                session_name,
                &step.plan.policy,
                duration,
            )
            .await?;
            (
                fresh,
                Some(if previous.is_some() {
                    "Refreshed"
                } else {
                    "Issued"
                }),
            )
        }
    };
    step.write_secret(&credentials, &wanted_for).await?;
    Ok(Issued {
        next_due: refresh(&credentials).unwrap_or(step.now),
        credentials,
        changed,
        note,
        handled_rotation_request: rotation_request(step.grant),
    })
}

/// Records the IAM user in the status before it is created, so that whatever happens next
/// (a crash, a class that stops permitting the grant) s3grant knows there may be a user to remove.
async fn mark_user_pending(
    grant: &S3Grant,
    ctx: &Context,
    plan: &GrantPlan,
    user_name: &str,
) -> Result<()> {
    let previous = grant.status.as_ref();
    if previous.and_then(|s| s.iam_user.as_deref()) == Some(user_name) {
        return Ok(());
    }
    let mut status = previous.cloned().unwrap_or_default();
    status.iam_user = Some(user_name.to_string());
    status.class_name = Some(plan.class_name.clone());
    if status.conditions.is_empty() {
        status.conditions = vec![ready_condition(
            false,
            "Issuing",
            format!("creating IAM user {user_name}"),
            grant.metadata.generation,
            previous,
            Timestamp::now(),
        )];
    }
    write_status(grant, ctx, &status).await
}

fn rotation_request(grant: &S3Grant) -> Option<String> {
    grant
        .annotations()
        .get(ROTATE_REQUESTED_ANNOTATION)
        .cloned()
}

async fn namespace_labels(ctx: &Context, namespace: &str) -> Result<BTreeMap<String, String>> {
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let ns = api
        .get(namespace)
        .await
        .map_err(Error::kube("read the grant's namespace"))?;
    Ok(ns.metadata.labels.unwrap_or_default())
}

/// Writes the Secret when it differs. A missing Secret is created (so a grant racing
/// another for the same name loses with a conflict instead of overwriting it); an
/// existing one is applied with its resourceVersion as a precondition.
async fn write_secret(
    grant: &S3Grant,
    api: &Api<Secret>,
    plan: &GrantPlan,
    existing: Option<&Secret>,
    credentials: &Credentials,
    issued_for: &str,
) -> Result<()> {
    let mut desired = build_secret(grant, plan, credentials, issued_for);
    if !needs_write(existing, &desired) {
        return Ok(());
    }
    match existing {
        None => {
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            api.create(&params, &desired)
                .await
                .map_err(Error::kube("create the grant's Secret"))?;
        }
        Some(existing) => {
            desired.metadata.resource_version = existing.metadata.resource_version.clone();
            api.patch(
                &plan.secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
            .map_err(Error::kube("write the grant's Secret"))?;
        }
    }
    Ok(())
}

fn ready_status(
    grant: &S3Grant,
    plan: &GrantPlan,
    issued: &Issued,
    previous: Option<&S3GrantStatus>,
    now: Timestamp,
) -> S3GrantStatus {
    let scope = if plan.prefixes.is_empty() {
        format!("s3://{}", plan.bucket)
    } else {
        plan.prefixes
            .iter()
            .map(|p| format!("s3://{}/{p}", plan.bucket))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut message = format!(
        "{} credentials for {scope} ({}) are in Secret {}",
        plan.credential_kind(),
        grant.spec.mode,
        plan.secret_name
    );
    if let Some(note) = &issued.note {
        message.push_str("; ");
        message.push_str(note);
    }
    let generation = grant.metadata.generation;
    let last_rotated = match issued.changed {
        Some(_) => Some(rfc3339(now)),
        None => previous.and_then(|s| s.last_rotated.clone()),
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
        access_key_id: Some(issued.credentials.access_key_id.clone()),
        expires_at: issued.credentials.expiration.map(rfc3339),
        last_rotated,
        handled_rotation_request: issued.handled_rotation_request.clone(),
        policy_size: Some(plan.policy_size as i64),
    }
}

async fn write_status(grant: &S3Grant, ctx: &Context, status: &S3GrantStatus) -> Result<()> {
    if grant.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<S3Grant> =
        Api::namespaced(ctx.client.clone(), &grant.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": S3Grant::api_version(&()),
        "kind": S3Grant::kind(&()),
        "status": status,
    });
    api.patch_status(
        &grant.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("write the grant's status"))?;
    Ok(())
}

/// Removes what a grant holds: its Secret, then its IAM user and keys. Used on delete and
/// when a grant is no longer permitted. STS sessions already issued cannot be revoked one
/// by one; deleting the Secret stops them being handed out. Fails with `RevokeBlocked`
/// when an IAM user may exist but its class (and so its backend) is gone.
async fn revoke_grant(grant: &S3Grant, ctx: &Context) -> Result<()> {
    let namespace = grant.namespace().unwrap_or_default();
    let uid = grant.uid().unwrap_or_default();
    let mut removed = Vec::new();

    let secrets = ctx.secrets(&namespace);
    let secret_name = grant
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| grant.secret_name());
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(Error::kube("read the grant's Secret"))?;
    if let ExistingSecret::Ours { .. } = inspect_secret(existing.as_ref(), &uid) {
        match secrets.delete(&secret_name, &DeleteParams::default()).await {
            Ok(_) => removed.push(format!("Secret {secret_name}")),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                return Err(Error::Kube {
                    action: "delete the grant's Secret",
                    source: err,
                })
            }
        }
    }

    // The status names the user before it is created (see `mark_user_pending`), so a grant
    // without one never had a user and costs no AWS call here.
    let user = iam_user_name(&namespace, &grant.name_any(), &uid);
    let had_user = grant.status.as_ref().is_some_and(|s| s.iam_user.is_some());
    if had_user {
        let classes = ctx.classes.state();
        let used = grant
            .status
            .as_ref()
            .and_then(|s| s.class_name.clone())
            .or_else(|| grant.spec.class_name.clone());
        match select_class(used.as_deref(), &classes) {
            Ok(class) => {
                let aws = ctx.aws_for(class).await?;
                if delete_user(&aws.iam, &user, &uid).await? {
                    removed.push(format!("IAM user {user} and its access keys"));
                }
            }
            Err(err) => {
                return Err(Error::RevokeBlocked(format!(
                    "IAM user {user} cannot be deleted because its class is unavailable ({err}); restore the class so s3grant can remove it"
                )));
            }
        }
    }
    if !removed.is_empty() {
        ctx.publish(
            grant,
            EventType::Normal,
            "Revoked",
            format!("removed {}", removed.join(" and ")),
        )
        .await;
    }
    Ok(())
}

async fn cleanup(grant: &S3Grant, ctx: &Context) -> Result<Action> {
    revoke_grant(grant, ctx).await?;
    ctx.metrics
        .forget(&grant.namespace().unwrap_or_default(), &grant.name_any());
    if let Some(uid) = grant.uid() {
        ctx.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&uid);
    }
    tracing::info!(grant = %grant.name_any(), namespace = grant.namespace().as_deref().unwrap_or(""), "grant deleted; AWS side cleaned up");
    Ok(Action::await_change())
}

/// The classes whose backend did not answer an STS GetCallerIdentity with any HTTP
/// response (an error response counts: RGW answers 405, which still proves it is there).
/// A class that cannot even be configured is reported on its grants instead.
async fn unanswered_backends(ctx: &Context) -> Vec<String> {
    use aws_smithy_runtime_api::client::result::SdkError;
    let mut silent = Vec::new();
    for class in ctx.classes.state() {
        let name = class.name_any();
        let aws = match ctx.aws_for(&class).await {
            Ok(aws) => aws,
            Err(err) => {
                tracing::warn!(class = %name, error = %err, "class cannot be used");
                continue;
            }
        };
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            aws.sts.get_caller_identity().send(),
        )
        .await;
        match probe {
            Ok(Ok(_)) | Ok(Err(SdkError::ServiceError(_))) => {}
            _ => silent.push(name),
        }
    }
    silent
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Arc<crate::admin::Readiness>,
) -> anyhow::Result<()> {
    let aws_base = load_base_config().await;
    let (grants, secret_metadata): (Api<S3Grant>, Api<PartialObjectMeta<Secret>>) =
        match &config.watch_namespace {
            Some(namespace) => (
                Api::namespaced(client.clone(), namespace),
                Api::namespaced(client.clone(), namespace),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let classes: Api<S3GrantClass> = Api::all(client.clone());

    // The first list proves the CRDs are served.
    grants
        .list(&kube::api::ListParams::default().limit(1))
        .await?;
    classes
        .list(&kube::api::ListParams::default().limit(1))
        .await?;

    let (class_store, class_writer) = reflector::store();
    // Class and namespace-label changes both re-evaluate every grant.
    let (class_changed, class_changes) = futures::channel::mpsc::channel::<()>(16);
    let mut labels_changed = class_changed.clone();
    let class_watch =
        reflector::reflector(class_writer, watcher(classes, watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .for_each(move |event| {
                let mut class_changed = class_changed.clone();
                if event.is_ok() {
                    let _ = class_changed.try_send(());
                }
                std::future::ready(())
            });
    tokio::spawn(class_watch);
    class_store.wait_until_ready().await?;

    // A namespace whose labels change may gain or lose a class (namespaceSelector).
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let namespace_config = match &config.watch_namespace {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    let namespace_watch = watcher(namespaces, namespace_config)
        .default_backoff()
        .applied_objects()
        .predicate_filter(predicates::labels, Default::default())
        .for_each(move |event| {
            if event.is_ok() {
                let _ = labels_changed.try_send(());
            }
            std::future::ready(())
        });
    tokio::spawn(namespace_watch);

    let reporter = Reporter {
        controller: "s3grant".into(),
        instance: config.identity.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        config: config.clone(),
        aws_base,
        classes: class_store,
        metrics: metrics.clone(),
        default_chain_is_role: OnceCell::new(),
        verified: Default::default(),
    });
    let owned_secrets = watcher(
        secret_metadata,
        watcher::Config::default()
            .labels(&format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1)),
    )
    .default_backoff()
    .touched_objects();
    // Status writes do not change generation, annotations or finalizers, so they do not wake us.
    let spec_changes = predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers);
    let (grant_store, grant_writer) = reflector::store();
    let grant_stream =
        reflector::reflector(grant_writer, watcher(grants, watcher::Config::default()))
            .default_backoff()
            .touched_objects()
            .predicate_filter(spec_changes, Default::default());
    let controller = Controller::for_stream(grant_stream, grant_store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency))
        .owns_stream(owned_secrets)
        .reconcile_all_on(class_changes)
        .shutdown_on_signal();
    let probe_ctx = ctx.clone();
    tokio::spawn(async move {
        // The store's readiness wakes only one waiter (the controller also waits on it),
        // so poll it again every second rather than wait once.
        while tokio::time::timeout(Duration::from_secs(1), grant_store.wait_until_ready())
            .await
            .is_err()
        {}
        tracing::debug!("first sync of grants done; probing backends");
        // Ready once the first sync is done and every class's backend has answered.
        loop {
            match unanswered_backends(&probe_ctx).await {
                silent if silent.is_empty() => break,
                silent => {
                    tracing::warn!(classes = ?silent, "backends not answering; not ready yet")
                }
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
        ready.set_synced();
    });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(err) = result {
                tracing::debug!(error = %err, "controller event");
            }
            std::future::ready(())
        })
        .await;
    tracing::info!("controller stopped");
    Ok(())
}
