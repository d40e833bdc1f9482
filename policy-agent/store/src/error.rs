//! Every way a store call fails, classified: [`Error::kind`] says whether asking again may
//! help, which is what a fail-open or fail-closed decision, readiness and the lease API's
//! 503-or-500 need. Messages include the cause's own text, so one line says everything; the
//! cause is also kept as the error's `source()` for whoever walks the chain.

use std::time::Duration;

use redis::RedisError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Redis URL the client refuses (its password redacted), or a Cluster seed list it
    /// refuses: it can never work.
    #[error("redis url {url}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: RedisError,
    },
    /// A Cluster topology without a single seed node.
    #[error("no Redis Cluster seed nodes")]
    NoSeeds,
    /// No connection yet, or the last one broke; the background task is reconnecting.
    #[error("not connected to redis")]
    NotConnected,
    /// Redis did not answer `call` within the caller's deadline.
    #[error("redis did not answer {call} within the deadline ({}ms)", deadline.as_millis())]
    Timeout { call: &'static str, deadline: Duration },
    /// Redis answered with an error, or the connection failed during the call.
    #[error("{0}")]
    Redis(#[from] RedisError),
    /// A script answered in a shape this code does not read: the scripts and the code that
    /// calls them disagree.
    #[error("unexpected reply from the {script} script: {reply}")]
    UnexpectedReply { script: &'static str, reply: String },
    /// Renew or release by a holder and token that do not hold the lease: it expired, was
    /// released, or the token is another grant's. Never a silent success.
    #[error("lease {lease:?} is not held by {holder:?} with fencing token {token} (expired or released)")]
    NotHolder { lease: String, holder: String, token: i64 },
}

/// Whether asking again may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The store may answer if asked again: not connected, connection dropped, timed out,
    /// cluster resharding, loading.
    Transient,
    /// Asking again will not help: a bad URL, a script error, a wrong type, bad credentials,
    /// a refused renewal.
    Permanent,
}

impl ErrorKind {
    /// The metric label (`kind="transient"`).
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        let transient = match self {
            Error::NotConnected | Error::Timeout { .. } => true,
            Error::Redis(error) => is_transient(error),
            Error::InvalidUrl { .. }
            | Error::NoSeeds
            | Error::UnexpectedReply { .. }
            | Error::NotHolder { .. } => false,
        };
        if transient { ErrorKind::Transient } else { ErrorKind::Permanent }
    }

    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

/// Transient: worth asking again (connection, timeout, cluster moves, loading, failover).
fn is_transient(error: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::BusyLoading)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
                | ErrorKind::Server(ServerErrorKind::ReadOnly)
                | ErrorKind::ClusterConnectionNotFound
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_asking_again_may_fix() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(Error::Redis(refused).kind(), ErrorKind::Transient);
        let script =
            RedisError::from((redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError), "ERR boom"));
        assert_eq!(Error::Redis(script).kind(), ErrorKind::Permanent);
        assert!(Error::NotConnected.is_transient());
        assert!(Error::Timeout { call: "x", deadline: Duration::from_millis(5) }.is_transient());
        assert!(!Error::NotHolder { lease: "l".into(), holder: "h".into(), token: 1 }.is_transient());
        assert_eq!(ErrorKind::Transient.label(), "transient");
    }
}
