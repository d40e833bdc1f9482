//! Every way the agent fails, in one enum: a configuration it refuses (at start, from the
//! file, or NACKed over ADS), a lease request it cannot grant, a store failure (kept whole as
//! [`breakwater_store::Error`], which says whether it is transient), and start-up or serving
//! failures. Messages include the cause's own text, so one line (a log, an HTTP body, a NACK)
//! says everything; the cause is also the error's `source()`, which `main` walks to report
//! the whole chain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not an `AgentConfig` in JSON.
    #[error("cannot parse {path}: {source}")]
    ParseJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The configuration file is not an `AgentConfig` in YAML (boxed: the parser's error is
    /// large, and every `Result` of the crate would carry its size).
    #[error("cannot parse {path}: {source}")]
    ParseYaml {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A rate limit the algorithms cannot enforce.
    #[error("rate limit {id:?}: {problem}")]
    InvalidRule { id: String, problem: &'static str },
    #[error("rate limit id {0:?} appears twice")]
    DuplicateRule(String),
    #[error("a rate limit has an empty id")]
    EmptyRuleId,
    /// A lease of the configuration the agent cannot grant.
    #[error("lease {name:?} (id {id:?}): {problem}")]
    InvalidLease { id: String, name: String, problem: String },
    /// A breaker of the configuration the agent cannot run.
    #[error("breaker {id:?}: {problem}")]
    InvalidBreaker { id: String, problem: String },

    /// No `LockLease` of that name selects this pod (HTTP 404).
    #[error("no lease {0:?} for this pod: no LockLease of that name in its namespace selects it")]
    UnknownLease(String),
    /// Still fully held when the wait ended (HTTP 423, with Retry-After).
    #[error("lease {lease:?} is still held after waiting {}ms", waited.as_millis())]
    LeaseBusy { lease: String, waited: Duration, free_at_us: i64 },
    /// The store refused (a renewal or release by a non-holder: HTTP 409) or failed (503 when
    /// transient, 500 otherwise).
    #[error("{0}")]
    Store(#[from] breakwater_store::Error),

    /// A `--leader` lease name that no `LockLease` can have.
    #[error("--leader {lease:?}: {problem}")]
    InvalidLeader { lease: String, problem: String },
    /// A pod identity that cannot prefix holder ids.
    #[error("pod {name:?} in namespace {namespace:?}: both must be non-empty, without '/'")]
    InvalidPod { name: String, namespace: String },
    /// Neither `--pod-name` nor `POD_NAME` is set, and the host name cannot be read.
    #[error("--pod-name (POD_NAME) is not set and the host name cannot be read: {source}")]
    NoPodName {
        #[source]
        source: std::io::Error,
    },
    #[error("--leader-dir {path}: {source}")]
    LeaderDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[source] tonic::transport::Error),
    /// The health and metrics server, or the lease API.
    #[error("{server} server: {source}")]
    Http {
        server: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The operator's xDS server cannot be reached.
    #[error("connect {endpoint}: {source}")]
    XdsConnect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The xDS stream could not be opened, or failed.
    #[error("xDS stream: {}", .0.message())]
    XdsStream(#[source] tonic::Status),
    /// A response or resource of another type than the two the agent subscribes to, or a
    /// resource of another type than its response (NACKed).
    #[error(
        "unexpected type {got:?}, expected {:?} or {:?}",
        breakwater_api::agent::TYPE_URL,
        breakwater_api::agent::BREAKER_TYPE_URL
    )]
    XdsType { got: String },
    /// More than the one agent configuration resource (NACKed).
    #[error("{0} resources, expected one agent configuration")]
    XdsResources(usize),
    /// An ADS proxy for Envoy was asked for without an operator to forward to.
    #[error("--xds-proxy-addr needs --xds-endpoint (the operator to forward Envoy's stream to)")]
    XdsProxyWithoutEndpoint,
    /// A resource that does not decode as an agent configuration or a breaker (NACKed).
    #[error("resource {name:?}: {source}")]
    XdsDecode {
        name: String,
        #[source]
        source: breakwater_api::agent::DecodeError,
    },
}

impl Error {
    /// A short label per kind of failure, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::ReadConfig { .. } | Error::ParseJson { .. } | Error::ParseYaml { .. } => "config_file",
            Error::InvalidRule { .. }
            | Error::DuplicateRule(_)
            | Error::EmptyRuleId
            | Error::InvalidLease { .. }
            | Error::InvalidBreaker { .. } => "config",
            Error::UnknownLease(_) => "unknown_lease",
            Error::LeaseBusy { .. } => "lease_busy",
            Error::Store(breakwater_store::Error::NotHolder { .. }) => "not_holder",
            Error::Store(_) => "store",
            Error::InvalidLeader { .. }
            | Error::InvalidPod { .. }
            | Error::NoPodName { .. }
            | Error::XdsProxyWithoutEndpoint => "flags",
            Error::LeaderDir { .. } => "leader_dir",
            Error::Bind { .. } => "bind",
            Error::Grpc(_) => "grpc",
            Error::Http { .. } => "http",
            Error::XdsConnect { .. } | Error::XdsStream(_) => "xds",
            Error::XdsType { .. } | Error::XdsResources(_) | Error::XdsDecode { .. } => "xds_nack",
        }
    }
}

/// `error` and every cause below it, one `: ` apart, leaving out a cause whose text the
/// message above already carries: what `main` prints before exiting.
pub fn report(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_walks_the_chain_once() {
        let bind = Error::Bind {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        };
        assert_eq!(report(&bind), "bind 127.0.0.1:1: address in use");
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(std::io::Error::other("inner"));
        assert_eq!(report(&outer), "outer: inner");
    }
}
