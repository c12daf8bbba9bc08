//! The controller. Each grant runs one pipeline ([`reconcile`]): resolve class → check
//! guardrails → plan → record in the ledger → ensure AWS ([`issue`]) → write the Secret
//! ([`write`]) → release what is no longer wanted ([`release`]) → write status once →
//! requeue at the next deadline. Deleting a grant revokes everything it holds; classes
//! are deleted like grants ([`classes`]); [`sweep`] removes IAM users whose grant is
//! gone; [`watches`] decides which grants a class or namespace change wakes.

mod backends;
mod classes;
mod issue;
mod reconcile;
mod release;
mod sweep;
mod watches;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::OnceCell;

use crate::api::{BackendRecord, S3Grant, S3GrantClass, CLASS_FINALIZER, MANAGED_BY_LABEL};
use crate::aws::{clients_for, load_base_config, AwsClients};
use crate::cli::RunConfig;
use crate::error::{Error, Result};
use crate::leader::Fence;
use crate::metrics::Metrics;

pub use reconcile::{error_policy, reconcile};

/// How long AWS clients (and the credentials Secret they were built from) are reused.
const CLIENT_CACHE_TTL: Duration = Duration::from_secs(60);

pub struct Context {
    pub client: Client,
    pub config: RunConfig,
    pub aws_base: aws_config::SdkConfig,
    pub classes: Store<S3GrantClass>,
    pub grants: Store<S3Grant>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Open while this replica may act (leader election); every AWS call checks it.
    pub fence: Fence,
    /// Per-backend slots and circuit breakers: see [`backends`].
    pub backends: backends::Backends,
    /// Liveness: counts reconciles in flight, so /livez sees a wedged controller.
    pub health: Arc<crate::admin::Readiness>,
    /// Tagged on IAM users; the sweep only ever deletes users carrying it.
    pub cluster_id: Option<String>,
    /// The finalizer this operator puts on classes its grants hold something on.
    pub class_finalizer: String,
    default_chain_is_role: OnceCell<bool>,
    clients: Mutex<HashMap<String, (Instant, AwsClients)>>,
    /// IAM-user grants whose AWS side was checked, by uid: see [`issue::Verified`].
    verified: Mutex<HashMap<String, issue::Verified>>,
    /// Consecutive failed reconciles per grant uid, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The resourceVersion of the last status this operator wrote, per grant uid: a
    /// reconcile that sees an older object reads the grant again (the cache can lag
    /// behind our own writes, and the ledger must never be read stale).
    written: Mutex<HashMap<String, u64>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Context {
    pub fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    pub fn grants_in(&self, namespace: &str) -> Api<S3Grant> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// IAM and STS clients for a backend, reused for a minute.
    pub async fn aws_for(&self, backend: &BackendRecord, class_name: &str) -> Result<AwsClients> {
        if let Some((built, clients)) = locked(&self.clients).get(&backend.id) {
            if built.elapsed() < CLIENT_CACHE_TTL {
                return Ok(clients.clone());
            }
        }
        let client = self.client.clone();
        let clients = clients_for(
            &self.aws_base,
            backend,
            class_name,
            |ns| Api::namespaced(client.clone(), ns),
            self.metrics.clone(),
            &self.default_chain_is_role,
            &self.fence,
        )
        .await?;
        locked(&self.clients).insert(backend.id.clone(), (Instant::now(), clients.clone()));
        Ok(clients)
    }

    /// The labels of a namespace, from the namespace cache (read from the API server
    /// when the cache has not seen it yet).
    pub async fn namespace_labels(&self, namespace: &str) -> Result<BTreeMap<String, String>> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(namespace)) {
            return Ok(ns.metadata.labels.clone().unwrap_or_default());
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = api
            .get_metadata(namespace)
            .await
            .map_err(Error::kube("read the grant's namespace"))?;
        Ok(ns.metadata.labels.unwrap_or_default())
    }

    /// Whether this replica may still write: a leader whose lease may have lapsed (its
    /// fence closed) writes nothing to Kubernetes either, so a replica resuming from a
    /// pause cannot overwrite what the new leader wrote.
    pub fn acting(&self) -> Result<()> {
        if self.fence.is_open() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// A slot on a backend for this reconcile's AWS calls there (see [`backends`]).
    pub fn enter_backend(
        &self,
        backend: &BackendRecord,
        class_name: &str,
    ) -> Result<backends::Slot> {
        let share = usize::from(self.config.concurrency);
        self.backends
            .enter(&backend.id, &format!("class {class_name}"), share)
    }

    /// Counts a failed attempt and gives the delay before the next, with jitter.
    pub fn back_off(&self, uid: &str, error: &Error) -> Duration {
        let attempt = {
            let mut failures = locked(&self.failures);
            let count = failures.entry(uid.to_string()).or_default();
            *count = count.saturating_add(1);
            *count
        };
        let delay = error.retry_delay(attempt);
        delay.mul_f64(rand::random_range(0.8..=1.0))
    }

    pub fn succeeded(&self, uid: &str) {
        locked(&self.failures).remove(uid);
    }

    fn forget(&self, uid: &str) {
        locked(&self.failures).remove(uid);
        locked(&self.verified).remove(uid);
        locked(&self.written).remove(uid);
    }
}

/// The finalizer of this operator's shard: one for an operator of all namespaces, one per
/// namespace for operators that each watch one (`--watch-namespace`), so that a class
/// stays until every shard's grants let go of it.
pub fn class_finalizer(watch_namespace: Option<&str>) -> String {
    match watch_namespace {
        None => CLASS_FINALIZER.to_string(),
        Some(ns) if ns.len() <= 56 => format!("{CLASS_FINALIZER}-{ns}"),
        Some(ns) => format!("{CLASS_FINALIZER}-{}", &crate::naming::digest(ns)[..16]),
    }
}

/// The classes whose backend did not answer an STS GetCallerIdentity with any HTTP
/// response (an error response counts: RGW answers 405, which still proves it is there).
/// A class that cannot even be configured is reported on its grants instead.
async fn unanswered_backends(ctx: &Context) -> Vec<String> {
    use aws_smithy_runtime_api::client::result::SdkError;
    let probes = ctx
        .classes
        .state()
        .into_iter()
        .filter(|class| class.metadata.deletion_timestamp.is_none())
        .map(|class| async move {
            let name = class.name_any();
            let backend = crate::backend::record_of(&class.spec.backend);
            let aws = match ctx.aws_for(&backend, &name).await {
                Ok(aws) => aws,
                Err(err) => {
                    tracing::warn!(class = %name, error = %err, "class cannot be used");
                    return None;
                }
            };
            let probe = tokio::time::timeout(
                Duration::from_secs(10),
                aws.sts.get_caller_identity().send(),
            )
            .await;
            match probe {
                Ok(Ok(_)) | Ok(Err(SdkError::ServiceError(_))) => None,
                _ => Some(name),
            }
        });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// This cluster's identity: the flag, else the uid of the kube-system namespace.
async fn cluster_identity(client: &Client, config: &RunConfig) -> Option<String> {
    if let Some(id) = &config.cluster_id {
        return Some(id.clone());
    }
    let api: Api<Namespace> = Api::all(client.clone());
    match api.get_metadata_opt("kube-system").await {
        Ok(Some(ns)) => ns.metadata.uid,
        Ok(None) | Err(_) => {
            tracing::warn!("no --cluster-id and no kube-system namespace to take one from: IAM users are not tagged with a cluster, and the sweep of orphaned users is off");
            None
        }
    }
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(
    client: Client,
    config: RunConfig,
    metrics: Arc<Metrics>,
    ready: Arc<crate::admin::Readiness>,
    fence: Fence,
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
    let cluster_id = cluster_identity(&client, &config).await;
    ready.set_wedge_timeout(config.wedge_timeout);

    // Grants that a class or namespace change concerns are woken through this channel.
    let (wake, woken) = futures::channel::mpsc::channel::<ObjectRef<S3Grant>>(1024);

    let (grant_store, grant_writer) = reflector::store();
    let (class_store, class_writer) = reflector::store();
    let (namespace_store, namespace_writer) = reflector::store();

    let reporter = Reporter {
        controller: "s3grant".into(),
        instance: config.identity.clone(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        class_finalizer: class_finalizer(config.watch_namespace.as_deref()),
        config: config.clone(),
        aws_base,
        classes: class_store.clone(),
        grants: grant_store.clone(),
        namespaces: namespace_store.clone(),
        metrics: metrics.clone(),
        health: ready.clone(),
        backends: backends::Backends::default(),
        fence,
        cluster_id,
        default_chain_is_role: OnceCell::new(),
        clients: Mutex::default(),
        verified: Mutex::default(),
        failures: Mutex::default(),
        written: Mutex::default(),
    });

    let (class_events, class_events_rx) = futures::channel::mpsc::channel::<()>(16);
    tokio::spawn(watches::classes(
        ctx.clone(),
        reflector::reflector(class_writer, watcher(classes, watcher::Config::default()))
            .backoff(watches::WatchBackoff::default())
            .touched_objects()
            .boxed(),
        wake.clone(),
        class_events,
    ));
    class_store.wait_until_ready().await?;

    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let namespace_config = match &config.watch_namespace {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    tokio::spawn(watches::namespaces(
        ctx.clone(),
        reflector::reflector(namespace_writer, watcher(namespaces, namespace_config))
            .backoff(watches::WatchBackoff::default())
            .applied_objects()
            .predicate_filter(predicates::labels, Default::default())
            .boxed(),
        wake.clone(),
    ));

    let owned_secrets = watcher(
        secret_metadata,
        watcher::Config::default()
            .labels(&format!("{}={}", MANAGED_BY_LABEL.0, MANAGED_BY_LABEL.1)),
    )
    .backoff(watches::WatchBackoff::default())
    .touched_objects();
    // Status writes do not change generation, annotations or finalizers, so they do not wake us.
    let spec_changes = predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers);
    let grant_stream =
        reflector::reflector(grant_writer, watcher(grants, watcher::Config::default()))
            .backoff(watches::WatchBackoff::default())
            .touched_objects()
            .predicate_filter(spec_changes, Default::default());
    let controller = Controller::for_stream(grant_stream, grant_store.clone())
        // Twice the per-backend share: a backend that stalls holds at most half the slots.
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(config.concurrency.saturating_mul(2)),
        )
        .owns_stream(owned_secrets)
        .reconcile_on(woken)
        .trigger_backoff(watches::TriggerBackoff)
        .shutdown_on_signal();

    tokio::spawn(classes::run(ctx.clone(), class_events_rx, wake.clone()));
    tokio::spawn(sweep::run(ctx.clone()));

    let probe_ctx = ctx.clone();
    tokio::spawn(async move {
        // The store's readiness wakes only one waiter (the controller also waits on it),
        // so poll it again every second rather than wait once.
        while tokio::time::timeout(Duration::from_secs(1), grant_store.wait_until_ready())
            .await
            .is_err()
        {}
        tracing::debug!("first sync of grants done; probing backends");
        // Ready once the first sync is done and every class's backend was probed once. A
        // backend that does not answer is reported, not waited for: one dead backend must
        // not take the operator out of service for every other backend's grants.
        let silent = unanswered_backends(&probe_ctx).await;
        if !silent.is_empty() {
            tracing::warn!(classes = ?silent, "backends not answering; their grants will retry with backoff");
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
