//! The relay's one error type. Credentials never appear in it: the PostgreSQL URL is read
//! from a file and never printed, and connection errors are the driver's, which omit it.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid relay specification: {0}")]
    Spec(String),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("table {table}: {problem}")]
    Table { table: String, problem: String },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
    #[error("lease store: {0}")]
    Lease(#[from] breakwater_store::Error),
    #[error("a newer relay (token above {token}) has committed: this one stepped down")]
    Fenced { token: i64 },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
}

impl Error {
    /// The reason the status shows for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Postgres(_) => "PostgresUnreachable",
            Error::Table { .. } => "TableInvalid",
            Error::Redis(_) | Error::Lease(_) => "RedisUnreachable",
            Error::Nats(_) => "SinkUnreachable",
            Error::Fenced { .. } => "Fenced",
            Error::Read { .. } | Error::Spec(_) | Error::Bind { .. } => "InvalidConfiguration",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
