//! The `envoy.service.accesslog.v3.AccessLogService` server: Envoy streams the access-log
//! entries of calls on breaker routes here (the compiler configures an `http_grpc` access
//! log on the outbound listener, filtered to those routes), and each message's entries go
//! to the [`Board`]. Envoy expects no answer until it closes the stream; the agent ends the
//! streams itself when it stops (they never end on their own, and the gRPC server drains
//! only once every call has).

use std::sync::Arc;

use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{StreamAccessLogsMessage, StreamAccessLogsResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::Board;

#[derive(Debug)]
pub struct AccessLogGrpc {
    board: Arc<Board>,
    stop: watch::Receiver<bool>,
}

impl AccessLogGrpc {
    /// Streams end when `stop` turns true.
    pub fn new(board: Arc<Board>, stop: watch::Receiver<bool>) -> Self {
        AccessLogGrpc { board, stop }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogGrpc {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        loop {
            let message = tokio::select! {
                message = stream.message() => message?,
                _ = stop.wait_for(|stop| *stop) => None,
            };
            let Some(message) = message else { break };
            // TCP entries say nothing about HTTP calls; the compiler never sends them here.
            if let Some(LogEntries::HttpLogs(entries)) = message.log_entries {
                self.board.record(&entries.log_entry);
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}
