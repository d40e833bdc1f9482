//! The operator's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },

    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },

    #[error("cannot write status of {kind} {name}: {source}")]
    Serialize { kind: &'static str, name: String, source: serde_json::Error },

    #[error("leader election: {0}")]
    LeaderElection(String),

    #[error("redis: {0}")]
    Redis(String),

    #[error("{0}")]
    Server(#[from] std::io::Error),
}

impl Error {
    /// A short label per kind of error, for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "kube",
            Self::Read { .. } => "read",
            Self::Parse { .. } => "parse",
            Self::Serialize { .. } => "serialize",
            Self::LeaderElection(_) => "leader_election",
            Self::Redis(_) => "redis",
            Self::Server(_) => "server",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
