//! Leader election on a `coordination.k8s.io/v1` Lease, with a fence.
//!
//! Only a replica's own monotonic clock is ever trusted, never another replica's wall
//! clock, so a skewed clock cannot make a standby take a live Lease:
//!
//! - A **follower** ([`Follower`]) remembers when, on its own monotonic clock, it last
//!   saw the Lease's record change (holder, renewTime, transitions or resourceVersion).
//!   It takes the Lease only once the record has stood still for the holder's
//!   `leaseDurationSeconds`, or at once when nobody holds it. Taking, like renewing, is a
//!   replace under the resourceVersion it read: a 409 means someone else wrote first.
//! - A **leader** counts its Lease valid until `t + lease - margin` ([`Timing`]), where
//!   `t` is the monotonic instant *before* it sent its last successful renewal. A
//!   follower starts counting no earlier than the moment that renewal was written, so the
//!   leader's validity ends at least `margin` before any follower can take over.
//! - The [`Fence`] is that validity, read from the clock at each use. Every AWS call
//!   checks it just before it is sent (`aws::FenceGuard`), so a leader that was paused
//!   past its lease (SIGSTOP, a stalled VM) makes no AWS call when it resumes, even
//!   before it has noticed that it lost. A fence that has closed stays closed: the
//!   replica exits and competes again after a restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::oneshot;

/// The shortest lease accepted: with a one-second margin and renewals every second,
/// shorter leases would leave no room for a single slow renewal.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// How long a release on shutdown may take before the replica exits anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The refusal an AWS call gets while the fence is closed.
#[derive(Debug, thiserror::Error)]
#[error("not the leader (lease lost or not renewed in time)")]
pub struct NotLeader;

/// The periods derived from the lease duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// The lease, in whole seconds (what `leaseDurationSeconds` says), at least [`MIN_LEASE`].
    pub lease: Duration,
    /// How much sooner than a follower could take over the leader stops acting.
    pub margin: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How soon a failed renewal is tried again.
    pub retry: Duration,
    /// How often a follower reads the Lease.
    pub poll: Duration,
}

impl Timing {
    pub fn new(lease: Duration) -> Timing {
        let seconds = lease.as_secs() + u64::from(lease.subsec_nanos() > 0);
        let lease = Duration::from_secs(seconds).max(MIN_LEASE);
        let renew_every = (lease / 3).max(Duration::from_secs(1));
        Timing {
            lease,
            margin: (lease / 5).max(Duration::from_secs(1)),
            renew_every,
            retry: (renew_every / 2).min(Duration::from_secs(1)),
            poll: (lease / 4).min(Duration::from_secs(2)),
        }
    }

    /// Until when a leader whose last successful renewal was sent at `renew_started`
    /// may act.
    pub fn valid_until(&self, renew_started: Instant) -> Instant {
        renew_started + (self.lease - self.margin)
    }

    pub fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease.as_secs()).unwrap_or(i32::MAX)
    }
}

/// What a follower compares between two reads of the Lease: any change means the holder
/// (or someone) is alive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// `None` when the Lease is free (no holder, or an empty one).
    pub holder: Option<String>,
    pub renew_time: Option<jiff::Timestamp>,
    pub transitions: Option<i32>,
    pub resource_version: Option<String>,
    /// The holder's `leaseDurationSeconds`.
    pub lease_seconds: Option<i32>,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions,
            resource_version: lease.metadata.resource_version.clone(),
            lease_seconds: spec.lease_duration_seconds,
        }
    }
}

/// What a follower does after a read of the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowerStep {
    /// Nobody holds it, or its record has not changed for the holder's lease duration.
    Take,
    /// The holder may be alive: read again; it can be taken in this much time at the
    /// earliest, if the record does not change.
    Wait(Duration),
}

/// A replica that does not hold the Lease. It never looks at the Lease's renewTime as a
/// time: only at whether the record changed, on its own monotonic clock.
#[derive(Debug, Default)]
pub struct Follower {
    /// The last record seen and when it was first seen so.
    seen: Option<(Record, Instant)>,
}

impl Follower {
    /// Decides from the record read at `now`. `own_lease` counts when the record does
    /// not say how long its holder's lease is.
    pub fn observe(&mut self, record: Record, now: Instant, own_lease: Duration) -> FollowerStep {
        if record.holder.is_none() {
            self.seen = Some((record, now));
            return FollowerStep::Take;
        }
        let lease = match record.lease_seconds {
            Some(seconds) if seconds > 0 => Duration::from_secs(seconds.unsigned_abs().into()),
            _ => own_lease,
        };
        let since = match &self.seen {
            Some((seen, since)) if *seen == record => *since,
            _ => {
                self.seen = Some((record, now));
                now
            }
        };
        let unchanged_for = now.saturating_duration_since(since);
        if unchanged_for >= lease {
            FollowerStep::Take
        } else {
            FollowerStep::Wait(lease - unchanged_for)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FenceState {
    /// Leader election is off: always open (until shutdown closes it).
    Unfenced,
    /// Not yet leading: closed, and may open once.
    Standby,
    /// Leading: open until this instant.
    Until(Instant),
    /// Lost, released or shut down: closed for good.
    Lost,
}

#[derive(Debug)]
struct FenceInner {
    state: Mutex<FenceState>,
    /// Why it was closed, when someone said.
    reason: Mutex<Option<String>>,
    waker: AtomicWaker,
}

/// Whether this replica may act now. Cheap to clone; every clone is the same fence.
#[derive(Clone, Debug)]
pub struct Fence(Arc<FenceInner>);

impl Fence {
    fn with(state: FenceState) -> Fence {
        Fence(Arc::new(FenceInner {
            state: Mutex::new(state),
            reason: Mutex::new(None),
            waker: AtomicWaker::new(),
        }))
    }

    /// The fence of a replica that does not elect a leader: always open.
    pub fn unfenced() -> Fence {
        Fence::with(FenceState::Unfenced)
    }

    /// The fence of a replica that has not taken the Lease yet: closed.
    pub fn standby() -> Fence {
        Fence::with(FenceState::Standby)
    }

    fn state(&self) -> FenceState {
        *self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True only while this replica's lease is valid by its own monotonic clock (always,
    /// without leader election, until shutdown).
    pub fn is_open(&self) -> bool {
        self.is_open_at(Instant::now())
    }

    pub fn is_open_at(&self, now: Instant) -> bool {
        match self.state() {
            FenceState::Unfenced => true,
            FenceState::Until(deadline) => now < deadline,
            FenceState::Standby | FenceState::Lost => false,
        }
    }

    /// When the fence closes unless renewed (`None` when it is not leading).
    pub fn deadline(&self) -> Option<Instant> {
        match self.state() {
            FenceState::Until(deadline) => Some(deadline),
            _ => None,
        }
    }

    /// Opens the fence until `deadline` (a renewal or the first acquisition). A fence
    /// that has closed, even for an instant, never opens again: returns false then.
    pub fn open_until(&self, deadline: Instant, now: Instant) -> bool {
        let opened = {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            match *state {
                FenceState::Unfenced => return true,
                FenceState::Lost => false,
                FenceState::Standby if now < deadline => {
                    *state = FenceState::Until(deadline);
                    true
                }
                FenceState::Until(current) if now < current => {
                    *state = FenceState::Until(current.max(deadline));
                    true
                }
                FenceState::Standby | FenceState::Until(_) => {
                    *state = FenceState::Lost;
                    false
                }
            }
        };
        self.0.waker.wake();
        opened
    }

    /// Closes the fence for good: no AWS call from now on.
    pub fn close(&self) {
        *self.0.state.lock().unwrap_or_else(PoisonError::into_inner) = FenceState::Lost;
        self.0.waker.wake();
    }

    /// Closes the fence for good, saying why (the first reason given is kept).
    pub fn close_because(&self, reason: impl Into<String>) {
        self.0
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| reason.into());
        self.close();
    }

    /// Why the fence is closed, for the message a replica exits with.
    pub fn why_closed(&self) -> String {
        if let Some(reason) = &*self.0.reason.lock().unwrap_or_else(PoisonError::into_inner) {
            return reason.clone();
        }
        match self.state() {
            FenceState::Until(deadline) => format!(
                "not renewed in time (its validity ended {:?} ago)",
                Instant::now().saturating_duration_since(deadline)
            ),
            FenceState::Lost => "closed".into(),
            FenceState::Standby => "not leading yet".into(),
            FenceState::Unfenced => "open".into(),
        }
    }

    /// Resolves once the fence has closed after being open (the lease lapsed or was lost,
    /// or `close` was called). The clock is read each time this is polled, so it does not
    /// depend on a timer firing in time.
    pub async fn closed(&self) {
        let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| {
            self.0.waker.register(cx.waker());
            match self.state() {
                FenceState::Lost => Poll::Ready(()),
                FenceState::Until(deadline) if Instant::now() >= deadline => Poll::Ready(()),
                FenceState::Until(deadline) => {
                    let at = tokio::time::Instant::from_std(deadline);
                    let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    sleep.as_mut().reset(at);
                    if sleep.as_mut().poll(cx).is_ready() {
                        cx.waker().wake_by_ref();
                    }
                    Poll::Pending
                }
                FenceState::Unfenced | FenceState::Standby => Poll::Pending,
            }
        })
        .await
    }
}

/// One replica's side of the election on one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    fence: Fence,
}

/// The Lease as this replica last wrote it, and when that write was sent.
pub struct Leadership {
    lease: Lease,
    renewed_at: Instant,
}

/// The task that renews a held Lease. [`Keeper::release`] stops it and frees the Lease.
pub struct Keeper {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    /// Stops renewing, closes the fence, then frees the Lease so a standby can take it
    /// at once.
    pub async fn release(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(RELEASE_TIMEOUT + Duration::from_secs(1), self.task).await;
    }
}

enum Renewal {
    /// Renewed by a request sent at this instant.
    Renewed(Instant),
    /// Failed without news of another holder: retry soon.
    Failed(String),
    /// Another holder, or the Lease is gone.
    Lost(String),
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease: Duration,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing: Timing::new(lease),
            fence: Fence::standby(),
        }
    }

    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// A request to the API server, cut off after `budget`.
    async fn bounded<T>(
        budget: Duration,
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(budget, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {budget:?}")),
        }
    }

    /// The spec this replica writes when it takes or renews the Lease.
    fn held_spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let previous = previous.cloned().unwrap_or_default();
        let ours = previous.holder_identity.as_deref() == Some(self.identity.as_str());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_seconds()),
            acquire_time: if ours {
                previous.acquire_time.clone()
            } else {
                Some(now_micro())
            },
            renew_time: Some(now_micro()),
            lease_transitions: if ours {
                previous.lease_transitions
            } else {
                Some(previous.lease_transitions.unwrap_or(0).saturating_add(1))
            },
            ..previous
        }
    }

    /// Waits until this replica holds the Lease (creating it when missing); the fence is
    /// open when this returns.
    pub async fn acquire(&self) -> Leadership {
        let mut follower = Follower::default();
        let mut last_holder: Option<String> = None;
        loop {
            let wait = match Self::bounded(self.timing.lease, self.api.get_opt(&self.name)).await {
                Ok(None) => match self.create().await {
                    Ok(leadership) => return leadership,
                    Err(reason) => {
                        tracing::debug!(%reason, "could not create the Lease");
                        self.timing.retry
                    }
                },
                Ok(Some(lease)) => {
                    let record = Record::of(&lease);
                    if record.holder != last_holder {
                        tracing::info!(
                            holder = record.holder.as_deref().unwrap_or(""),
                            "the Lease's holder"
                        );
                        last_holder = record.holder.clone();
                    }
                    match follower.observe(record, Instant::now(), self.timing.lease) {
                        FollowerStep::Take => match self.take(lease).await {
                            Ok(leadership) => return leadership,
                            Err(reason) => {
                                tracing::debug!(%reason, "could not take the Lease");
                                self.timing.retry
                            }
                        },
                        FollowerStep::Wait(left) => left.min(self.timing.poll),
                    }
                }
                Err(reason) => {
                    tracing::warn!(%reason, lease = %self.name, "cannot read the leader-election Lease");
                    self.timing.retry
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn create(&self) -> Result<Leadership, String> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_transitions: Some(0),
                ..self.held_spec(None)
            }),
        };
        let started = Instant::now();
        let written = Self::bounded(
            self.timing.lease,
            self.api.create(&PostParams::default(), &lease),
        )
        .await?;
        self.opened(written, started)
    }

    async fn take(&self, mut lease: Lease) -> Result<Leadership, String> {
        lease.spec = Some(self.held_spec(lease.spec.as_ref()));
        let started = Instant::now();
        let written = Self::bounded(
            self.timing.lease,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await?;
        self.opened(written, started)
    }

    fn opened(&self, lease: Lease, started: Instant) -> Result<Leadership, String> {
        if self
            .fence
            .open_until(self.timing.valid_until(started), Instant::now())
        {
            Ok(Leadership {
                lease,
                renewed_at: started,
            })
        } else {
            Err("the write took longer than the lease".into())
        }
    }

    /// Renews the Lease in a task of its own until [`Keeper::release`], or until the
    /// fence closes (renewals failed until the deadline, or another replica holds it).
    pub fn keep(&self, leadership: Leadership) -> Keeper {
        let (stop, stopped) = oneshot::channel();
        let elector = self.clone();
        let task = tokio::spawn(async move { elector.renew_until_lost(leadership, stopped).await });
        Keeper { stop, task }
    }

    async fn renew_until_lost(&self, leadership: Leadership, mut stop: oneshot::Receiver<()>) {
        let Leadership {
            mut lease,
            renewed_at,
        } = leadership;
        let mut next = renewed_at + self.timing.renew_every;
        loop {
            let Some(deadline) = self.fence.deadline() else {
                return;
            };
            tokio::select! {
                biased;
                _ = &mut stop => {
                    self.release(lease).await;
                    return;
                }
                () = tokio::time::sleep_until(next.min(deadline).into()) => {}
            }
            if !self.fence.is_open() {
                let reason = self.fence.why_closed();
                self.fence.close_because(reason.clone());
                tracing::error!(lease = %self.name, %reason, "lost the Lease; this replica stops acting");
                return;
            }
            match self.renew(&mut lease).await {
                Renewal::Renewed(sent) => next = sent + self.timing.renew_every,
                Renewal::Failed(reason) => {
                    let left = self
                        .fence
                        .deadline()
                        .map(|d| d.saturating_duration_since(Instant::now()));
                    tracing::warn!(%reason, valid_for = ?left, "could not renew the Lease");
                    next = Instant::now() + self.timing.retry;
                }
                Renewal::Lost(reason) => {
                    self.fence.close_because(reason.clone());
                    tracing::error!(%reason, lease = %self.name, "lost the Lease; this replica stops acting");
                    return;
                }
            }
        }
    }

    async fn renew(&self, lease: &mut Lease) -> Renewal {
        let started = Instant::now();
        let Some(deadline) = self.fence.deadline() else {
            return Renewal::Lost("the fence is closed".into());
        };
        let budget = deadline.saturating_duration_since(started);
        let mut desired = lease.clone();
        desired.spec = Some(self.held_spec(lease.spec.as_ref()));
        match tokio::time::timeout(
            budget,
            self.api
                .replace(&self.name, &PostParams::default(), &desired),
        )
        .await
        {
            Ok(Ok(written)) => {
                if self
                    .fence
                    .open_until(self.timing.valid_until(started), Instant::now())
                {
                    tracing::trace!(valid_for = ?self.timing.lease - self.timing.margin, "renewed the Lease");
                    *lease = written;
                    Renewal::Renewed(started)
                } else {
                    Renewal::Lost("the renewal came back after the lease had lapsed".into())
                }
            }
            Ok(Err(err)) if is_conflict(&err) => {
                // Someone wrote the Lease since our last write: who holds it now?
                match Self::bounded(budget.max(self.timing.retry), self.api.get_opt(&self.name))
                    .await
                {
                    Ok(Some(fresh)) => match Record::of(&fresh).holder {
                        Some(holder) if holder == self.identity => {
                            *lease = fresh;
                            Renewal::Failed(
                                "the Lease was changed by another writer; renewing again".into(),
                            )
                        }
                        holder => Renewal::Lost(format!(
                            "the Lease is held by {}",
                            holder.as_deref().unwrap_or("nobody")
                        )),
                    },
                    Ok(None) => Renewal::Lost("the Lease was deleted".into()),
                    Err(reason) => Renewal::Failed(reason),
                }
            }
            Ok(Err(err)) => Renewal::Failed(err.to_string()),
            Err(_) => Renewal::Failed(format!("no answer within {budget:?}")),
        }
    }

    /// Frees the Lease after closing the fence: an empty holder, which a follower takes
    /// at once.
    async fn release(&self, mut lease: Lease) {
        self.fence.close_because("released on shutdown");
        let mut spec = lease.spec.take().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        lease.spec = Some(spec);
        match Self::bounded(
            RELEASE_TIMEOUT,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the Lease"),
            Err(reason) => {
                tracing::warn!(%reason, "could not release the Lease; a standby takes it when it lapses")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(4);

    fn held_by(holder: &str, version: &str) -> Record {
        Record {
            holder: Some(holder.into()),
            renew_time: Some(jiff::Timestamp::UNIX_EPOCH),
            transitions: Some(1),
            resource_version: Some(version.into()),
            lease_seconds: Some(4),
        }
    }

    #[test]
    fn a_follower_waits_a_full_lease_of_its_own_time_after_the_last_change() {
        let t0 = Instant::now();
        let mut follower = Follower::default();
        assert_eq!(
            follower.observe(held_by("a", "1"), t0, LEASE),
            FollowerStep::Wait(LEASE)
        );
        assert_eq!(
            follower.observe(held_by("a", "1"), t0 + Duration::from_secs(3), LEASE),
            FollowerStep::Wait(Duration::from_secs(1))
        );
        // A renewal (a new resourceVersion) starts the count again.
        let t1 = t0 + Duration::from_millis(3900);
        assert_eq!(
            follower.observe(held_by("a", "2"), t1, LEASE),
            FollowerStep::Wait(LEASE)
        );
        assert_eq!(
            follower.observe(held_by("a", "2"), t1 + Duration::from_millis(3999), LEASE),
            FollowerStep::Wait(Duration::from_millis(1))
        );
        assert_eq!(
            follower.observe(held_by("a", "2"), t1 + LEASE, LEASE),
            FollowerStep::Take
        );
    }

    #[test]
    fn a_follower_ignores_what_the_renew_time_says() {
        // A renewTime far in the past by the follower's wall clock (a skewed clock, or a
        // skewed holder) is no reason to take the Lease: only an unchanged record is.
        let t0 = Instant::now();
        let mut follower = Follower::default();
        let mut stale = held_by("a", "7");
        stale.renew_time = Some(jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(
            follower.observe(stale.clone(), t0, LEASE),
            FollowerStep::Wait(LEASE)
        );
        let mut future = stale.clone();
        future.renew_time = Some(jiff::Timestamp::MAX);
        assert_eq!(
            follower.observe(future.clone(), t0 + Duration::from_secs(2), LEASE),
            FollowerStep::Wait(LEASE),
            "any change, even to a time in the future, is a sign of life"
        );
        assert_eq!(
            follower.observe(future, t0 + Duration::from_secs(6), LEASE),
            FollowerStep::Take
        );
    }

    #[test]
    fn any_change_of_holder_transitions_or_version_is_a_sign_of_life() {
        let t0 = Instant::now();
        let base = held_by("a", "1");
        let changes = [
            Record {
                holder: Some("b".into()),
                ..base.clone()
            },
            Record {
                transitions: Some(2),
                ..base.clone()
            },
            Record {
                resource_version: Some("9".into()),
                ..base.clone()
            },
            Record {
                renew_time: Some(jiff::Timestamp::from_second(1).unwrap()),
                ..base.clone()
            },
        ];
        for changed in changes {
            let mut follower = Follower::default();
            follower.observe(base.clone(), t0, LEASE);
            let later = t0 + Duration::from_secs(10);
            assert_eq!(
                follower.observe(changed.clone(), later, LEASE),
                FollowerStep::Wait(LEASE),
                "{changed:?}"
            );
        }
    }

    #[test]
    fn a_free_lease_is_taken_at_once() {
        let mut follower = Follower::default();
        let free = Record {
            holder: None,
            ..held_by("a", "3")
        };
        assert_eq!(
            follower.observe(free, Instant::now(), LEASE),
            FollowerStep::Take
        );
        let empty = Record::of(&Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(empty.holder, None);
    }

    #[test]
    fn the_holders_lease_duration_counts_not_the_followers() {
        let t0 = Instant::now();
        let mut follower = Follower::default();
        let long = Record {
            lease_seconds: Some(15),
            ..held_by("a", "1")
        };
        follower.observe(long.clone(), t0, LEASE);
        assert_eq!(
            follower.observe(long.clone(), t0 + Duration::from_secs(5), LEASE),
            FollowerStep::Wait(Duration::from_secs(10))
        );
        let unsaid = Record {
            lease_seconds: None,
            ..held_by("a", "2")
        };
        follower.observe(unsaid.clone(), t0, LEASE);
        assert_eq!(
            follower.observe(unsaid, t0 + LEASE, LEASE),
            FollowerStep::Take
        );
    }

    #[test]
    fn timing_keeps_a_margin_and_renews_several_times_per_lease() {
        let four = Timing::new(Duration::from_secs(4));
        assert_eq!(four.margin, Duration::from_secs(1));
        assert_eq!(
            four.renew_every,
            Duration::from_millis(1333) + Duration::from_nanos(333_333)
        );
        let fifteen = Timing::new(Duration::from_secs(15));
        assert_eq!(fifteen.margin, Duration::from_secs(3));
        assert_eq!(fifteen.renew_every, Duration::from_secs(5));
        assert_eq!(fifteen.poll, Duration::from_secs(2));
        assert_eq!(fifteen.lease_seconds(), 15);
        // Too short a lease is raised; fractions round up to what the Lease can say.
        assert_eq!(Timing::new(Duration::from_secs(1)).lease, MIN_LEASE);
        assert_eq!(Timing::new(Duration::from_millis(4500)).lease_seconds(), 5);
        for seconds in [3, 4, 10, 15, 60, 137] {
            let timing = Timing::new(Duration::from_secs(seconds));
            assert!(timing.margin >= Duration::from_secs(1));
            assert!(timing.margin * 5 >= timing.lease);
            assert!(
                timing.renew_every * 2 <= timing.lease - timing.margin,
                "{seconds}s: at least two renewals before the fence closes"
            );
        }
    }

    #[test]
    fn the_fence_closes_before_any_follower_can_take_over() {
        // The leader's last successful renewal was sent at `sent`; the follower first saw
        // the record it wrote at `seen` >= `sent` (it cannot see a write before it is
        // sent). The follower takes at `seen + lease` at the earliest.
        let timing = Timing::new(LEASE);
        let sent = Instant::now();
        for delay_ms in [0, 1, 500, 3000] {
            let seen = sent + Duration::from_millis(delay_ms);
            let mut follower = Follower::default();
            follower.observe(held_by("a", "5"), seen, LEASE);
            let mut earliest_take = seen;
            while follower.observe(held_by("a", "5"), earliest_take, LEASE) != FollowerStep::Take {
                earliest_take += Duration::from_millis(10);
            }
            let closes = timing.valid_until(sent);
            assert!(
                closes + timing.margin <= earliest_take,
                "the fence closes a margin before a takeover"
            );
        }
    }

    #[test]
    fn fence_validity_counts_from_when_the_renewal_was_sent() {
        let timing = Timing::new(LEASE);
        let fence = Fence::standby();
        let t0 = Instant::now();
        assert!(!fence.is_open_at(t0), "a standby may not act");
        // A take sent at t0 that took 2.5 s to answer is valid until t0 + 3 s, not later.
        assert!(fence.open_until(timing.valid_until(t0), t0 + Duration::from_millis(2500)));
        assert!(fence.is_open_at(t0 + Duration::from_millis(2999)));
        assert!(!fence.is_open_at(t0 + Duration::from_secs(3)));
        // A renewal sent at t0 + 1 s extends it to t0 + 4 s.
        let t1 = t0 + Duration::from_secs(1);
        assert!(fence.open_until(timing.valid_until(t1), t1 + Duration::from_millis(10)));
        assert_eq!(fence.deadline(), Some(t0 + Duration::from_secs(4)));
        // An older renewal answered late never shortens nor wrongly extends it.
        assert!(fence.open_until(timing.valid_until(t0), t1 + Duration::from_millis(20)));
        assert_eq!(fence.deadline(), Some(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_fence_that_lapsed_never_opens_again() {
        let timing = Timing::new(LEASE);
        let fence = Fence::standby();
        let t0 = Instant::now();
        assert!(fence.open_until(timing.valid_until(t0), t0));
        // Paused past the deadline; a renewal sent before the pause answers afterwards.
        let resumed = t0 + Duration::from_secs(10);
        assert!(!fence.is_open_at(resumed));
        assert!(!fence.open_until(timing.valid_until(t0 + Duration::from_secs(9)), resumed));
        assert!(
            !fence.is_open_at(t0 + Duration::from_secs(9)),
            "lost for good"
        );
        assert_eq!(fence.deadline(), None);
        // A take whose answer came after its own deadline does not open a standby fence.
        let late = Fence::standby();
        assert!(!late.open_until(timing.valid_until(t0), t0 + Duration::from_secs(5)));
        assert!(!late.is_open_at(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn a_closed_fence_says_why() {
        let fence = Fence::standby();
        let now = Instant::now();
        assert!(fence.open_until(now + Duration::from_millis(1), now));
        std::thread::sleep(Duration::from_millis(2));
        assert!(fence.why_closed().starts_with("not renewed in time"));
        fence.close_because("the Lease is held by b");
        fence.close_because("released on shutdown");
        assert_eq!(fence.why_closed(), "the Lease is held by b");
    }

    #[test]
    fn an_unfenced_replica_is_open_until_shutdown() {
        let fence = Fence::unfenced();
        let clone = fence.clone();
        assert!(clone.is_open());
        assert!(fence.open_until(Instant::now(), Instant::now()));
        assert!(clone.is_open());
        fence.close();
        assert!(!clone.is_open(), "clones share one state");
    }

    #[tokio::test]
    async fn closed_resolves_when_the_deadline_passes_or_on_close() {
        let fence = Fence::standby();
        let now = Instant::now();
        assert!(fence.open_until(now + Duration::from_millis(200), now));
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), fence.closed())
            .await
            .expect("closed at its deadline");
        assert!(started.elapsed() >= Duration::from_millis(150));

        let fence = Fence::standby();
        let now = Instant::now();
        assert!(fence.open_until(now + Duration::from_secs(60), now));
        let closer = fence.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            closer.close();
        });
        tokio::time::timeout(Duration::from_secs(5), fence.closed())
            .await
            .expect("closed when closed");

        let standby = Fence::standby();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), standby.closed())
                .await
                .is_err(),
            "a standby's fence is not a lost one"
        );
    }
}
