//! Which pod an ADS stream speaks for. A node id (`NAMESPACE/POD`) is only what the client
//! says; in a cluster, any pod that reaches the xDS port could claim another's and read its
//! configuration, or NACK on its behalf and turn that pod's policies `Rejected`. So in cluster
//! mode every stream carries gRPC metadata `authorization: Bearer <token>`: the pod's
//! projected ServiceAccount token for the audience [`DEFAULT_AUDIENCE`] (or the one the
//! operator is run with), which the kubelet binds to the pod. The API server checks it (a
//! TokenReview: signature, expiry, audience, and that the bound pod still exists with that
//! uid) and names the pod in the review's `user.extra`; the stream then serves that pod's node
//! id and no other.
//!
//! Reviews are cached by the SHA-256 of the token until the token's own `exp`, so proxies that
//! reconnect cost the API server nothing. A refusal is not cached: refusing again costs a
//! review, but a cached refusal would outlive its cause (a pod the API server had not seen
//! yet, an API server that did not answer), and it would not bound the load anyway, since
//! every forged token is a new key. Envoy and the agent back off between attempts.
//!
//! Standalone mode and tests serve unauthenticated ([`Authenticator::unauthenticated`]); the
//! choice is made where the server is built, never by default.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, api::PostParams};
use tonic::{Status, metadata::MetadataMap};

use crate::{
    error::{Error, Report, Result},
    metrics::{Metrics, OutcomeLabel, ReasonLabel},
};

/// The audience the operator accepts tokens for unless told otherwise (`run
/// --xds-token-audience`); the sidecar injector projects the pods' tokens with it.
pub const DEFAULT_AUDIENCE: &str = "breakwater.dev/xds";

/// The bound-object claims the ServiceAccount authenticator puts in `user.extra`.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A ServiceAccount's username: `system:serviceaccount:NAMESPACE:NAME`.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// How many reviews the cache keeps. One entry per live token, and a pod holds one token at a
/// time (two for a moment when the kubelet rotates it); past this, the entries closest to
/// expiry go first and their pods pay one more review when they reconnect.
pub const CACHE_CAPACITY: usize = 16_384;

/// The pod a token was bound to, as the API server read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl PodIdentity {
    /// The one node id this pod's streams may ask for.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Who a stream is, once its metadata is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Not checked (standalone mode, tests): whatever node id the client sends.
    Unchecked,
    /// Proved by a token: this pod's node id only.
    Pod(PodIdentity),
}

impl Identity {
    /// Whether a stream of this identity may serve `node_id` (from its first request).
    pub fn admit(&self, node_id: &str) -> Result<(), Refusal> {
        match self {
            Identity::Unchecked => Ok(()),
            Identity::Pod(pod) if pod.node_id() == node_id => Ok(()),
            Identity::Pod(pod) => Err(Refusal::WrongPod { pod: pod.node_id(), node_id: node_id.to_string() }),
        }
    }
}

/// Why a stream is refused. Not an [`Error`]: a refusal is the authenticator's verdict on a
/// client, counted and answered, not a failure of the operator (a review that could not be
/// sent carries that failure, [`Refusal::ReviewFailed`]).
#[derive(Debug)]
pub enum Refusal {
    /// No `authorization: Bearer <token>` metadata.
    MissingToken,
    /// The API server does not vouch for the token: forged, expired, for another audience,
    /// or bound to a pod that no longer exists. `error` is the API server's word.
    Unauthenticated { error: String },
    /// A valid token, but not a projected one bound to a pod (a user's, or a ServiceAccount
    /// token from a Secret): it names no pod the stream could serve.
    NotPodBound { user: String },
    /// The TokenReview could not be made (the API server did not answer, or refused the
    /// operator): the client should retry, so this is UNAVAILABLE.
    ReviewFailed(Error),
    /// A valid token of pod `pod` on a stream that asks for another node id.
    WrongPod { pod: String, node_id: String },
}

impl Refusal {
    /// The `reason` label of `breakwater_xds_stream_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::Unauthenticated { .. } => "unauthenticated",
            Refusal::NotPodBound { .. } => "not_pod_bound",
            Refusal::ReviewFailed(_) => "review_failed",
            Refusal::WrongPod { .. } => "wrong_pod",
        }
    }

    /// What the client is told. Never the token: it is not part of any variant.
    pub fn status(&self) -> Status {
        match self {
            Refusal::MissingToken => Status::unauthenticated(
                "no `authorization: Bearer <token>` metadata: an ADS stream must present its pod's \
                 projected ServiceAccount token",
            ),
            Refusal::Unauthenticated { error } => {
                Status::unauthenticated(format!("the API server does not accept the token: {error}"))
            }
            Refusal::NotPodBound { user } => Status::unauthenticated(format!(
                "the token of {user} is not bound to a pod: an ADS stream must present its pod's \
                 projected ServiceAccount token"
            )),
            Refusal::ReviewFailed(error) => {
                Status::unavailable(format!("cannot check the token now: {}", Report(error)))
            }
            Refusal::WrongPod { pod, node_id } => Status::permission_denied(format!(
                "the token is pod {pod}'s; it cannot ask for node id {node_id:?}"
            )),
        }
    }

    /// Counts and logs the refusal, and returns what the client is told.
    pub fn record(self, metrics: &Metrics, peer: Option<SocketAddr>) -> Status {
        metrics.xds_refusals.get_or_create(&ReasonLabel { reason: self.reason() }).inc();
        let status = self.status();
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        tracing::warn!(reason = self.reason(), peer, code = ?status.code(), message = status.message(), "ADS stream refused");
        status
    }
}

/// Reads the pod out of a TokenReview's status; `audience` is the one the review asked for.
pub fn pod_identity(status: &TokenReviewStatus, audience: &str) -> Result<PodIdentity, Refusal> {
    if status.authenticated != Some(true) {
        let error = status.error.clone().filter(|e| !e.is_empty());
        return Err(Refusal::Unauthenticated { error: error.unwrap_or_else(|| "not authenticated".into()) });
    }
    // An audience-aware API server returns the audiences it checked; an empty list would mean
    // the token is only good for the API server itself.
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        let error = format!("the review does not confirm audience {audience:?}");
        return Err(Refusal::Unauthenticated { error });
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    let not_bound = || Refusal::NotPodBound { user: username.clone() };
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(not_bound)?;
    let extra = user.and_then(|u| u.extra.as_ref());
    let claim = |key: &str| match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    let name = claim(POD_NAME).filter(|n| !n.contains('/')).ok_or_else(not_bound)?;
    let uid = claim(POD_UID).ok_or_else(not_bound)?;
    Ok(PodIdentity {
        namespace: namespace.to_string(),
        name,
        uid,
        service_account: service_account.to_string(),
    })
}

/// The token of `authorization: Bearer <token>` (the scheme is case-insensitive, RFC 7235).
pub fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// When a JWT expires, from the `exp` claim of its payload. Read without checking the
/// signature, so only after the API server said the token is valid; None when the token is
/// not a JWT or has no `exp` (then its review is not cached).
pub fn expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    let payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// A token's SHA-256: the cache's key, so the cache never holds a token. Its `Debug` shows
/// the first bytes only, enough to tell entries apart in a log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        TokenHash(bytes)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash(")?;
        for byte in &self.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Reviews the API server vouched for, each until its token expires; at most `capacity`.
/// Time is passed in, so the cache is tested without a clock.
#[derive(Debug)]
pub struct ReviewCache {
    entries: HashMap<TokenHash, (PodIdentity, SystemTime)>,
    capacity: usize,
}

impl ReviewCache {
    pub fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pod of a token reviewed before, unless the token has expired since (then the entry
    /// is dropped and the token is reviewed again, which refuses it).
    pub fn get(&mut self, key: &TokenHash, now: SystemTime) -> Option<PodIdentity> {
        match self.entries.get(key) {
            Some((identity, expires)) if now < *expires => Some(identity.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `identity` for the token until `expires`. When full, expired entries go
    /// first, then the one that would expire soonest.
    pub fn insert(&mut self, key: TokenHash, identity: PodIdentity, expires: SystemTime, now: SystemTime) {
        if expires <= now {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, at)| now < *at);
            if self.entries.len() >= self.capacity
                && let Some(soonest) = self.entries.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k)
            {
                self.entries.remove(&soonest);
            }
        }
        self.entries.insert(key, (identity, expires));
    }
}

/// What asks the API server about a token: a TokenReview (`kube::Client`), or a stand-in in
/// unit tests.
pub trait TokenReviewer: Send + Sync + 'static {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus>>;
}

impl TokenReviewer for kube::Client {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..TokenReview::default()
            };
            let reviewed =
                Api::<TokenReview>::all(self.clone()).create(&PostParams::default(), &review).await?;
            Ok(reviewed.status.unwrap_or_default())
        })
    }
}

/// Checks each ADS stream's token, or — only where that is chosen explicitly — nothing.
#[derive(Clone)]
pub struct Authenticator(Option<Arc<TokenReviews>>);

struct TokenReviews {
    reviewer: Box<dyn TokenReviewer>,
    audience: String,
    cache: Mutex<ReviewCache>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Authenticator::Unauthenticated"),
            Some(reviews) => f
                .debug_struct("Authenticator")
                .field("audience", &reviews.audience)
                .field("cached", &reviews.cache.lock().map(|c| c.len()).unwrap_or_default())
                .finish(),
        }
    }
}

impl Authenticator {
    /// Believes every node id. Only for a server no other pod can reach: standalone mode on
    /// loopback, tests.
    pub fn unauthenticated() -> Self {
        Authenticator(None)
    }

    /// Cluster mode: each stream's token is checked with a TokenReview for `audience`.
    pub fn token_reviews(client: kube::Client, audience: impl Into<String>) -> Self {
        Self::with_reviewer(client, audience, CACHE_CAPACITY)
    }

    /// Tokens checked by `reviewer`, with a cache of `capacity` reviews.
    pub fn with_reviewer(reviewer: impl TokenReviewer, audience: impl Into<String>, capacity: usize) -> Self {
        Authenticator(Some(Arc::new(TokenReviews {
            reviewer: Box::new(reviewer),
            audience: audience.into(),
            cache: Mutex::new(ReviewCache::new(capacity)),
        })))
    }

    /// The audience tokens must carry; None when nothing is checked.
    pub fn audience(&self) -> Option<&str> {
        self.0.as_ref().map(|r| r.audience.as_str())
    }

    /// Who the stream with `metadata` is: [`Identity::Unchecked`] when unauthenticated, else
    /// the pod its token is bound to (from the cache, or a TokenReview).
    pub async fn authenticate(&self, metadata: &MetadataMap, metrics: &Metrics) -> Result<Identity, Refusal> {
        let Some(reviews) = &self.0 else { return Ok(Identity::Unchecked) };
        let token = bearer_token(metadata).ok_or(Refusal::MissingToken)?;
        let key = TokenHash::of(token);
        if let Some(pod) = reviews.cached(&key) {
            metrics.xds_token_review_cache_hits.inc();
            return Ok(Identity::Pod(pod));
        }
        let counted = |outcome| metrics.xds_token_reviews.get_or_create(&OutcomeLabel { outcome }).inc();
        let status = match reviews.reviewer.review(token, &reviews.audience).await {
            Ok(status) => status,
            Err(error) => {
                counted("error");
                return Err(Refusal::ReviewFailed(error));
            }
        };
        counted(if status.authenticated == Some(true) { "authenticated" } else { "unauthenticated" });
        let pod = pod_identity(&status, &reviews.audience)?;
        if let Some(expires) = expiry(token) {
            let now = SystemTime::now();
            if let Ok(mut cache) = reviews.cache.lock() {
                cache.insert(key, pod.clone(), expires, now);
            }
        }
        Ok(Identity::Pod(pod))
    }
}

impl TokenReviews {
    fn cached(&self, key: &TokenHash) -> Option<PodIdentity> {
        // A poisoned lock only means another stream panicked mid-update: review again.
        self.cache.lock().ok()?.get(key, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use k8s_openapi::api::authentication::v1::UserInfo;
    use tonic::{Code, metadata::MetadataValue};

    use super::*;

    fn reviewed(username: &str, extra: &[(&str, &[&str])]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![DEFAULT_AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    fn bound(namespace: &str, pod: &str) -> TokenReviewStatus {
        reviewed(
            &format!("system:serviceaccount:{namespace}:default"),
            &[(POD_NAME, &[pod]), (POD_UID, &["0d5e-uid"]), ("authentication.kubernetes.io/node-name", &[])],
        )
    }

    fn pod(namespace: &str, name: &str) -> PodIdentity {
        PodIdentity {
            namespace: namespace.into(),
            name: name.into(),
            uid: "0d5e-uid".into(),
            service_account: "default".into(),
        }
    }

    /// A JWT-shaped token whose payload holds `claims` (unsigned: only the API server checks).
    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64(claims))
    }

    #[test]
    fn the_pod_comes_from_the_bound_object_claims() {
        assert_eq!(pod_identity(&bound("shop", "api-0"), DEFAULT_AUDIENCE).unwrap(), pod("shop", "api-0"));
        assert_eq!(pod("shop", "api-0").node_id(), "shop/api-0");
    }

    #[test]
    fn what_names_no_pod_is_refused() {
        let refused =
            |status: TokenReviewStatus| pod_identity(&status, DEFAULT_AUDIENCE).unwrap_err().reason();
        let not_authenticated = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..bound("shop", "api-0")
        };
        match pod_identity(&not_authenticated, DEFAULT_AUDIENCE) {
            Err(Refusal::Unauthenticated { error }) => assert_eq!(error, "token has expired"),
            other => panic!("{other:?}"),
        }
        assert_eq!(refused(TokenReviewStatus::default()), "unauthenticated");
        // Valid for the API server, not for us.
        assert_eq!(
            refused(TokenReviewStatus { audiences: None, ..bound("shop", "api-0") }),
            "unauthenticated"
        );
        let other_audience =
            TokenReviewStatus { audiences: Some(vec!["vault".into()]), ..bound("shop", "a") };
        assert_eq!(refused(other_audience), "unauthenticated");
        // A user, a Secret-based ServiceAccount token, a bound token without its uid.
        assert_eq!(refused(reviewed("alice", &[(POD_NAME, &["a"]), (POD_UID, &["u"])])), "not_pod_bound");
        assert_eq!(refused(reviewed("system:serviceaccount:shop:default", &[])), "not_pod_bound");
        assert_eq!(
            refused(reviewed("system:serviceaccount:shop:default", &[(POD_NAME, &["a"])])),
            "not_pod_bound"
        );
        let two_names =
            reviewed("system:serviceaccount:shop:d", &[(POD_NAME, &["a", "b"]), (POD_UID, &["u"])]);
        assert_eq!(refused(two_names), "not_pod_bound");
        assert_eq!(
            refused(reviewed("system:serviceaccount:shop", &[(POD_NAME, &["a"]), (POD_UID, &["u"])])),
            "not_pod_bound"
        );
    }

    #[test]
    fn a_pod_serves_its_own_node_id_only() {
        let identity = Identity::Pod(pod("shop", "api-0"));
        assert!(identity.admit("shop/api-0").is_ok());
        for other in ["shop/api-1", "billing/api-0", "shop/api-0/x", "", "shop"] {
            let refusal = identity.admit(other).unwrap_err();
            let status = refusal.status();
            assert_eq!(status.code(), Code::PermissionDenied, "{other}");
            assert!(
                status.message().contains("shop/api-0") && status.message().contains(other),
                "{status:?}"
            );
        }
        assert!(Identity::Unchecked.admit("anyone/at-all").is_ok());
    }

    #[test]
    fn expiry_is_the_payloads_exp() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(expiry(&jwt(r#"{"exp":1700000000,"sub":"x"}"#)), Some(at(1_700_000_000)));
        // Padded base64 is tolerated; no exp, a non-JWT or a bad payload give none.
        let padded =
            format!("e30.{}=.x", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":5}"#));
        assert_eq!(expiry(&padded), Some(at(5)));
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(expiry("not-a-jwt"), None);
        assert_eq!(expiry("a.%%%.c"), None);
    }

    #[test]
    fn the_bearer_scheme_is_required() {
        let with = |value: &str| {
            let mut metadata = MetadataMap::new();
            metadata.insert("authorization", MetadataValue::try_from(value).unwrap());
            bearer_token(&metadata).map(String::from)
        };
        assert_eq!(with("Bearer abc.def").as_deref(), Some("abc.def"));
        assert_eq!(with("bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("abc"), None);
        assert_eq!(bearer_token(&MetadataMap::new()), None);
    }

    #[test]
    fn cached_reviews_last_until_the_token_expires() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut cache = ReviewCache::new(4);
        let key = TokenHash::of("token-a");
        cache.insert(key, pod("shop", "a"), t0 + Duration::from_secs(60), t0);
        assert_eq!(cache.get(&key, t0 + Duration::from_secs(59)), Some(pod("shop", "a")));
        assert_eq!(cache.get(&key, t0 + Duration::from_secs(60)), None, "gone at exp");
        assert!(cache.is_empty(), "an expired entry is dropped when met");
        cache.insert(key, pod("shop", "a"), t0, t0);
        assert!(cache.is_empty(), "an already expired token is not kept");
    }

    #[test]
    fn the_cache_is_bounded() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut cache = ReviewCache::new(2);
        let (a, b, c) = (TokenHash::of("a"), TokenHash::of("b"), TokenHash::of("c"));
        cache.insert(a, pod("ns", "a"), t0 + Duration::from_secs(30), t0);
        cache.insert(b, pod("ns", "b"), t0 + Duration::from_secs(10), t0);
        cache.insert(c, pod("ns", "c"), t0 + Duration::from_secs(20), t0);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&b, t0), None, "the soonest to expire made room");
        assert!(cache.get(&a, t0).is_some() && cache.get(&c, t0).is_some());
        // Expired entries make room before live ones do.
        let later = t0 + Duration::from_secs(25);
        cache.insert(b, pod("ns", "b"), t0 + Duration::from_secs(90), later);
        assert_eq!(cache.get(&c, later), None);
        assert!(cache.get(&a, later).is_some() && cache.get(&b, later).is_some());
    }

    #[test]
    fn a_hash_does_not_show_the_token() {
        let shown = format!("{:?}", TokenHash::of("secret-token"));
        assert!(!shown.contains("secret") && shown.len() < 24, "{shown}");
        assert_ne!(TokenHash::of("a"), TokenHash::of("b"));
    }

    /// Answers every review with `status`, counting them.
    struct Fixed {
        status: TokenReviewStatus,
        calls: Arc<AtomicUsize>,
    }

    impl TokenReviewer for Fixed {
        fn review<'a>(&'a self, _: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus>> {
            assert_eq!(audience, DEFAULT_AUDIENCE);
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready(Ok(self.status.clone())))
        }
    }

    fn metadata(token: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", MetadataValue::try_from(format!("Bearer {token}")).unwrap());
        metadata
    }

    fn count(metrics: &Metrics, sample: &str) -> f64 {
        let text = metrics.encode();
        text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
    }

    #[tokio::test]
    async fn a_token_is_reviewed_once_until_it_expires() {
        let calls = Arc::new(AtomicUsize::new(0));
        let reviewer = Fixed { status: bound("shop", "api-0"), calls: calls.clone() };
        let authenticator = Authenticator::with_reviewer(reviewer, DEFAULT_AUDIENCE, 8);
        let metrics = Metrics::default();
        let in_an_hour = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 3600;
        let token = jwt(&format!(r#"{{"exp":{in_an_hour}}}"#));
        for _ in 0..5 {
            let identity = authenticator.authenticate(&metadata(&token), &metrics).await.unwrap();
            assert_eq!(identity, Identity::Pod(pod("shop", "api-0")));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one review for five streams");
        assert_eq!(count(&metrics, "breakwater_xds_token_reviews_total{outcome=\"authenticated\"}"), 1.0);
        assert_eq!(count(&metrics, "breakwater_xds_token_review_cache_hits_total"), 4.0);
        // A token whose exp has passed is not served from the cache: reviewed again.
        let expired = jwt(r#"{"exp":1}"#);
        for _ in 0..2 {
            authenticator.authenticate(&metadata(&expired), &metrics).await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(!format!("{authenticator:?}").contains(&token));
    }

    #[tokio::test]
    async fn refusals_are_not_cached() {
        let calls = Arc::new(AtomicUsize::new(0));
        let status = TokenReviewStatus { authenticated: Some(false), ..TokenReviewStatus::default() };
        let authenticator =
            Authenticator::with_reviewer(Fixed { status, calls: calls.clone() }, DEFAULT_AUDIENCE, 8);
        let metrics = Metrics::default();
        let token = jwt(r#"{"exp":99999999999}"#);
        for _ in 0..3 {
            let refusal = authenticator.authenticate(&metadata(&token), &metrics).await.unwrap_err();
            assert_eq!(refusal.status().code(), Code::Unauthenticated);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(count(&metrics, "breakwater_xds_token_reviews_total{outcome=\"unauthenticated\"}"), 3.0);
        // No token at all costs no review.
        let refusal = authenticator.authenticate(&MetadataMap::new(), &metrics).await.unwrap_err();
        assert_eq!(refusal.reason(), "missing_token");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let status = refusal.record(&metrics, None);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(count(&metrics, "breakwater_xds_stream_refusals_total{reason=\"missing_token\"}"), 1.0);
    }

    #[tokio::test]
    async fn unauthenticated_believes_anyone() {
        let metrics = Metrics::default();
        let identity = Authenticator::unauthenticated().authenticate(&MetadataMap::new(), &metrics).await;
        assert_eq!(identity.unwrap(), Identity::Unchecked);
        assert_eq!(Authenticator::unauthenticated().audience(), None);
    }

    #[test]
    fn a_failed_review_is_unavailable() {
        let status = kube::core::Status::failure("etcd is down", "InternalError").with_code(500);
        let refusal = Refusal::ReviewFailed(Error::Kube(kube::Error::Api(Box::new(status))));
        assert_eq!(refusal.status().code(), Code::Unavailable);
        assert_eq!(refusal.reason(), "review_failed");
    }
}
