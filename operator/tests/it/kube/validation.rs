//! Standalone mode against the real API server: every bad object the tests feed to
//! standalone-mode validation (the corpus in crds/tests/common/corpus.rs) is created on the
//! server, which must refuse it, and `breakwater_api::validate_object` must give exactly the
//! field errors the server gave, word for word. The good objects (examples/, the corpus's full
//! examples, each CEL rule's good spec) must pass both.
//!
//! The server's answer is read from what it sent: the causes of a 422 Invalid, or the unknown
//! fields of a 400 BadRequest from strict field validation (`fieldValidation=Strict`, which
//! `kubectl apply` sends by default and standalone mode follows). kube 4.2's `PostParams` has
//! no field validation, so the create request is built by hand.
//!
//! What only the operator judges (an Override policy outside the root namespace gets a
//! `RootNamespaceOnly` condition, not a field error) is not a schema error. The corpus marks
//! those cases (`cli::RefusedBy::Operator`), so they are left out of the bad objects by
//! construction; here they must pass `validate_object` and the server's create.

use breakwater_api::{FieldError, crd_for, validate_object};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    core::Status,
};
use serde_json::Value;

use super::{admin, namespace, plane};
use crate::standalone_cli::corpus;

/// Creates `object` as a resource of `crd` in `namespace` with strict field validation (and
/// nothing stored with `dry_run`). `Err` holds the server's refusal.
async fn create(
    client: &Client,
    crd: &CustomResourceDefinition,
    namespace: &str,
    object: &Value,
    dry_run: bool,
) -> Result<(), Box<Status>> {
    let api_version = object["apiVersion"].as_str().expect("the object has an apiVersion");
    let path = format!("/apis/{api_version}/namespaces/{namespace}/{}", crd.spec.names.plural);
    let body = serde_json::to_vec(object).expect("an object serializes");
    let mut request =
        kube::core::Request::new(&path).create(&PostParams::default(), body).expect("a create request");
    let query = if dry_run { "fieldValidation=Strict&dryRun=All" } else { "fieldValidation=Strict" };
    *request.uri_mut() = format!("{path}?{query}").parse().expect("a request URI");
    match client.request::<Value>(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status),
        Err(err) => panic!("cannot create {path}: {err}"),
    }
}

/// The CRD serving a corpus object; every object of the corpus is a Breakwater kind.
fn crd_of(object: &Value) -> &'static CustomResourceDefinition {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    crd_for(api_version, kind).unwrap_or_else(|| panic!("no CRD serves {api_version} {kind}"))
}

/// What standalone mode says about `object`, one line per error, sorted.
fn standalone(object: &Value) -> Vec<String> {
    sorted(validate_object(crd_of(object), object).iter().map(ToString::to_string))
}

fn sorted(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut lines: Vec<String> = lines.into_iter().collect();
    lines.sort();
    lines
}

/// The field errors of a refusal, worded as `FieldError` prints them, sorted; `Err` with the
/// whole answer when it is not a field-error refusal.
fn field_errors(status: &Status) -> Result<Vec<String>, String> {
    let answer = || format!("{} {}: {}", status.code, status.reason, status.message);
    match (status.code, status.reason.as_str()) {
        (422, "Invalid") => {
            let causes = status.details.as_ref().map(|d| d.causes.as_slice()).unwrap_or_default();
            if causes.is_empty() {
                return Err(format!("a 422 without causes: {}", answer()));
            }
            Ok(sorted(causes.iter().map(|cause| {
                // Go prints the nil path of "some validation rules were not checked" as
                // `<nil>`; a `FieldError` without a path prints its message alone.
                let path = if cause.field == "<nil>" { "" } else { cause.field.as_str() };
                FieldError { path: path.into(), message: cause.message.clone() }.to_string()
            })))
        }
        (400, "BadRequest") => {
            // `LockLease in version "v1alpha1" cannot be handled as a LockLease: strict decoding
            // error: unknown field "spec.a", unknown field "spec.b"`: no causes, one message.
            let (_, unknown) = status.message.split_once("strict decoding error: ").ok_or_else(answer)?;
            Ok(sorted(unknown.split(", ").map(|item| {
                match item.strip_prefix("unknown field \"").and_then(|f| f.strip_suffix('"')) {
                    Some(field) => format!("{field}: {item}"),
                    None => item.to_owned(),
                }
            })))
        }
        _ => Err(answer()),
    }
}

/// The server's field errors for `object`, created in `namespace`.
async fn server_errors(client: &Client, namespace: &str, object: &Value) -> Result<Vec<String>, String> {
    let crd = crd_of(object);
    match create(client, crd, namespace, object, false).await {
        Ok(()) => {
            // Remove it, so that the next object of the same name is judged on its own.
            let plural = &crd.spec.names.plural;
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            plane().kubectl_ok(&["delete", &format!("{plural}.breakwater.dev"), name, "-n", namespace]);
            Err("accepted".into())
        }
        Err(status) => field_errors(&status),
    }
}

/// Where the bad input is the namespace name itself, the object cannot be put in the test
/// namespace, and the API server refuses the create with 404 (no namespace of that name can
/// exist) before it validates anything. Its judgement of the name is asked of a Namespace of
/// that name: the API server checks a Namespace's name and an object's `metadata.namespace`
/// with one function, and standalone mode must word it the same.
async fn server_errors_on_namespace(client: &Client, object: &Value) -> Result<Vec<String>, String> {
    let bad = object["metadata"]["namespace"].as_str().unwrap_or_default();
    match create(client, crd_of(object), bad, object, false).await {
        Err(status) if status.code == 404 && status.reason == "NotFound" => {}
        Ok(()) => return Err(format!("created in namespace {bad:?}")),
        Err(status) => {
            return Err(format!("refused with {} {}: {}", status.code, status.reason, status.message));
        }
    }
    let namespaces = Api::<Namespace>::all(client.clone());
    let candidate = Namespace {
        metadata: ObjectMeta { name: Some(bad.into()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    match namespaces.create(&PostParams { dry_run: true, ..PostParams::default() }, &candidate).await {
        Ok(_) => Err(format!("the server takes {bad:?} as a namespace name")),
        // Only the name's errors: the server also checks the label it would give the
        // Namespace (`kubernetes.io/metadata.name`), which the object does not have.
        Err(kube::Error::Api(status)) => Ok(field_errors(&status)?
            .into_iter()
            .filter_map(|line| {
                line.strip_prefix("metadata.name: ").map(|e| format!("metadata.namespace: {e}"))
            })
            .collect()),
        Err(err) => panic!("cannot create Namespace {bad}: {err}"),
    }
}

#[tokio::test]
async fn every_bad_object_is_refused_with_the_words_standalone_mode_uses() {
    let client = admin().await;
    let ns = namespace("validation", &[]);
    let bad_objects = corpus::bad_objects();
    assert!(bad_objects.len() > 50, "the corpus lost its bad objects: {}", bad_objects.len());
    let mut mismatches = Vec::new();
    for (name, mut object) in bad_objects {
        let expected = standalone(&object);
        // Standalone mode's answer only picks how to ask the server: if it missed a bad
        // namespace, the object is moved to the test namespace, the server accepts it, and the
        // test fails all the same.
        let answer = if expected.iter().any(|e| e.starts_with("metadata.namespace: ")) {
            server_errors_on_namespace(&client, &object).await
        } else {
            object["metadata"]["namespace"] = ns.clone().into();
            server_errors(&client, &ns, &object).await
        };
        let report = match answer {
            Ok(server) if server == expected => continue,
            Ok(server) => format!("server:     {server:#?}\nstandalone: {expected:#?}"),
            Err(answer) => {
                format!("server:     not a field-error refusal: {answer}\nstandalone: {expected:#?}")
            }
        };
        mismatches.push(format!("== {name}\n{report}\nobject: {object}"));
    }
    assert!(
        mismatches.is_empty(),
        "{} bad objects were not refused with the words standalone mode uses:\n\n{}",
        mismatches.len(),
        mismatches.join("\n\n")
    );
}

#[tokio::test]
async fn good_objects_are_accepted_by_both() {
    let client = admin().await;
    let ns = namespace("validation-good", &[]);
    let corpus_examples =
        corpus::EXAMPLES.iter().map(|(name, yaml)| (format!("corpus: {name}"), corpus::from_yaml(yaml)));
    let good: Vec<(String, Value)> = corpus::repository_examples()
        .into_iter()
        .chain(corpus_examples)
        .chain(corpus::rule_good_objects())
        // Refused by the operator only: the schema, and so the server, accepts them.
        .chain(corpus::operator_verdicts())
        .collect();
    let mut refused = Vec::new();
    for (name, mut object) in good {
        // The examples name their own namespaces; the server takes any name in the test's.
        object["metadata"]["namespace"] = ns.clone().into();
        let standalone = standalone(&object);
        let server = match create(&client, crd_of(&object), &ns, &object, true).await {
            Ok(()) => Ok(Vec::new()),
            Err(status) => field_errors(&status),
        };
        if server != Ok(Vec::new()) || !standalone.is_empty() {
            refused.push(format!("== {name}\nserver:     {server:#?}\nstandalone: {standalone:#?}"));
        }
    }
    assert!(refused.is_empty(), "good objects were refused:\n\n{}", refused.join("\n\n"));
}

#[tokio::test]
async fn another_kind_is_refused_with_the_same_words() {
    // Not a corpus object (standalone mode picks the CRD by kind, so it never validates one kind
    // against another's CRD), but `validate_object` can be called so.
    let client = admin().await;
    let ns = namespace("validation-kind", &[]);
    let mut lease =
        corpus::from_yaml(corpus::EXAMPLES.iter().find(|(n, _)| *n == "LockLease").expect("a LockLease").1);
    lease["metadata"]["namespace"] = ns.clone().into();
    let crd = crd_of(&lease);
    lease["kind"] = "Lease".into();
    let expected = sorted(validate_object(crd, &lease).iter().map(ToString::to_string));
    let server = match create(&client, crd, &ns, &lease, false).await {
        Ok(()) => Err("accepted".to_owned()),
        Err(status) => field_errors(&status),
    };
    assert_eq!(server, Ok(expected), "server (left) and standalone (right) differ on another kind");
}
