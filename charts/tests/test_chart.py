"""Lint and render the Breakwater Helm chart with real Helm (v4, embedded by helm-python-sdk).

No cluster is needed: `helm_python.lint` runs `helm lint`, and `Chart.render` runs the
template engine offline exactly as `helm template` / `helm install` would (values schema
included). The RBAC the chart grants is compared with the rules the operator itself says
it needs: the JSON printed by `breakwater-operator rbac`, whose path is given in the
environment variable BREAKWATER_EXPECTED_RBAC (the chart narrows some rules to the objects
it names with resourceNames, which that list cannot know: those names are checked against
the Deployment's flags). The flags and environment the Deployment sets are compared with
what `breakwater-operator run --help` says it reads, from the file named by
BREAKWATER_OPERATOR_RUN_HELP. The operator binary itself, named by BREAKWATER_OPERATOR_BIN,
checks the injection configuration the chart renders (`breakwater-operator inject`) and the
Deployment's arguments (`breakwater-operator run`, up to connecting to the API server).

Run (from the repository root; `make chart-test` does all of it):
    cargo build -q -p breakwater-operator
    target/debug/breakwater-operator rbac > target/expected-rbac.json
    target/debug/breakwater-operator run --help > target/operator-run-help.txt
    BREAKWATER_EXPECTED_RBAC=target/expected-rbac.json \
    BREAKWATER_OPERATOR_RUN_HELP=target/operator-run-help.txt \
    BREAKWATER_OPERATOR_BIN=target/debug/breakwater-operator .venv/bin/pytest charts/tests -q
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "breakwater"
GENERATED_CRDS_DIR = REPO / "crds" / "yaml"

RELEASE = "bw"
NAMESPACE = "breakwater-system"
FULLNAME = "bw-breakwater"

EXPECTED_CRDS = {
    "circuitbreakerpolicies.breakwater.dev": "CircuitBreakerPolicy",
    "ratelimitpolicies.breakwater.dev": "RateLimitPolicy",
    "lockleases.breakwater.dev": "LockLease",
    "outboxrelays.breakwater.dev": "OutboxRelay",
}
CLUSTER_SCOPED_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
}
RBAC_ENV = "BREAKWATER_EXPECTED_RBAC"
RUN_HELP_ENV = "BREAKWATER_OPERATOR_RUN_HELP"
OPERATOR_BIN_ENV = "BREAKWATER_OPERATOR_BIN"
RULE_KEYS = {"apiGroups", "resources", "verbs"}

# Sidecar injection: the names the chart gives its objects (release "bw").
INJECT_NAME = f"{FULLNAME}-inject"  # the ConfigMap and the MutatingWebhookConfiguration
WEBHOOK_SERVICE = f"{FULLNAME}-webhook"
WEBHOOK_DNS_NAMES = [
    f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc",
    f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc.cluster.local",
]
INJECT_CONFIG_PATH = "/etc/breakwater/inject/inject.yaml"
WEBHOOK_CERT_DIR = "/etc/breakwater/webhook-tls"
EXCLUDED_NAMESPACES = [NAMESPACE, "kube-system", "kube-public"]
CERT_MANAGER = {"injection": {"certManager": {"enabled": True}}}
NO_INJECTION = {"injection": {"enabled": False}}
WEBHOOK_FLAGS = {
    "--webhook-addr",
    "--inject-config",
    "--webhook-cert-secret",
    "--webhook-configuration",
    "--webhook-dns-names",
    "--webhook-cert-dir",
}
MANAGED_CERT_FLAGS = {"--webhook-cert-secret", "--webhook-configuration", "--webhook-dns-names"}

Triple = tuple[str, str, str]

# The rules of `breakwater-operator rbac` the chart grants only when the operator manages the
# webhook's certificate (injection on, cert-manager off), each narrowed by resourceNames to
# the object the Deployment names with the flag given; None where the verb cannot be
# narrowed (a create is authorized before the object has a name).
MANAGED_CERT_RULES: dict[str, dict[Triple, str | None]] = {
    "cluster": {
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "get"): "--webhook-configuration",
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch"): "--webhook-configuration",
    },
    "namespaced": {
        ("", "secrets", "create"): None,
        ("", "secrets", "update"): "--webhook-cert-secret",
    },
}
# The rules of `breakwater-operator rbac` the chart grants only with leader election.
LEADER_ELECTION_RULES: set[Triple] = {
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("", "pods", "patch"),
}

Doc = dict[str, Any]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


class Rendered:
    """The objects of one render, by kind and name."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = ""
        self.docs: list[Doc] = []
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc is None:
                    continue
                assert isinstance(doc, dict), f"{template} rendered a non-object: {doc!r}"
                doc["_template"] = template
                self.docs.append(doc)

    def kinds(self) -> list[str]:
        return sorted(doc["kind"] for doc in self.docs)

    def all(self, kind: str) -> list[Doc]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> Doc:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}: {self.kinds()}"
        return found[0]

    def deployment(self) -> Doc:
        return self.one("Deployment")

    def container(self) -> Doc:
        containers = self.deployment()["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["operator"]
        return containers[0]

    def args(self) -> list[str]:
        return [str(a) for a in self.container()["args"]]

    def flag(self, name: str) -> str:
        """The value after `name` in the container args (flags given as two items)."""
        args = self.args()
        assert args.count(name) == 1, f"{name} should appear once in {args}"
        index = args.index(name)
        assert index + 1 < len(args), f"{name} has no value in {args}"
        return args[index + 1]

    def env(self) -> dict[str, Doc]:
        return {e["name"]: e for e in self.container().get("env", [])}

    def named(self, kind: str, name: str) -> Doc:
        found = [doc for doc in self.all(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, rendered {self.kinds()}"
        return found[0]

    def pod_annotations(self) -> dict[str, str]:
        return self.deployment()["spec"]["template"]["metadata"].get("annotations", {})

    def inject_config(self) -> str:
        """The injection configuration the chart renders (the ConfigMap's inject.yaml)."""
        config_map = self.named("ConfigMap", INJECT_NAME)
        assert set(config_map["data"]) == {"inject.yaml"}
        return config_map["data"]["inject.yaml"]

    def webhook(self) -> Doc:
        """The one webhook of the chart's MutatingWebhookConfiguration."""
        configuration = self.one("MutatingWebhookConfiguration")
        assert configuration["metadata"]["name"] == INJECT_NAME
        assert len(configuration["webhooks"]) == 1, configuration["webhooks"]
        return configuration["webhooks"][0]

    def volume_mounts(self) -> dict[str, Doc]:
        return {m["name"]: m for m in self.container()["volumeMounts"]}

    def volumes(self) -> dict[str, Doc]:
        return {v["name"]: v for v in self.deployment()["spec"]["template"]["spec"]["volumes"]}

    def flags(self) -> list[str]:
        """The flag names in the container args (`--x=y` counts as `--x`)."""
        return [a.split("=", 1)[0] for a in self.args() if a.startswith("--")]


def render(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    namespace: str = NAMESPACE,
    name: str = RELEASE,
) -> Rendered:
    manifests = chart.render(values, name=name, namespace=namespace, is_install=True)
    return Rendered(manifests)


@pytest.fixture(scope="session")
def default(chart: helm.Chart) -> Rendered:
    return render(chart)


def triples(rules: list[Doc], where: str) -> set[Triple]:
    """(apiGroup, resource, verb) for every combination a list of PolicyRules grants."""
    out: set[Triple] = set()
    for rule in rules:
        extra = set(rule) - RULE_KEYS
        assert not extra, (
            f"{where}: rule {rule} has {sorted(extra)}; only apiGroups/resources/verbs rules "
            "are expected (no resourceNames or nonResourceURLs)"
        )
        for key in RULE_KEYS:
            assert isinstance(rule.get(key), list) and rule[key], f"{where}: {key} missing in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def grants(roles: list[Doc]) -> dict[Triple, frozenset[str] | None]:
    """What the chart's roles grant: each (apiGroup, resource, verb) with the names it is
    narrowed to (resourceNames), or None when it applies to every object."""
    out: dict[Triple, frozenset[str] | None] = {}
    for role in roles:
        where = f"{role['kind']} {role['metadata']['name']}"
        for rule in role["rules"]:
            names = rule.get("resourceNames")
            plain = {k: v for k, v in rule.items() if k != "resourceNames"}
            if names is not None:
                assert isinstance(names, list) and names, f"{where}: empty resourceNames in {rule}"
            for triple in triples([plain], where):
                if triple in out and out[triple] is None:
                    continue
                out[triple] = None if names is None else (out.get(triple) or frozenset()) | set(names)
    return out


def strings(value: Any) -> Iterator[str]:
    """Every string inside a nested structure (keys and values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def file_from_env(name: str, hint: str) -> Path:
    """The file the environment variable `name` names; the run fails with `hint` without it."""
    path = os.environ.get(name)
    if not path:
        pytest.fail(f"{name} is not set: {hint}", pytrace=False)
    file = Path(path)
    if not file.is_file():
        pytest.fail(f"{name}={path}: no such file ({file.resolve()}); {hint}", pytrace=False)
    return file


@pytest.fixture(scope="session")
def expected_rbac() -> dict[str, set[Triple]]:
    hint = (
        "it must name the JSON printed by `breakwater-operator rbac` "
        '({"clusterRules": [PolicyRule...], "namespacedRules": [PolicyRule...]}), e.g. '
        "`cargo run -q -p breakwater-operator -- rbac > target/expected-rbac.json && "
        f"{RBAC_ENV}=target/expected-rbac.json pytest charts/tests`"
    )
    file = file_from_env(RBAC_ENV, hint)
    path = os.environ[RBAC_ENV]
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        pytest.fail(f"{RBAC_ENV}={path} is not valid JSON ({exc}); {hint}", pytrace=False)
    if not isinstance(data, dict) or not {"clusterRules", "namespacedRules"} <= set(data):
        pytest.fail(f"{RBAC_ENV}={path} lacks clusterRules/namespacedRules; {hint}", pytrace=False)
    return {
        "cluster": triples(data["clusterRules"], f"{path} clusterRules"),
        "namespaced": triples(data["namespacedRules"], f"{path} namespacedRules"),
    }


@pytest.fixture(scope="session")
def run_help() -> str:
    hint = (
        "it must name the text printed by `breakwater-operator run --help`, e.g. "
        "`cargo run -q -p breakwater-operator -- run --help > target/operator-run-help.txt && "
        f"{RUN_HELP_ENV}=target/operator-run-help.txt pytest charts/tests`"
    )
    text = file_from_env(RUN_HELP_ENV, hint).read_text()
    if "--root-namespace" not in text:
        pytest.fail(
            f"{RUN_HELP_ENV}={os.environ[RUN_HELP_ENV]} is not the help of `run`; {hint}", pytrace=False
        )
    return text


@pytest.fixture(scope="session")
def operator_bin() -> Path:
    hint = (
        "it must name the breakwater-operator binary, e.g. "
        "`cargo build -q -p breakwater-operator && "
        f"{OPERATOR_BIN_ENV}=target/debug/breakwater-operator pytest charts/tests`"
    )
    binary = file_from_env(OPERATOR_BIN_ENV, hint).resolve()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{OPERATOR_BIN_ENV}={binary} is not executable; {hint}", pytrace=False)
    return binary


def fmt(items: set[Triple]) -> str:
    return ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in sorted(items)) or "(none)"


# --------------------------------------------------------------------------- lint


LINT_VALUE_SETS = {
    "defaults": None,
    "single-replica-no-leader-election": {"replicas": 1, "leaderElection": {"enabled": False}},
    "redis-url": {"redis": {"url": "redis://:pw@redis.example:6379/0"}},
    "redis-existing-secret": {"redis": {"existingSecret": "redis-auth", "existingSecretKey": "uri"}},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "breakwater"}},
    "xds-port": {"xds": {"port": 15010}},
    "injection-ignore-agent-mode": {"injection": {"failurePolicy": "Ignore", "mode": "agent"}},
    "injection-disabled": NO_INJECTION,
    "injection-cert-manager": CERT_MANAGER,
    "injection-cert-manager-issuer": {
        "injection": {"certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}}
    },
}


@pytest.mark.parametrize("values", LINT_VALUE_SETS.values(), ids=LINT_VALUE_SETS.keys())
def test_lint_reports_no_errors_or_warnings(values: dict[str, Any] | None) -> None:
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], json.dumps(report, indent=2)


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "breakwater"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"
    assert meta["kubeVersion"] == ">=1.30.0-0"
    assert meta.get("description")


def test_every_default_value_is_documented() -> None:
    """Each leaf of values.yaml has a comment on the line above it or above an enclosing key."""
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = lines[i - 1].strip().startswith("#") or (bool(stack) and stack[-1][1])
        is_leaf = stripped.split(":", 1)[1].strip() != ""
        if is_leaf and not documented:
            undocumented.append(f"line {i + 1}: {stripped}")
        stack.append((indent, documented))
    assert undocumented == [], f"values.yaml values without a comment: {undocumented}"


# --------------------------------------------------------------------------- default render


def test_default_render_kinds(default: Rendered) -> None:
    assert default.kinds() == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "Service",
            "ServiceAccount",
        ]
    )


def test_objects_are_named_labelled_and_namespaced(default: Rendered) -> None:
    for doc in default.docs:
        meta = doc["metadata"]
        where = f"{doc['kind']} from {doc['_template']}"
        assert meta["name"].startswith(FULLNAME), where
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "breakwater", where
        assert labels.get("app.kubernetes.io/instance") == RELEASE, where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert labels.get("helm.sh/chart") == "breakwater-0.1.0", where
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            assert "namespace" not in meta, where
        else:
            assert meta.get("namespace") == NAMESPACE, where


def test_chart_ships_the_four_breakwater_crds(chart: helm.Chart) -> None:
    # Helm installs crds/ before the templates and never renders them, so they are read
    # through the chart (what `helm install` would send), not through render().
    crds = {}
    for entry in chart.crds:
        docs = [d for d in yaml.safe_load_all(entry["data"]) if d is not None]
        assert len(docs) == 1, f"{entry['filename']} should hold one object"
        crds[docs[0]["metadata"]["name"]] = docs[0]
    assert set(crds) == set(EXPECTED_CRDS)
    for name, crd in crds.items():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1", name
        assert crd["kind"] == "CustomResourceDefinition", name
        spec = crd["spec"]
        assert spec["group"] == "breakwater.dev", name
        assert spec["names"]["kind"] == EXPECTED_CRDS[name], name
        assert name == f"{spec['names']['plural']}.breakwater.dev"
        assert spec["scope"] == "Namespaced", name
        assert "breakwater" in spec["names"].get("categories", []), name
        versions = {v["name"]: v for v in spec["versions"]}
        assert "v1alpha1" in versions, name
        assert versions["v1alpha1"]["served"] and versions["v1alpha1"]["storage"], name
        assert versions["v1alpha1"]["schema"]["openAPIV3Schema"]["type"] == "object", name
        assert "status" in versions["v1alpha1"].get("subresources", {}), name


def test_chart_crds_match_the_generated_ones() -> None:
    """charts/breakwater/crds/ is a copy of crds/yaml/ (written by `make crds`)."""
    chart_files = {p.name: p.read_bytes() for p in (CHART_DIR / "crds").glob("*.yaml")}
    generated = {p.name: p.read_bytes() for p in GENERATED_CRDS_DIR.glob("*.yaml")}
    assert sorted(chart_files) == sorted(generated), "run `make crds`"
    stale = [name for name in chart_files if chart_files[name] != generated[name]]
    assert stale == [], f"chart CRDs differ from crds/yaml: {stale}; run `make crds`"


# --------------------------------------------------------------------------- RBAC


def check_rbac(out: Rendered, expected: dict[str, set[Triple]]) -> None:
    """The chart's roles grant exactly `breakwater-operator rbac`'s rules, less the ones its
    values make unnecessary (managed webhook certificates, leader election), and the rules
    narrowed by resourceNames name exactly what the Deployment tells the operator to touch."""
    managed = MANAGED_CERT_FLAGS <= set(out.flags())
    leader_election = "--leader-election=false" not in out.args()
    for scope, kind in (("cluster", "ClusterRole"), ("namespaced", "Role")):
        roles = out.all(kind)
        if kind == "Role":
            assert all(role["metadata"]["namespace"] == NAMESPACE for role in roles)
        granted = grants(roles)
        wanted = set(expected[scope])
        if not managed:
            wanted -= set(MANAGED_CERT_RULES[scope])
        if scope == "namespaced" and not leader_election:
            wanted -= LEADER_ELECTION_RULES
        missing, extra = wanted - set(granted), set(granted) - wanted
        assert not missing and not extra, f"{kind}: missing: {fmt(missing)}; not needed: {fmt(extra)}"
        narrowed = {triple: names for triple, names in granted.items() if names is not None}
        expected_names = {
            triple: frozenset([out.flag(flag)])
            for triple, flag in MANAGED_CERT_RULES[scope].items()
            if managed and flag is not None
        }
        assert narrowed == expected_names, f"{kind}: resourceNames"
        if not roles:
            assert wanted == set(), f"no {kind} rendered, but {fmt(wanted)} are needed"


def test_the_tests_own_rule_lists_are_the_operators(expected_rbac: dict[str, set[Triple]]) -> None:
    for scope, rules in MANAGED_CERT_RULES.items():
        assert set(rules) <= expected_rbac[scope], f"{scope}: {fmt(set(rules) - expected_rbac[scope])}"
    assert LEADER_ELECTION_RULES <= expected_rbac["namespaced"]


def test_roles_grant_exactly_what_the_operator_needs(
    default: Rendered, expected_rbac: dict[str, set[Triple]]
) -> None:
    # Default values: leader election, and the operator manages the webhook's certificate,
    # so every rule of `breakwater-operator rbac` is granted.
    assert MANAGED_CERT_FLAGS <= set(default.flags())
    check_rbac(default, expected_rbac)
    granted = grants(default.all("ClusterRole")) | grants(default.all("Role"))
    assert set(granted) == expected_rbac["cluster"] | expected_rbac["namespaced"]
    assert default.one("Role")["metadata"]["name"] == FULLNAME
    assert grants(default.all("ClusterRole"))[
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch")
    ] == {INJECT_NAME}
    assert grants(default.all("Role"))[("", "secrets", "update")] == {f"{FULLNAME}-webhook-tls"}


RBAC_VALUE_SETS = {
    "cert-manager": CERT_MANAGER,
    "injection-disabled": NO_INJECTION,
    "no-leader-election": {"replicas": 1, "leaderElection": {"enabled": False}},
    "no-leader-election-cert-manager": {"replicas": 1, "leaderElection": {"enabled": False}, **CERT_MANAGER},
}


@pytest.mark.parametrize("values", RBAC_VALUE_SETS.values(), ids=RBAC_VALUE_SETS.keys())
def test_roles_grant_only_what_the_values_need(
    chart: helm.Chart, expected_rbac: dict[str, set[Triple]], values: Doc
) -> None:
    check_rbac(render(chart, values), expected_rbac)


def test_without_managed_certificates_nothing_touches_secrets_or_webhooks(chart: helm.Chart) -> None:
    for values in (CERT_MANAGER, NO_INJECTION):
        out = render(chart, values)
        granted = grants(out.all("ClusterRole")) | grants(out.all("Role"))
        assert ("", "secrets", "create") not in granted and ("", "secrets", "update") not in granted
        assert not any(group == "admissionregistration.k8s.io" for group, _, _ in granted)
        # The ClusterRole still reads an OutboxRelay's Secret by name.
        assert granted[("", "secrets", "get")] is None


def test_rbac_has_no_wildcards(default: Rendered) -> None:
    roles = default.all("ClusterRole") + default.all("Role")
    assert roles, "no roles rendered"
    for role in roles:
        wild = [s for s in strings(role["rules"]) if "*" in s]
        assert wild == [], f"{role['kind']} {role['metadata']['name']} uses wildcards: {wild}"


def test_service_account_is_bound_to_both_roles(default: Rendered) -> None:
    sa = default.one("ServiceAccount")["metadata"]
    assert sa["namespace"] == NAMESPACE
    assert default.deployment()["spec"]["template"]["spec"]["serviceAccountName"] == sa["name"]
    subject = {"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}

    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = default.one(binding_kind)
        role = default.one(role_kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": role["metadata"]["name"],
        }, binding_kind
        assert binding["subjects"] == [subject], binding_kind
        if binding_kind == "RoleBinding":
            assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == NAMESPACE


def test_existing_service_account(chart: helm.Chart) -> None:
    out = render(chart, {"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert out.all("ServiceAccount") == []
    assert out.deployment()["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        assert out.one(kind)["subjects"][0]["name"] == "platform-sa", kind


def test_service_account_annotations(chart: helm.Chart) -> None:
    annotations = {"iam.gke.io/gcp-service-account": "bw@p.iam.gserviceaccount.com"}
    out = render(chart, {"serviceAccount": {"annotations": annotations}})
    assert out.one("ServiceAccount")["metadata"]["annotations"] == annotations


# --------------------------------------------------------------------------- Deployment


def test_deployment_security_context(default: Rendered) -> None:
    pod = default.deployment()["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = default.container()["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in csc["capabilities"]
    assert csc.get("privileged", False) is False
    assert pod["automountServiceAccountToken"] is True
    assert pod["terminationGracePeriodSeconds"] == 30
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_container_ports(default: Rendered) -> None:
    ports = [(p["name"], p["containerPort"], p["protocol"]) for p in default.container()["ports"]]
    assert ports == [("http-metrics", 8080, "TCP"), ("grpc-xds", 18000, "TCP"), ("webhook", 9443, "TCP")]


def test_probes_use_the_metrics_port(default: Rendered) -> None:
    container = default.container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 8080, "grpc-xds": 18000, "webhook": 9443}

    def probe_target(probe: str) -> tuple[str, int]:
        http = container[probe]["httpGet"]
        port = http["port"]
        return http["path"], ports[port] if isinstance(port, str) else port

    assert probe_target("livenessProbe") == ("/healthz", 8080)
    assert probe_target("readinessProbe") == ("/readyz", 8080)


def services(out: Rendered) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in out.all("Service")}


def test_services_expose_xds_on_the_leader_and_metrics_and_webhook_on_every_replica(
    default: Rendered,
) -> None:
    by_name = services(default)
    assert sorted(by_name) == [FULLNAME, f"{FULLNAME}-metrics", WEBHOOK_SERVICE]
    container_ports = {p["name"] for p in default.container()["ports"]}
    pod_labels = default.deployment()["spec"]["template"]["metadata"]["labels"]
    matched = default.deployment()["spec"]["selector"]["matchLabels"]
    expected = {
        FULLNAME: ("grpc-xds", 18000, "grpc-xds", "TCP", "grpc"),
        f"{FULLNAME}-metrics": ("http-metrics", 8080, "http-metrics", "TCP", None),
        WEBHOOK_SERVICE: ("webhook", 443, "webhook", "TCP", None),
    }
    for name, port in expected.items():
        service = by_name[name]
        assert service["spec"]["type"] == "ClusterIP"
        ports = [
            (p["name"], p["port"], p["targetPort"], p["protocol"], p.get("appProtocol"))
            for p in service["spec"]["ports"]
        ]
        assert ports == [port], name
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    # Metrics and admission: every replica. xDS: only the pod the leader labels as serving it.
    assert by_name[f"{FULLNAME}-metrics"]["spec"]["selector"] == matched
    assert by_name[WEBHOOK_SERVICE]["spec"]["selector"] == matched
    xds_selector = by_name[FULLNAME]["spec"]["selector"]
    assert xds_selector == {**matched, "breakwater.dev/serving-xds": "true"}
    assert matched.items() <= pod_labels.items()
    assert "breakwater.dev/serving-xds" not in pod_labels, "the operator sets it, never the chart"


def test_without_leader_election_the_one_replica_serves_xds(chart: helm.Chart) -> None:
    out = render(chart, {"replicas": 1, "leaderElection": {"enabled": False}})
    matched = out.deployment()["spec"]["selector"]["matchLabels"]
    assert services(out)[FULLNAME]["spec"]["selector"] == matched


def test_resources_from_values(default: Rendered) -> None:
    assert default.container()["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }


def test_default_args(default: Rendered) -> None:
    assert default.args() == [
        "run",
        "--root-namespace",
        NAMESPACE,
        "--log-level",
        "info",
        "--log-format",
        "json",
        "--metrics-addr",
        "0.0.0.0:8080",
        "--xds-addr",
        "0.0.0.0:18000",
        "--leader-election-namespace",
        "$(POD_NAMESPACE)",
        "--xds-token-audience",
        "breakwater.dev/xds",
        "--relay-image",
        default.container()["image"],
        "--relay-redis-secret",
        "breakwater-redis",
        "--webhook-addr",
        "0.0.0.0:9443",
        "--inject-config",
        INJECT_CONFIG_PATH,
        "--webhook-cert-secret",
        f"{FULLNAME}-webhook-tls",
        "--webhook-configuration",
        INJECT_NAME,
        "--webhook-dns-names",
        ",".join(WEBHOOK_DNS_NAMES),
    ]


def test_relays_run_the_operators_image_unless_told_otherwise(chart: helm.Chart, default: Rendered) -> None:
    # The operator's image ships breakwater-relay (the Dockerfile's default stage), and only
    # the chart knows its reference: the binary's own default is the release's tag.
    assert default.flag("--relay-image") == default.container()["image"]
    assert default.flag("--relay-redis-secret") == "breakwater-redis"
    out = render(chart, {"image": {"tag": "sha-1"}})
    assert out.flag("--relay-image") == "ghcr.io/breakwater-dev/breakwater:sha-1"
    out = render(chart, {"relay": {"image": "registry.local/relay:v2", "redisSecret": "agents-redis"}})
    assert out.flag("--relay-image") == "registry.local/relay:v2"
    assert out.flag("--relay-redis-secret") == "agents-redis"
    assert out.container()["image"] == f"ghcr.io/breakwater-dev/breakwater:{chart.metadata['appVersion']}"


def test_downward_api_env_and_no_redis_by_default(default: Rendered) -> None:
    env = default.env()
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "BREAKWATER_REDIS_URL" not in env
    assert default.all("Secret") == []


def test_image_defaults_to_app_version(chart: helm.Chart, default: Rendered) -> None:
    app_version = chart.metadata["appVersion"]
    assert default.container()["image"] == f"ghcr.io/breakwater-dev/breakwater:{app_version}"
    assert default.container()["imagePullPolicy"] == "IfNotPresent"
    assert "imagePullSecrets" not in default.deployment()["spec"]["template"]["spec"]


def test_image_overrides(chart: helm.Chart) -> None:
    out = render(
        chart,
        {
            "image": {"repository": "registry.local/bw", "tag": "sha-1234", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "regcred"}],
        },
    )
    assert out.container()["image"] == "registry.local/bw:sha-1234"
    assert out.container()["imagePullPolicy"] == "Always"
    assert out.deployment()["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_scheduling_values_pass_through(chart: helm.Chart, default: Rendered) -> None:
    values = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "breakwater"}},
                        },
                    }
                ]
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"prometheus.io/scrape": "true"},
    }
    pod = render(chart, values).deployment()["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == values["nodeSelector"]
    assert pod["spec"]["tolerations"] == values["tolerations"]
    assert pod["spec"]["affinity"] == values["affinity"]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    checksum = default.pod_annotations()["checksum/inject-config"]
    assert pod["metadata"]["annotations"] == {**values["podAnnotations"], "checksum/inject-config": checksum}
    plain = default.deployment()["spec"]["template"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert key not in plain["spec"], key
    assert list(plain["metadata"]["annotations"]) == ["checksum/inject-config"]
    without_injection = render(chart, {**NO_INJECTION, "podAnnotations": values["podAnnotations"]})
    assert without_injection.pod_annotations() == values["podAnnotations"]
    assert "annotations" not in render(chart, NO_INJECTION).deployment()["spec"]["template"]["metadata"]


# --------------------------------------------------------------------------- overrides


def test_two_replicas_get_a_pod_disruption_budget(default: Rendered) -> None:
    assert default.deployment()["spec"]["replicas"] == 2
    pdb = default.one("PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] == 1
    pod_labels = default.deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()


def test_one_replica_has_no_pod_disruption_budget(chart: helm.Chart) -> None:
    out = render(chart, {"replicas": 1})
    assert out.deployment()["spec"]["replicas"] == 1
    assert out.all("PodDisruptionBudget") == []


def test_leader_election_disabled(chart: helm.Chart, default: Rendered) -> None:
    out = render(chart, {"replicas": 1, "leaderElection": {"enabled": False}})
    # The Role keeps the managed webhook certificate's Secret rules only.
    assert set(grants(out.all("Role"))) == set(MANAGED_CERT_RULES["namespaced"])
    assert out.one("RoleBinding")["roleRef"]["name"] == out.one("Role")["metadata"]["name"]
    out = render(chart, {"replicas": 1, "leaderElection": {"enabled": False}, **CERT_MANAGER})
    assert out.all("Role") == [] and out.all("RoleBinding") == []
    out = render(chart, {"replicas": 1, "leaderElection": {"enabled": False}, **NO_INJECTION})
    assert out.all("Role") == [] and out.all("RoleBinding") == []
    assert out.args().count("--leader-election=false") == 1
    assert out.flag("--leader-election-namespace") == "$(POD_NAMESPACE)"
    assert "--leader-election=false" not in default.args()


def test_leader_election_disabled_refuses_several_replicas(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="leaderElection.enabled=false requires replicas: 1"):
        render(chart, {"replicas": 3, "leaderElection": {"enabled": False}})


def test_redis_existing_secret(chart: helm.Chart) -> None:
    out = render(chart, {"redis": {"existingSecret": "redis-auth", "existingSecretKey": "uri"}})
    assert out.env()["BREAKWATER_REDIS_URL"] == {
        "name": "BREAKWATER_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "uri"}},
    }
    assert out.all("Secret") == []


def test_redis_url_is_kept_in_a_secret(chart: helm.Chart) -> None:
    url = "redis://:s3cr3t-pw@redis-master.data:6379/0"
    out = render(chart, {"redis": {"url": url}})
    secret = out.one("Secret")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    assert out.env()["BREAKWATER_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "url"}
    }
    for doc in out.docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert "s3cr3t-pw" not in text and url not in text, f"{doc['kind']} leaks the Redis URL"


@pytest.mark.parametrize(
    "values",
    [{"redis": {"url": "redis://r:6379"}}, {"redis": {"existingSecret": "redis-auth"}}],
    ids=["url", "existing-secret"],
)
def test_redis_env_is_what_the_operator_reads(chart: helm.Chart, run_help: str, values: Doc) -> None:
    # The operator reads LockLease holders from Redis (`run --redis-url`, env
    # BREAKWATER_REDIS_URL); a name the binary does not read would leave Held Unknown/NoStore.
    out = render(chart, values)
    assert "BREAKWATER_REDIS_URL" in out.env()
    assert "--redis-url" not in out.args(), "the URL comes from the Secret, never an argument"
    assert "--redis-url" in run_help
    assert "[env: BREAKWATER_REDIS_URL" in run_help, "`run --redis-url` reads BREAKWATER_REDIS_URL"
    # The chart sets no key prefix: the operator's default must be the agents' ("bw").
    assert "BREAKWATER_REDIS_KEY_PREFIX" not in out.env()
    prefix = run_help[run_help.index("--redis-key-prefix") :].split("\n\n")[0]
    assert "[default: bw]" in prefix, prefix


def test_redis_url_and_existing_secret_are_exclusive(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, {"redis": {"url": "redis://r:6379", "existingSecret": "redis-auth"}})


def test_root_namespace_defaults_to_the_release_namespace(chart: helm.Chart) -> None:
    out = render(chart, namespace="platform")
    assert out.flag("--root-namespace") == "platform"


def test_root_namespace_and_logging_overrides(chart: helm.Chart) -> None:
    out = render(chart, {"rootNamespace": "mesh-policies", "logLevel": "debug", "logFormat": "text"})
    assert out.flag("--root-namespace") == "mesh-policies"
    assert out.flag("--log-level") == "debug"
    assert out.flag("--log-format") == "text"


def test_port_overrides_stay_consistent(chart: helm.Chart) -> None:
    out = render(chart, {"metrics": {"port": 9090}, "xds": {"port": 15010}})
    assert out.flag("--metrics-addr") == "0.0.0.0:9090"
    assert out.flag("--xds-addr") == "0.0.0.0:15010"
    ports = {p["name"]: p["containerPort"] for p in out.container()["ports"]}
    assert ports == {"http-metrics": 9090, "grpc-xds": 15010, "webhook": 9443}
    service = {p["name"]: p for doc in out.all("Service") for p in doc["spec"]["ports"]}
    assert {name: p["port"] for name, p in service.items()} == {
        "http-metrics": 9090,
        "grpc-xds": 15010,
        "webhook": 443,
    }
    assert {name: p["targetPort"] for name, p in service.items()} == {
        "http-metrics": "http-metrics",
        "grpc-xds": "grpc-xds",
        "webhook": "webhook",
    }
    for probe in ("livenessProbe", "readinessProbe"):
        port = out.container()[probe]["httpGet"]["port"]
        assert (ports[port] if isinstance(port, str) else port) == 9090, probe
    assert f"{FULLNAME}.{NAMESPACE}.svc:15010" in out.notes
    assert f"{FULLNAME}-metrics.{NAMESPACE}.svc:9090/metrics" in out.notes


def test_schema_accepts_xds_values(chart: helm.Chart) -> None:
    out = render(chart, {"xds": {"port": 1}})
    assert out.flag("--xds-addr") == "0.0.0.0:1"
    out = render(chart, {"xds": {"port": 65535}})
    assert out.flag("--xds-addr") == "0.0.0.0:65535"


def test_metrics_and_xds_ports_must_differ(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="metrics.port and xds.port must differ"):
        render(chart, {"xds": {"port": 8080}})
    with pytest.raises(helm.HelmRenderError, match="metrics.port and xds.port must differ"):
        render(chart, {"metrics": {"port": 9000}, "xds": {"port": 9000}})


BAD_VALUES = {
    "unknown-log-format": ({"logFormat": "xml"}, "logFormat"),
    "unknown-log-level": ({"logLevel": "verbose"}, "logLevel"),
    "misspelt-key": ({"replica": 3}, "replica"),
    "zero-replicas": ({"replicas": 0}, "replicas"),
    "port-out-of-range": ({"metrics": {"port": 70000}}, "metrics/port"),
    "xds-port-out-of-range": ({"xds": {"port": 0}}, "xds/port"),
    "xds-port-not-a-number": ({"xds": {"port": "18000"}}, "xds/port"),
    "xds-unknown-key": ({"xds": {"address": "0.0.0.0:18000"}}, "address"),
    "redis-url-without-scheme": ({"redis": {"url": "redis:6379"}}, "redis/url"),
    "empty-relay-redis-secret": ({"relay": {"redisSecret": ""}}, "relay/redisSecret"),
    "relay-redis-secret-not-a-name": ({"relay": {"redisSecret": "Agents_Redis"}}, "relay/redisSecret"),
    "relay-unknown-key": ({"relay": {"replicas": 3}}, "replicas"),
    "unknown-failure-policy": ({"injection": {"failurePolicy": "Retry"}}, "injection/failurePolicy"),
    "failure-policy-lower-case": ({"injection": {"failurePolicy": "fail"}}, "injection/failurePolicy"),
    "unknown-injection-mode": ({"injection": {"mode": "sidecar"}}, "injection/mode"),
    "injection-timeout-over-30": ({"injection": {"timeoutSeconds": 31}}, "injection/timeoutSeconds"),
    "injection-port-out-of-range": ({"injection": {"port": 0}}, "injection/port"),
    "token-shorter-than-600s": (
        {"injection": {"tokenExpirationSeconds": 60}},
        "injection/tokenExpirationSeconds",
    ),
    "empty-token-audience": ({"injection": {"tokenAudience": ""}}, "injection/tokenAudience"),
    "injection-enabled-not-a-boolean": ({"injection": {"enabled": "yes"}}, "injection/enabled"),
    "injection-unknown-key": ({"injection": {"namespaces": ["shop"]}}, "namespaces"),
    "injection-unknown-sidecar": ({"injection": {"resources": {"envoy": {}}}}, "envoy"),
    "injection-resources-unknown-key": (
        {"injection": {"resources": {"agent": {"request": {"cpu": "1"}}}}},
        "request",
    ),
    "cert-manager-unknown-key": ({"injection": {"certManager": {"issuer": "ca"}}}, "issuer"),
    "issuer-ref-unknown-key": (
        {"injection": {"certManager": {"issuerRef": {"name": "ca", "namespace": "x"}}}},
        "namespace",
    ),
}


@pytest.mark.parametrize(("values", "needle"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=needle):
        render(chart, values)


# --------------------------------------------------------------------------- sidecar injection


def test_default_webhook_configuration(default: Rendered) -> None:
    configuration = default.one("MutatingWebhookConfiguration")
    assert configuration["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert "annotations" not in configuration["metadata"], "managed mode: no cert-manager annotation"
    assert default.webhook() == {
        "name": "inject.breakwater.dev",
        # No caBundle: the operator fills it (--webhook-configuration), and an upgrade leaves
        # a field the chart never sets alone.
        "clientConfig": {
            "service": {"name": WEBHOOK_SERVICE, "namespace": NAMESPACE, "path": "/inject", "port": 443}
        },
        "rules": [
            {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
        ],
        "namespaceSelector": {
            "matchLabels": {"breakwater.dev/inject": "enabled"},
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": EXCLUDED_NAMESPACES}
            ],
        },
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 5,
        "reinvocationPolicy": "IfNeeded",
    }


def test_the_webhook_service_reaches_every_replicas_webhook_port(default: Rendered) -> None:
    service = default.named("Service", default.webhook()["clientConfig"]["service"]["name"])
    assert service["metadata"]["namespace"] == default.webhook()["clientConfig"]["service"]["namespace"]
    [port] = service["spec"]["ports"]
    assert port["port"] == default.webhook()["clientConfig"]["service"]["port"] == 443
    container_ports = {p["name"]: p["containerPort"] for p in default.container()["ports"]}
    assert container_ports[port["targetPort"]] == 9443
    assert default.flag("--webhook-addr") == "0.0.0.0:9443"
    assert service["spec"]["selector"] == default.deployment()["spec"]["selector"]["matchLabels"]
    assert "breakwater.dev/serving-xds" not in service["spec"]["selector"], "not only the leader"


def test_managed_certificate_flags_name_the_charts_objects(default: Rendered) -> None:
    assert (
        default.flag("--webhook-configuration")
        == default.one("MutatingWebhookConfiguration")["metadata"]["name"]
    )
    assert default.flag("--webhook-cert-secret") == f"{FULLNAME}-webhook-tls"
    service = default.webhook()["clientConfig"]["service"]
    # The API server calls <service>.<namespace>.svc: the certificate must carry that name.
    assert default.flag("--webhook-dns-names").split(",") == [
        f"{service['name']}.{service['namespace']}.svc",
        f"{service['name']}.{service['namespace']}.svc.cluster.local",
    ]
    assert "--webhook-cert-dir" not in default.flags()
    # The Secret lives in POD_NAMESPACE, the release namespace the Role is in.
    assert default.env()["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert default.all("Secret") == [] and default.all("Certificate") == [] and default.all("Issuer") == []


def test_the_injection_configuration_is_mounted_where_the_operator_reads_it(default: Rendered) -> None:
    path = default.flag("--inject-config")
    assert path == INJECT_CONFIG_PATH
    mount = default.volume_mounts()["inject-config"]
    assert mount["readOnly"] is True
    assert path == f"{mount['mountPath']}/inject.yaml"
    assert default.volumes()["inject-config"] == {"name": "inject-config", "configMap": {"name": INJECT_NAME}}
    default.inject_config()  # the ConfigMap holds inject.yaml


def test_failure_policy_ignore(chart: helm.Chart) -> None:
    out = render(chart, {"injection": {"failurePolicy": "Ignore", "timeoutSeconds": 10}})
    assert out.webhook()["failurePolicy"] == "Ignore"
    assert out.webhook()["timeoutSeconds"] == 10
    assert (
        "failurePolicy\nIgnore: while no operator replica answers, pods in labelled namespaces start "
        "without sidecars" in out.notes
    )


def test_injection_disabled_renders_none_of_it(chart: helm.Chart, default: Rendered) -> None:
    out = render(chart, NO_INJECTION)
    gone = sorted(set(default.kinds()) - set(out.kinds()))
    assert gone == ["ConfigMap", "MutatingWebhookConfiguration"], gone
    assert sorted(services(out)) == [FULLNAME, f"{FULLNAME}-metrics"]
    assert not WEBHOOK_FLAGS & set(out.flags()), out.args()
    assert out.flag("--xds-token-audience") == "breakwater.dev/xds", "ADS tokens are checked all the same"
    assert "webhook" not in {p["name"] for p in out.container()["ports"]}
    assert set(out.volumes()) == {"tmp"} and set(out.volume_mounts()) == {"tmp"}
    assert "breakwater.dev/inject" not in out.notes


def test_cert_manager_mode(chart: helm.Chart) -> None:
    out = render(chart, CERT_MANAGER)
    issuer = out.one("Issuer")
    assert issuer["apiVersion"] == "cert-manager.io/v1"
    assert issuer["spec"] == {"selfSigned": {}}
    certificate = out.one("Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["dnsNames"] == WEBHOOK_DNS_NAMES
    assert certificate["spec"]["issuerRef"] == {
        "name": issuer["metadata"]["name"],
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    # cert-manager's CA injector fills the caBundle from the Certificate.
    configuration = out.one("MutatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"
    }
    assert "caBundle" not in out.webhook()["clientConfig"]
    # The operator reads the Certificate's Secret from a read-only volume.
    assert out.flag("--webhook-cert-dir") == WEBHOOK_CERT_DIR
    assert not MANAGED_CERT_FLAGS & set(out.flags()), out.args()
    mount = out.volume_mounts()["webhook-tls"]
    assert mount == {"name": "webhook-tls", "mountPath": WEBHOOK_CERT_DIR, "readOnly": True}
    assert out.volumes()["webhook-tls"]["secret"] == {"secretName": certificate["spec"]["secretName"]}
    assert certificate["spec"]["secretName"] != f"{FULLNAME}-webhook-tls", "not the managed mode's Secret"
    assert "cert-manager must be installed" in out.notes


def test_cert_manager_with_an_issuer(chart: helm.Chart) -> None:
    out = render(
        chart, {"injection": {"certManager": {"enabled": True, "issuerRef": {"name": "platform-ca"}}}}
    )
    assert out.all("Issuer") == []
    assert out.one("Certificate")["spec"]["issuerRef"] == {
        "name": "platform-ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    issuer = {"name": "vault", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    out = render(chart, {"injection": {"certManager": {"enabled": True, "issuerRef": issuer}}})
    assert out.one("Certificate")["spec"]["issuerRef"] == issuer


def test_cert_manager_issuer_needs_a_name(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="issuerRef.name is required"):
        render(
            chart, {"injection": {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer"}}}}
        )


def test_a_changed_injection_configuration_rolls_the_pods(chart: helm.Chart, default: Rendered) -> None:
    checksum = default.pod_annotations()["checksum/inject-config"]
    assert re.fullmatch("[0-9a-f]{64}", checksum)
    changed = render(chart, {"injection": {"mode": "agent"}})
    assert changed.inject_config() != default.inject_config()
    assert changed.pod_annotations()["checksum/inject-config"] != checksum
    unrelated = render(chart, {"logLevel": "debug"})
    assert unrelated.pod_annotations()["checksum/inject-config"] == checksum


def test_token_audience_is_the_operators_and_the_agents(chart: helm.Chart, default: Rendered) -> None:
    assert default.flag("--xds-token-audience") == "breakwater.dev/xds"
    assert yaml.safe_load(default.inject_config())["tokenAudience"] == "breakwater.dev/xds"
    out = render(chart, {"injection": {"tokenAudience": "mesh.example/xds"}})
    assert out.flag("--xds-token-audience") == "mesh.example/xds"
    assert yaml.safe_load(out.inject_config())["tokenAudience"] == "mesh.example/xds"


def test_injection_port(chart: helm.Chart) -> None:
    out = render(chart, {"injection": {"port": 8443}})
    assert out.flag("--webhook-addr") == "0.0.0.0:8443"
    assert {p["name"]: p["containerPort"] for p in out.container()["ports"]}["webhook"] == 8443
    assert services(out)[WEBHOOK_SERVICE]["spec"]["ports"][0]["targetPort"] == "webhook"


@pytest.mark.parametrize(
    "values",
    [{"injection": {"port": 8080}}, {"injection": {"port": 18000}}, {"xds": {"port": 9443}}],
    ids=["metrics-port", "xds-port", "xds-on-webhook-port"],
)
def test_injection_port_must_differ_from_the_others(chart: helm.Chart, values: Doc) -> None:
    with pytest.raises(
        helm.HelmRenderError, match="injection.port must differ from metrics.port and xds.port"
    ):
        render(chart, values)
    render(chart, {**values, **NO_INJECTION})  # no webhook: no conflict


def test_injection_configuration_from_values(chart: helm.Chart, default: Rendered) -> None:
    config = yaml.safe_load(default.inject_config())
    assert config == {
        "agentImage": default.container()["image"],
        "proxyImage": "envoyproxy/envoy:v1.35.3",
        "captureImage": f"ghcr.io/breakwater-dev/breakwater-capture:{chart.metadata['appVersion']}",
        "imagePullPolicy": "IfNotPresent",
        "xdsEndpoint": f"http://{FULLNAME}.{NAMESPACE}.svc:18000",
        "tokenAudience": "breakwater.dev/xds",
        "tokenExpirationSeconds": 3600,
        "mode": "proxy",
        "excludeNamespaces": EXCLUDED_NAMESPACES,
        "proxy": {
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "1", "memory": "512Mi"},
            }
        },
        "agent": {
            "resources": {
                "requests": {"cpu": "50m", "memory": "64Mi"},
                "limits": {"cpu": "500m", "memory": "256Mi"},
            }
        },
        "capture": {
            "resources": {
                "requests": {"cpu": "10m", "memory": "16Mi"},
                "limits": {"cpu": "100m", "memory": "64Mi"},
            }
        },
    }
    out = render(
        chart,
        {
            "image": {"tag": "sha-1", "pullPolicy": "Always"},
            "injection": {
                "captureImage": {"repository": "registry.local/capture", "tag": "v2"},
                "proxyImage": "registry.local/envoy:v1",
                "redisSecret": "agents-redis",
                "tokenExpirationSeconds": 7200,
                "resources": {"agent": {"requests": {"cpu": "200m"}}},
            },
        },
        namespace="kube-system",
    )
    config = yaml.safe_load(out.inject_config())
    assert config["agentImage"] == "ghcr.io/breakwater-dev/breakwater:sha-1"
    assert config["captureImage"] == "registry.local/capture:v2"
    assert config["proxyImage"] == "registry.local/envoy:v1"
    assert config["imagePullPolicy"] == "Always"
    assert config["redisSecret"] == "agents-redis"
    assert config["tokenExpirationSeconds"] == 7200
    assert config["agent"]["resources"] == {
        "requests": {"cpu": "200m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    assert config["excludeNamespaces"] == ["kube-system", "kube-public"]
    assert out.webhook()["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "kube-system",
        "kube-public",
    ]


# The binary checks what the chart renders.

SAMPLE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "api-0", "labels": {"app": "api"}},
    "spec": {"containers": [{"name": "api", "image": "example/api:1"}]},
}


def inject(
    operator_bin: Path, tmp_path: Path, config: str | None, pod: Doc = SAMPLE_POD, namespace: str = "shop"
) -> tuple[int, Doc | None, str]:
    """`breakwater-operator inject`: the exit code, the pod it prints (None if refused), stderr."""
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    command = [str(operator_bin), "inject", "-f", str(pod_file), "--namespace", namespace]
    if config is not None:
        config_file = tmp_path / "inject.yaml"
        config_file.write_text(config)
        command += ["--config", str(config_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (0, 1), f"{command}: exit {done.returncode}\n{done.stderr}"
    printed = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    assert len(printed) == (1 if done.returncode == 0 else 0), done.stdout
    return done.returncode, (printed[0] if printed else None), done.stderr


def init_containers(pod: Doc) -> dict[str, Doc]:
    return {c["name"]: c for c in pod["spec"].get("initContainers", [])}


def test_the_charts_configuration_injects_the_sidecars(
    operator_bin: Path, tmp_path: Path, default: Rendered
) -> None:
    code, pod, stderr = inject(operator_bin, tmp_path, default.inject_config())
    assert code == 0, stderr
    assert pod is not None
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [
        "breakwater-capture",
        "breakwater-agent",
        "breakwater-proxy",
    ]
    assert pod["spec"]["containers"] == SAMPLE_POD["spec"]["containers"]
    assert pod["metadata"]["annotations"]["breakwater.dev/injected"] == "proxy"
    sidecars = init_containers(pod)
    assert sidecars["breakwater-agent"]["image"] == default.container()["image"]
    assert sidecars["breakwater-proxy"]["image"] == "envoyproxy/envoy:v1.35.3"
    assert sidecars["breakwater-capture"]["image"] == "ghcr.io/breakwater-dev/breakwater-capture:0.1.0"
    # The agent dials the chart's xDS Service, with a token for the operator's audience.
    xds = services(default)[FULLNAME]
    [xds_port] = [p["port"] for p in xds["spec"]["ports"] if p["name"] == "grpc-xds"]
    endpoint = f"http://{xds['metadata']['name']}.{xds['metadata']['namespace']}.svc:{xds_port}"
    agent_args = sidecars["breakwater-agent"]["args"]
    assert [a for a in agent_args if a.startswith("--xds-endpoint=")] == [f"--xds-endpoint={endpoint}"]
    [token] = [v for v in pod["spec"]["volumes"] if v["name"] == "breakwater-xds-token"]
    projection = token["projected"]["sources"][0]["serviceAccountToken"]
    assert projection["audience"] == default.flag("--xds-token-audience")
    assert projection["expirationSeconds"] == 3600


def test_the_charts_defaults_are_the_injectors(operator_bin: Path, tmp_path: Path, default: Rendered) -> None:
    """values.yaml's resources, proxy image and token lifetime equal inject::Config::default()."""
    _, charts, _ = inject(operator_bin, tmp_path, default.inject_config())
    _, builtin, _ = inject(operator_bin, tmp_path, None)
    assert charts is not None and builtin is not None
    ours, theirs = init_containers(charts), init_containers(builtin)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name]["resources"] == theirs[name]["resources"], name
        assert ours[name]["imagePullPolicy"] == theirs[name]["imagePullPolicy"], name
    assert ours["breakwater-proxy"]["image"] == theirs["breakwater-proxy"]["image"]
    assert charts["spec"]["volumes"] == builtin["spec"]["volumes"]


def test_agent_mode_and_redis_secret(operator_bin: Path, tmp_path: Path, chart: helm.Chart) -> None:
    out = render(chart, {"injection": {"mode": "agent", "redisSecret": "agents-redis"}})
    code, pod, stderr = inject(operator_bin, tmp_path, out.inject_config())
    assert code == 0, stderr
    assert pod is not None
    assert list(init_containers(pod)) == ["breakwater-agent"]
    agent = init_containers(pod)["breakwater-agent"]
    assert not any(a.startswith("--xds-proxy-addr") for a in agent["args"]), "no Envoy to proxy for"
    redis = {e["name"]: e for e in agent["env"]}["BREAKWATER_REDIS_URL"]
    assert redis["valueFrom"] == {"secretKeyRef": {"name": "agents-redis", "key": "url", "optional": True}}


def test_the_xds_port_reaches_the_agents(operator_bin: Path, tmp_path: Path, chart: helm.Chart) -> None:
    out = render(chart, {"xds": {"port": 15010}}, namespace="mesh")
    _, pod, _ = inject(operator_bin, tmp_path, out.inject_config())
    assert pod is not None
    assert (
        f"--xds-endpoint=http://{FULLNAME}.mesh.svc:15010" in init_containers(pod)["breakwater-agent"]["args"]
    )


@pytest.mark.parametrize("namespace", EXCLUDED_NAMESPACES)
def test_excluded_namespaces_are_not_injected(
    operator_bin: Path, tmp_path: Path, default: Rendered, namespace: str
) -> None:
    code, pod, stderr = inject(operator_bin, tmp_path, default.inject_config(), namespace=namespace)
    assert code == 0 and pod is not None
    assert "initContainers" not in pod["spec"]
    assert "excluded-namespace" in stderr


def test_the_annotations_the_notes_name(operator_bin: Path, tmp_path: Path, default: Rendered) -> None:
    assert "breakwater.dev/inject: disabled" in default.notes
    assert "breakwater.dev/inject-mode: agent" in default.notes
    assert "kubectl label namespace <your-namespace> breakwater.dev/inject=enabled" in default.notes
    assert default.webhook()["namespaceSelector"]["matchLabels"] == {"breakwater.dev/inject": "enabled"}

    def annotated(annotations: dict[str, str]) -> Doc:
        return {**SAMPLE_POD, "metadata": {**SAMPLE_POD["metadata"], "annotations": annotations}}

    _, pod, stderr = inject(
        operator_bin, tmp_path, default.inject_config(), annotated({"breakwater.dev/inject": "disabled"})
    )
    assert pod is not None and "initContainers" not in pod["spec"], stderr
    _, pod, _ = inject(
        operator_bin, tmp_path, default.inject_config(), annotated({"breakwater.dev/inject-mode": "agent"})
    )
    assert pod is not None and list(init_containers(pod)) == ["breakwater-agent"]
    code, pod, stderr = inject(
        operator_bin, tmp_path, default.inject_config(), annotated({"breakwater.dev/inject-mode": "sidecar"})
    )
    assert code == 1 and pod is None and "breakwater.dev/inject-mode" in stderr


DEPLOYMENT_VALUE_SETS = {
    "defaults": None,
    "cert-manager": CERT_MANAGER,
    "injection-disabled": NO_INJECTION,
    "no-leader-election": {"replicas": 1, "leaderElection": {"enabled": False}},
    "redis": {"redis": {"url": "redis://r:6379"}},
    "relay": {"relay": {"image": "registry.local/relay:v2", "redisSecret": "agents-redis"}},
}


@pytest.mark.parametrize("values", DEPLOYMENT_VALUE_SETS.values(), ids=DEPLOYMENT_VALUE_SETS.keys())
def test_every_flag_the_deployment_passes_is_in_run_help(
    chart: helm.Chart, run_help: str, values: Doc | None
) -> None:
    out = render(chart, values)
    assert out.args()[0] == "run"
    for flag in out.flags():
        assert re.search(
            rf"^\s+(-\w, )?{re.escape(flag)}[ =<]", run_help, re.MULTILINE
        ), f"the Deployment passes {flag}, which `breakwater-operator run --help` does not list"


@pytest.mark.parametrize("values", DEPLOYMENT_VALUE_SETS.values(), ids=DEPLOYMENT_VALUE_SETS.keys())
def test_run_accepts_the_deployments_arguments(
    chart: helm.Chart, operator_bin: Path, tmp_path: Path, values: Doc | None
) -> None:
    """`breakwater-operator run` with the Deployment's arguments and environment, as the kubelet
    expands them, gets as far as connecting to the API server: clap accepts the combination of
    flags and the webhook's options (the mounted injection configuration included) load. No
    cluster is reachable (no kubeconfig, no in-cluster environment), so it stops there."""
    out = render(chart, values)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    for name, var in out.env().items():
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[name] = {"metadata.name": "bw-breakwater-0", "metadata.namespace": NAMESPACE}.get(
            field, "redis://r:6379"
        )
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in out.args()]
    if "--inject-config" in args:
        config = tmp_path / "inject.yaml"
        config.write_text(out.inject_config())
        args[args.index("--inject-config") + 1] = str(config)
    done = subprocess.run(
        [str(operator_bin), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 1, f"exit {done.returncode}:\n{done.stderr}"
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert errors and "Kubernetes client" in errors[0]["fields"]["message"], done.stderr


def test_notes_say_how_to_check_the_install(default: Rendered) -> None:
    notes = default.notes
    assert f"kubectl get pods -n {NAMESPACE}" in notes
    assert "kubectl get breakwater -A" in notes
    assert "examples/" in notes
    assert f"{FULLNAME}-metrics.{NAMESPACE}.svc:8080/metrics" in notes


def test_notes_say_where_sidecars_connect(default: Rendered) -> None:
    notes = default.notes
    assert f"{FULLNAME}.{NAMESPACE}.svc:18000" in notes
    assert '"grpc-xds"' in notes
