//! OutboxRelay: checks beyond the schema, and the connection Secret it references. Nothing
//! relays an outbox yet, so a valid OutboxRelay is accepted with reason
//! `RelayNotImplemented`, and its message says that nothing reads the table.

use breakwater_api::OutboxRelay;
use kube::ResourceExt;

use super::{Assessment, Verdict, reason};
use crate::inventory::{Inventory, ObjectName};

pub fn assess(relay: &OutboxRelay, inventory: &Inventory) -> Assessment {
    let delivery = &relay.spec.delivery;
    let accepted = match delivery.poll_interval.to_std() {
        Err(err) => Verdict::fail(reason::INVALID, format!("spec.delivery.pollInterval: {err}")),
        Ok(_) => Verdict::ok(
            reason::RELAY_NOT_IMPLEMENTED,
            format!(
                "valid, but no outbox relay is built yet: nothing reads table {} or publishes to {}",
                relay.spec.source.postgres.table,
                sink(&relay.spec.sink)
            ),
        ),
    };
    let secret_ref = &relay.spec.source.postgres.connection_secret_ref;
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

fn sink(sink: &breakwater_api::outbox_relay::Sink) -> String {
    match (&sink.redis_stream, &sink.nats, &sink.webhook) {
        (Some(redis), _, _) => format!("Redis stream {}", redis.stream),
        (_, Some(nats), _) => format!("NATS subject {}", nats.subject),
        (_, _, Some(webhook)) => format!("webhook {}", webhook.url),
        _ => "no sink".to_string(),
    }
}
