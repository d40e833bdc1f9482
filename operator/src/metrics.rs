//! Prometheus metrics of the controllers, served on `/metrics`.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub error: &'static str,
}

/// An xDS resource type, by the last segment of its type URL (`Cluster`, `Listener`…).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub type_: String,
}

impl TypeLabel {
    pub fn of(type_url: &str) -> Self {
        Self { type_: type_url.rsplit('.').next().unwrap_or(type_url).to_string() }
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub status_writes: Family<KindLabel, Counter>,
    pub leader: Gauge,
    pub xds_connected: Gauge,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_acks: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_push_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("breakwater");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
        });
        let status_writes = Family::<KindLabel, Counter>::default();
        let leader = Gauge::default();
        let xds_connected = Gauge::default();
        let xds_pushes = Family::<TypeLabel, Counter>::default();
        let xds_acks = Family::<TypeLabel, Counter>::default();
        let xds_nacks = Family::<TypeLabel, Counter>::default();
        let xds_push_latency = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciliations that failed, by error kind", errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent per reconciliation", duration.clone());
        registry.register(
            "status_writes",
            "Status patches sent (unchanged status is not written)",
            status_writes.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        registry.register("xds_connected_proxies", "ADS streams open on this replica", xds_connected.clone());
        registry.register("xds_pushes", "Discovery responses sent, by type", xds_pushes.clone());
        registry.register("xds_acks", "Discovery responses acknowledged, by type", xds_acks.clone());
        registry.register("xds_nacks", "Discovery responses rejected, by type", xds_nacks.clone());
        registry.register(
            "xds_push_latency_seconds",
            "Time from sending a discovery response to its acknowledgement",
            xds_push_latency.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            status_writes,
            leader,
            xds_connected,
            xds_pushes,
            xds_acks,
            xds_nacks,
            xds_push_latency,
        }
    }
}

impl Metrics {
    pub fn observe(&self, kind: &'static str, elapsed: Duration) {
        self.reconciles.get_or_create(&KindLabel { kind }).inc();
        self.duration.get_or_create(&KindLabel { kind }).observe(elapsed.as_secs_f64());
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
