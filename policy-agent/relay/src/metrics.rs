//! The relay's Prometheus metrics, served on `/metrics`.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{error::Error, relay::BatchReport};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub published: Counter,
    pub failed_attempts: Counter,
    pub dead_lettered: Counter,
    pub batch_duration: Histogram,
    pub errors: Family<ReasonLabel, Counter>,
    /// Age of the oldest pending row, in seconds, as last measured.
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub pending: Gauge,
    /// 1 while this replica holds the relay's lease.
    pub active: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("breakwater_relay");
        let published = Counter::default();
        let failed_attempts = Counter::default();
        let dead_lettered = Counter::default();
        let batch_duration = Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]);
        let errors = Family::<ReasonLabel, Counter>::default();
        let lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let pending = Gauge::default();
        let active = Gauge::default();
        registry.register(
            "published",
            "Rows the sink acknowledged and the relay removed or marked",
            published.clone(),
        );
        registry.register(
            "failed_attempts",
            "Publish attempts the sink refused or did not answer",
            failed_attempts.clone(),
        );
        registry.register(
            "dead_lettered",
            "Rows moved to the dead-letter table after maxAttempts",
            dead_lettered.clone(),
        );
        registry.register(
            "batch_duration_seconds",
            "Time of one committed batch: read, publish, remove",
            batch_duration.clone(),
        );
        registry.register("errors", "Batches not committed, by reason", errors.clone());
        registry.register("lag_seconds", "Age of the oldest pending row", lag_seconds.clone());
        registry.register("pending", "Rows waiting to be published", pending.clone());
        registry.register("active", "1 while this replica holds the relay lease", active.clone());
        Metrics {
            registry,
            published,
            failed_attempts,
            dead_lettered,
            batch_duration,
            errors,
            lag_seconds,
            pending,
            active,
        }
    }
}

impl Metrics {
    pub fn record(&self, report: &BatchReport, elapsed: Duration) {
        self.published.inc_by(report.published as u64);
        self.failed_attempts.inc_by(report.failed as u64);
        self.dead_lettered.inc_by(report.parked as u64);
        self.batch_duration.observe(elapsed.as_secs_f64());
    }

    pub fn report_error(&self, error: &Error) {
        self.errors.get_or_create(&ReasonLabel { reason: error.reason() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
