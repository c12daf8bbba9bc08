//! Isolation between backends, so that one slow or dead backend cannot starve the
//! others: each backend may occupy at most half the controller's slots at once, and a
//! backend that stopped answering (a timeout, a connection that failed) is not called
//! again until a cooldown has passed (a circuit breaker, doubling while it stays silent).
//! Grants of a busy or silent backend are requeued instead of holding a slot, so the
//! due STS re-mints of every other backend keep their deadlines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::locked;
use crate::error::{Error, Result};

const FIRST_COOLDOWN: Duration = Duration::from_secs(10);
const MAX_COOLDOWN: Duration = Duration::from_secs(120);

/// Whether a backend may be called, decided without IO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Breaker {
    silent_since: Option<Instant>,
    cooldown: Duration,
    closed_until: Option<Instant>,
}

impl Breaker {
    /// `Some(until)` while calls to the backend are held back.
    pub fn held_back(&self, now: Instant) -> Option<Instant> {
        self.closed_until.filter(|until| now < *until)
    }

    /// The backend did not answer: hold calls back, longer each time it stays silent.
    pub fn silent(&mut self, now: Instant) {
        self.cooldown = if self.silent_since.is_some() {
            (self.cooldown * 2).min(MAX_COOLDOWN)
        } else {
            FIRST_COOLDOWN
        };
        self.silent_since.get_or_insert(now);
        self.closed_until = Some(now + self.cooldown);
    }

    /// The backend answered (even with an error): calls flow again.
    pub fn answered(&mut self) {
        *self = Breaker::default();
    }
}

#[derive(Default)]
pub struct Backends {
    breakers: Mutex<HashMap<String, Breaker>>,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A slot on one backend, held for a reconcile's AWS calls there.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Backends {
    /// A slot on `backend`, or an error that requeues the grant soon: the backend is at
    /// its share of the controller's slots, or is held back after not answering.
    pub fn enter(&self, backend: &str, label: &str, share: usize) -> Result<Slot> {
        let now = Instant::now();
        if let Some(until) = locked(&self.breakers)
            .get(backend)
            .and_then(|b| b.held_back(now))
        {
            return Err(Error::BackendUnavailable(format!(
                "the backend of {label} did not answer; not calling it for another {} s",
                until.duration_since(now).as_secs().max(1)
            )));
        }
        let semaphore = locked(&self.slots)
            .entry(backend.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(share.max(1))))
            .clone();
        semaphore
            .try_acquire_owned()
            .map(Slot)
            .map_err(|_| Error::BackendBusy(label.to_string()))
    }

    /// Records how a call to `backend` ended.
    pub fn record(&self, backend: &str, outcome: Option<&Error>) {
        let mut breakers = locked(&self.breakers);
        let breaker = breakers.entry(backend.to_string()).or_default();
        match outcome {
            Some(error) if error.is_unanswered() => {
                breaker.silent(Instant::now());
                tracing::warn!(backend, cooldown = ?breaker.cooldown, "backend did not answer; holding calls back");
            }
            _ => breaker.answered(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_backend_is_held_back_longer_each_time_until_it_answers() {
        let t0 = Instant::now();
        let mut breaker = Breaker::default();
        assert_eq!(breaker.held_back(t0), None);
        breaker.silent(t0);
        assert_eq!(breaker.held_back(t0), Some(t0 + FIRST_COOLDOWN));
        assert_eq!(
            breaker.held_back(t0 + FIRST_COOLDOWN),
            None,
            "half open: one try"
        );
        let t1 = t0 + FIRST_COOLDOWN;
        breaker.silent(t1);
        assert_eq!(breaker.held_back(t1), Some(t1 + FIRST_COOLDOWN * 2));
        for _ in 0..10 {
            breaker.silent(t1);
        }
        assert_eq!(breaker.held_back(t1), Some(t1 + MAX_COOLDOWN), "capped");
        breaker.answered();
        assert_eq!(breaker.held_back(t1), None);
    }

    #[test]
    fn a_backend_gets_at_most_its_share_of_slots() {
        let backends = Backends::default();
        let first = backends.enter("a", "class a", 2).unwrap();
        let _second = backends.enter("a", "class a", 2).unwrap();
        let third = backends.enter("a", "class a", 2);
        assert!(matches!(third, Err(Error::BackendBusy(_))));
        assert!(
            backends.enter("b", "class b", 2).is_ok(),
            "another backend is not affected"
        );
        drop(first);
        assert!(
            backends.enter("a", "class a", 2).is_ok(),
            "a slot came back"
        );
    }

    #[test]
    fn a_backend_that_did_not_answer_is_not_entered_until_its_cooldown_passed() {
        let backends = Backends::default();
        let timeout = Error::Aws {
            operation: "sts:AssumeRole",
            code: Some(crate::aws::NO_ANSWER.into()),
            message: "timed out".into(),
            transient: true,
        };
        backends.record("a", Some(&timeout));
        assert!(matches!(
            backends.enter("a", "class a", 2),
            Err(Error::BackendUnavailable(_))
        ));
        assert!(backends.enter("b", "class b", 2).is_ok());
        backends.record("a", None);
        assert!(backends.enter("a", "class a", 2).is_ok());
    }
}
