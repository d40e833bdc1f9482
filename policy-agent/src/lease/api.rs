//! The loopback lease API (HTTP JSON) the pod calls:
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/leases/{name}/acquire` `{"wait": "5s"}` (optional) | 200, a grant |
//! | `POST /v1/leases/{name}/renew` `{"holder", "fencingToken"}` | 200, the grant renewed |
//! | `POST /v1/leases/{name}/release` `{"holder", "fencingToken"}` | 200, when released |
//! | `GET /v1/leases/{name}` | 200, the current grants |
//! | `GET /v1/leases/{name}/leader` | 200, whether this pod leads (`--leader`) |
//!
//! Times are RFC 3339 from the store's clock (Redis `TIME`); durations are read and written
//! in Breakwater's one grammar ([`breakwater_api::duration`]: `250ms`, `5s`, `1m30s`). Every error is
//! `{"reason", "message"}`: `UnknownLease` 404, `Held` 423 with `Retry-After`, `NotHolder`
//! 409, `StoreUnavailable` 503, `StoreError` 500, `BadRequest` 400 (also `NotCampaigning`
//! 404, `NotFound` 404, `MethodNotAllowed` 405, `ShuttingDown` 503 for a wait cut short by
//! the agent's shutdown).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use breakwater_api::duration;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::leader::LeaderState;
use super::manager::LeaseManager;
use super::{Grant, LeaseState, LeaseStore};
use crate::Error;
use crate::store::StoreError;

/// The longest `wait` an acquire may ask for: a caller that wants longer loops, so that no
/// request outlives a proxy's or a client's idle timeout by much.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The leader helpers' channels, by lease name.
pub type Leaders = HashMap<String, watch::Receiver<LeaderState>>;

struct Api<S: LeaseStore> {
    manager: Arc<LeaseManager<S>>,
    leaders: Leaders,
    stop: watch::Receiver<bool>,
}

/// The API over `manager`. `stop` turning true ends waiting acquires (503 `ShuttingDown`), so
/// that a long wait does not hold the server's graceful shutdown.
pub fn router<S: LeaseStore>(
    manager: Arc<LeaseManager<S>>,
    leaders: Leaders,
    stop: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/v1/leases/{name}", get(state::<S>))
        .route("/v1/leases/{name}/acquire", post(acquire::<S>))
        .route("/v1/leases/{name}/renew", post(renew::<S>))
        .route("/v1/leases/{name}/release", post(release::<S>))
        .route("/v1/leases/{name}/leader", get(leader::<S>))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "NotFound", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "method not allowed here")
        })
        .with_state(Arc::new(Api { manager, leaders, stop }))
}

/// A JSON answer (axum's `json` feature is off in this workspace; serializing is all we need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => {
                ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
            }
            // Our bodies are strings and numbers: this cannot happen, but never panic.
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        }
    }
}

/// An error answer: a status and `{"reason", "message"}`, with `Retry-After` when held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Whole seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub reason: String,
    pub message: String,
    /// When the earliest current grant ends unless renewed (`Held` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_at: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody { reason: reason.into(), message: message.into(), free_at: None },
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// What a lease error means over HTTP. `now_us` is the time `Retry-After` counts from. The
/// manager only fails with the lease and store variants; any other is a 500.
pub fn error_response(error: &Error, now_us: i64) -> ApiError {
    let message = error.to_string();
    match error {
        Error::UnknownLease(_) => ApiError::new(StatusCode::NOT_FOUND, "UnknownLease", message),
        Error::LeaseBusy { free_at_us, .. } => {
            let mut answer = ApiError::new(StatusCode::LOCKED, "Held", message);
            answer.body.free_at = Some(rfc3339(*free_at_us));
            answer.retry_after = Some(retry_after_seconds(*free_at_us, now_us));
            answer
        }
        Error::Store(StoreError::NotHolder { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "NotHolder", message)
        }
        Error::Store(store) if store.is_transient() => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "StoreUnavailable", message)
        }
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "StoreError", message),
    }
}

/// Whole seconds until `free_at_us`, rounded up, at least 1: a client that obeys never asks
/// before the grant can have ended.
pub fn retry_after_seconds(free_at_us: i64, now_us: i64) -> u64 {
    let micros = u64::try_from(free_at_us.saturating_sub(now_us)).unwrap_or(0);
    micros.div_ceil(1_000_000).max(1)
}

/// RFC 3339 (UTC, microseconds when not whole) for a store time in microseconds.
pub fn rfc3339(us: i64) -> String {
    match jiff::Timestamp::from_microsecond(us) {
        Ok(t) => t.to_string(),
        // Outside years -9999..=9999: not a time any store returns; say what it was.
        Err(_) => format!("@{us}us"),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireRequest {
    /// How long to wait for a slot; absent or `0s`: try once.
    #[serde(default)]
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HolderRequest {
    holder: String,
    fencing_token: i64,
}

/// One grant as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantBody {
    pub lease: String,
    pub holder: String,
    pub fencing_token: i64,
    pub acquired_at: String,
    pub renewed_at: String,
    pub expires_at: String,
    /// How long the grant lasts from its last renewal.
    pub ttl: String,
}

impl GrantBody {
    pub fn new(lease: &str, grant: &Grant) -> Self {
        let since = grant.renewed_at_us.max(grant.acquired_at_us);
        let ttl =
            Duration::from_micros(u64::try_from(grant.expires_at_us.saturating_sub(since)).unwrap_or(0));
        GrantBody {
            lease: lease.to_string(),
            holder: grant.holder.clone(),
            fencing_token: grant.fencing_token,
            acquired_at: rfc3339(grant.acquired_at_us),
            renewed_at: rfc3339(grant.renewed_at_us),
            expires_at: rfc3339(grant.expires_at_us),
            ttl: duration::format(ttl),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseBody {
    pub lease: String,
    pub holder: String,
    pub fencing_token: i64,
    pub released_at: String,
}

/// `GET /v1/leases/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateBody {
    pub lease: String,
    /// How many may hold it at once.
    pub holders: u32,
    pub ttl: String,
    /// The store's clock when it was read.
    pub now: String,
    /// The newest fencing token granted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// Current grants, by fencing token.
    pub grants: Vec<GrantBody>,
}

/// `GET /v1/leases/{name}/leader`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderBody {
    pub lease: String,
    pub leader: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at: Option<String>,
    /// The expiry in the store after the last renewal; the pod stops believing it leads a
    /// margin before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why this pod does not lead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// How many times this agent has become leader of this lease.
    pub terms: u64,
}

impl LeaderBody {
    pub fn new(state: &LeaderState) -> Self {
        let leading = state.leading.as_ref();
        LeaderBody {
            lease: state.lease.clone(),
            leader: leading.is_some(),
            holder: leading.map(|l| l.holder.clone()),
            fencing_token: leading.map(|l| l.fencing_token),
            acquired_at: leading.map(|l| rfc3339(l.acquired_at_us)),
            expires_at: leading.map(|l| rfc3339(l.expires_at_us)),
            waiting: state.waiting.clone(),
            terms: state.terms,
        }
    }
}

fn now_us() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

fn lease_error(error: Error) -> ApiError {
    // Busy carries the store's free time but not its clock: count from ours. Retry-After is
    // advice; the grant's own expiry is what the store enforces.
    error_response(&error, now_us())
}

/// Completes when `stop` turns true; never when its sender is gone without saying so.
async fn stopping(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn lease_name(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(name)| name).map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// Parses a JSON body into our error shape; an empty body is `T::default()` when allowed.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    empty: Option<T>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        let mut answer = ApiError::bad_request(rejection.body_text());
        answer.status = rejection.status();
        answer
    })?;
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = empty
    {
        return Ok(default);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

async fn acquire<S: LeaseStore>(
    State(api): State<Arc<Api<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<GrantBody>, ApiError> {
    let name = lease_name(path)?;
    let request: AcquireRequest = parse_body(body, Some(AcquireRequest::default()))?;
    let wait = match request.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => duration::parse(text).map_err(|e| ApiError::bad_request(format!("wait: {e}")))?,
    };
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(format!(
            "wait: {} is longer than the longest wait, {}",
            duration::format(wait),
            duration::format(MAX_WAIT)
        )));
    }
    let grant = tokio::select! {
        result = api.manager.acquire(&name, wait) => result.map_err(lease_error)?,
        () = stopping(api.stop.clone()) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ShuttingDown", "the agent is shutting down"));
        }
    };
    Ok(Json(GrantBody::new(&name, &grant)))
}

async fn renew<S: LeaseStore>(
    State(api): State<Arc<Api<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<GrantBody>, ApiError> {
    let name = lease_name(path)?;
    let request: HolderRequest = parse_body(body, None)?;
    let grant =
        api.manager.renew(&name, &request.holder, request.fencing_token).await.map_err(lease_error)?;
    Ok(Json(GrantBody::new(&name, &grant)))
}

async fn release<S: LeaseStore>(
    State(api): State<Arc<Api<S>>>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReleaseBody>, ApiError> {
    let name = lease_name(path)?;
    let request: HolderRequest = parse_body(body, None)?;
    let released_at =
        api.manager.release(&name, &request.holder, request.fencing_token).await.map_err(lease_error)?;
    Ok(Json(ReleaseBody {
        lease: name,
        holder: request.holder,
        fencing_token: request.fencing_token,
        released_at: rfc3339(released_at),
    }))
}

async fn state<S: LeaseStore>(
    State(api): State<Arc<Api<S>>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<StateBody>, ApiError> {
    let name = lease_name(path)?;
    let rule = api.manager.rule(&name).ok_or_else(|| lease_error(Error::UnknownLease(name.clone())))?;
    let state: LeaseState = api.manager.state(&name).await.map_err(lease_error)?;
    Ok(Json(StateBody {
        holders: rule.holders,
        ttl: duration::format(Duration::from_millis(rule.ttl_ms)),
        now: rfc3339(state.now_us),
        fencing_token: state.last_token,
        grants: state.grants.iter().map(|g| GrantBody::new(&name, g)).collect(),
        lease: name,
    }))
}

async fn leader<S: LeaseStore>(
    State(api): State<Arc<Api<S>>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LeaderBody>, ApiError> {
    let name = lease_name(path)?;
    match api.leaders.get(&name) {
        Some(rx) => Ok(Json(LeaderBody::new(&rx.borrow()))),
        None if api.manager.rule(&name).is_none() => Err(lease_error(Error::UnknownLease(name))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotCampaigning",
            format!(
                "this agent does not run leader election for lease {name:?} (start it with --leader {name})"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_lease_error_has_its_status_and_reason() {
        let now = 1_700_000_000_000_000;
        let cases = [
            (Error::UnknownLease("x".into()), 404, "UnknownLease"),
            (
                Error::LeaseBusy {
                    lease: "x".into(),
                    waited: Duration::from_secs(1),
                    free_at_us: now + 2_500_000,
                },
                423,
                "Held",
            ),
            (
                Error::Store(StoreError::NotHolder { lease: "x".into(), holder: "h".into(), token: 7 }),
                409,
                "NotHolder",
            ),
            (Error::Store(StoreError::NotConnected), 503, "StoreUnavailable"),
            (
                Error::Store(StoreError::UnexpectedReply { script: "lease state", reply: "[]".into() }),
                500,
                "StoreError",
            ),
        ];
        for (error, status, reason) in cases {
            let answer = error_response(&error, now);
            assert_eq!(answer.status.as_u16(), status, "{error}");
            assert_eq!(answer.body.reason, reason);
            assert_eq!(answer.body.message, error.to_string());
            assert_eq!(answer.retry_after.is_some(), reason == "Held");
        }
        let held = error_response(
            &Error::LeaseBusy { lease: "x".into(), waited: Duration::ZERO, free_at_us: now + 2_500_000 },
            now,
        );
        assert_eq!(held.retry_after, Some(3), "rounded up");
        assert_eq!(held.body.free_at.as_deref(), Some("2023-11-14T22:13:22.5Z"));
        let json = serde_json::to_value(&held.body).unwrap();
        assert_eq!(json["reason"], "Held");
        assert_eq!(json["freeAt"], "2023-11-14T22:13:22.5Z");
    }

    #[test]
    fn retry_after_never_says_zero() {
        assert_eq!(retry_after_seconds(10_000_000, 0), 10);
        assert_eq!(retry_after_seconds(10_000_001, 0), 11);
        assert_eq!(retry_after_seconds(0, 10_000_000), 1, "already free by our clock");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_000_001), "1970-01-01T00:00:01.000001Z");
    }

    #[test]
    fn a_grant_shows_its_times_and_ttl() {
        let grant = Grant {
            holder: "ns/pod-a/1".into(),
            fencing_token: 42,
            acquired_at_us: 1_000_000,
            renewed_at_us: 3_000_000,
            expires_at_us: 13_000_000,
        };
        let body = serde_json::to_value(GrantBody::new("lock", &grant)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "lease": "lock",
                "holder": "ns/pod-a/1",
                "fencingToken": 42,
                "acquiredAt": "1970-01-01T00:00:01Z",
                "renewedAt": "1970-01-01T00:00:03Z",
                "expiresAt": "1970-01-01T00:00:13Z",
                "ttl": "10s",
            })
        );
    }
}
