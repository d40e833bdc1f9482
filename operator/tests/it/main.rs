//! The operator's integration tests, linked into one binary: every test binary links the
//! whole operator with kube and envoy-types, so one binary instead of ten saves minutes of
//! linking and gigabytes of disk (CI ran out of it). Run one group with
//! `cargo test -p breakwater-operator --test it ads::`.

mod ads;
mod compile;
mod compile_golden;
mod compile_props;
mod compile_render_cli;
mod delta;
mod descriptors;
mod kube;
mod lease_programmed;
mod live;
mod merge;
mod programmed;
mod standalone_cli;
#[path = "../support/mod.rs"]
mod support;
