//! Redis Streams: one `XADD` per row, the row's columns as fields (`id` first), pipelined per
//! wave on one connection. A wave holds at most one row per aggregate, so pipelining never
//! reorders an aggregate; a row whose `XADD` Redis refused fails alone.

use redis::aio::ConnectionManager;

use crate::plan::Row;

#[derive(Clone)]
pub struct RedisStreams {
    connection: ConnectionManager,
    /// Stream name template (`{aggregateType}`, `{type}`).
    pub stream: String,
    /// `MAXLEN ~`: trimmed approximately, so Redis trims whole nodes cheaply.
    pub max_len: Option<u64>,
}

impl std::fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreams").field("stream", &self.stream).field("max_len", &self.max_len).finish()
    }
}

impl RedisStreams {
    /// Connects to `url` (the agents' Redis); the connection manager reconnects by itself.
    pub async fn connect(url: &str, stream: String, max_len: Option<u64>) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let connection = ConnectionManager::new(client).await?;
        Ok(RedisStreams { connection, stream, max_len })
    }

    pub async fn publish(&self, rows: &[&Row]) -> Vec<Result<(), String>> {
        let mut pipe = redis::pipe();
        for row in rows {
            let command = pipe.cmd("XADD").arg(row.destination(&self.stream));
            if let Some(max_len) = self.max_len {
                command.arg("MAXLEN").arg("~").arg(max_len);
            }
            command
                .arg("*")
                .arg("id")
                .arg(&row.id)
                .arg("aggregatetype")
                .arg(&row.aggregate_type)
                .arg("aggregateid")
                .arg(&row.aggregate_id)
                .arg("type")
                .arg(&row.kind)
                .arg("payload")
                .arg(&row.payload);
            for (name, value) in row.header_pairs() {
                command.arg(format!("header.{name}")).arg(value);
            }
        }
        let mut connection = self.connection.clone();
        match pipe.ignore_errors().query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut connection).await
        {
            Ok(results) => results.into_iter().map(|r| r.map(drop).map_err(|e| e.to_string())).collect(),
            Err(error) => rows.iter().map(|_| Err(error.to_string())).collect(),
        }
    }
}
