//! The mutating admission webhook: `POST /inject` over HTTPS, an `AdmissionReview` in, the
//! same review out with a JSON patch (or a denial that says why). Every replica serves it —
//! admission must not wait for leadership — with the certificate [`super::certs`] keeps.

use std::{sync::Arc, time::Instant};

use axum::{Json, Router, extract::State as AxumState, routing::post};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    certs::Resolver,
    config::Config,
    pod::{self, Decision, NODE_ID, NODE_NAMESPACE},
};
use crate::{
    error::{Error, Result},
    http::State,
    metrics::InjectionLabels,
    render,
};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/inject";

/// Decides admissions; holds what is the same for every pod.
#[derive(Debug)]
pub struct Injector {
    config: Config,
    /// The Envoy bootstrap as protobuf-JSON, with the node id left to the kubelet.
    bootstrap: String,
}

impl Injector {
    pub fn new(config: Config) -> Result<Self> {
        let bootstrap = render::bootstrap_json(NODE_ID, NODE_NAMESPACE)?;
        Ok(Injector { config, bootstrap })
    }

    /// What happens to `pod` (its JSON) in `namespace`.
    pub fn decide(&self, pod: &serde_json::Value, namespace: &str) -> Decision {
        pod::inject(pod, namespace, &self.bootstrap, &self.config)
    }

    /// The answer to one review. A request that cannot be read is refused as invalid; a pod
    /// the injector leaves alone is allowed unchanged.
    pub fn review(
        &self,
        review: AdmissionReview<DynamicObject>,
        state: &State,
    ) -> AdmissionReview<DynamicObject> {
        let started = Instant::now();
        let request: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(request) => request,
            Err(err) => {
                count(state, "invalid", "unreadable-review");
                return AdmissionResponse::invalid(err.to_string()).into_review();
            }
        };
        let response = self.respond(&request, state);
        state.metrics.admission_duration.observe(started.elapsed().as_secs_f64());
        response.into_review()
    }

    fn respond(&self, request: &AdmissionRequest<DynamicObject>, state: &State) -> AdmissionResponse {
        let allowed = AdmissionResponse::from(request);
        let (Operation::Create, Some(object)) = (&request.operation, &request.object) else {
            count(state, "skipped", "not-a-create");
            return allowed;
        };
        let namespace =
            request.namespace.clone().or_else(|| object.metadata.namespace.clone()).unwrap_or_default();
        let original = match serde_json::to_value(object) {
            Ok(value) => value,
            Err(err) => return AdmissionResponse::invalid(format!("the pod cannot be read: {err}")),
        };
        match self.decide(&original, &namespace) {
            Decision::Skip(why) => {
                count(state, "skipped", why.as_str());
                allowed
            }
            Decision::Deny(message) => {
                count(state, "denied", "bad-annotation");
                tracing::info!(namespace, %message, "pod refused by the sidecar injector");
                allowed.deny(format!("breakwater sidecar injection: {message}"))
            }
            Decision::Inject { pod, mode } => {
                match allowed.clone().with_patch(json_patch::diff(&original, &pod)) {
                    Ok(patched) => {
                        count(state, "injected", mode.as_str());
                        patched
                    }
                    Err(err) => {
                        count(state, "error", "patch");
                        allowed.deny(format!("breakwater sidecar injection failed: {err}"))
                    }
                }
            }
        }
    }
}

fn count(state: &State, result: &'static str, detail: &'static str) {
    state.metrics.injections.get_or_create(&InjectionLabels { result, detail }).inc();
}

fn router(injector: Arc<Injector>, state: Arc<State>) -> Router {
    Router::new()
        .route(
            PATH,
            post(
                |AxumState((injector, state)): AxumState<(Arc<Injector>, Arc<State>)>,
                 Json(review): Json<AdmissionReview<DynamicObject>>| async move {
                    Json(injector.review(review, &state))
                },
            ),
        )
        .with_state((injector, state))
}

/// How long a client has to finish the TLS handshake; a stalled one must not hold a task.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the webhook on `listener` with the certificate `resolver` holds, until `stop`.
pub async fn serve(
    listener: TcpListener,
    injector: Arc<Injector>,
    resolver: Arc<Resolver>,
    state: Arc<State>,
    stop: CancellationToken,
) -> Result<()> {
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| Error::Certificate(err.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let service = TowerToHyperService::new(router(injector, state));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "webhook accept failed");
                    continue;
                }
            },
        };
        let (acceptor, service, stop) = (acceptor.clone(), service.clone(), stop.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => return tracing::debug!(%peer, error = %err, "webhook TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "webhook TLS handshake timed out"),
            };
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => if let Err(err) = served {
                    tracing::debug!(%peer, error = %err, "webhook connection ended with an error");
                },
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn review(object: serde_json::Value, operation: &str) -> AdmissionReview<DynamicObject> {
        serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "5f1c",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "alice"},
                "object": object,
                "dryRun": false,
            },
        }))
        .expect("a review")
    }

    fn pod(annotations: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api", "annotations": annotations},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    }

    fn answer(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
        let injector = Injector::new(Config::default()).expect("bootstrap renders");
        serde_json::to_value(injector.review(review, &State::default())).expect("serializes")
    }

    #[test]
    fn a_pod_is_answered_with_a_json_patch_that_yields_the_injected_pod() {
        let original = pod(json!({}));
        let answer = answer(review(original.clone(), "CREATE"));
        let response = &answer["response"];
        assert_eq!(response["uid"], "5f1c");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // kube serializes the patch's bytes as a JSON array, which the API server's decoder
        // reads as it reads base64 (the real-API-server suite checks that).
        let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).expect("patch bytes");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
        let mut patched = original;
        json_patch::patch(&mut patched, &patch).expect("applies");
        assert_eq!(patched["spec"]["initContainers"][2]["name"], pod::PROXY_CONTAINER);
        assert_eq!(patched["spec"]["containers"][0]["name"], "app");
    }

    #[test]
    fn bad_annotations_are_denied_and_updates_pass() {
        let denied = answer(review(pod(json!({pod::MODE_ANNOTATION: "both"})), "CREATE"));
        assert_eq!(denied["response"]["allowed"], false);
        let message = denied["response"]["status"]["message"].as_str().expect("message");
        assert!(message.contains(pod::MODE_ANNOTATION), "{message}");
        let update = answer(review(pod(json!({pod::MODE_ANNOTATION: "both"})), "UPDATE"));
        assert_eq!(update["response"]["allowed"], true);
        assert_eq!(update["response"].get("patch"), None);
    }
}
