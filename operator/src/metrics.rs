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

/// What the sidecar injector did with one admission request, and the detail (the mode
/// injected, why it was skipped or refused).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectionLabels {
    pub result: &'static str,
    pub detail: &'static str,
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

/// Why an ADS stream was refused (`xds::identity::Refusal::reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// What a TokenReview answered: `authenticated`, `unauthenticated`, or `error` (no answer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
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
    pub injections: Family<InjectionLabels, Counter>,
    pub admission_duration: Histogram,
    pub leader: Gauge,
    pub xds_connected: Gauge,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_acks: Family<TypeLabel, Counter>,
    pub xds_nacks: Family<TypeLabel, Counter>,
    pub xds_push_latency: Histogram,
    pub xds_refusals: Family<ReasonLabel, Counter>,
    pub xds_token_reviews: Family<OutcomeLabel, Counter>,
    pub xds_token_review_cache_hits: Counter,
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
        let injections = Family::<InjectionLabels, Counter>::default();
        let admission_duration = Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]);
        let leader = Gauge::default();
        let xds_connected = Gauge::default();
        let xds_pushes = Family::<TypeLabel, Counter>::default();
        let xds_acks = Family::<TypeLabel, Counter>::default();
        let xds_nacks = Family::<TypeLabel, Counter>::default();
        let xds_push_latency = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let xds_refusals = Family::<ReasonLabel, Counter>::default();
        let xds_token_reviews = Family::<OutcomeLabel, Counter>::default();
        let xds_token_review_cache_hits = Counter::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register("reconcile_errors", "Reconciliations that failed, by error kind", errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent per reconciliation", duration.clone());
        registry.register(
            "status_writes",
            "Status patches sent (unchanged status is not written)",
            status_writes.clone(),
        );
        registry.register(
            "injections",
            "Pod admissions by the sidecar injector: injected (by mode), skipped, denied (by reason)",
            injections.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time the sidecar injector spent on one admission review",
            admission_duration.clone(),
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
        registry.register(
            "xds_stream_refusals",
            "ADS streams refused for their identity (no or invalid token, another pod's node id), by reason",
            xds_refusals.clone(),
        );
        registry.register(
            "xds_token_reviews",
            "TokenReviews sent to check ADS streams' tokens, by outcome",
            xds_token_reviews.clone(),
        );
        registry.register(
            "xds_token_review_cache_hits",
            "ADS streams whose token a cached TokenReview vouched for (no review sent)",
            xds_token_review_cache_hits.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            status_writes,
            injections,
            admission_duration,
            leader,
            xds_connected,
            xds_pushes,
            xds_acks,
            xds_nacks,
            xds_push_latency,
            xds_refusals,
            xds_token_reviews,
            xds_token_review_cache_hits,
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
