//! OutboxRelay: checks beyond the schema, the connection Secret it references, and what its
//! status says about the relay that runs it. An accepted OutboxRelay is run by a Deployment
//! of `breakwater-relay` the operator applies (`crate::relay`); the active relay writes its
//! live facts to the agents' Redis, and [`report`] turns one read of them (and what the
//! operator knows of the Deployment) into the status fields and the `Ready` condition, purely.

use std::time::Duration;

use breakwater_api::{
    OutboxRelay,
    common::Duration as ApiDuration,
    duration,
    outbox_relay::{OutboxRelayStatus, Sink},
};
use breakwater_store::relay::RelayFacts;
use kube::ResourceExt;
use serde::Serialize;

use super::{Assessment, Verdict, reason};
use crate::inventory::{Inventory, ObjectName};
pub use crate::policy::lock_lease::Status;

/// Replicas of every relay's Deployment: one relays, the other holds itself ready to take
/// the relay lease over at once.
pub const REPLICAS: i32 = 2;

/// The longest OutboxRelay name the operator can run: its relay's pods carry the name in the
/// label `app.kubernetes.io/instance`, and a label value holds at most 63 characters.
pub const MAX_NAME_LENGTH: usize = 63;

/// A report older than this, by Redis's clock, says nothing about now: the active relay
/// reports every 5 s, so six missed reports mean nobody is relaying.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// The longest relay message the status carries: the message is the relay's error text,
/// and a condition message must stay well under the API server's 32 KiB.
const MAX_MESSAGE_LENGTH: usize = 1024;

pub fn assess(relay: &OutboxRelay, inventory: &Inventory) -> Assessment {
    let spec = &relay.spec;
    let name = relay.name_any();
    let webhook_timeout = spec.sink.webhook.as_ref().and_then(|webhook| webhook.timeout.as_ref());
    let accepted = if name.len() > MAX_NAME_LENGTH {
        Verdict::fail(
            reason::INVALID,
            format!(
                "metadata.name: {} characters, at most {MAX_NAME_LENGTH} for an OutboxRelay: its relay's pods \
                 carry the name in the label app.kubernetes.io/instance",
                name.len()
            ),
        )
    } else if let Err(err) = spec.delivery.poll_interval.to_std() {
        Verdict::fail(reason::INVALID, format!("spec.delivery.pollInterval: {err}"))
    } else if let Some(problem) = webhook_timeout.and_then(zero_or_invalid) {
        Verdict::fail(reason::INVALID, format!("spec.sink.webhook.timeout: {problem}"))
    } else {
        Verdict::ok(
            reason::ACCEPTED,
            format!(
                "relays table {} to {} with a Deployment of {REPLICAS} replicas",
                spec.source.postgres.table,
                sink(&spec.sink)
            ),
        )
    };
    let secret_ref = &spec.source.postgres.connection_secret_ref;
    let secret = ObjectName::new(relay.namespace().unwrap_or_default(), &secret_ref.name);
    let resolved_refs = match inventory.secrets.get(&secret) {
        None => Verdict::fail(reason::SECRET_NOT_FOUND, format!("Secret {secret} not found")),
        Some(keys) if !keys.contains(&secret_ref.key) => Verdict::fail(
            reason::SECRET_KEY_NOT_FOUND,
            format!("Secret {secret} has no key {:?}", secret_ref.key),
        ),
        Some(_) => Verdict::ok(reason::RESOLVED_REFS, format!("connection URL from Secret {secret}")),
    };
    Assessment { accepted, resolved_refs: Some(resolved_refs), targets: None }
}

/// Why a deadline cannot work: a zero one fails every POST before it is sent.
fn zero_or_invalid(timeout: &ApiDuration) -> Option<String> {
    match timeout.to_std() {
        Err(err) => Some(err.to_string()),
        Ok(Duration::ZERO) => Some("0s would fail every POST before it is sent".to_string()),
        Ok(_) => None,
    }
}

/// The sink in words. A webhook URL's password, if it holds one, is left out: the message
/// travels further (Events, logs) than the spec.
fn sink(sink: &Sink) -> String {
    match (&sink.redis_stream, &sink.nats, &sink.webhook) {
        (Some(redis), _, _) => format!("Redis stream {}", redis.stream),
        (_, Some(nats), _) => format!("NATS subject {}", nats.subject),
        (_, _, Some(webhook)) => format!("webhook {}", breakwater_store::redact(&webhook.url)),
        _ => "no sink".to_string(),
    }
}

/// The `Ready` condition: its type and the reasons the operator gives. When a fresh report
/// is read, the reason is the relay's own (`Relaying`, or why not: `PostgresUnreachable`,
/// `TableInvalid`, `SinkRefusing`, `SinkUnreachable`, `RedisUnreachable`, `Fenced`,
/// `InvalidConfiguration`; any other condition reason a newer relay writes passes too).
pub mod ready {
    pub const TYPE: &str = "Ready";
    /// The relay's reason when it publishes: the only one that makes `Ready` True.
    pub const RELAYING: &str = "Relaying";
    /// The resource is not accepted, so no relay runs (its Deployment is deleted).
    pub const NOT_ACCEPTED: &str = "NotAccepted";
    /// A Deployment of the relay's name exists that this OutboxRelay does not control; the
    /// operator leaves it alone.
    pub const DEPLOYMENT_CONFLICT: &str = "DeploymentConflict";
    /// The relay's namespace lacks the Secret with the agents' Redis URL (`run
    /// --relay-redis-secret`), or its key `url`: the relay's pods cannot start.
    pub const REDIS_SECRET_NOT_FOUND: &str = "RedisSecretNotFound";
    /// The operator runs without Redis, so it cannot read the relay's facts.
    pub const NO_STORE: &str = "NoStore";
    /// Redis could not be read; the fields shown are the last ones read.
    pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
    /// No relay has reported yet.
    pub const NO_REPORT: &str = "NoReport";
    /// The last report is older than [`super::STALE_AFTER`] by Redis's clock.
    pub const STALE_REPORT: &str = "StaleReport";
    /// A report whose reason is not a condition reason (the API server would refuse it).
    pub const INVALID_REPORT: &str = "InvalidReport";
}

/// The `Ready` condition before it becomes a `metav1.Condition`. The reason is a `String`:
/// a fresh report's reason is the relay's, read from Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Ready {
    fn new(status: Status, reason: &str, message: impl Into<String>) -> Self {
        Self { status, reason: reason.to_string(), message: message.into() }
    }
}

/// The status fields the operator derives from the relay's facts (the rest of
/// `OutboxRelayStatus` is the conditions).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_relay: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<ApiDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<u64>,
}

impl RelayFields {
    /// The fields as a resource's status carries them now.
    pub fn of(status: Option<&OutboxRelayStatus>) -> Self {
        status.map_or_else(Self::default, |s| Self {
            active_relay: s.active_relay.clone(),
            pending: s.pending,
            oldest_pending_age: s.oldest_pending_age.clone(),
            published: s.published,
            dead_lettered: s.dead_lettered,
        })
    }
}

/// What became of the relay's Deployment in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Deployment {
    /// Applied (created, changed or already as wanted): `name` runs [`REPLICAS`] replicas.
    Applied { name: String },
    /// None runs: the resource is not accepted (a Deployment the operator had made is
    /// deleted), or nothing is deployed at all (standalone mode).
    None,
    /// `name` exists and is not controlled by this OutboxRelay (`owner` says by what).
    NotOwned { name: String, owner: String },
}

/// Whether the relay's namespace holds the Secret with the agents' Redis URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisSecret {
    /// Present with its key, or not looked at (nothing to deploy).
    Present,
    /// `name` (namespace/name) does not exist.
    NotFound { name: String },
    /// `name` exists without the key `key`.
    NoKey { name: String, key: String },
}

/// What the operator learnt about the relay's facts from the store.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// The operator runs without Redis.
    NoStore,
    /// Redis could not be read, for this reason.
    Unavailable(&'a str),
    /// The facts Redis holds; None when no relay has reported.
    Read(Option<&'a RelayFacts>),
}

/// The status fields and `Ready` condition of a relay.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub fields: RelayFields,
    pub ready: Ready,
}

/// Everything [`report`] weighs.
#[derive(Clone, Debug)]
pub struct Known<'a> {
    pub accepted: bool,
    pub deployment: &'a Deployment,
    pub redis_secret: &'a RedisSecret,
    pub observation: Observation<'a>,
}

/// The status fields and `Ready` of a relay. `Ready` is the relay's own word when a fresh
/// report is read; otherwise it says why nothing relays, most specific first: not accepted,
/// a Deployment of someone else's in the way, the Redis Secret the pods need is missing, no
/// store, an unreadable store, no report, a stale one. The fields come from the facts read:
/// the totals (`published`, `deadLettered`) always, the live ones (`activeRelay`, `pending`,
/// `oldestPendingAge`) only from a fresh report; when Redis cannot be read, the fields last
/// written (`last`) stay.
pub fn report(known: Known<'_>, last: &RelayFields) -> Report {
    let fields = match known.observation {
        Observation::NoStore | Observation::Read(None) => RelayFields::default(),
        Observation::Unavailable(_) => last.clone(),
        Observation::Read(Some(facts)) => fields(facts),
    };
    let fresh = match known.observation {
        Observation::Read(Some(facts)) if !stale(facts) => Some(facts),
        _ => None,
    };
    let ready = match (known.deployment, fresh, known.redis_secret) {
        _ if !known.accepted => Ready::new(
            Status::False,
            ready::NOT_ACCEPTED,
            "the resource is not accepted: no relay runs for it",
        ),
        (Deployment::NotOwned { name, owner }, ..) => Ready::new(
            Status::False,
            ready::DEPLOYMENT_CONFLICT,
            format!(
                "Deployment {name} exists and is not this OutboxRelay's ({owner}): the operator leaves it \
                 alone and runs no relay; rename or delete one of them"
            ),
        ),
        (_, Some(facts), _) => from_facts(facts),
        (_, None, RedisSecret::NotFound { name }) => Ready::new(
            Status::False,
            ready::REDIS_SECRET_NOT_FOUND,
            format!(
                "Secret {name}, with the agents' Redis URL under key url, not found: the relay's pods \
                 cannot start"
            ),
        ),
        (_, None, RedisSecret::NoKey { name, key }) => Ready::new(
            Status::False,
            ready::REDIS_SECRET_NOT_FOUND,
            format!(
                "Secret {name} has no key {key:?} (the agents' Redis URL): the relay's pods cannot start"
            ),
        ),
        (deployment, None, RedisSecret::Present) => not_reported(known.observation, deployment),
    };
    Report { fields, ready }
}

/// `Ready` when no fresh report says how the relay goes.
fn not_reported(observation: Observation<'_>, deployment: &Deployment) -> Ready {
    match observation {
        Observation::NoStore => Ready::new(
            Status::Unknown,
            ready::NO_STORE,
            "the operator reads no Redis (no --redis-url, or standalone mode), so it cannot tell how the \
             relay goes",
        ),
        Observation::Unavailable(error) => Ready::new(
            Status::Unknown,
            ready::STORE_UNAVAILABLE,
            format!("cannot read the relay's facts from Redis: {error}"),
        ),
        Observation::Read(None) => {
            let running = match deployment {
                Deployment::Applied { name } => format!(" (Deployment {name}, {REPLICAS} replicas)"),
                _ => String::new(),
            };
            Ready::new(Status::Unknown, ready::NO_REPORT, format!("no relay has reported yet{running}"))
        }
        Observation::Read(Some(facts)) => Ready::new(
            Status::Unknown,
            ready::STALE_REPORT,
            format!(
                "no report for {} (Redis time; a relay reports every 5s): the last, by {}, said {}",
                duration::format(Duration::from_secs(age_ms(facts) / 1000)),
                facts.holder,
                facts.reason
            ),
        ),
    }
}

/// `Ready` from a fresh report: True only while relaying; otherwise the relay's reason and
/// message, as it wrote them.
fn from_facts(facts: &RelayFacts) -> Ready {
    if facts.reason == ready::RELAYING {
        let backlog = match facts.pending {
            0 => "nothing pending".to_string(),
            n => format!("{n} pending, the oldest {} old", age(facts.oldest_pending_age_ms).as_str()),
        };
        return Ready::new(Status::True, ready::RELAYING, format!("relayed by {}: {backlog}", facts.holder));
    }
    let message = truncate(&facts.message, MAX_MESSAGE_LENGTH);
    if is_condition_reason(&facts.reason) {
        Ready::new(Status::False, &facts.reason, message)
    } else {
        Ready::new(
            Status::False,
            ready::INVALID_REPORT,
            format!("the relay reported reason {:?}: {message}", truncate(&facts.reason, 64)),
        )
    }
}

fn fields(facts: &RelayFacts) -> RelayFields {
    let live = !stale(facts);
    RelayFields {
        active_relay: live.then(|| facts.holder.clone()),
        pending: live.then_some(facts.pending),
        oldest_pending_age: live.then(|| age(facts.oldest_pending_age_ms)),
        published: Some(facts.published),
        dead_lettered: Some(facts.dead_lettered),
    }
}

fn age_ms(facts: &RelayFacts) -> u64 {
    facts.now_ms.saturating_sub(facts.reported_at_ms)
}

fn stale(facts: &RelayFacts) -> bool {
    u128::from(age_ms(facts)) > STALE_AFTER.as_millis()
}

/// An age in the duration grammar, in whole seconds: the relay measures it every 5 s, so
/// milliseconds would only make the status change more often.
fn age(ms: u64) -> ApiDuration {
    ApiDuration::new(duration::format(Duration::from_secs(ms / 1000)))
}

/// Whether the API server takes `reason` as a condition reason (metav1.Condition's pattern).
fn is_condition_reason(reason: &str) -> bool {
    let mut chars = reason.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let body_ok = reason.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | ':'));
    let last_ok = reason.chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok && body_ok && last_ok && reason.len() <= 1024
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str, sink: serde_json::Value) -> OutboxRelay {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "breakwater.dev/v1alpha1",
            "kind": "OutboxRelay",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "source": {"postgres": {"connectionSecretRef": {"name": "orders-db", "key": "url"}, "table": "outbox"}},
                "sink": sink,
            },
        }))
        .expect("an OutboxRelay")
    }

    fn stream() -> serde_json::Value {
        serde_json::json!({"redisStream": {"stream": "events.{aggregateType}"}})
    }

    fn facts(reason: &str, message: &str, age_ms: u64) -> RelayFacts {
        RelayFacts {
            holder: "orders-relay-7c9f8d6b5-x2kqp".into(),
            pending: 12,
            oldest_pending_age_ms: 3_400,
            published: 1_000,
            dead_lettered: 2,
            reason: reason.into(),
            message: message.into(),
            reported_at_ms: 1_000_000,
            now_ms: 1_000_000 + age_ms,
        }
    }

    fn applied() -> Deployment {
        Deployment::Applied { name: "orders-relay".into() }
    }

    fn known<'a>(deployment: &'a Deployment, observation: Observation<'a>) -> Known<'a> {
        Known { accepted: true, deployment, redis_secret: &RedisSecret::Present, observation }
    }

    fn said(report: &Report) -> (Status, &str, &str) {
        (report.ready.status, report.ready.reason.as_str(), report.ready.message.as_str())
    }

    #[test]
    fn an_accepted_relay_says_what_it_relays_and_how() {
        let mut inventory = Inventory::new("breakwater-system");
        inventory.secrets.insert(ObjectName::new("shop", "orders-db"), ["url".to_string()].into());
        let assessment = assess(&relay("orders", stream()), &inventory);
        assert_eq!(
            assessment.accepted,
            Verdict::ok(
                "Accepted",
                "relays table outbox to Redis stream events.{aggregateType} with a Deployment of 2 replicas"
            )
        );
        assert_eq!(assessment.resolved_refs.map(|v| v.reason), Some("ResolvedRefs"));
    }

    #[test]
    fn names_too_long_for_a_label_and_zero_deadlines_are_refused() {
        let inventory = Inventory::new("breakwater-system");
        let longest = "a".repeat(MAX_NAME_LENGTH);
        assert!(assess(&relay(&longest, stream()), &inventory).accepted.ok);
        let too_long = assess(&relay(&format!("{longest}b"), stream()), &inventory).accepted;
        assert_eq!((too_long.ok, too_long.reason), (false, "Invalid"));
        assert!(
            too_long.message.starts_with("metadata.name: 64 characters, at most 63"),
            "{}",
            too_long.message
        );

        let webhook = |timeout: &str| {
            relay(
                "orders",
                serde_json::json!({"webhook": {"url": "https://hooks.example/o", "timeout": timeout}}),
            )
        };
        let zero = assess(&webhook("0s"), &inventory).accepted;
        assert_eq!(
            (zero.ok, zero.message.as_str()),
            (false, "spec.sink.webhook.timeout: 0s would fail every POST before it is sent")
        );
        let ok = assess(&webhook("2s"), &inventory).accepted;
        assert_eq!(
            (ok.ok, ok.message.as_str()),
            (true, "relays table outbox to webhook https://hooks.example/o with a Deployment of 2 replicas")
        );
        let with_password = relay(
            "orders",
            serde_json::json!({"webhook": {"url": "http://relay:Hook-S3cret@hooks.example/o"}}),
        );
        let message = assess(&with_password, &inventory).accepted.message;
        assert!(
            message.contains("http://relay:***@hooks.example/o") && !message.contains("S3cret"),
            "{message}"
        );
        assert!(!assess(&webhook("2 s"), &inventory).accepted.ok, "outside the grammar");
    }

    #[test]
    fn a_fresh_report_is_the_relays_word() {
        let deployment = applied();
        let relaying = facts("Relaying", "relayed by orders-relay-7c9f8d6b5-x2kqp", 4_000);
        let r = report(known(&deployment, Observation::Read(Some(&relaying))), &RelayFields::default());
        assert_eq!(
            said(&r),
            (
                Status::True,
                "Relaying",
                "relayed by orders-relay-7c9f8d6b5-x2kqp: 12 pending, the oldest 3s old"
            )
        );
        assert_eq!(
            r.fields,
            RelayFields {
                active_relay: Some("orders-relay-7c9f8d6b5-x2kqp".into()),
                pending: Some(12),
                oldest_pending_age: Some(ApiDuration::new("3s")),
                published: Some(1_000),
                dead_lettered: Some(2),
            }
        );
        let idle = RelayFacts { pending: 0, oldest_pending_age_ms: 0, ..relaying };
        let r = report(known(&deployment, Observation::Read(Some(&idle))), &RelayFields::default());
        assert_eq!(r.ready.message, "relayed by orders-relay-7c9f8d6b5-x2kqp: nothing pending");
        assert_eq!(r.fields.oldest_pending_age, Some(ApiDuration::new("0s")));

        let refusing = facts("SinkRefusing", "3 publish attempt(s) refused since the last report: OOM", 0);
        let r = report(known(&deployment, Observation::Read(Some(&refusing))), &RelayFields::default());
        assert_eq!(
            said(&r),
            (Status::False, "SinkRefusing", "3 publish attempt(s) refused since the last report: OOM")
        );
        assert_eq!(r.fields.active_relay.as_deref(), Some("orders-relay-7c9f8d6b5-x2kqp"));
    }

    #[test]
    fn a_reason_the_api_server_would_refuse_is_not_passed_on() {
        let deployment = applied();
        let odd = facts("not a reason!", &"x".repeat(5_000), 0);
        let r = report(known(&deployment, Observation::Read(Some(&odd))), &RelayFields::default());
        assert_eq!((r.ready.status, r.ready.reason.as_str()), (Status::False, "InvalidReport"));
        assert!(r.ready.message.starts_with("the relay reported reason \"not a reason!\": xxx"));
        assert!(r.ready.message.chars().count() < 1_100, "the relay's message is cut");
        assert!(is_condition_reason("PostgresUnreachable") && is_condition_reason("A_b:c,d"));
        assert!(!is_condition_reason("") && !is_condition_reason("9Lives") && !is_condition_reason("Ends,"));
    }

    #[test]
    fn a_stale_report_keeps_the_totals_and_drops_the_live_fields() {
        let deployment = applied();
        let old = facts("Relaying", "", STALE_AFTER.as_millis() as u64 + 15_000);
        let r = report(known(&deployment, Observation::Read(Some(&old))), &RelayFields::default());
        assert_eq!(
            said(&r),
            (
                Status::Unknown,
                "StaleReport",
                "no report for 45s (Redis time; a relay reports every 5s): the last, by \
                 orders-relay-7c9f8d6b5-x2kqp, said Relaying"
            )
        );
        assert_eq!(
            r.fields,
            RelayFields { published: Some(1_000), dead_lettered: Some(2), ..RelayFields::default() }
        );
        let just_fresh = facts("Relaying", "", STALE_AFTER.as_millis() as u64);
        let r = report(known(&deployment, Observation::Read(Some(&just_fresh))), &RelayFields::default());
        assert_eq!(r.ready.reason, "Relaying", "30s old is still fresh");
    }

    #[test]
    fn without_a_fresh_report_ready_says_why() {
        let deployment = applied();
        let last = RelayFields { published: Some(7), ..RelayFields::default() };
        let none = report(known(&deployment, Observation::Read(None)), &last);
        assert_eq!(
            said(&none),
            (Status::Unknown, "NoReport", "no relay has reported yet (Deployment orders-relay, 2 replicas)")
        );
        assert_eq!(none.fields, RelayFields::default());
        let no_store = report(known(&deployment, Observation::NoStore), &last);
        assert_eq!((no_store.ready.status, no_store.ready.reason.as_str()), (Status::Unknown, "NoStore"));
        assert!(no_store.ready.message.contains("--redis-url"), "{}", no_store.ready.message);
        let down = report(known(&deployment, Observation::Unavailable("not connected to redis")), &last);
        assert_eq!(
            said(&down),
            (
                Status::Unknown,
                "StoreUnavailable",
                "cannot read the relay's facts from Redis: not connected to redis"
            )
        );
        assert_eq!(down.fields, last, "the fields last read stay");
    }

    #[test]
    fn what_keeps_a_relay_from_running_comes_first() {
        let relaying = facts("Relaying", "", 0);
        let deployment = applied();
        let not_accepted =
            Known { accepted: false, ..known(&deployment, Observation::Read(Some(&relaying))) };
        assert_eq!(report(not_accepted, &RelayFields::default()).ready.reason, "NotAccepted");

        let theirs = Deployment::NotOwned { name: "orders-relay".into(), owner: "no controller".into() };
        let r = report(known(&theirs, Observation::Read(Some(&relaying))), &RelayFields::default());
        assert_eq!((r.ready.status, r.ready.reason.as_str()), (Status::False, "DeploymentConflict"));
        assert!(r.ready.message.starts_with("Deployment orders-relay exists and is not this OutboxRelay's"));

        let missing = RedisSecret::NotFound { name: "shop/breakwater-redis".into() };
        let no_secret = Known { redis_secret: &missing, ..known(&deployment, Observation::Read(None)) };
        let r = report(no_secret.clone(), &RelayFields::default());
        assert_eq!(
            said(&r),
            (
                Status::False,
                "RedisSecretNotFound",
                "Secret shop/breakwater-redis, with the agents' Redis URL under key url, not found: the relay's \
                 pods cannot start"
            )
        );
        // Pods started before the Secret went away still relay: a fresh report wins.
        let running = Known { observation: Observation::Read(Some(&relaying)), ..no_secret };
        assert_eq!(report(running, &RelayFields::default()).ready.reason, "Relaying");
        let no_key = RedisSecret::NoKey { name: "shop/breakwater-redis".into(), key: "url".into() };
        let r = report(
            Known { redis_secret: &no_key, ..known(&deployment, Observation::NoStore) },
            &RelayFields::default(),
        );
        assert_eq!(r.ready.reason, "RedisSecretNotFound");
        assert!(r.ready.message.starts_with("Secret shop/breakwater-redis has no key \"url\""));
    }

    #[test]
    fn the_fields_read_back_from_a_status() {
        let status = OutboxRelayStatus {
            active_relay: Some("a".into()),
            pending: Some(1),
            oldest_pending_age: Some(ApiDuration::new("2s")),
            published: Some(3),
            dead_lettered: Some(4),
            conditions: vec![],
        };
        let fields = RelayFields::of(Some(&status));
        assert_eq!(fields.active_relay.as_deref(), Some("a"));
        assert_eq!((fields.pending, fields.published, fields.dead_lettered), (Some(1), Some(3), Some(4)));
        let json = serde_json::to_value(&fields).expect("serializes");
        assert_eq!(json["oldestPendingAge"], "2s");
        assert_eq!(serde_json::to_value(RelayFields::default()).expect("serializes"), serde_json::json!({}));
    }
}
