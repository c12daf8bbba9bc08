//! Which grants a class or namespace change wakes. A class change concerns the grants
//! that name it, used it, hold something on it, or would pick it as the default; a
//! namespace label change concerns the grants of that namespace. Nothing else is woken.

use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc::Sender;
use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use super::Context;
use crate::api::{S3Grant, S3GrantClass};

/// The backoff of each watch stream after an error: 0.5 s doubling to at most 8 s, plus up
/// to a quarter of jitter, back to 0.5 s after any event. kube-runtime's default (0.8 s
/// doubling to 30 s, with up to 100 % jitter, client-go's) grows through an API server
/// outage, where the watchers only error: measured here, after a 40 s outage the watches
/// waited 27-49 s more before their next attempt, so a grant created once the API server
/// was back was Ready only 36-47 s later. A few watches reconnecting every 8 s cost an API
/// server nothing.
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(8);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (delay * 2).min(Self::MAX);
        Some(delay.mul_f64(1.0 + rand::random::<f64>() / 4.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The controller's backoff on its merged trigger streams (grants, owned Secrets, woken
/// grants): a short constant pause. Each watch stream already backs off on its own
/// ([`WatchBackoff`]); kube-runtime's default here is a second exponential backoff (to
/// 30 s, plus jitter) that grows on every error of any stream and is reset only by a
/// trigger, so through an API server outage it grew unchecked and then stopped every
/// trigger, wakes included, for 45-53 s at a time (measured after a 40 s outage).
pub struct TriggerBackoff;

impl Iterator for TriggerBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(100))
    }
}

impl kube::runtime::utils::Backoff for TriggerBackoff {
    fn reset(&mut self) {}
}

/// Whether a change of `class` can change what `grant` should hold.
pub fn concerns(class: &S3GrantClass, grant: &S3Grant) -> bool {
    let name = class.name_any();
    let named = grant.spec.class_name.as_deref() == Some(name.as_str());
    let default_pick = grant.spec.class_name.is_none() && class.is_default();
    let status = grant.status.as_ref();
    let used = status.is_some_and(|s| {
        s.class_name.as_deref() == Some(name.as_str())
            || s.held.iter().any(|h| h.class_name == name)
    });
    named || default_pick || used
}

fn wake_all(wake: &mut Sender<ObjectRef<S3Grant>>, grants: impl Iterator<Item = Arc<S3Grant>>) {
    for grant in grants {
        // A full queue means a reconcile of everything is already pending.
        let _ = wake.try_send(ObjectRef::from_obj(grant.as_ref()));
    }
}

/// Drives the class reflector, waking the grants each class change concerns, and tells
/// the class finalizer loop that something changed.
pub async fn classes(
    ctx: Arc<Context>,
    mut events: BoxStream<'static, Result<S3GrantClass, kube::runtime::watcher::Error>>,
    mut wake: Sender<ObjectRef<S3Grant>>,
    mut class_changed: Sender<()>,
) {
    while let Some(event) = events.next().await {
        match event {
            Ok(class) => {
                let concerned = ctx
                    .grants
                    .state()
                    .into_iter()
                    .filter(|g| concerns(&class, g));
                wake_all(&mut wake, concerned);
                let _ = class_changed.try_send(());
            }
            Err(err) => tracing::warn!(error = %err, "class watch"),
        }
    }
}

/// Drives the namespace reflector (label changes only reach here), waking the grants of
/// the namespace whose labels changed.
pub async fn namespaces(
    ctx: Arc<Context>,
    mut events: BoxStream<
        'static,
        Result<PartialObjectMeta<Namespace>, kube::runtime::watcher::Error>,
    >,
    mut wake: Sender<ObjectRef<S3Grant>>,
) {
    while let Some(event) = events.next().await {
        match event {
            Ok(namespace) => {
                let name = namespace.name_any();
                let in_namespace = ctx
                    .grants
                    .state()
                    .into_iter()
                    .filter(|g| g.namespace().as_deref() == Some(name.as_str()));
                wake_all(&mut wake, in_namespace);
            }
            Err(err) => tracing::warn!(error = %err, "namespace watch"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Backend, Held, HeldKind, S3GrantClassSpec, S3GrantSpec, S3GrantStatus};

    fn class(name: &str, default: bool) -> S3GrantClass {
        let mut class = S3GrantClass::new(
            name,
            S3GrantClassSpec {
                backend: Backend::default(),
                namespace_selector: None,
                buckets: vec!["b".into()],
                prefix_template: None,
                allow_whole_bucket: true,
                modes: None,
                max_duration: None,
                allow_iam_users: None,
            },
        );
        if default {
            class.metadata.annotations = Some(
                [(
                    crate::api::DEFAULT_CLASS_ANNOTATION.to_string(),
                    "true".to_string(),
                )]
                .into(),
            );
        }
        class
    }

    fn grant(class_name: Option<&str>, status: Option<S3GrantStatus>) -> S3Grant {
        let spec: S3GrantSpec = serde_yaml::from_str("{bucket: b}").unwrap();
        let mut grant = S3Grant::new(
            "g",
            S3GrantSpec {
                class_name: class_name.map(str::to_string),
                ..spec
            },
        );
        grant.status = status;
        grant
    }

    #[test]
    fn a_watch_backs_off_to_at_most_10_s_and_starts_over_after_an_event() {
        use kube::runtime::utils::Backoff;
        let mut backoff = WatchBackoff::default();
        let delays: Vec<Duration> = backoff.by_ref().take(12).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_millis(625));
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(10)),
            "{delays:?}"
        );
        assert!(delays[11] >= Duration::from_secs(8), "{delays:?}");
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(625));
        assert!(TriggerBackoff
            .take(100)
            .all(|d| d == Duration::from_millis(100)));
    }

    #[test]
    fn a_class_change_wakes_only_the_grants_it_concerns() {
        let a = class("a", false);
        assert!(concerns(&a, &grant(Some("a"), None)), "names it");
        assert!(!concerns(&a, &grant(Some("b"), None)), "names another");
        assert!(!concerns(&a, &grant(None, None)), "a is not the default");
        assert!(
            concerns(&class("a", true), &grant(None, None)),
            "would pick it"
        );
        let used = S3GrantStatus {
            class_name: Some("a".into()),
            ..Default::default()
        };
        assert!(concerns(&a, &grant(None, Some(used))), "used it");
        let holds = S3GrantStatus {
            held: vec![Held {
                kind: HeldKind::IamUser,
                name: "u".into(),
                class_name: "a".into(),
                backend: "x".into(),
                id: None,
                since: None,
            }],
            ..Default::default()
        };
        assert!(
            concerns(&a, &grant(Some("b"), Some(holds))),
            "holds a user there"
        );
    }
}
