//! breakwater-operator: reconciles Breakwater policies into status conditions (and, later,
//! Envoy and agent configuration), in a cluster or standalone on files.

pub mod compile;
pub mod controller;
pub mod error;
pub mod http;
pub mod inventory;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod policy;
pub mod rbac;
pub mod render;
pub mod resource;
pub mod run;
pub mod selector;
pub mod standalone;
pub mod status;
pub mod telemetry;
pub mod xds;

pub use error::{Error, Result};
