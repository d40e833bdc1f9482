//! Shadow-mode counts out: every `interval`, what each shadow rule would have rejected since
//! the last report is added to Redis (`breakwater_store::shadow`, one count per minute, all
//! agents adding to the same one), where the operator reads the last complete minute into
//! the policy's status. The counts are the rule's `shadow_over_limit` metric, so the report
//! is the difference since the last one that Redis took: a failed add is retried with the
//! next, never lost or counted twice by this agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use breakwater_store::shadow::RedisShadow;
use tokio::sync::watch;

use crate::config::RuleHolder;

/// How often the counts are added to Redis: often enough that the last complete minute is
/// whole when the operator reads it.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Reports until `stop` turns true, then once more.
pub async fn report(rules: Arc<RuleHolder>, shadow: RedisShadow, mut stop: watch::Receiver<bool>) {
    let mut reported: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        add(&rules, &shadow, &mut reported).await;
    }
    add(&rules, &shadow, &mut reported).await;
}

async fn add(rules: &RuleHolder, shadow: &RedisShadow, reported: &mut HashMap<String, u64>) {
    let Some(rules) = rules.load() else { return };
    for rule in rules.rules.values().filter(|r| r.rule.shadow) {
        let total = rule.counters.shadow_over_limit.get();
        let last = reported.get(&rule.rule.id).copied().unwrap_or(0);
        if total <= last {
            continue;
        }
        match shadow.add(&rule.rule.id, total - last).await {
            Ok(()) => {
                reported.insert(rule.rule.id.clone(), total);
            }
            Err(error) => tracing::debug!(rule = %rule.rule.id, %error, "shadow count not added; retrying"),
        }
    }
}
