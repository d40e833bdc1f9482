//! `breakwater-relay`: relays a transactional outbox from PostgreSQL to a broker, at least
//! once and in order per aggregate, with one active relay per `OutboxRelay` fenced by a lease
//! (docs/outbox.md).
//!
//! - [`table`]: the SQL, from the table names (pure);
//! - [`plan`]: the order rows go out in, and what a batch's results mean (pure);
//! - [`sink`]: Redis Streams, NATS JetStream or a webhook, one dispatch; a row counts as
//!   published only once its broker acknowledged it;
//! - [`fence`]: the relay lease and its fencing token;
//! - [`relay`]: the batch loop, one PostgreSQL transaction per batch;
//! - [`report`]: the live facts the operator shows in the status, through Redis;
//! - [`run`]: everything together, as `main` and the tests start it;
//! - [`http`], [`metrics`], [`error`].

pub mod error;
pub mod fence;
pub mod http;
pub mod metrics;
pub mod plan;
pub mod relay;
pub mod report;
pub mod run;
pub mod sink;
pub mod table;

pub use error::{Error, Result};
