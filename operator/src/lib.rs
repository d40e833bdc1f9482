//! breakwater-operator: reconciles Breakwater policies into status conditions and into the
//! Envoy and agent configuration it serves over xDS, in a cluster or standalone on files.
//! The modules depend on each other one way (docs/architecture.md): inventory and policy
//! (evaluation), compile, xds and status, then controller, standalone and run.

pub mod compile;
pub mod controller;
pub mod error;
pub mod follow;
pub mod http;
pub mod inject;
pub mod inventory;
pub mod leader;
pub mod lease;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod rbac;
pub mod reflectors;
pub mod relay;
pub mod render;
pub mod resource;
pub mod run;
pub mod selector;
pub mod serving;
pub mod standalone;
pub mod status;
pub mod telemetry;
pub mod xds;

pub use error::{Error, Result};
