//! `OutboxRelay`: declares the relay of a transactional outbox table in PostgreSQL to a
//! broker, at least once, in order per aggregate, with poison rows parked. The operator
//! validates it, resolves its Secret, runs `breakwater-relay` for it as a Deployment of two
//! replicas in its namespace, and shows the active relay's facts in its status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Duration, conditions_schema};

/// Declares the relay of an outbox table (Debezium layout: id, aggregatetype, aggregateid,
/// type, payload) to a Redis stream, a NATS subject or a webhook. The operator runs the relay
/// as a Deployment `<name>-relay` of two replicas in this namespace (one relays, one stands
/// by) and reports how it goes in the Ready condition.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "breakwater.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    doc = "Declares the relay of a transactional outbox table from PostgreSQL to a broker; the operator runs the relay as a Deployment in the same namespace",
    namespaced,
    status = "OutboxRelayStatus",
    shortname = "outbox",
    category = "breakwater",
    printcolumn = r#"{"name":"Relay","type":"string","jsonPath":".status.activeRelay"}"#,
    printcolumn = r#"{"name":"Pending","type":"integer","jsonPath":".status.pending"}"#,
    printcolumn = r#"{"name":"Published","type":"integer","jsonPath":".status.published"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(self.delivery) || !has(self.delivery.deadLetterTable) || self.delivery.deadLetterTable != self.source.postgres.table").message("delivery.deadLetterTable must differ from source.postgres.table"))]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// Where the outbox rows come from.
    pub source: Source,
    /// Where they are published.
    pub sink: Sink,
    /// Batching, ordering, retries and what happens to a row once published.
    #[serde(default)]
    pub delivery: Delivery,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Source {
    /// A PostgreSQL outbox table.
    pub postgres: PostgresSource,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSource {
    /// The Secret key (in this namespace) holding the connection URL, postgres://…
    pub connection_secret_ref: SecretKeyRef,
    /// The outbox table, optionally schema-qualified (public.outbox).
    #[schemars(length(min = 1, max = 127), regex(pattern = r"^([a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*$"))]
    pub table: String,
}

/// A key in a Secret of the resource's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The broker; set exactly one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.redisStream) ? 1 : 0) + (has(self.nats) ? 1 : 0) + (has(self.webhook) ? 1 : 0) == 1").message("set exactly one sink: redisStream, nats or webhook"))]
#[serde(rename_all = "camelCase")]
pub struct Sink {
    /// A Redis stream on the agents' Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_stream: Option<RedisStreamSink>,
    /// A NATS (JetStream) subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSink>,
    /// An HTTP endpoint that receives each event as a POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSink>,
}

/// The pattern of a destination name: text with `{aggregateType}` / `{type}` placeholders.
const DESTINATION_PATTERN: &str = r"^([A-Za-z0-9_.:-]|\{aggregateType\}|\{type\})+$";

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisStreamSink {
    /// Stream name; {aggregateType} and {type} are replaced from the row.
    #[schemars(length(min = 1, max = 256), regex(pattern = DESTINATION_PATTERN))]
    pub stream: String,
    /// Trim each stream to about this many entries (XADD MAXLEN ~).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_len: Option<u64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSink {
    /// Server URL, nats://host:port.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(nats|tls)://"))]
    pub url: String,
    /// Subject; {aggregateType} and {type} are replaced from the row.
    #[schemars(length(min = 1, max = 256), regex(pattern = DESTINATION_PATTERN))]
    pub subject: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.timeout) || duration(self.timeout) <= duration('10s')").message("webhook timeout must be at most 10s: a relay's batch must be published within two lease TTLs"))]
#[serde(rename_all = "camelCase")]
pub struct WebhookSink {
    /// Endpoint URL, http:// or https://.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: String,
    /// Deadline of each POST (default 5s, at most 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.pollInterval) || (duration(self.pollInterval) >= duration('10ms') && duration(self.pollInterval) <= duration('1m'))").message("pollInterval must be between 10ms and 1m"))]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// Rows read and published per transaction.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10_000))]
    pub batch_size: u32,
    /// How often the table is polled when the last batch was not full.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// PerAggregate publishes the rows of one aggregate in id order, one at a time; None
    /// publishes in parallel.
    #[serde(default)]
    pub ordering: Ordering,
    /// Attempts before a row is moved to the dead-letter table.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Where rows go after maxAttempts failures; without it they are retried forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 127), regex(pattern = r"^([a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*$"))]
    pub dead_letter_table: Option<String>,
    /// Delete published rows, or keep them with published_at set.
    #[serde(default)]
    pub after_publish: AfterPublish,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            poll_interval: default_poll_interval(),
            ordering: Ordering::default(),
            max_attempts: default_max_attempts(),
            dead_letter_table: None,
            after_publish: AfterPublish::default(),
        }
    }
}

fn default_batch_size() -> u32 {
    100
}

fn default_poll_interval() -> Duration {
    Duration::new("500ms")
}

fn default_max_attempts() -> u32 {
    5
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Ordering {
    #[default]
    PerAggregate,
    None,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AfterPublish {
    #[default]
    Delete,
    MarkPublished,
}

/// What the active relay last reported to the agents' Redis (it reports every 5 s).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The pod relaying now (from a report at most 30s old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_relay: Option<String>,
    /// Rows waiting to be published (from a report at most 30s old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Age of the oldest waiting row, in whole seconds (from a report at most 30s old).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<Duration>,
    /// Rows published, as the relays count them in the agents' Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
    /// Rows moved to the dead-letter table, as the relays count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<u64>,
    /// Accepted, ResolvedRefs, Programmed and Ready (Relaying, or why not).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
