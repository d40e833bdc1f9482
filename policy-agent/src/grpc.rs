//! The `envoy.service.ratelimit.v3.RateLimitService` server: a thin adapter from tonic to
//! [`Limiter`]. Tests call [`RateLimitService::should_rate_limit`] on it directly; `run`
//! serves it on a loopback socket.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::limiter::{Decline, Limiter};
use crate::store::CounterStore;

#[derive(Debug)]
pub struct RateLimitGrpc<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> RateLimitGrpc<S> {
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        RateLimitGrpc { limiter }
    }
}

#[tonic::async_trait]
impl<S: CounterStore> RateLimitService for RateLimitGrpc<S> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        match self.limiter.should_rate_limit(request.get_ref()).await {
            Ok(response) => Ok(Response::new(response)),
            Err(decline @ Decline::EmptyDomain) => Err(Status::invalid_argument(decline.to_string())),
            Err(decline @ Decline::NoConfiguration) => Err(Status::unavailable(decline.to_string())),
        }
    }
}
