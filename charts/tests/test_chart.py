"""Lint and render the Breakwater Helm chart with real Helm (v4, embedded by helm-python-sdk).

No cluster is needed: `helm_python.lint` runs `helm lint`, and `Chart.render` runs the
template engine offline exactly as `helm template` / `helm install` would (values schema
included). The RBAC the chart grants is compared with the rules the operator itself says
it needs: the JSON printed by `breakwater-operator rbac`, whose path is given in the
environment variable BREAKWATER_EXPECTED_RBAC. The environment the Deployment sets is
compared with what `breakwater-operator run --help` says it reads, from the file named by
BREAKWATER_OPERATOR_RUN_HELP. Tests that run the operator binary itself find it in
BREAKWATER_OPERATOR_BIN.

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
CLUSTER_SCOPED_KINDS = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
RBAC_ENV = "BREAKWATER_EXPECTED_RBAC"
RUN_HELP_ENV = "BREAKWATER_OPERATOR_RUN_HELP"
OPERATOR_BIN_ENV = "BREAKWATER_OPERATOR_BIN"
RULE_KEYS = {"apiGroups", "resources", "verbs"}

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


def triples(rules: list[Doc], where: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a list of PolicyRules grants."""
    out: set[tuple[str, str, str]] = set()
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
def expected_rbac() -> dict[str, set[tuple[str, str, str]]]:
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


def fmt(items: set[tuple[str, str, str]]) -> str:
    return ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in sorted(items)) or "(none)"


# --------------------------------------------------------------------------- lint


LINT_VALUE_SETS = {
    "defaults": None,
    "single-replica-no-leader-election": {"replicas": 1, "leaderElection": {"enabled": False}},
    "redis-url": {"redis": {"url": "redis://:pw@redis.example:6379/0"}},
    "redis-existing-secret": {"redis": {"existingSecret": "redis-auth", "existingSecretKey": "uri"}},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "breakwater"}},
    "xds-port": {"xds": {"port": 15010}},
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
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
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


def test_cluster_role_grants_exactly_what_the_operator_needs(
    default: Rendered, expected_rbac: dict[str, set[tuple[str, str, str]]]
) -> None:
    granted = set()
    for role in default.all("ClusterRole"):
        granted |= triples(role["rules"], f"ClusterRole {role['metadata']['name']}")
    expected = expected_rbac["cluster"]
    assert granted == expected, (
        f"missing: {fmt(expected - granted)}; not needed: {fmt(granted - expected)}"
    )


def test_role_grants_exactly_the_leader_election_rules(
    default: Rendered, expected_rbac: dict[str, set[tuple[str, str, str]]]
) -> None:
    granted = set()
    for role in default.all("Role"):
        assert role["metadata"]["namespace"] == NAMESPACE
        granted |= triples(role["rules"], f"Role {role['metadata']['name']}")
    expected = expected_rbac["namespaced"]
    assert granted == expected, (
        f"missing: {fmt(expected - granted)}; not needed: {fmt(granted - expected)}"
    )


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
    assert ports == [("http-metrics", 8080, "TCP"), ("grpc-xds", 18000, "TCP")]


def test_probes_use_the_metrics_port(default: Rendered) -> None:
    container = default.container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 8080, "grpc-xds": 18000}

    def probe_target(probe: str) -> tuple[str, int]:
        http = container[probe]["httpGet"]
        port = http["port"]
        return http["path"], ports[port] if isinstance(port, str) else port

    assert probe_target("livenessProbe") == ("/healthz", 8080)
    assert probe_target("readinessProbe") == ("/readyz", 8080)


def services(out: Rendered) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in out.all("Service")}


def test_services_expose_xds_on_the_leader_and_metrics_on_every_replica(default: Rendered) -> None:
    by_name = services(default)
    assert sorted(by_name) == [FULLNAME, f"{FULLNAME}-metrics"]
    container_ports = {p["name"] for p in default.container()["ports"]}
    pod_labels = default.deployment()["spec"]["template"]["metadata"]["labels"]
    matched = default.deployment()["spec"]["selector"]["matchLabels"]
    expected = {
        FULLNAME: ("grpc-xds", 18000, "grpc-xds", "TCP", "grpc"),
        f"{FULLNAME}-metrics": ("http-metrics", 8080, "http-metrics", "TCP", None),
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
    # Metrics: every replica. xDS: only the pod the leader labels as serving it.
    assert by_name[f"{FULLNAME}-metrics"]["spec"]["selector"] == matched
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
    ]


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
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    plain = default.deployment()["spec"]["template"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert key not in plain["spec"], key
    assert "annotations" not in plain["metadata"]


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
    assert out.all("Role") == [] and out.all("RoleBinding") == []
    assert out.args()[-1] == "--leader-election=false"
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
    assert ports == {"http-metrics": 9090, "grpc-xds": 15010}
    service = {p["name"]: p for doc in out.all("Service") for p in doc["spec"]["ports"]}
    assert {name: p["port"] for name, p in service.items()} == {"http-metrics": 9090, "grpc-xds": 15010}
    assert {name: p["targetPort"] for name, p in service.items()} == {
        "http-metrics": "http-metrics",
        "grpc-xds": "grpc-xds",
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
}


@pytest.mark.parametrize(("values", "needle"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=needle):
        render(chart, values)


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
