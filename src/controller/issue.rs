//! Issuing, for a grant that exists: resolve its class, check the guardrails, plan,
//! record what will be held in the ledger, ensure the IAM user or STS session, write the
//! Secret, then release what the ledger holds and the plan no longer wants.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::Resource;

use super::write::{put_secret, write_secret, write_status};
use super::{classes, locked, release, Context};
use crate::api::{Held, S3Grant, S3GrantStatus};
use crate::aws::{AwsClients, Credentials};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::guardrails::{check_permitted, select_class};
use crate::iam_user::{
    create_key, decide_key_actions, delete_key, ensure_policy, ensure_user, list_keys,
    rotation_due, SecretKeys,
};
use crate::ledger;
use crate::naming::digest;
use crate::plan::{plan_grant, CredentialPlan, GrantPlan};
use crate::request::GrantRequest;
use crate::secret::{build_secret, inspect_secret, rfc3339, ExistingSecret, IssueRecord};
use crate::status::{ready_condition, Issued};
use crate::sts_session::{assume_role, effective_duration, refresh_at};
use crate::validate::later;

/// An IAM-user grant whose user, policy and keys were checked in AWS. Until `next_due`,
/// a reconcile of the same grant (same generation, annotations and class) whose Secret
/// still holds `access_key_id` and whose ledger holds nothing else needs no AWS call:
/// that is the reconcile our own Secret write triggers. Drift in AWS is looked for at
/// `next_due` (at most the resync period).
pub struct Verified {
    fingerprint: String,
    access_key_id: String,
    next_due: Timestamp,
}

/// What a successful issue leaves: the plan, what the status reports, the ledger, and
/// when the grant is due again.
pub struct Outcome {
    pub plan: GrantPlan,
    pub issued: Issued,
    pub held: Vec<Held>,
    pub next_due: Timestamp,
    /// Why new credentials were written (an Event reason), if they were.
    pub changed: Option<&'static str>,
    /// A held object that could not be released yet: retried with backoff.
    pub release_error: Option<Error>,
}

/// Runs the pipeline. `status` is the grant's status as the server has it; the ledger
/// entry written before a user is created is written through it, so a failure after
/// that point still knows what may exist.
pub async fn issue(
    ctx: &Context,
    grant: &S3Grant,
    status: &mut Option<S3GrantStatus>,
    now: Timestamp,
) -> Result<Outcome> {
    let request = GrantRequest::parse(grant)?;
    let classes = ctx.classes.state();
    let class = select_class(request.class_name.as_deref(), &classes)?;
    let labels = if class.spec.namespace_selector.is_some() {
        ctx.namespace_labels(&request.namespace).await?
    } else {
        Default::default()
    };
    check_permitted(class, &labels, &request)?;
    let plan = plan_grant(&request, class, ctx.cluster_id.as_deref())?;
    // Before any call: a grant whose backend is busy or silent waits without a slot.
    let slot = ctx.enter_backend(&plan.backend, &plan.class_name)?;

    let secrets = ctx.secrets(&request.namespace);
    let existing = secrets
        .get_opt(&plan.secret_name)
        .await
        .map_err(Error::kube("read the grant's Secret"))?;
    let (current, record) = match inspect_secret(existing.as_ref(), &request.uid) {
        ExistingSecret::Foreign => {
            return Err(Error::SecretConflict {
                namespace: request.namespace.clone(),
                name: plan.secret_name.clone(),
            })
        }
        ExistingSecret::Ours {
            credentials,
            record,
        } => (credentials, record),
        ExistingSecret::Missing => (None, IssueRecord::default()),
    };

    // Write-ahead: the user is in the ledger (and its class holds on to the backend's
    // record) before CreateUser can run, so no crash can leave it out of reach.
    let mut held = ledger::held_of(status.as_ref(), &classes);
    let want = ledger::wanted(&plan).map(|w| Held {
        since: Some(rfc3339(now)),
        ..w
    });
    if want.is_some() && current.is_none() {
        // A Secret that cannot be written must not cost a user, a key, or even a ledger entry.
        check_writable(grant, &plan, &secrets, existing.as_ref(), false, now).await?;
    }
    if let Some(want) = &want {
        if let Some(next) = ledger::record(&held, want) {
            let mut intent = status.clone().unwrap_or_default();
            intent.held = next.clone();
            if intent.conditions.is_empty() {
                intent.conditions = vec![ready_condition(
                    false,
                    "Issuing",
                    format!("creating IAM user {}", want.name),
                    request.generation,
                    status.as_ref(),
                    now,
                )];
            }
            write_status(ctx, grant, status.as_ref(), &intent).await?;
            *status = Some(intent);
            held = next;
            // Only now: a class deleted after this point sees the entry and waits for it.
            classes::hold(ctx, class, &plan.backend).await?;
        }
    }

    let aws = ctx.aws_for(&plan.backend, &plan.class_name).await?;
    // The class's generation and annotations, not its resourceVersion: the finalizer and
    // backend records s3grant writes on the class change nothing a grant depends on.
    let fingerprint = digest(&format!(
        "{}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        request.uid,
        grant.metadata.generation,
        grant.metadata.annotations,
        class.metadata.uid,
        class.metadata.generation,
        class.metadata.annotations
    ));
    let step = Step {
        ctx,
        grant,
        request: &request,
        plan: &plan,
        aws: &aws,
        secrets,
        existing,
        record,
        status: status.as_ref(),
        now,
    };
    let stale = ledger::stale(&held, want.as_ref());
    let result = match &plan.credential {
        CredentialPlan::IamUser { .. } => {
            let cacheable = stale.is_empty() && held.iter().all(|h| h.id.is_some());
            issue_iam_user(&step, current, &fingerprint, cacheable).await
        }
        CredentialPlan::StsSession { .. } => issue_sts_session(&step, current)
            .await
            .map(|(issued, next_due, changed)| (issued, next_due, changed, None)),
    };
    ctx.backends.record(&plan.backend.id, result.as_ref().err());
    let (mut issued, next_due, changed, user_id) = result?;
    drop(slot);

    let want = want.map(|w| Held {
        id: user_id.clone(),
        ..w
    });
    let (released, release_error) =
        release::release_all(ctx, grant, &stale, user_id.as_deref()).await;
    if let Some(err) = &release_error {
        issued.notes.push(format!(
            "a user it held before could not be removed yet ({err})"
        ));
    }
    Ok(Outcome {
        held: ledger::settle(&held, want.as_ref(), &released),
        plan,
        issued,
        next_due,
        changed,
        release_error,
    })
}

/// What one issue works with.
struct Step<'a> {
    ctx: &'a Context,
    grant: &'a S3Grant,
    request: &'a GrantRequest,
    plan: &'a GrantPlan,
    aws: &'a AwsClients,
    secrets: Api<Secret>,
    existing: Option<Secret>,
    /// What the Secret records of the last issue.
    record: IssueRecord,
    status: Option<&'a S3GrantStatus>,
    now: Timestamp,
}

fn secret_for(
    grant: &S3Grant,
    plan: &GrantPlan,
    credentials: &Credentials,
    record: &IssueRecord,
) -> Result<Secret> {
    let owner = grant
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("the grant has no uid yet".into()))?;
    Ok(build_secret(plan, owner, credentials, record))
}

/// Asks the API server whether the Secret can be written, before anything is created in
/// AWS for it: a Secret that cannot be written must not cost an access key.
async fn check_writable(
    grant: &S3Grant,
    plan: &GrantPlan,
    secrets: &Api<Secret>,
    existing: Option<&Secret>,
    session: bool,
    now: Timestamp,
) -> Result<()> {
    let placeholder = Credentials {
        access_key_id: "AKIAPLACEHOLDER00000".into(),
        secret_access_key: "placeholder".into(),
        session_token: session.then(|| "placeholder".into()),
        expiration: session.then_some(now),
    };
    let desired = secret_for(grant, plan, &placeholder, &IssueRecord::default())?;
    put_secret(secrets, existing, desired, true).await
}

impl Step<'_> {
    fn secret(&self, credentials: &Credentials, record: &IssueRecord) -> Result<Secret> {
        secret_for(self.grant, self.plan, credentials, record)
    }

    async fn check_writable(&self, session: bool) -> Result<()> {
        check_writable(
            self.grant,
            self.plan,
            &self.secrets,
            self.existing.as_ref(),
            session,
            self.now,
        )
        .await
    }

    async fn write(&self, credentials: &Credentials, record: &IssueRecord) -> Result<()> {
        self.ctx.acting()?;
        let desired = self.secret(credentials, record)?;
        write_secret(&self.secrets, self.existing.as_ref(), desired).await?;
        Ok(())
    }

    /// The rotation request not answered yet, if any: neither the Secret (written with
    /// the new key) nor the status records it as handled.
    fn pending_rotation(&self) -> Option<&str> {
        let requested = self.request.rotation_request.as_deref()?;
        let handled_in_secret = self.record.rotation_handled.as_deref() == Some(requested);
        let handled_in_status = self
            .status
            .and_then(|s| s.handled_rotation_request.as_deref())
            == Some(requested);
        (!handled_in_secret && !handled_in_status).then_some(requested)
    }

    fn handled_rotation(&self) -> Option<String> {
        self.record
            .rotation_handled
            .clone()
            .or_else(|| self.status.and_then(|s| s.handled_rotation_request.clone()))
    }
}

type IamIssued = (Issued, Timestamp, Option<&'static str>, Option<String>);

async fn issue_iam_user(
    step: &Step<'_>,
    current: Option<Credentials>,
    fingerprint: &str,
    cacheable: bool,
) -> Result<IamIssued> {
    let (ctx, plan, now) = (step.ctx, step.plan, step.now);
    let CredentialPlan::IamUser {
        user_name,
        rotate_every,
        ..
    } = &plan.credential
    else {
        unreachable!("issue_iam_user is only called for IAM-user plans");
    };
    let uid = &step.request.uid;
    // Credentials issued for another user (or an STS session) are not this user's key.
    let current = current.filter(|_| step.record.issued_for == digest(user_name));
    let pending = step.pending_rotation();
    if let (Some(current), true, None) = (&current, cacheable, pending) {
        let hit = locked(&ctx.verified)
            .get(uid)
            .filter(|v| {
                v.fingerprint == fingerprint
                    && v.access_key_id == current.access_key_id
                    && now < v.next_due
            })
            .map(|v| v.next_due);
        if let Some(next_due) = hit {
            // AWS needs nothing; the Secret may still have been edited around the key.
            step.write(current, &step.record).await?;
            let issued = Issued {
                access_key_id: current.access_key_id.clone(),
                handled_rotation_request: step.handled_rotation(),
                ..Issued::default()
            };
            let user_id = step
                .status
                .and_then(|s| s.held.iter().find(|h| &h.name == user_name))
                .and_then(|h| h.id.clone());
            return Ok((issued, next_due, None, user_id));
        }
    }

    let user = ensure_user(&step.aws.iam, plan).await?;
    ensure_policy(&step.aws.iam, user_name, &plan.policy, user.created).await?;
    let keys = if user.created {
        Vec::new()
    } else {
        list_keys(&step.aws.iam, user_name).await?
    };
    let current_key = current
        .as_ref()
        .and_then(|c| keys.iter().find(|k| k.id == c.access_key_id));
    let scheduled = current_key.is_some_and(|key| rotation_due(key.created, *rotate_every, now));
    let secret_keys = SecretKeys {
        current: current_key.map(|k| k.id.as_str()),
        in_secret_since: step.record.issued_at,
        last_known: step.status.and_then(|s| s.access_key_id.as_deref()),
    };
    let grace = ctx.config.key_grace_period;
    let actions = decide_key_actions(
        &keys,
        secret_keys,
        pending.is_some() || scheduled,
        now,
        grace,
    );
    if actions.create && current_key.is_some() {
        step.check_writable(false).await?;
    }
    for key_id in &actions.delete {
        tracing::info!(user = %user_name, access_key_id = %key_id, "deleting access key");
        delete_key(&step.aws.iam, user_name, key_id).await?;
    }
    let mut notes = Vec::new();
    if let (Some(request), Some(until)) = (pending, actions.rotation_waits_until) {
        notes.push(format!(
            "rotation request {} waits until {} for the previous key's grace to end",
            crate::error::shown(request),
            rfc3339(until)
        ));
    }
    let (credentials, changed, created_at, record) = match (actions.create, current, current_key) {
        (false, Some(current), Some(key)) => (current, None, key.created, step.record.clone()),
        (_, previous, _) => {
            let (key, fresh) = create_key(&step.aws.iam, user_name).await?;
            let reason = if previous.is_some() || !keys.is_empty() {
                "Rotated"
            } else {
                "Issued"
            };
            let record = IssueRecord {
                issued_for: digest(user_name),
                issued_at: Some(Timestamp::now()),
                rotation_handled: step
                    .request
                    .rotation_request
                    .clone()
                    .or_else(|| step.record.rotation_handled.clone()),
            };
            (fresh, Some(reason), key.created, record)
        }
    };
    step.write(&credentials, &record).await?;
    if changed.is_some() {
        crash_point("after-secret-write");
    }

    // Next: the resync, a previous key's retirement, a waiting or scheduled rotation.
    let mut deadlines = vec![later(now, ctx.config.resync_period)];
    deadlines.extend(actions.retire_previous_at);
    deadlines.extend(actions.rotation_waits_until);
    if changed.is_some() && keys.len() > actions.delete.len() {
        deadlines.push(later(now, grace));
    }
    deadlines.extend(rotate_every.map(|period| later(created_at, period)));
    let next_due = deadlines.into_iter().min().unwrap_or(now);
    if actions.rotation_waits_until.is_none() {
        locked(&ctx.verified).insert(
            uid.clone(),
            Verified {
                fingerprint: fingerprint.to_string(),
                access_key_id: credentials.access_key_id.clone(),
                next_due,
            },
        );
    }
    let issued = Issued {
        access_key_id: credentials.access_key_id.clone(),
        expires_at: None,
        changed: changed.is_some(),
        notes,
        handled_rotation_request: record
            .rotation_handled
            .clone()
            .or_else(|| step.handled_rotation()),
    };
    Ok((issued, next_due, changed, Some(user.id)))
}

async fn issue_sts_session(
    step: &Step<'_>,
    current: Option<Credentials>,
) -> Result<(Issued, Timestamp, Option<&'static str>)> {
    let CredentialPlan::StsSession {
        role_arn,
        session_name,
        duration: requested,
    } = &step.plan.credential
    else {
        unreachable!("issue_sts_session is only called for STS plans");
    };
    let (duration, note) = effective_duration(*requested, step.aws.role_chaining);
    // A session is reused only if it was issued by this backend for exactly this role,
    // name, lifetime and policy (two accounts can have roles of the same ARN).
    let wanted_for = digest(&format!(
        "{}\n{role_arn}\n{session_name}\n{}\n{}",
        step.plan.backend.id,
        duration.as_secs(),
        step.plan.policy.to_compact_json()
    ));
    let current = current.filter(|_| step.record.issued_for == wanted_for);
    let seed = u64::from_str_radix(&digest(&step.request.uid)[..12], 16).unwrap_or_default();
    let fraction = step.ctx.config.sts_refresh_fraction;
    let refresh = |c: &Credentials| {
        c.expiration
            .map(|exp| refresh_at(exp, duration, fraction, seed))
    };
    let pending = step.pending_rotation();
    let (credentials, changed, record) = match current {
        Some(current)
            if pending.is_none() && refresh(&current).is_some_and(|due| step.now < due) =>
        {
            (current, None, step.record.clone())
        }
        previous => {
            step.check_writable(true).await?;
            let fresh = assume_role(
                &step.aws.sts,
                role_arn,
                session_name,
                &step.plan.policy,
                duration,
            )
            .await?;
            let record = IssueRecord {
                issued_for: wanted_for,
                issued_at: Some(Timestamp::now()),
                rotation_handled: step
                    .request
                    .rotation_request
                    .clone()
                    .or_else(|| step.record.rotation_handled.clone()),
            };
            let reason = match (&previous, pending) {
                (Some(_), None) => "Refreshed",
                (Some(_), Some(_)) => "Rotated",
                (None, _) => "Issued",
            };
            (fresh, Some(reason), record)
        }
    };
    step.write(&credentials, &record).await?;
    let next_due = refresh(&credentials).unwrap_or(step.now);
    let issued = Issued {
        access_key_id: credentials.access_key_id.clone(),
        expires_at: credentials.expiration,
        changed: changed.is_some(),
        notes: note.into_iter().collect(),
        handled_rotation_request: record
            .rotation_handled
            .clone()
            .or_else(|| step.handled_rotation()),
    };
    Ok((issued, next_due, changed))
}

/// A grant's next deadline as a requeue: at least a second, at most the resync period.
pub fn requeue_at(next_due: Timestamp, now: Timestamp, resync: Duration) -> Duration {
    let wait = (next_due.as_second() - now.as_second()).max(1) as u64;
    Duration::from_secs(wait).min(resync)
}
