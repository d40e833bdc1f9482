//! The agent's Prometheus metrics. Per-rule counters are resolved once, when a
//! configuration is compiled, and kept with the rule: a decision increments atomics and
//! never looks up a label set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    rule: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleOutcomeLabels {
    rule: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    breaker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerResultLabels {
    breaker: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallKindLabels {
    call: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    lease: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseOpLabels {
    lease: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseKindLabels {
    lease: String,
    kind: &'static str,
}

/// The outcomes of one rule's decisions.
#[derive(Clone, Debug, Default)]
pub struct RuleCounters {
    /// Admitted by the store.
    pub ok: Counter,
    /// Rejected by the store.
    pub over_limit: Counter,
    /// Rejected by the over-limit cache, without asking the store.
    pub over_limit_cached: Counter,
    /// A shadow rule that would have rejected (the request was admitted).
    pub shadow_over_limit: Counter,
    /// The store did not answer in time or failed: admitted (failureMode Open).
    pub failure_open: Counter,
    /// The store did not answer in time or failed: rejected (failureMode Closed).
    pub failure_closed: Counter,
    /// Quota batches reserved (batch script calls that granted hits or refused).
    pub batches: Counter,
    /// Hits Redis granted to this agent's batches.
    pub batch_reserved: Counter,
    /// Hits admitted from batches (the reserving request's own included).
    pub batch_served: Counter,
    /// Unused batch hits given back to Redis.
    pub batch_returned: Counter,
    /// Unused batch hits that could not be given back: counted in Redis, never admitted.
    pub batch_stranded: Counter,
}

/// One breaker's metrics, resolved when its rule is put in force.
#[derive(Clone, Debug, Default)]
pub struct BreakerCounters {
    /// The state this agent answers from: 0 CLOSED, 1 OPEN, 2 HALF_OPEN.
    pub state: Gauge,
    /// Calls admitted, and rejected (OPEN, or HALF_OPEN without a probe for this call).
    pub admitted: Counter,
    pub rejected: Counter,
    /// Probes asked of the store (HALF_OPEN, or OPEN once its duration has passed).
    pub probes: Counter,
    /// Calls answered by the policy's fallback while Redis was away for longer than the hold.
    pub fallback: Counter,
    /// Outcomes the store did not take (dropped, not retried).
    pub dropped: Counter,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    quota_batches: Family<RuleLabels, Counter>,
    quota_batch_hits: Family<RuleOutcomeLabels, Counter>,
    unknown: Family<ReasonLabels, Counter>,
    store_errors: Family<KindLabels, Counter>,
    pub requests: Counter,
    pub request_duration: Histogram,
    config_reloads: Family<ReasonLabels, Counter>,
    config_rules: Gauge,
    pub store_up: Gauge,
    lease_leader: Family<LeaseLabels, Gauge>,
    lease_grants: Family<LeaseLabels, Counter>,
    lease_busy: Family<LeaseLabels, Counter>,
    lease_not_holder: Family<LeaseOpLabels, Counter>,
    lease_store_errors: Family<LeaseKindLabels, Counter>,
    breaker_decisions: Family<BreakerResultLabels, Counter>,
    breaker_state: Family<BreakerLabels, Gauge>,
    breaker_dropped: Family<BreakerLabels, Counter>,
    breaker_store_errors: Family<CallKindLabels, Counter>,
    access_log_entries: Family<ResultLabels, Counter>,
    /// 1 while every breaker answers by its fallback (Redis away for longer than the hold).
    pub breaker_fallback: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("breakwater_agent");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "rate_limit_decisions",
            "Descriptor decisions by rule and result (ok, over_limit, over_limit_cached, shadow_over_limit, failure_open, failure_closed)",
            decisions.clone(),
        );
        let quota_batches = Family::<RuleLabels, Counter>::default();
        registry.register(
            "quota_batches",
            "Quota batches reserved from the counter store, by rule (batch script calls)",
            quota_batches.clone(),
        );
        let quota_batch_hits = Family::<RuleOutcomeLabels, Counter>::default();
        registry.register(
            "quota_batch_hits",
            "Quota-batch hits by rule and outcome (reserved: granted by Redis, served: admitted from a batch, returned: given back, stranded: unused and not given back)",
            quota_batch_hits.clone(),
        );
        let unknown = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rate_limit_unknown_descriptors",
            "Descriptors admitted because no rule matched them (reason: no_limit_key, unknown_rule, unknown_breaker, other_domain)",
            unknown.clone(),
        );
        let store_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Counter-store calls that failed (kind: timeout, transient, permanent)",
            store_errors.clone(),
        );
        let requests = Counter::default();
        registry.register("rate_limit_requests", "ShouldRateLimit calls answered", requests.clone());
        let request_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "rate_limit_request_duration_seconds",
            "Time to answer one ShouldRateLimit call",
            request_duration.clone(),
        );
        let config_reloads = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configurations received (reason: applied, rejected)",
            config_reloads.clone(),
        );
        let config_rules = Gauge::default();
        registry.register("config_rules", "Rate-limit rules in force", config_rules.clone());
        let store_up = Gauge::default();
        registry.register("store_up", "1 while the counter store answers its health probe", store_up.clone());
        let lease_leader = Family::<LeaseLabels, Gauge>::default();
        registry.register(
            "lease_leader",
            "1 while this agent's pod leads the lease (leader election, --leader), else 0",
            lease_leader.clone(),
        );
        let lease_grants = Family::<LeaseLabels, Counter>::default();
        registry.register("lease_grants", "Leases granted, by lease id", lease_grants.clone());
        let lease_busy = Family::<LeaseLabels, Counter>::default();
        registry.register(
            "lease_busy",
            "Acquisitions refused because the lease was still fully held when the wait ended, by lease id",
            lease_busy.clone(),
        );
        let lease_not_holder = Family::<LeaseOpLabels, Counter>::default();
        registry.register(
            "lease_not_holder",
            "Renewals and releases refused because the caller no longer held the grant (op: renew, release)",
            lease_not_holder.clone(),
        );
        let lease_store_errors = Family::<LeaseKindLabels, Counter>::default();
        registry.register(
            "lease_store_errors",
            "Lease calls the store failed, by lease id (kind: transient, permanent)",
            lease_store_errors.clone(),
        );
        let breaker_decisions = Family::<BreakerResultLabels, Counter>::default();
        registry.register(
            "breaker_decisions",
            "Breaker decisions by breaker id and result (admitted, rejected, probe: asked the store for a probe, fallback: answered by the fallback)",
            breaker_decisions.clone(),
        );
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "The state this agent answers a breaker from: 0 CLOSED, 1 OPEN, 2 HALF_OPEN",
            breaker_state.clone(),
        );
        let breaker_dropped = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "breaker_dropped_outcomes",
            "Call outcomes the store did not take (Redis away or slow), by breaker id",
            breaker_dropped.clone(),
        );
        let breaker_store_errors = Family::<CallKindLabels, Counter>::default();
        registry.register(
            "breaker_store_errors",
            "Breaker calls to the store that failed (call: report, probe, read; kind: timeout, transient, permanent)",
            breaker_store_errors.clone(),
        );
        let access_log_entries = Family::<ResultLabels, Counter>::default();
        registry.register(
            "access_log_entries",
            "Access-log entries received (result: counted, ignored: refused by Envoy itself, unknown_route: no breaker of that route)",
            access_log_entries.clone(),
        );
        let breaker_fallback = Gauge::default();
        registry.register(
            "breaker_fallback",
            "1 while every breaker answers by its fallback because Redis has been away for longer than the hold",
            breaker_fallback.clone(),
        );
        Metrics {
            registry,
            breaker_decisions,
            breaker_state,
            breaker_dropped,
            breaker_store_errors,
            access_log_entries,
            breaker_fallback,
            decisions,
            quota_batches,
            quota_batch_hits,
            unknown,
            store_errors,
            requests,
            request_duration,
            config_reloads,
            config_rules,
            store_up,
            lease_leader,
            lease_grants,
            lease_busy,
            lease_not_holder,
            lease_store_errors,
        }
    }
}

impl Metrics {
    pub fn rule_counters(&self, rule: &str) -> RuleCounters {
        let get =
            |result| self.decisions.get_or_create(&DecisionLabels { rule: rule.to_string(), result }).clone();
        RuleCounters {
            ok: get("ok"),
            over_limit: get("over_limit"),
            over_limit_cached: get("over_limit_cached"),
            shadow_over_limit: get("shadow_over_limit"),
            failure_open: get("failure_open"),
            failure_closed: get("failure_closed"),
            batches: self.quota_batches.get_or_create(&RuleLabels { rule: rule.to_string() }).clone(),
            batch_reserved: self.quota_batch_hit_counter(rule, "reserved"),
            batch_served: self.quota_batch_hit_counter(rule, "served"),
            batch_returned: self.quota_batch_hit_counter(rule, "returned"),
            batch_stranded: self.quota_batch_hit_counter(rule, "stranded"),
        }
    }

    fn quota_batch_hit_counter(&self, rule: &str, outcome: &'static str) -> Counter {
        self.quota_batch_hits.get_or_create(&RuleOutcomeLabels { rule: rule.to_string(), outcome }).clone()
    }

    pub fn unknown_descriptor(&self, reason: &'static str) {
        self.unknown.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn unknown_descriptors(&self, reason: &'static str) -> u64 {
        self.unknown.get_or_create(&ReasonLabels { reason }).get()
    }

    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn store_errors(&self, kind: &'static str) -> u64 {
        self.store_errors.get_or_create(&KindLabels { kind }).get()
    }

    pub fn config_applied(&self, rules: usize) {
        self.config_reloads.get_or_create(&ReasonLabels { reason: "applied" }).inc();
        self.config_rules.set(i64::try_from(rules).unwrap_or(i64::MAX));
    }

    pub fn config_rejected(&self) {
        self.config_reloads.get_or_create(&ReasonLabels { reason: "rejected" }).inc();
    }

    /// The leader gauge of one lease (the name pods ask for).
    pub fn lease_leader(&self, lease: &str) -> Gauge {
        self.lease_leader.get_or_create(&LeaseLabels { lease: lease.to_string() }).clone()
    }

    pub fn lease_granted(&self, lease: &str) {
        self.lease_grants.get_or_create(&LeaseLabels { lease: lease.into() }).inc();
    }

    pub fn lease_grants(&self, lease: &str) -> u64 {
        self.lease_grants.get_or_create(&LeaseLabels { lease: lease.into() }).get()
    }

    pub fn lease_was_busy(&self, lease: &str) {
        self.lease_busy.get_or_create(&LeaseLabels { lease: lease.into() }).inc();
    }

    pub fn lease_busy(&self, lease: &str) -> u64 {
        self.lease_busy.get_or_create(&LeaseLabels { lease: lease.into() }).get()
    }

    /// `op`: `renew` or `release`.
    pub fn lease_refused(&self, lease: &str, op: &'static str) {
        self.lease_not_holder.get_or_create(&LeaseOpLabels { lease: lease.into(), op }).inc();
    }

    pub fn lease_not_holder(&self, lease: &str, op: &'static str) -> u64 {
        self.lease_not_holder.get_or_create(&LeaseOpLabels { lease: lease.into(), op }).get()
    }

    /// `kind`: `transient` or `permanent` ([`crate::store::ErrorKind::label`]).
    pub fn lease_store_error(&self, lease: &str, kind: &'static str) {
        self.lease_store_errors.get_or_create(&LeaseKindLabels { lease: lease.into(), kind }).inc();
    }

    pub fn lease_store_errors(&self, lease: &str, kind: &'static str) -> u64 {
        self.lease_store_errors.get_or_create(&LeaseKindLabels { lease: lease.into(), kind }).get()
    }

    pub fn breaker_counters(&self, breaker: &str) -> BreakerCounters {
        let get = |result| {
            self.breaker_decisions
                .get_or_create(&BreakerResultLabels { breaker: breaker.to_string(), result })
                .clone()
        };
        let labels = BreakerLabels { breaker: breaker.to_string() };
        BreakerCounters {
            state: self.breaker_state.get_or_create(&labels).clone(),
            admitted: get("admitted"),
            rejected: get("rejected"),
            probes: get("probe"),
            fallback: get("fallback"),
            dropped: self.breaker_dropped.get_or_create(&labels).clone(),
        }
    }

    /// Drops a removed breaker's series, so a scrape does not show a state nobody keeps.
    pub fn forget_breaker(&self, breaker: &str) {
        let labels = BreakerLabels { breaker: breaker.to_string() };
        self.breaker_state.remove(&labels);
    }

    /// `call`: report, probe, read; `kind`: timeout, transient, permanent.
    pub fn breaker_store_error(&self, call: &'static str, kind: &'static str) {
        self.breaker_store_errors.get_or_create(&CallKindLabels { call, kind }).inc();
    }

    pub fn breaker_store_errors(&self, call: &'static str, kind: &'static str) -> u64 {
        self.breaker_store_errors.get_or_create(&CallKindLabels { call, kind }).get()
    }

    pub fn access_log_entries(&self, counted: u64, ignored: u64, unknown: u64) {
        for (result, n) in [("counted", counted), ("ignored", ignored), ("unknown_route", unknown)] {
            if n > 0 {
                self.access_log_entries.get_or_create(&ResultLabels { result }).inc_by(n);
            }
        }
    }

    pub fn access_log_entry_count(&self, result: &'static str) -> u64 {
        self.access_log_entries.get_or_create(&ResultLabels { result }).get()
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
