//! The admin server: `/livez` (alive unless a reconcile has been running longer than the
//! wedge timeout: every call it makes has a shorter timeout, so it is stuck), `/readyz`
//! (ready once the CRDs are served and the first sync of grants and classes is done) and
//! `/metrics` in Prometheus text format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
pub struct Readiness {
    synced: AtomicBool,
    leading: AtomicBool,
    standby: AtomicBool,
    /// Reconciles in flight, by a sequence number, with when each began.
    in_flight: Mutex<HashMap<u64, Instant>>,
    next_reconcile: AtomicU64,
    /// In seconds; 0 means the default.
    wedge_timeout: AtomicU64,
}

/// The default bound past which a running reconcile counts as wedged.
pub const DEFAULT_WEDGE_TIMEOUT: Duration = Duration::from_secs(420);

/// A reconcile in flight; it stops counting when dropped.
pub struct InFlight<'a> {
    readiness: &'a Readiness,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.readiness
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Readiness {
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::SeqCst);
    }

    /// A replica waiting for the Lease is healthy and ready to take over.
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::SeqCst) || self.standby.load(Ordering::SeqCst)
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    pub fn set_wedge_timeout(&self, timeout: Duration) {
        self.wedge_timeout
            .store(timeout.as_secs().max(1), Ordering::SeqCst);
    }

    fn wedge_timeout(&self) -> Duration {
        match self.wedge_timeout.load(Ordering::SeqCst) {
            0 => DEFAULT_WEDGE_TIMEOUT,
            seconds => Duration::from_secs(seconds),
        }
    }

    /// Marks a reconcile as running until the guard is dropped.
    pub fn reconcile_started(&self) -> InFlight<'_> {
        let id = self.next_reconcile.fetch_add(1, Ordering::SeqCst);
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Instant::now());
        InFlight {
            readiness: self,
            id,
        }
    }

    /// How long the oldest reconcile has been running, when that is past the wedge timeout.
    pub fn wedged(&self) -> Option<Duration> {
        let oldest = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Instant::elapsed)
            .max()?;
        (oldest > self.wedge_timeout()).then_some(oldest)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "admin server listening");
    axum::serve(listener, app).await
}

async fn livez(State(state): State<AdminState>) -> impl IntoResponse {
    match state.readiness.wedged() {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(running) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "wedged: a reconcile has been running for {} s, longer than every timeout it has\n",
                running.as_secs()
            ),
        ),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first sync\n",
        )
    }
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_running_past_the_wedge_timeout_means_not_alive() {
        let readiness = Readiness::default();
        readiness.set_wedge_timeout(Duration::from_secs(1));
        assert_eq!(readiness.wedged(), None, "nothing running");
        let running = readiness.reconcile_started();
        assert_eq!(readiness.wedged(), None, "just started");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(readiness.wedged().is_some(), "running for longer than 1 s");
        drop(running);
        assert_eq!(readiness.wedged(), None, "finished");
    }
}
