//! The rules this agent enforces, and where they come from.
//!
//! [`RuleSet`] is the validated form of the operator's [`AgentConfig`]: rules by id, each
//! with its [`Limit`] and its metric handles already resolved, so a decision does one hash
//! lookup and no allocation to find its rule. [`RuleHolder`] publishes the current set
//! through an `ArcSwapOption`: a decision loads it without a lock, a new configuration
//! replaces it in one atomic store, and decisions in flight finish on the set they began
//! with.
//!
//! The same configuration declares the leases this pod may take ([`LeaseRule`]s): they are
//! validated with the rules (a bad lease refuses the whole configuration, like a bad rate
//! limit) and handed to the lease manager on every swap.
//!
//! [`apply`] compiles a configuration and swaps it in; where configurations come from is
//! [`crate::source`].

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use breakwater_api::agent::{AgentConfig, BreakerRule, LeaseRule, RateLimitRule};
use breakwater_api::rate_limit::FailureMode;

use crate::algorithm::Limit;
use crate::breaker::{self, CompiledBreaker};
use crate::metrics::{Metrics, RuleCounters};
use crate::{Error, Result};

/// One rule, ready to enforce.
#[derive(Debug)]
pub struct CompiledRule {
    pub rule: RateLimitRule,
    pub limit: Limit,
    pub counters: RuleCounters,
}

/// A validated configuration.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: HashMap<String, Arc<CompiledRule>>,
    /// True when no rule fails closed: then the agent is useful (it admits) even without
    /// Redis, and readiness does not wait for it.
    pub all_fail_open: bool,
    /// The leases this pod may take, validated, in the configuration's order (by id).
    pub leases: Vec<LeaseRule>,
    /// The breakers of every Service that has one, validated (the board keeps their state).
    pub breakers: Vec<CompiledBreaker>,
    /// Set by [`RuleHolder::store`]: distinct for every rule set published.
    pub generation: u64,
}

/// The longest lease TTL the agent accepts (the CRD allows 1 h): keeps every expiry a
/// small number of microseconds and a stuck holder's lease bounded.
pub const MAX_LEASE_TTL_MS: u64 = 24 * 3600 * 1000;

/// Checks the leases of one configuration (a refusal is [`Error::InvalidLease`]; the
/// previous configuration stays in force): ids and names present and unique, names usable
/// in a URL path and as a file name (the leader file), a TTL, at least one holder.
pub fn validate_leases(leases: &[LeaseRule]) -> Result<()> {
    let mut ids = HashSet::with_capacity(leases.len());
    let mut names = HashSet::with_capacity(leases.len());
    for lease in leases {
        let refuse =
            |problem: String| Error::InvalidLease { id: lease.id.clone(), name: lease.name.clone(), problem };
        if lease.id.is_empty() {
            return Err(refuse("empty id".into()));
        }
        if let Err(problem) = check_lease_name(&lease.name) {
            return Err(refuse(problem));
        }
        if lease.ttl_ms == 0 || lease.ttl_ms > MAX_LEASE_TTL_MS {
            return Err(refuse(format!(
                "ttlMs must be between 1 and {MAX_LEASE_TTL_MS}, got {}",
                lease.ttl_ms
            )));
        }
        if lease.holders == 0 {
            return Err(refuse("holders must be at least 1".into()));
        }
        if !ids.insert(lease.id.as_str()) {
            return Err(refuse("the id appears twice".into()));
        }
        if !names.insert(lease.name.as_str()) {
            return Err(refuse("the name appears twice".into()));
        }
    }
    Ok(())
}

/// A Kubernetes object name (DNS-1123 subdomain): what the operator sends, and safe as a
/// path segment and a file name.
pub fn check_lease_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 253 {
        return Err(format!("name is {} characters long, at most 253", name.len()));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(format!("name has {c:?}: only lowercase letters, digits, '-' and '.'"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err("name must start and end with a letter or digit".into());
    }
    Ok(())
}

impl RuleSet {
    /// Validates `config`; a refusal names the first rule or lease at fault.
    pub fn compile(config: &AgentConfig, metrics: &Metrics) -> Result<Self> {
        let mut rules = HashMap::with_capacity(config.rate_limits.len());
        for rule in &config.rate_limits {
            if rule.id.is_empty() {
                return Err(Error::EmptyRuleId);
            }
            let limit = Limit::from_rule(rule)
                .map_err(|problem| Error::InvalidRule { id: rule.id.clone(), problem })?;
            let compiled =
                CompiledRule { rule: rule.clone(), limit, counters: metrics.rule_counters(&rule.id) };
            if rules.insert(rule.id.clone(), Arc::new(compiled)).is_some() {
                return Err(Error::DuplicateRule(rule.id.clone()));
            }
        }
        validate_leases(&config.leases)?;
        let all_fail_open = config.rate_limits.iter().all(|r| r.failure_mode == FailureMode::Open);
        let breakers = compile_breakers(&config.breakers)?;
        Ok(RuleSet { rules, all_fail_open, leases: config.leases.clone(), breakers, generation: 0 })
    }
}

/// Checks and converts the breakers of one configuration: ids present and unique, numbers
/// the state machine can run ([`crate::breaker::params`]).
fn compile_breakers(breakers: &[BreakerRule]) -> Result<Vec<CompiledBreaker>> {
    let mut ids = HashSet::with_capacity(breakers.len());
    breakers
        .iter()
        .map(|rule| {
            let refuse = |problem: String| Error::InvalidBreaker { id: rule.id.clone(), problem };
            if rule.id.is_empty() {
                return Err(refuse("empty id".into()));
            }
            if !ids.insert(rule.id.as_str()) {
                return Err(refuse("the id appears twice".into()));
            }
            Ok(CompiledBreaker { rule: rule.clone(), params: breaker::params(rule).map_err(refuse)? })
        })
        .collect()
}

/// The current rule set; empty until a first configuration arrives.
#[derive(Debug, Default)]
pub struct RuleHolder {
    current: ArcSwapOption<RuleSet>,
    published: std::sync::atomic::AtomicU64,
}

impl RuleHolder {
    pub fn load(&self) -> Option<Arc<RuleSet>> {
        self.current.load_full()
    }

    /// Publishes `rules` and returns them as published.
    pub fn store(&self, mut rules: RuleSet) -> Arc<RuleSet> {
        rules.generation = self.published.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let rules = Arc::new(rules);
        self.current.store(Some(rules.clone()));
        rules
    }
}

/// Parses a configuration file: JSON when it looks like JSON, YAML otherwise.
pub fn parse_file(path: &Path, text: &str) -> Result<AgentConfig> {
    let path = path.to_path_buf();
    let is_json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        serde_json::from_str(text).map_err(|source| Error::ParseJson { path, source })
    } else {
        serde_saphyr::from_str(text).map_err(|source| Error::ParseYaml { path, source: Box::new(source) })
    }
}

pub fn read_file(path: &Path) -> Result<(AgentConfig, String)> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::ReadConfig { path: path.to_path_buf(), source })?;
    Ok((parse_file(path, &text)?, text))
}

/// What runs after every swap, with the set now in force: clears the over-limit cache and
/// hands the leases to the lease manager.
pub type OnSwap = dyn Fn(&RuleSet) + Send + Sync;

/// Applies one configuration: compiles it and swaps it in, or keeps the old one.
pub fn apply(
    holder: &RuleHolder,
    metrics: &Metrics,
    config: &AgentConfig,
    on_swap: &dyn Fn(&RuleSet),
) -> Result<()> {
    match RuleSet::compile(config, metrics) {
        Ok(rules) => {
            let count = rules.rules.len();
            let leases = rules.leases.len();
            let rules = holder.store(rules);
            on_swap(&rules);
            metrics.config_applied(count);
            tracing::info!(rules = count, leases, "configuration applied");
            Ok(())
        }
        Err(error) => {
            metrics.config_rejected();
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_api::rate_limit::Algorithm;

    fn rule(id: &str, requests: u32) -> RateLimitRule {
        RateLimitRule {
            id: id.into(),
            requests,
            period_ms: 1000,
            burst: 0,
            algorithm: Algorithm::FixedWindow,
            shadow: false,
            failure_mode: FailureMode::Open,
        }
    }

    #[test]
    fn refuses_duplicates_and_zero_rates() {
        let metrics = Metrics::default();
        let dup = AgentConfig { rate_limits: vec![rule("a", 1), rule("a", 2)], ..Default::default() };
        assert!(matches!(RuleSet::compile(&dup, &metrics), Err(Error::DuplicateRule(id)) if id == "a"));
        let zero = AgentConfig { rate_limits: vec![rule("z", 0)], ..Default::default() };
        let error = RuleSet::compile(&zero, &metrics).unwrap_err().to_string();
        assert_eq!(error, "rate limit \"z\": requests must be at least 1");
    }

    #[test]
    fn parses_yaml_and_json() {
        let yaml = "rateLimits:\n- {id: a/b/c, requests: 5, periodMs: 1000, algorithm: FixedWindow, failureMode: Closed}\n";
        let config = parse_file(Path::new("c.yaml"), yaml).unwrap();
        assert_eq!(config.rate_limits[0].requests, 5);
        assert_eq!(config.rate_limits[0].failure_mode, FailureMode::Closed);
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(parse_file(Path::new("c.json"), &json).unwrap(), config);
        let error = parse_file(Path::new("bad.yaml"), "rateLimits: 3").unwrap_err().to_string();
        assert!(error.starts_with("cannot parse bad.yaml"), "{error}");
    }

    #[test]
    fn fail_open_only_when_every_rule_is() {
        let metrics = Metrics::default();
        let mut config = AgentConfig { rate_limits: vec![rule("a", 1)], ..Default::default() };
        assert!(RuleSet::compile(&config, &metrics).unwrap().all_fail_open);
        config.rate_limits.push(RateLimitRule { failure_mode: FailureMode::Closed, ..rule("b", 1) });
        assert!(!RuleSet::compile(&config, &metrics).unwrap().all_fail_open);
    }

    fn lease(id: &str, name: &str, ttl_ms: u64, holders: u32) -> LeaseRule {
        LeaseRule { id: id.into(), name: name.into(), ttl_ms, holders }
    }

    #[test]
    fn a_bad_lease_refuses_the_whole_configuration() {
        let metrics = Metrics::default();
        let good = AgentConfig {
            rate_limits: vec![rule("a", 1)],
            leases: vec![lease("ns/lock", "lock", 10_000, 1), lease("ns/pool", "pool", 500, 3)],
            ..Default::default()
        };
        assert_eq!(RuleSet::compile(&good, &metrics).unwrap().leases, good.leases);
        let refused = |leases: Vec<LeaseRule>| {
            let config = AgentConfig { rate_limits: vec![rule("a", 1)], leases, ..Default::default() };
            RuleSet::compile(&config, &metrics).unwrap_err().to_string()
        };
        assert_eq!(refused(vec![lease("", "x", 1, 1)]), "lease \"x\" (id \"\"): empty id");
        assert_eq!(refused(vec![lease("ns/x", "", 1, 1)]), "lease \"\" (id \"ns/x\"): empty name");
        assert_eq!(
            refused(vec![lease("ns/x", "x", 0, 1)]),
            "lease \"x\" (id \"ns/x\"): ttlMs must be between 1 and 86400000, got 0"
        );
        assert_eq!(
            refused(vec![lease("ns/x", "x", 1000, 0)]),
            "lease \"x\" (id \"ns/x\"): holders must be at least 1"
        );
        assert_eq!(
            refused(vec![lease("ns/x", "x", 1000, 1), lease("ns/x", "y", 1000, 1)]),
            "lease \"y\" (id \"ns/x\"): the id appears twice"
        );
        assert_eq!(
            refused(vec![lease("ns/x", "x", 1000, 1), lease("other/x", "x", 1000, 1)]),
            "lease \"x\" (id \"other/x\"): the name appears twice"
        );
        for bad in ["../etc", "a/b", "Lock", "-a", "a.", ".."] {
            let error = refused(vec![lease("ns/x", bad, 1000, 1)]);
            assert!(error.contains("name"), "{bad}: {error}");
        }
    }

    #[test]
    fn every_swap_hands_over_the_set_in_force() {
        let metrics = Metrics::default();
        let holder = RuleHolder::default();
        let seen = std::sync::Mutex::new(Vec::new());
        let on_swap = |rules: &RuleSet| seen.lock().unwrap().push(rules.leases.clone());
        let one = AgentConfig { leases: vec![lease("ns/x", "x", 1000, 1)], ..Default::default() };
        apply(&holder, &metrics, &one, &on_swap).unwrap();
        let bad = AgentConfig { leases: vec![lease("ns/y", "y", 0, 1)], ..Default::default() };
        assert!(apply(&holder, &metrics, &bad, &on_swap).is_err());
        apply(&holder, &metrics, &AgentConfig::default(), &on_swap).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![one.leases.clone(), vec![]]);
        assert!(holder.load().unwrap().leases.is_empty());
    }
}
