//! `breakwater-operator render` as a user runs it: one proxy or every Pod, YAML or JSON, the
//! bootstrap's xDS address from flags, and what happens with an unknown or malformed proxy.

use std::{path::Path, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_breakwater-operator");
const API_POD: &str = "shop/api-7c9f8d6b5-x2kqp";

fn render(args: &[&str]) -> (Option<i32>, String, String) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let output = Command::new(BIN)
        .args(["render", "--dir", examples.to_str().expect("utf-8 path")])
        .args(args)
        .output()
        .expect("binary runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn one_proxy_as_json_is_a_discovery_like_document() {
    let (code, stdout, stderr) = render(&["--proxy", API_POD, "-o", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(doc["node"], API_POD);
    let types: Vec<&str> = doc["discovery"]
        .as_array()
        .expect("discovery")
        .iter()
        .map(|r| r["type_url"].as_str().expect("type_url"))
        .collect();
    assert_eq!(
        types,
        [
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "type.googleapis.com/envoy.config.route.v3.VirtualHost",
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "type.googleapis.com/breakwater.agent.v1alpha1.AgentConfig",
            "type.googleapis.com/breakwater.agent.v1alpha1.BreakerRule",
        ]
    );
    for response in doc["discovery"].as_array().expect("discovery") {
        for resource in response["resources"].as_array().expect("resources") {
            assert_eq!(resource["@type"], response["type_url"]);
        }
    }
    let xds = &doc["bootstrap"]["static_resources"]["clusters"][0];
    assert_eq!(xds["name"], "breakwater_xds");
    let address = &xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
    // Envoy reaches the operator through its agent's ADS proxy, on loopback.
    assert_eq!(address["socket_address"]["address"], "127.0.0.1");
    assert_eq!(address["socket_address"]["port_value"], 15083);
    assert_eq!(doc["bootstrap"]["node"]["id"], API_POD);
}

/// The resources of one type in a rendered proxy.
fn resources<'a>(doc: &'a serde_json::Value, type_url: &str) -> &'a Vec<serde_json::Value> {
    let response = doc["discovery"].as_array().expect("discovery").iter().find(|r| r["type_url"] == type_url);
    response.and_then(|r| r["resources"].as_array()).unwrap_or_else(|| panic!("no {type_url}"))
}

/// The payments example's breaker as a user reads it in `render`: the route named after it
/// with its descriptor, the outbound listener's check and access log, the agents' rule (a
/// resource of its own, not in the agent's configuration).
#[test]
fn the_payments_breaker_is_rendered_in_routes_listener_and_agent() {
    let (code, stdout, stderr) = render(&["--proxy", API_POD, "-o", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");

    let hosts = resources(&doc, "type.googleapis.com/envoy.config.route.v3.VirtualHost");
    let payments = hosts
        .iter()
        .find(|h| h["name"] == "outbound_http/payments.shop.svc.cluster.local:80")
        .expect("payments");
    let route = &payments["routes"][0];
    assert_eq!(route["name"], "shop/payments:80");
    assert_eq!(
        route["route"]["rate_limits"],
        serde_json::json!([{ "actions": [{ "generic_key": {
            "descriptor_key": "breakwater.breaker", "descriptor_value": "shop/payments:80" } }] }])
    );
    let named: Vec<&serde_json::Value> =
        hosts.iter().filter(|h| h["routes"][0].get("name").is_some()).collect();
    assert_eq!(named.len(), 2, "only the breaker's routes are named (its qualified and short hosts)");

    let listeners = resources(&doc, "type.googleapis.com/envoy.config.listener.v3.Listener");
    let listener = listeners.iter().find(|l| l["name"] == "outbound_http").expect("outbound_http");
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    let filters: Vec<&str> =
        hcm["http_filters"].as_array().expect("filters").iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(filters, ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]);
    let check = &hcm["http_filters"][0]["typed_config"];
    assert_eq!(check["domain"], "breakwater");
    assert_eq!(check["rate_limited_status"]["code"], "ServiceUnavailable");
    assert!(check.get("failure_mode_deny").is_none(), "false: the call goes on when the agent is silent");
    let log = &hcm["access_log"][0];
    assert_eq!(log["name"], "envoy.access_loggers.http_grpc");
    assert_eq!(log["filter"]["extension_filter"]["typed_config"]["expression"], "xds.route_name != ''");
    assert_eq!(log["typed_config"]["common_config"]["log_name"], "breakwater_breaker");
    assert_eq!(
        log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"],
        "breakwater_agent"
    );

    let agent = &resources(&doc, "type.googleapis.com/breakwater.agent.v1alpha1.AgentConfig")[0];
    assert!(agent.get("breakers").is_none(), "{agent}");
    assert_eq!(
        resources(&doc, "type.googleapis.com/breakwater.agent.v1alpha1.BreakerRule"),
        &[serde_json::json!({
            "@type": "type.googleapis.com/breakwater.agent.v1alpha1.BreakerRule",
            "id": "shop/payments:80", "policy": "shop/payments", "failureRateThreshold": 50,
            "slowCallMs": 2000, "slowCallRateThreshold": 80, "window": "Count", "windowSize": 100,
            "windowMs": 0, "minimumCalls": 20, "openMs": 30000, "halfOpenCalls": 3, "fallback": "Admit",
        })]
    );
}

#[test]
fn every_pod_as_yaml_documents() {
    let (code, stdout, stderr) = render(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let proxies: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("# proxy ")).collect();
    assert_eq!(
        proxies,
        [
            "billing/billing-worker-84c6d5f7b9-tq9vd",
            "billing/ledger-6f4d9c8b7-k2j5n",
            "shop/api-7c9f8d6b5-m4n8z",
            API_POD,
            "shop/payments-5d8b7c4f9-q7wzt",
        ]
    );
    assert_eq!(stdout.lines().filter(|l| *l == "---").count(), 4);
}

#[test]
fn an_unknown_pod_gets_the_outbound_side_with_a_note() {
    let (code, stdout, stderr) = render(&["--proxy", "shop/not-a-pod", "-o", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("no Pod shop/not-a-pod"), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let listeners = &doc["discovery"][0]["resources"];
    assert_eq!(listeners.as_array().map(Vec::len), Some(1));
    assert_eq!(listeners[0]["name"], "outbound_http");
    // Its Envoy asks about the breakers on the outbound routes, so its agent has them.
    let breakers = resources(&doc, "type.googleapis.com/breakwater.agent.v1alpha1.BreakerRule");
    assert_eq!(breakers[0]["id"], "shop/payments:80");
    let agent = &resources(&doc, "type.googleapis.com/breakwater.agent.v1alpha1.AgentConfig")[0];
    assert!(agent.get("rateLimits").is_none_or(|r| r.as_array().is_some_and(Vec::is_empty)));
}

#[test]
fn a_malformed_proxy_is_refused() {
    let (code, stdout, stderr) = render(&["--proxy", "just-a-pod"]);
    assert_eq!(code, Some(1));
    assert!(stdout.is_empty());
    assert!(stderr.contains("is not NAMESPACE/POD"), "{stderr}");
}
