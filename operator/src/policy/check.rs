//! Policy fields that pass the schema but that Envoy cannot express as written. Each check
//! names the field and says why, so validation refuses the policy (`Accepted=False`)
//! instead of the compiler dropping or bending what was asked: a refused policy is in no
//! effective policy, so the compiler never sees it.

use breakwater_api::{
    CircuitBreakerPolicySpec, RateLimitPolicySpec,
    common::Duration,
    rate_limit::{Limit, Scope},
};

/// Why a RateLimitPolicy cannot be compiled as written, or Ok.
pub fn rate_limit_policy(spec: &RateLimitPolicySpec) -> Result<(), String> {
    for (index, limit) in spec.limits.iter().enumerate() {
        rate_limit(limit).map_err(|err| format!("spec.limits[{index}].{err}"))?;
    }
    Ok(())
}

/// Why one limit cannot be compiled, or Ok. The message starts with the field path below
/// the limit.
pub fn rate_limit(limit: &Limit) -> Result<(), String> {
    for (index, part) in limit.key.iter().flatten().enumerate() {
        if part.remote_address == Some(false) {
            return Err(format!(
                "key[{index}].remoteAddress: false selects no counter; omit the key part, or set it to true to count per client address"
            ));
        }
        if part.path == Some(false) {
            return Err(format!(
                "key[{index}].path: false selects no counter; omit the key part, or set it to true to count per path"
            ));
        }
    }
    if limit.scope() == Scope::Pod
        && let Ok(per) = limit.rate.per.to_std()
        && per.subsec_nanos() != 0
    {
        return Err(format!(
            "rate.per: {} is not a whole number of seconds; scope Pod limits run in Envoy's local rate limiter, whose refill intervals are whole multiples of one second here",
            limit.rate.per
        ));
    }
    Ok(())
}

/// Why a CircuitBreakerPolicy cannot be compiled as written, or Ok.
pub fn circuit_breaker_policy(spec: &CircuitBreakerPolicySpec) -> Result<(), String> {
    let positive = |field: &str, value: Option<&Duration>, why: &str| match value.map(Duration::to_std) {
        Some(Ok(d)) if d.is_zero() => Err(format!("spec.{field}: must be longer than 0s: {why}")),
        _ => Ok(()),
    };
    positive(
        "timeout",
        spec.timeout.as_ref(),
        "Envoy reads a zero route timeout as no deadline at all; omit timeout for no deadline",
    )?;
    if let Some(retry) = &spec.retry {
        positive(
            "retry.perTryTimeout",
            retry.per_try_timeout.as_ref(),
            "Envoy reads a zero per-try timeout as unset; omit perTryTimeout to bound attempts by timeout only",
        )?;
        positive(
            "retry.backoff.base",
            retry.backoff.as_ref().map(|b| &b.base),
            "Envoy's retry backoff needs a positive base interval",
        )?;
    }
    if let Some(outlier) = &spec.outlier_detection {
        positive(
            "outlierDetection.interval",
            outlier.interval.as_ref(),
            "Envoy needs a positive interval between ejection sweeps",
        )?;
    }
    // The agents refuse a configuration whose breaker they cannot run, and every agent has
    // every breaker: one such policy would stop every agent's updates.
    if let Some(breaker) = &spec.breaker {
        positive(
            "breaker.openDuration",
            Some(&breaker.open_duration),
            "an OPEN breaker would let probes through at once, so it would never reject a call",
        )?;
        positive(
            "breaker.slidingWindow.duration",
            breaker.sliding_window.duration.as_ref(),
            "a Time window of no time holds no calls to judge",
        )?;
        positive(
            "breaker.slowCall.duration",
            breaker.slow_call.as_ref().map(|s| &s.duration),
            "every call would be slow; omit slowCall for no slow-call rule",
        )?;
    }
    Ok(())
}
