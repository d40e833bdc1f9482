//! A webhook: each row of a wave is POSTed at once to one URL, its payload as the body
//! (`application/json`), its id as `Idempotency-Key`; a 2xx answer is the acknowledgement.
//!
//! What is retried within the wave: answers that say "later" (408, 429, 5xx), connection
//! errors and calls that hit the deadline, up to [`IN_WAVE_RETRIES`] times after
//! [`RETRY_BASE`] · 2ⁿ with jitter (0.1 s, 0.2 s, 0.4 s nominal) — enough to ride out a
//! restarting pod without waiting for the next batch. Past that, and at once for any other
//! answer (a 4xx the endpoint will give again, a 3xx, which is not followed), the row has
//! failed one attempt, and the relay's own attempts, backoff and dead-lettering take over.
//! A retry is made only while it can end within [`IN_WAVE_BUDGET`] of the row's first call,
//! so with the default 5 s deadline a call that timed out is not tried again in the wave.
//!
//! The URL is used as written: no `{aggregateType}`/`{type}` placeholders (the headers say
//! both). Only `http://`: reqwest's rustls features bring aws-lc-rs or leave the provider to
//! the process, which no build of this workspace can afford (see the workspace Cargo.toml),
//! so an `https://` URL is refused when the relay starts.

use std::time::Duration;

use reqwest::{
    StatusCode,
    header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue},
};
use tokio::time::Instant;

use crate::{
    error::{Error, Result},
    plan::Row,
};

/// The deadline of one call when the spec sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls after the first within one wave, for the answers worth trying again soon.
pub const IN_WAVE_RETRIES: u32 = 3;
/// A retry is made only if it can end within this long of the row's first call: the relay
/// holds its batch's transaction while it publishes, and PostgreSQL ends a session idle in a
/// transaction after two lease TTLs (20 s by default), which would cost the whole batch.
pub const IN_WAVE_BUDGET: Duration = Duration::from_secs(8);
/// The first pause before a retry; each next one doubles.
pub const RETRY_BASE: Duration = Duration::from_millis(100);
/// How much of an error answer's body the error shows (the status and the dead-letter table
/// keep it; an HTML error page would drown the rest).
const SNIPPET: usize = 200;

pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

#[derive(Clone)]
pub struct Webhook {
    client: reqwest::Client,
    /// The endpoint as configured (it may hold credentials: shown only redacted).
    pub url: String,
    pub timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &super::redacted(&self.url))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What one call came to.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    Published,
    /// Worth another call within the wave.
    Later(String),
    Failed(String),
}

impl Webhook {
    /// A sink for `url` (checked here, so a bad URL stops the relay at start, not each row).
    pub fn new(url: &str, timeout: Duration) -> Result<Self> {
        let invalid = |problem: String| Error::Spec(format!("webhook {}: {problem}", super::redacted(url)));
        let parsed = reqwest::Url::parse(url).map_err(|error| invalid(error.to_string()))?;
        match parsed.scheme() {
            "http" => {}
            "https" => {
                return Err(invalid(
                    "https:// is not supported by this build (no TLS in its HTTP client); use an \
                     http:// endpoint, e.g. a sidecar or gateway that originates TLS"
                        .to_string(),
                ));
            }
            other => return Err(invalid(format!("scheme {other} is not http"))),
        }
        if timeout.is_zero() {
            return Err(invalid("the timeout must be above zero".to_string()));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirected POST may turn into a GET elsewhere: the answer is not an ack.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("breakwater-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| invalid(error.to_string()))?;
        Ok(Webhook { client, url: url.to_string(), timeout })
    }

    pub async fn publish(&self, rows: &[&Row]) -> Vec<Result<(), String>> {
        futures::future::join_all(rows.iter().map(|row| self.publish_one(row))).await
    }

    async fn publish_one(&self, row: &Row) -> Result<(), String> {
        let headers = headers(row);
        let started = Instant::now();
        let mut retries = 0;
        loop {
            let error = match self.call(row, headers.clone()).await {
                Call::Published => return Ok(()),
                Call::Failed(error) => return Err(error),
                Call::Later(error) => error,
            };
            let Some(delay) = retry_after(retries, started.elapsed(), self.timeout) else {
                let calls =
                    if retries == 0 { "1 call".to_string() } else { format!("{} calls", retries + 1) };
                return Err(format!("{error} ({calls} in this attempt)"));
            };
            tracing::debug!(id = row.id, error, retries, "webhook call failed; retrying in the wave");
            tokio::time::sleep(delay).await;
            retries += 1;
        }
    }

    async fn call(&self, row: &Row, headers: HeaderMap) -> Call {
        let sent = self.client.post(&self.url).headers(headers).body(row.payload.clone()).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(error) if error.is_timeout() => {
                return Call::Later(format!("no answer from the webhook within {:?}", self.timeout));
            }
            Err(error) => return Call::Later(format!("cannot reach the webhook: {}", chain(error))),
        };
        let status = response.status();
        if status.is_success() {
            return Call::Published;
        }
        let error = format!("webhook answered HTTP {status}{}", snippet(response).await);
        if retried(status) { Call::Later(error) } else { Call::Failed(error) }
    }
}

/// Whether an answer means "try again soon": a timeout, too many requests, a server error.
fn retried(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The pause before retry `n` (from 0) of a row whose first call was `elapsed` ago, or None
/// when the retries are used up or the retry could not end within [`IN_WAVE_BUDGET`].
fn retry_after(n: u32, elapsed: Duration, timeout: Duration) -> Option<Duration> {
    let delay = retry_delay(n);
    (n < IN_WAVE_RETRIES && elapsed + delay + timeout <= IN_WAVE_BUDGET).then_some(delay)
}

/// The pause before retry `n` (from 0): `RETRY_BASE · 2ⁿ`, times 0.5–1.5 so that rows that
/// failed together do not all come back together.
fn retry_delay(n: u32) -> Duration {
    RETRY_BASE.saturating_mul(1 << n.min(10)).mul_f64(0.5 + fastrand::f64())
}

/// `: <the start of the body>` on one line, or nothing for an empty body. Reads no more than
/// it shows (within the call's deadline).
async fn snippet(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < SNIPPET * 4 {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(SNIPPET) {
        None if text.is_empty() => String::new(),
        None => format!(": {text}"),
        Some((end, _)) => format!(": {}…", &text[..end]),
    }
}

/// A transport error with its causes (reqwest's own text is only the outermost), without
/// the URL, which may hold credentials.
fn chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The row's headers, then the relay's (content type, aggregate, type, `Idempotency-Key`),
/// which replace any of the row's under the same names. A row header HTTP cannot carry is
/// left out with a warning: the payload is what the row carries.
fn headers(row: &Row) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let ours = super::row_headers(row).into_iter().chain([(IDEMPOTENCY_KEY, row.id.as_str())]);
    let pairs = row.header_pairs();
    let theirs = pairs.iter().map(|(name, value)| (name.as_str(), value.as_str()));
    for (name, value) in theirs.chain(ours) {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            _ => tracing::warn!(id = row.id, header = name, "header left out: HTTP cannot carry it"),
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_means_timeouts_throttling_and_server_errors() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(retried(StatusCode::from_u16(code).expect("status")), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 409, 410, 422] {
            assert!(!retried(StatusCode::from_u16(code).expect("status")), "{code}");
        }
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter() {
        for (n, nominal) in [(0, 100.0), (1, 200.0), (2, 400.0)] {
            for _ in 0..50 {
                let delay = retry_delay(n).as_secs_f64() * 1000.0;
                assert!(delay >= nominal * 0.5 && delay <= nominal * 1.5, "{n}: {delay}");
            }
        }
    }

    #[test]
    fn retries_stop_after_three_or_past_the_budget() {
        let (quick, slow) = (Duration::from_millis(200), DEFAULT_TIMEOUT);
        assert!(retry_after(0, quick, quick).is_some());
        assert!(retry_after(2, Duration::from_secs(1), quick).is_some());
        assert_eq!(retry_after(3, quick, quick), None, "three retries at most");
        // A 5 s call that timed out leaves no room for another within 8 s; a quick 503 does.
        assert_eq!(retry_after(0, slow, slow), None);
        assert!(retry_after(0, Duration::from_millis(10), slow).is_some());
        assert_eq!(retry_after(1, Duration::from_secs(3), slow), None);
    }

    #[test]
    fn the_key_and_the_relays_headers_override_the_rows() {
        let row = crate::sink::row_with_headers(
            r#"{"trace":"abc","idempotency-key":"forged","Content-Type":"text/plain","bad name":"x","multi":"a\nb"}"#,
        );
        let headers = headers(&row);
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get("Idempotency-Key"), Some(row.id.as_str()));
        assert_eq!(get("Content-Type"), Some("application/json"));
        assert_eq!(get("Breakwater-Aggregate-Type"), Some("order"));
        assert_eq!(get("Breakwater-Aggregate-Id"), Some("42"));
        assert_eq!(get("Breakwater-Type"), Some("Created"));
        assert_eq!(get("trace"), Some("abc"));
        assert_eq!(headers.len(), 6, "bad name and multi are left out: {headers:?}");
    }

    #[test]
    fn only_http_urls_with_a_deadline_are_accepted() {
        let refused = |url: &str, timeout: u64| {
            Webhook::new(url, Duration::from_millis(timeout)).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(Webhook::new("http://hooks.svc:8080/in", DEFAULT_TIMEOUT).is_ok());
        let https = refused("https://user:secret@hooks.example/in?token=t", 1000);
        assert!(https.contains("https:// is not supported"), "{https}");
        assert!(!https.contains("secret") && !https.contains("token"), "{https}");
        assert!(refused("ftp://hooks.example/in", 1000).contains("scheme ftp"));
        assert!(refused("http://hooks.example/in", 0).contains("above zero"));
        assert!(refused("http://", 1000).contains("webhook"));
    }
}
