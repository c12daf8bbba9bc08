//! Prometheus metrics. Every label is bounded: error categories and AWS operation names
//! are fixed sets; grant labels exist only for the per-grant expiry gauge.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use jiff::Timestamp;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AwsCallLabels {
    service: String,
    operation: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    namespace: String,
    grant: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<CategoryLabels, Counter>,
    reconcile_duration: Histogram,
    aws_calls: Family<AwsCallLabels, Counter>,
    seconds_until_expiry: Family<GrantLabels, Gauge>,
    swept_users: Counter,
    sweeps: Counter,
    expirations: Mutex<HashMap<GrantLabels, Timestamp>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("s3grant");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<CategoryLabels, Counter>::default();
        let reconcile_duration =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let aws_calls = Family::<AwsCallLabels, Counter>::default();
        let seconds_until_expiry = Family::<GrantLabels, Gauge>::default();
        let swept_users = Counter::default();
        let sweeps = Counter::default();
        registry.register("reconciles", "Reconciles of S3Grants", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            reconcile_duration.clone(),
        );
        registry.register(
            "aws_calls",
            "AWS API calls by service, operation and outcome",
            aws_calls.clone(),
        );
        registry.register(
            "credentials_expiry_seconds",
            "Seconds until the STS credentials in each grant's Secret expire",
            seconds_until_expiry.clone(),
        );
        registry.register(
            "swept_users",
            "IAM users deleted by the sweep because their grant was gone",
            swept_users.clone(),
        );
        registry.register(
            "sweeps",
            "Sweeps for IAM users whose grant is gone, completed",
            sweeps.clone(),
        );
        Metrics {
            registry,
            swept_users,
            sweeps,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            aws_calls,
            seconds_until_expiry,
            expirations: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(error) = error {
            self.reconcile_errors
                .get_or_create(&CategoryLabels {
                    category: error.category().into(),
                })
                .inc();
        }
    }

    pub fn swept(&self) {
        self.swept_users.inc();
    }

    pub fn sweep_done(&self) {
        self.sweeps.inc();
    }

    pub fn aws_call(&self, service: &str, operation: &str, outcome: &'static str) {
        self.aws_calls
            .get_or_create(&AwsCallLabels {
                service: service.into(),
                operation: operation.into(),
                outcome,
            })
            .inc();
    }

    /// Total AWS calls so far, for tests and benchmarks.
    pub fn aws_calls_total(&self) -> u64 {
        let text = self.render();
        text.lines()
            .filter(|l| l.starts_with("s3grant_aws_calls_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn set_expiry(&self, namespace: &str, grant: &str, expiration: Option<Timestamp>) {
        let labels = GrantLabels {
            namespace: namespace.into(),
            grant: grant.into(),
        };
        let mut expirations = self
            .expirations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match expiration {
            Some(at) => {
                expirations.insert(labels, at);
            }
            None => {
                expirations.remove(&labels);
                self.seconds_until_expiry.remove(&labels);
            }
        }
    }

    pub fn forget(&self, namespace: &str, grant: &str) {
        self.set_expiry(namespace, grant, None);
    }

    /// The metrics in Prometheus text format, with expiry gauges computed now.
    pub fn render(&self) -> String {
        let now = Timestamp::now();
        for (labels, at) in self
            .expirations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            self.seconds_until_expiry
                .get_or_create(labels)
                .set(at.as_second() - now.as_second());
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Counts every AWS call made through a client it is attached to.
#[derive(Debug)]
pub struct AwsCallCounter(pub std::sync::Arc<Metrics>);

impl Intercept for AwsCallCounter {
    fn name(&self) -> &'static str {
        "s3grant-aws-call-counter"
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_string(), m.name().to_string()))
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        let outcome = match context.response().map(|r| r.status().as_u16()) {
            Some(200..=299) => "ok",
            Some(429) => "throttled",
            Some(400..=499) => "client_error",
            Some(_) => "server_error",
            None => "transport_error",
        };
        self.0.aws_call(&service, &operation, outcome);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_gauge_counts_down_and_is_forgotten() {
        let metrics = Metrics::default();
        let in_an_hour = Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(3600))
            .unwrap();
        metrics.set_expiry("tenant-a", "reports", Some(in_an_hour));
        let text = metrics.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("s3grant_credentials_expiry_seconds{"))
            .unwrap();
        let seconds: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&seconds), "{line}");
        metrics.forget("tenant-a", "reports");
        assert!(!metrics.render().contains("grant=\"reports\""));
    }

    #[test]
    fn errors_are_counted_by_bounded_category() {
        let metrics = Metrics::default();
        metrics.reconciled(
            Duration::from_millis(5),
            Some(&Error::InvalidSpec("x".into())),
        );
        metrics.aws_call("IAM", "GetUser", "ok");
        metrics.aws_call("IAM", "GetUser", "ok");
        let text = metrics.render();
        assert!(
            text.contains("s3grant_reconcile_errors_total{category=\"InvalidSpec\"} 1"),
            "{text}"
        );
        assert_eq!(metrics.aws_calls_total(), 2);
    }
}
