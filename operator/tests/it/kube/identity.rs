//! Every ADS stream proves which pod it is: an operator in cluster mode (`run`), its ADS
//! streams opened by test clients presenting real projected ServiceAccount tokens, minted by
//! the real API server's TokenRequest API and bound to Pods created there, and checked by
//! the operator with real TokenReviews. The operator runs as a ServiceAccount of its own, so
//! the API server's audit log counts its TokenReviews too.
//!
//! The expired token is signed here with the plane's own ServiceAccount signing key (the
//! harness makes it): TokenRequest refuses lifetimes under 10 minutes, so no token the API
//! server issues expires within a test. It is a real token of the pod, re-signed with `exp`,
//! `iat` and `nbf` two hours earlier; the same token re-signed with its times unchanged is
//! served, so the refusal is the expiry's.

use std::time::{Duration, SystemTime};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use breakwater_operator::xds::DEFAULT_AUDIENCE;
use serde_json::{Value, json};
use tonic::Code;

use super::{
    DEADLINE, OPERATOR, Operator, client, eventually, kubectl_apply, namespace, plane, pod_with_account,
};
use crate::support::ads::{Client, first_answer};

/// How long the tokens the tests request live (the API server's minimum is 10 minutes).
const LIFETIME: Duration = Duration::from_secs(3600);

/// An operator running as ServiceAccount `operator` of a fresh namespace (bound to
/// cluster-admin: RBAC is `rbac.rs`'s concern), and two pods there running as `api`.
struct World {
    ns: String,
    operator: Operator,
    /// The operator's username, as the audit log names it.
    user: String,
}

impl World {
    async fn start(name: &str) -> World {
        let plane = plane();
        let ns = namespace(name, &[]);
        let binding = format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: operator, namespace: {ns}}}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {ns}-operator}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}\n\
             subjects: [{{kind: ServiceAccount, name: operator, namespace: {ns}}}]\n"
        );
        kubectl_apply(&ns, &binding);
        let account = plane.service_account(&ns, "operator");
        pod_with_account(&ns, "api-0", "api", "app: api, lease: held");
        pod_with_account(&ns, "api-1", "api", "app: api");
        let operator = Operator::start(client(&account.kubeconfig).await, &ns);
        let ready = || async {
            let answer = operator.get("/readyz").await;
            if answer.as_deref() == Some("ready") { Ok(()) } else { Err(format!("/readyz: {answer:?}")) }
        };
        eventually("the operator is ready", DEADLINE, ready).await;
        World { user: format!("system:serviceaccount:{ns}:operator"), ns, operator }
    }

    fn node(&self, pod: &str) -> String {
        format!("{}/{pod}", self.ns)
    }

    fn token(&self, pod: &str) -> String {
        plane().pod_token(&self.ns, "api", pod, DEFAULT_AUDIENCE, LIFETIME)
    }

    /// The refusals counted with `reason`.
    async fn refusals(&self, reason: &str) -> f64 {
        self.operator.metric(&format!("breakwater_xds_stream_refusals_total{{reason=\"{reason}\"}}")).await
    }

    /// The TokenReviews the operator counted, whatever their outcome.
    async fn reviews(&self) -> f64 {
        let mut total = 0.0;
        for outcome in ["authenticated", "unauthenticated", "error"] {
            let sample = format!("breakwater_xds_token_reviews_total{{outcome=\"{outcome}\"}}");
            total += self.operator.metric(&sample).await;
        }
        total
    }

    /// Opens a stream of `node` presenting `token`, which must be refused with `code`, counted
    /// once more under `reason`, in words that do not hold the token; the refusal.
    async fn refused(&self, node: &str, token: Option<&str>, code: Code, reason: &str) -> tonic::Status {
        let before = self.refusals(reason).await;
        let status = match first_answer(&self.operator.xds_endpoint(), node, token).await {
            Ok(response) => panic!("{node} was served {} (a token: {})", response.type_url, token.is_some()),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{status:?}");
        if let Some(token) = token {
            assert!(!status.message().contains(token), "the token is echoed: {}", status.code());
        }
        assert_eq!(self.refusals(reason).await, before + 1.0, "refusals counted as {reason}");
        status
    }

    async fn served(&self, node: &str, token: &str) {
        if let Err(status) = first_answer(&self.operator.xds_endpoint(), node, Some(token)).await {
            panic!("{node} was refused: {status:?}");
        }
    }
}

/// What the API server answers an admin's TokenReview of `token` for `audience`.
fn review(token: &str, audience: &str) -> Value {
    let manifest = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    });
    let plane = plane();
    let out = plane.kubectl_as(
        &plane.kubeconfig,
        &["create", "-f", "-", "-o", "json"],
        Some(&manifest.to_string()),
    );
    assert!(out.status.success(), "TokenReview: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a TokenReview")
}

/// A JWT's header and claims.
fn decode(token: &str) -> (Value, Value) {
    let part = |i: usize| -> Value {
        let text = token.split('.').nth(i).expect("three parts");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).expect("base64url")).expect("JSON")
    };
    (part(0), part(1))
}

/// A JWT of `header` and `claims` signed ES256 with `key` (PKCS#8, P-256).
fn sign(key: &[u8], header: &Value, claims: &Value) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("JSON"));
    let input = format!("{}.{}", encode(header), encode(claims));
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key, &rng).expect("a P-256 key");
    let signature = pair.sign(&rng, input.as_bytes()).expect("signed");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// The `create tokenreviews` requests `user` made, per the audit log (one event per request:
/// the policy omits RequestReceived); None on an external cluster.
fn audited_reviews(user: &str) -> Option<usize> {
    let audit = plane().audit_log()?;
    let count = audit
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["user"]["username"] == user && e["verb"] == "create")
        .filter(|e| e["objectRef"]["resource"] == "tokenreviews")
        .count();
    Some(count)
}

#[tokio::test]
async fn a_stream_with_its_pods_token_is_served_and_its_acks_count() {
    let _one_operator = OPERATOR.lock().await;
    let world = World::start("identity-own").await;
    let lease = "apiVersion: breakwater.dev/v1alpha1\nkind: LockLease\nmetadata: {name: lock}\n\
                 spec: {ttl: 30s, podSelector: {matchLabels: {lease: held}}}\n";
    kubectl_apply(&world.ns, lease);

    let token = world.token("api-0");
    let proxy =
        Client::connect_with_token(&world.operator.xds_endpoint(), &world.node("api-0"), Some(&token))
            .await
            .expect("the pod's own token is accepted");
    let acknowledging = tokio::spawn(proxy.acknowledge_everything());
    let programmed = eventually("the LockLease is Programmed on the proxy's ACKs", DEADLINE, || async {
        let json = plane().kubectl_ok(&["get", "ll", "lock", "-n", &world.ns, "-o", "json"]);
        let object: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        let condition = object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Programmed")
            .cloned()
            .unwrap_or_default();
        if condition["status"] == "True" { Ok(condition) } else { Err(condition.to_string()) }
    })
    .await;
    assert_eq!(programmed["message"], "acknowledged by 1/1 proxies", "{programmed}");
    assert_eq!(world.operator.metric("breakwater_xds_connected_proxies").await, 1.0);
    assert_eq!(world.reviews().await, 1.0, "one TokenReview for the one stream");
    acknowledging.abort();
    world.operator.stop().await;
}

#[tokio::test]
async fn a_stream_without_a_valid_token_is_unauthenticated() {
    let _one_operator = OPERATOR.lock().await;
    let world = World::start("identity-none").await;
    let node = world.node("api-0");

    let status = world.refused(&node, None, Code::Unauthenticated, "missing_token").await;
    assert!(status.message().contains("authorization: Bearer"), "{status:?}");

    world.refused(&node, Some("not-a-token-at-all"), Code::Unauthenticated, "unauthenticated").await;

    // The pod's own token, for another audience (the API server's, say).
    let other = plane().pod_token(&world.ns, "api", "api-0", "https://kubernetes.default.svc", LIFETIME);
    let status = world.refused(&node, Some(&other), Code::Unauthenticated, "unauthenticated").await;
    assert!(status.message().contains("audience"), "the API server names the audience: {status:?}");

    // A valid token for the audience, but bound to no pod: it names no node id.
    let unbound = plane()
        .kubectl_ok(&["create", "token", "api", "-n", &world.ns, &format!("--audience={DEFAULT_AUDIENCE}")])
        .trim()
        .to_string();
    let status = world.refused(&node, Some(&unbound), Code::Unauthenticated, "not_pod_bound").await;
    assert!(status.message().contains("not bound to a pod"), "{status:?}");
    assert_eq!(world.operator.metric("breakwater_xds_connected_proxies").await, 0.0);
    world.operator.stop().await;
}

#[tokio::test]
async fn another_pods_token_is_permission_denied() {
    let _one_operator = OPERATOR.lock().await;
    let world = World::start("identity-other").await;
    let token = world.token("api-1");
    let status = world.refused(&world.node("api-0"), Some(&token), Code::PermissionDenied, "wrong_pod").await;
    let message = status.message();
    assert!(message.contains(&world.node("api-1")) && message.contains(&world.node("api-0")), "{message}");
    // The same token serves its own pod (from the cache: the review named api-1 already).
    world.served(&world.node("api-1"), &token).await;
    assert_eq!(world.reviews().await, 1.0);
    world.operator.stop().await;
}

#[tokio::test]
async fn a_token_whose_pod_was_deleted_is_unauthenticated() {
    let _one_operator = OPERATOR.lock().await;
    let world = World::start("identity-deleted").await;
    pod_with_account(&world.ns, "gone-0", "api", "app: gone");
    let (token, witness) = (world.token("gone-0"), world.token("gone-0"));
    plane().kubectl_ok(&["delete", "pod", "gone-0", "-n", &world.ns, "--wait=true"]);
    // The API server checks the bound pod through its informer: wait until it refuses a
    // token of the pod (the witness) so that the operator's first review of `token` sees the
    // pod gone. The API server caches each token's verdict for a few seconds, hence a token
    // of its own.
    eventually("the API server refuses the deleted pod's tokens", DEADLINE, || async {
        let reviewed = review(&witness, DEFAULT_AUDIENCE);
        if reviewed["status"]["authenticated"] == true { Err(reviewed["status"].to_string()) } else { Ok(()) }
    })
    .await;
    world.refused(&world.node("gone-0"), Some(&token), Code::Unauthenticated, "unauthenticated").await;
    world.operator.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_unauthenticated() {
    let _one_operator = OPERATOR.lock().await;
    let Some(key) = plane().service_account_signing_key() else {
        eprintln!(
            "external cluster: its ServiceAccount signing key is not ours, so no expired token is made"
        );
        return;
    };
    let world = World::start("identity-expired").await;
    let (header, claims) = decode(&world.token("api-0"));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs();
    let at = |age: u64| json!(now - age);
    let mut expired = claims.clone();
    expired["iat"] = at(2 * 3600);
    expired["nbf"] = at(2 * 3600);
    expired["exp"] = at(3600);
    let token = sign(&key, &header, &expired);
    let status =
        world.refused(&world.node("api-0"), Some(&token), Code::Unauthenticated, "unauthenticated").await;
    assert!(status.message().contains("expired"), "the API server names the expiry: {status:?}");
    // The control: the same claims with their own times, signed the same way, are served.
    world.served(&world.node("api-0"), &sign(&key, &header, &claims)).await;
    world.operator.stop().await;
}

#[tokio::test]
async fn reconnecting_costs_one_token_review() {
    let _one_operator = OPERATOR.lock().await;
    let world = World::start("identity-cache").await;
    let token = world.token("api-0");
    const RECONNECTS: usize = 20;
    for _ in 0..RECONNECTS {
        world.served(&world.node("api-0"), &token).await;
    }
    assert_eq!(world.reviews().await, 1.0, "one TokenReview for {RECONNECTS} streams");
    assert_eq!(
        world.operator.metric("breakwater_xds_token_review_cache_hits_total").await,
        (RECONNECTS - 1) as f64
    );
    // A refusal for the node id costs no review either: the token is known.
    world.refused(&world.node("api-1"), Some(&token), Code::PermissionDenied, "wrong_pod").await;
    assert_eq!(world.reviews().await, 1.0);
    match audited_reviews(&world.user) {
        Some(_) => {
            let user = world.user.clone();
            eventually("the audit log agrees with the operator's count", DEADLINE, || async {
                let audited = audited_reviews(&user).unwrap_or_default();
                if audited == 1 { Ok(()) } else { Err(format!("{audited} TokenReviews audited")) }
            })
            .await;
        }
        None => eprintln!("external cluster: no audit log, so the count is the operator's alone"),
    }
    world.operator.stop().await;
}
