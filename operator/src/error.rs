//! The operator's one error type. A variant that comes from another error keeps it as its
//! [`source`](std::error::Error::source) and does not repeat it in its own message;
//! [`Report`] prints the whole chain (`main`, logs, the `Held` message).

use std::{error::Error as StdError, fmt, path::PathBuf, time::Duration};

use crate::inventory::ObjectName;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed")]
    Kube(#[from] kube::Error),

    #[error("{}: cannot read", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    #[error("{at}: YAML syntax error")]
    Yaml { at: Source, source: Box<serde_saphyr::Error> },

    #[error("{at}: not a Kubernetes object: apiVersion and kind must be set")]
    NotAnObject { at: Source },

    #[error("{at}: {kind} {name} is defined twice (first at {first})")]
    Duplicate { at: Source, kind: String, name: ObjectName, first: Box<Source> },

    #[error(
        "{at}: no kind {kind:?} in {api_version}: expected CircuitBreakerPolicy, RateLimitPolicy, LockLease or OutboxRelay"
    )]
    UnknownKind { at: Source, api_version: String, kind: String },

    #[error("{at}: invalid {kind} {name}")]
    Decode { at: Source, kind: String, name: ObjectName, source: serde_json::Error },

    #[error("another replica took the lease")]
    LeaseTaken,

    #[error("could not renew the lease in time")]
    LeaseNotRenewed,

    #[error("the API server did not answer within {0:?} while the leader lease was released")]
    LeaseNotReleased(Duration),

    #[error("OutboxRelay {name} has no {what}: only an object read from the API server can be deployed")]
    Incomplete { what: &'static str, name: String },

    #[error("cannot encode an OutboxRelay's spec as JSON")]
    RelaySpec(#[source] serde_json::Error),

    #[error("cannot use the agents' Redis")]
    Redis(#[source] crate::lease::StoreError),

    #[error("cannot listen on {addr}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },

    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),

    #[error("the HTTP server task ended abnormally")]
    Task(#[source] tokio::task::JoinError),

    #[error("invalid sidecar injection configuration: {0}")]
    InjectConfig(String),

    #[error("webhook certificate: {0}")]
    Certificate(String),

    #[error("the Envoy descriptor set is unreadable")]
    Descriptors(#[source] std::sync::Arc<prost_reflect::DescriptorError>),

    #[error("no message type {0} in the Envoy descriptor set")]
    UnknownType(String),

    #[error("cannot decode a {type_url} resource")]
    DecodeResource { type_url: String, source: prost::DecodeError },

    #[error("cannot decode the agent's configuration or a breaker")]
    DecodeAgent(#[source] breakwater_api::agent::DecodeError),

    #[error("cannot print the configuration as JSON")]
    PrintJson(#[source] serde_json::Error),

    #[error("cannot print the configuration as YAML")]
    PrintYaml(#[source] serde_saphyr::SerializeError),
}

impl Error {
    /// A short label per kind of error, for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "kube",
            Self::Read { .. } => "read",
            Self::Yaml { .. }
            | Self::NotAnObject { .. }
            | Self::Duplicate { .. }
            | Self::UnknownKind { .. }
            | Self::Decode { .. } => "parse",
            Self::LeaseTaken | Self::LeaseNotRenewed | Self::LeaseNotReleased(_) => "leader_election",
            Self::Incomplete { .. } => "input",
            Self::RelaySpec(_) => "serialize",
            Self::Redis(_) => "redis",
            Self::Bind { .. } | Self::Serve(_) | Self::Task(_) => "server",
            Self::InjectConfig(_) | Self::Certificate(_) => "injection",
            Self::Descriptors(_)
            | Self::UnknownType(_)
            | Self::DecodeResource { .. }
            | Self::DecodeAgent(_)
            | Self::PrintJson(_)
            | Self::PrintYaml(_) => "render",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an object was read from (standalone mode, `render`): a file and the line its
/// document starts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// An error with its chain of sources, on one line: `what failed: why: why that`. A source
/// whose message the line already holds is not repeated (some libraries print their source
/// in their own message too).
#[derive(Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let message = cause.to_string();
            if !line.contains(&message) {
                line.push_str(": ");
                line.push_str(&message);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_holds_the_chain_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let error = Error::Read { path: "/x".into(), source: io };
        assert_eq!(error.to_string(), "/x: cannot read");
        assert_eq!(Report(&error).to_string(), "/x: cannot read: No such file or directory");
        // kube's API error prints its source, the Status, in its own message already.
        let status = kube::core::Status::failure("nope", "NotFound").with_code(404);
        let api = kube::Error::Api(Box::new(status));
        let expected = format!("Kubernetes API request failed: {api}");
        assert_eq!(Report(&Error::Kube(api)).to_string(), expected);
    }
}
