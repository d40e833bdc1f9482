//! Pieces of policy specs, for the tests that build them in Rust and the compile benchmark.

use breakwater_api::{TargetRef, common::TargetKind, rate_limit::KeyPart};

/// A target Service `service`, the port `section` of it when given.
pub fn target(section: Option<&str>, service: &str) -> TargetRef {
    TargetRef {
        group: String::new(),
        kind: TargetKind::Service,
        name: service.to_string(),
        section_name: section.map(String::from),
    }
}

/// A rate-limit key part (exactly one of the four is set in a valid one).
pub fn key_part_of(
    header: Option<String>,
    remote_address: Option<bool>,
    path: Option<bool>,
    value: Option<String>,
) -> KeyPart {
    KeyPart { header, remote_address, path, value }
}
