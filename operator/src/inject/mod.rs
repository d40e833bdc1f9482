//! Sidecar injection: a mutating admission webhook that gives the pods of labelled
//! namespaces Envoy and `breakwater-agent` as native sidecars, and the traffic capture that
//! sends their connections through Envoy (docs/injection.md).
//!
//! `config` is what the chart sets, `pod` the mutation (pure), `quantity` the one check of
//! resource annotations, `certs` the serving certificate and its CA, `webhook` the HTTPS
//! endpoint.

pub mod certs;
pub mod config;
pub mod pod;
pub mod quantity;
pub mod webhook;

pub use config::{Config, Mode};
pub use webhook::Injector;
