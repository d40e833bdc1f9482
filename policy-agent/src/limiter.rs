//! The decision: a `RateLimitRequest` in, a `RateLimitResponse` out.
//!
//! Each descriptor whose first entry is `(LIMIT_KEY, rule id)` names one counter: the rule
//! id plus the remaining entries. Its hits go to the store (or are refused from the
//! over-limit cache), all descriptors of a request concurrently, each call bounded by the
//! deadline. A request is OVER_LIMIT when any non-shadow rule rejects it; shadow rules are
//! counted and never reject; descriptors that name no known rule are admitted and counted.
//! When the store fails or misses the deadline, the rule's failure mode answers.
//!
//! Hits are applied to each counter on its own (the counters of one request may live on
//! different Redis Cluster nodes), so a request rejected by one rule still consumes from
//! the rules that admitted it — as in envoyproxy/ratelimit. That can only under-admit.
//!
//! With quota batches on ([`crate::batch`]), a single-hit descriptor is admitted from the
//! batch this agent holds for its counter when it has one, and otherwise reserves the next
//! batch (one reservation per counter in flight; requests arriving meanwhile wait for it,
//! within the same deadline) or takes the per-request script (cold counters, counters near
//! their limit, several hits).

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_api::agent::{BREAKER_HEADER, BREAKER_KEY, DOMAIN, LIMIT_KEY};
use breakwater_api::rate_limit::FailureMode;
use breakwater_store::key::escape_into;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;

use crate::algorithm::Verdict;
use crate::batch::{BatchSettings, Batches, Leftover, Plan, Ticket};
use crate::breaker::{Board, Decision};
use crate::cache::OverLimitCache;
use crate::config::{CompiledRule, RuleHolder};
use crate::metrics::Metrics;
use crate::store::{CounterStore, StoreError};

#[derive(Debug, Clone)]
pub struct LimiterSettings {
    /// The longest a decision waits for the store before answering by the failure mode.
    pub deadline: Duration,
    /// Prefix of every counter key, inside its hash tag (several agents' configurations, or
    /// tests, can share one Redis).
    pub key_prefix: String,
    /// How many over-limit counters to remember (0 disables the cache).
    pub cache_capacity: usize,
    /// Quota batches (`--quota-batch`, `--quota-horizon`); [`BatchSettings::off`] keeps
    /// every decision on the per-request script.
    pub batch: BatchSettings,
}

impl Default for LimiterSettings {
    fn default() -> Self {
        LimiterSettings {
            deadline: Duration::from_millis(5),
            key_prefix: "bw".into(),
            cache_capacity: 65_536,
            batch: BatchSettings::default(),
        }
    }
}

/// How long a call made in the background may take: a give-back (the sweep, shutdown), whose
/// unanswered hits stay stranded, or a batch reserved ahead, whose waiters (if the batch in
/// hand runs out first) answer by their own deadline.
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(1);

/// Why a request gets a gRPC error instead of a decision. Envoy then applies its own
/// `failure_mode_deny`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Decline {
    #[error("the rate-limit domain must not be empty")]
    EmptyDomain,
    #[error("no rate-limit configuration has been received yet")]
    NoConfiguration,
}

/// Why the agent is not ready, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("no configuration yet")]
    NoConfiguration,
    #[error("the counter store is unreachable and some rules fail closed")]
    StoreDown,
}

#[derive(Debug)]
pub struct Limiter<S> {
    /// Shared with the background tasks that reserve batches ahead.
    store: Arc<S>,
    rules: Arc<RuleHolder>,
    cache: OverLimitCache,
    metrics: Arc<Metrics>,
    settings: LimiterSettings,
    /// The breakers, when this agent runs them: descriptors whose first entry is
    /// `BREAKER_KEY` are theirs.
    breakers: Option<Arc<Board>>,
    /// The quota batches in hand, when batches are on.
    batches: Option<Arc<Batches>>,
}

/// How a counter's hit went to the store.
enum Counted {
    Verdict(Verdict),
    /// The store failed or missed the deadline (label for `store_errors`, if a call of this
    /// request's own failed).
    Failed(StoreError, &'static str),
    /// The reservation this request waited for failed: answered by the failure mode, no
    /// call of its own.
    FlightFailed,
}

/// What happened to one descriptor.
enum Outcome {
    Unknown,
    Breaker(Decision),
    Decided { rule: Arc<CompiledRule>, verdict: Verdict, cached: bool },
    Failed { rule: Arc<CompiledRule> },
}

impl<S: CounterStore> Limiter<S> {
    pub fn new(store: S, rules: Arc<RuleHolder>, metrics: Arc<Metrics>, settings: LimiterSettings) -> Self {
        Limiter {
            cache: OverLimitCache::new(settings.cache_capacity),
            batches: settings.batch.enabled().then(|| Arc::new(Batches::new(settings.batch))),
            store: Arc::new(store),
            rules,
            metrics,
            settings,
            breakers: None,
        }
    }

    /// The quota batches, when they are on.
    pub fn batches(&self) -> Option<&Batches> {
        self.batches.as_deref()
    }

    /// Ends batches whose life is over, gives their unused hits back where the algorithm
    /// allows and counts the rest as stranded, and forgets idle counters. `run` calls it
    /// every horizon.
    pub async fn sweep(&self) {
        if let Some(batches) = &self.batches {
            self.give_back(batches.take_leftovers(Instant::now())).await;
        }
    }

    /// Gives every batch in hand back (shutdown: no decision will use them).
    pub async fn give_back_all(&self) {
        if let Some(batches) = &self.batches {
            self.give_back(batches.take_all()).await;
        }
    }

    async fn give_back(&self, leftovers: Vec<Leftover>) {
        let one = |leftover: Leftover| async move {
            let counters = &leftover.rule.counters;
            let back = if leftover.returnable {
                let call = self.store.give_back(&leftover.key, &leftover.limit, leftover.mark, leftover.hits);
                match tokio::time::timeout(BACKGROUND_DEADLINE, call).await {
                    Ok(Ok(back)) => back.min(leftover.hits),
                    Ok(Err(error)) => {
                        tracing::debug!(rule = %leftover.rule.rule.id, %error, "give-back failed; hits stranded");
                        0
                    }
                    Err(_) => 0,
                }
            } else {
                0
            };
            counters.batch_returned.inc_by(u64::from(back));
            counters.batch_stranded.inc_by(u64::from(leftover.hits - back));
        };
        futures::future::join_all(leftovers.into_iter().map(one)).await;
    }

    /// Also answers breaker descriptors, from `board`.
    pub fn with_breakers(mut self, board: Arc<Board>) -> Self {
        self.breakers = Some(board);
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn rules(&self) -> &Arc<RuleHolder> {
        &self.rules
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Forgets cached rejections; called on every configuration change.
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    pub fn readiness(&self) -> Result<(), NotReady> {
        let rules = self.rules.load().ok_or(NotReady::NoConfiguration)?;
        if rules.all_fail_open || self.store.is_up() { Ok(()) } else { Err(NotReady::StoreDown) }
    }

    pub async fn should_rate_limit(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Decline> {
        let started = Instant::now();
        if request.domain.is_empty() {
            return Err(Decline::EmptyDomain);
        }
        let rules = self.rules.load().ok_or(Decline::NoConfiguration)?;
        let default_hits = request.hits_addend.max(1);
        let outcomes: Vec<Outcome> = if request.domain != DOMAIN {
            for _ in &request.descriptors {
                self.metrics.unknown_descriptor("other_domain");
            }
            request.descriptors.iter().map(|_| Outcome::Unknown).collect()
        } else if request.descriptors.len() == 1 {
            vec![self.decide(&rules, &request.descriptors[0], default_hits).await]
        } else {
            futures::future::join_all(
                request.descriptors.iter().map(|d| self.decide(&rules, d, default_hits)),
            )
            .await
        };
        let response = respond(&outcomes);
        self.metrics.requests.inc();
        self.metrics.request_duration.observe(started.elapsed().as_secs_f64());
        Ok(response)
    }

    async fn decide(
        &self,
        rules: &crate::config::RuleSet,
        descriptor: &RateLimitDescriptor,
        default_hits: u32,
    ) -> Outcome {
        let Some((first, parts)) = descriptor.entries.split_first() else {
            self.metrics.unknown_descriptor("no_limit_key");
            return Outcome::Unknown;
        };
        if first.key == BREAKER_KEY
            && let Some(board) = &self.breakers
        {
            return match board.decide(&first.value).await {
                Decision::Unknown => {
                    self.metrics.unknown_descriptor("unknown_breaker");
                    Outcome::Unknown
                }
                decision => Outcome::Breaker(decision),
            };
        }
        if first.key != LIMIT_KEY {
            self.metrics.unknown_descriptor("no_limit_key");
            return Outcome::Unknown;
        }
        let Some(rule) = rules.rules.get(&first.value) else {
            self.metrics.unknown_descriptor("unknown_rule");
            return Outcome::Unknown;
        };
        let hits = match (&descriptor.hits_addend, descriptor.is_negative_hits) {
            // Returning budget is not supported: such a descriptor only reads its counter.
            (_, true) => 0,
            (Some(h), false) => u32::try_from(h.value).unwrap_or(u32::MAX),
            (None, false) => default_hits,
        };
        let key = counter_key(&self.settings.key_prefix, rule, parts);
        let generation = rules.generation;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.settings.deadline);
        let batches = self.batches.as_ref().filter(|_| hits == 1);
        let mut counted = false;
        let result = loop {
            let plan = match batches {
                Some(batches) => batches.plan(&key, rule, Instant::now(), counted),
                None => Plan::Single,
            };
            counted = true;
            if let Plan::Served(verdict, ahead) = plan {
                if let Some(ticket) = ahead {
                    self.reserve_ahead(ticket);
                }
                return Outcome::Decided { rule: rule.clone(), verdict, cached: false };
            }
            let now = Instant::now();
            if hits > 0
                && let Some(hit) = self.cache.get(&key, now, generation)
            {
                // A flight claimed by this request is released (and its waiters woken) as
                // the plan is dropped here.
                let verdict = Verdict {
                    admitted: false,
                    remaining: 0,
                    reset: hit.reset_at.saturating_duration_since(now),
                    retry_after: hit.until.saturating_duration_since(now),
                };
                return Outcome::Decided { rule: rule.clone(), verdict, cached: true };
            }
            match plan {
                Plan::Served(..) | Plan::Single => {
                    // Boxed: the store's future is large, and the decision's own future is
                    // moved whole into the gRPC task; keeping it small saves a memmove per
                    // request.
                    let hit = Box::pin(self.store.hit(&key, &rule.limit, hits));
                    let result = self.within(deadline, hit).await;
                    if let (Some(batches), Counted::Verdict(verdict)) = (batches, &result) {
                        batches.observe(&key, verdict.remaining);
                    }
                    break result;
                }
                Plan::Reserve(ticket) => {
                    let horizon = self.settings.batch.horizon;
                    let sent = Instant::now();
                    let reserve = Box::pin(self.store.reserve(&key, &ticket.limit, ticket.want, horizon));
                    match tokio::time::timeout_at(deadline, reserve).await {
                        Ok(Ok(reservation)) => break Counted::Verdict(ticket.complete(sent, &reservation)),
                        // The ticket, dropped unfinished, fails the flight for its waiters.
                        Ok(Err(error)) => {
                            let label = error.kind().label();
                            break Counted::Failed(error, label);
                        }
                        Err(_) => break self.timed_out(),
                    }
                }
                Plan::Wait(wait) => {
                    let Some(batches) = batches else { break Counted::FlightFailed };
                    match tokio::time::timeout_at(deadline, wait.wait(batches, &key)).await {
                        Ok(false) => continue,
                        Ok(true) | Err(_) => break Counted::FlightFailed,
                    }
                }
            }
        };
        match result {
            Counted::Verdict(verdict) => {
                if !verdict.admitted {
                    self.cache.insert(&key, started, verdict.retry_after, verdict.reset, generation);
                }
                Outcome::Decided { rule: rule.clone(), verdict, cached: false }
            }
            Counted::Failed(error, label) => {
                self.metrics.store_error(label);
                tracing::debug!(rule = %rule.rule.id, %error, "store failed; answering by failure mode");
                Outcome::Failed { rule: rule.clone() }
            }
            Counted::FlightFailed => Outcome::Failed { rule: rule.clone() },
        }
    }

    /// Reserves the next batch in a task of its own while the batch in hand still serves
    /// (the request that found it half used is answered at once); a failure leaves its
    /// waiters, if any, to the failure mode.
    fn reserve_ahead(&self, ticket: Ticket) {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let horizon = self.settings.batch.horizon;
        tokio::spawn(async move {
            let sent = Instant::now();
            let reserve = store.reserve(ticket.key(), &ticket.limit, ticket.want, horizon);
            match tokio::time::timeout(BACKGROUND_DEADLINE, reserve).await {
                Ok(Ok(reservation)) => {
                    ticket.complete(sent, &reservation);
                }
                Ok(Err(error)) => {
                    metrics.store_error(error.kind().label());
                    tracing::debug!(%error, "reserving a batch ahead failed");
                }
                Err(_) => metrics.store_error("timeout"),
            }
        });
    }

    /// A per-request store call bounded by the decision's deadline.
    async fn within(
        &self,
        deadline: tokio::time::Instant,
        call: impl Future<Output = Result<Verdict, StoreError>>,
    ) -> Counted {
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(verdict)) => Counted::Verdict(verdict),
            Ok(Err(error)) => {
                let label = error.kind().label();
                Counted::Failed(error, label)
            }
            Err(_) => self.timed_out(),
        }
    }

    fn timed_out(&self) -> Counted {
        Counted::Failed(
            StoreError::Timeout { call: "the decision", deadline: self.settings.deadline },
            "timeout",
        )
    }
}

/// `{<prefix>:<algorithm>:<rule id>:<key>=<value>:...}` — the whole name is the hash tag, so
/// a counter is one key in one Cluster slot. `%`, `:`, `=`, `{` and `}` in ids, keys and
/// values are percent-escaped, so distinct descriptors never share a counter.
pub fn counter_key(
    prefix: &str,
    rule: &CompiledRule,
    parts: &[envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry],
) -> String {
    let mut key = String::with_capacity(
        8 + prefix.len()
            + rule.rule.id.len()
            + parts.iter().map(|p| p.key.len() + p.value.len() + 2).sum::<usize>(),
    );
    key.push('{');
    escape_into(&mut key, prefix);
    key.push(':');
    key.push_str(rule.limit.tag());
    key.push(':');
    escape_into(&mut key, &rule.rule.id);
    for part in parts {
        key.push(':');
        escape_into(&mut key, &part.key);
        key.push('=');
        escape_into(&mut key, &part.value);
    }
    key.push('}');
    key
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: d.subsec_nanos() as i32 }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn current_limit(rule: &CompiledRule) -> RateLimit {
    let unit = match rule.rule.period_ms {
        1_000 => Unit::Second,
        60_000 => Unit::Minute,
        3_600_000 => Unit::Hour,
        86_400_000 => Unit::Day,
        _ => Unit::Unknown,
    };
    RateLimit {
        name: rule.rule.id.clone(),
        requests_per_unit: u32::try_from(rule.limit.quota()).unwrap_or(u32::MAX),
        unit: unit as i32,
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue { key: key.into(), value, raw_value: Vec::new() }
}

fn respond(outcomes: &[Outcome]) -> RateLimitResponse {
    let mut over = false;
    let mut failed_closed = false;
    // The descriptor whose numbers go into the X-RateLimit headers: the rejecting one that
    // frees up last, else the one with the least left.
    let mut binding: Option<(&CompiledRule, &Verdict)> = None;
    let mut statuses = Vec::with_capacity(outcomes.len());
    // Envoy adds these to its 503: which policy's breaker refused the call.
    let mut breaker_headers = Vec::new();
    for outcome in outcomes {
        let status = match outcome {
            Outcome::Unknown | Outcome::Breaker(Decision::Unknown | Decision::Admit(_)) => {
                DescriptorStatus { code: Code::Ok as i32, ..Default::default() }
            }
            Outcome::Breaker(Decision::Reject(breaker)) => {
                over = true;
                breaker_headers.push(header(BREAKER_HEADER, breaker.rule.policy.clone()));
                DescriptorStatus { code: Code::OverLimit as i32, ..Default::default() }
            }
            Outcome::Decided { rule, verdict, cached } => {
                let shadow = rule.rule.shadow;
                let code = match (verdict.admitted, shadow) {
                    (true, _) => {
                        rule.counters.ok.inc();
                        Code::Ok
                    }
                    (false, true) => {
                        rule.counters.shadow_over_limit.inc();
                        Code::Ok
                    }
                    (false, false) => {
                        if *cached {
                            rule.counters.over_limit_cached.inc();
                        } else {
                            rule.counters.over_limit.inc();
                        }
                        over = true;
                        Code::OverLimit
                    }
                };
                if !shadow {
                    let better = match binding {
                        None => true,
                        Some((_, b)) => match (verdict.admitted, b.admitted) {
                            (false, true) => true,
                            (false, false) => verdict.retry_after > b.retry_after,
                            (true, false) => false,
                            (true, true) => verdict.remaining < b.remaining,
                        },
                    };
                    if better {
                        binding = Some((rule, verdict));
                    }
                }
                DescriptorStatus {
                    code: code as i32,
                    current_limit: Some(current_limit(rule)),
                    limit_remaining: u32::try_from(verdict.remaining).unwrap_or(u32::MAX),
                    duration_until_reset: Some(pb_duration(verdict.reset)),
                    quota: None,
                }
            }
            Outcome::Failed { rule } => {
                let code = match (rule.rule.failure_mode, rule.rule.shadow) {
                    (FailureMode::Closed, false) => {
                        rule.counters.failure_closed.inc();
                        over = true;
                        failed_closed = true;
                        Code::OverLimit
                    }
                    (FailureMode::Closed, true) => {
                        rule.counters.failure_closed.inc();
                        Code::Ok
                    }
                    (FailureMode::Open, _) => {
                        rule.counters.failure_open.inc();
                        Code::Ok
                    }
                };
                DescriptorStatus {
                    code: code as i32,
                    current_limit: Some(current_limit(rule)),
                    ..Default::default()
                }
            }
        };
        statuses.push(status);
    }
    let mut headers = Vec::new();
    if let Some((rule, verdict)) = binding {
        let quota = rule.limit.quota();
        let window = ceil_secs(Duration::from_millis(rule.rule.period_ms)).max(1);
        headers.push(header("x-ratelimit-limit", format!("{quota}, {quota};w={window}")));
        headers.push(header("x-ratelimit-remaining", verdict.remaining.to_string()));
        headers.push(header("x-ratelimit-reset", ceil_secs(verdict.reset).to_string()));
        if !verdict.admitted {
            headers.push(header("retry-after", ceil_secs(verdict.retry_after).max(1).to_string()));
        }
    }
    headers.append(&mut breaker_headers);
    if over && failed_closed && !headers.iter().any(|h| h.key == "retry-after") {
        headers.push(header("retry-after", "1".into()));
    }
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add: headers,
        ..Default::default()
    }
}
