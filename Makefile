# Breakwater — the commands a newcomer needs. `make run` works on a fresh clone with a Rust
# toolchain; `make test` also needs Go (it builds kube-apiserver, etcd and kubectl once) and
# Python 3, and installs the Debian packages whose servers the tests start.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
CRD_DIRS := crds/yaml charts/breakwater/crds

.PHONY: run test deps control-plane chart-render unit crds crds-check chart-test fmt fmt-check lint e2e build clean

## run: the operator in standalone mode on examples/ (no cluster needed); Ctrl-C stops it
run:
	$(CARGO) run -q -p breakwater-operator -- standalone --dir examples

## test: everything CI checks — format, lints, CRD drift, unit/integration tests (with real
## Redis and a real Kubernetes API server), chart
test: deps control-plane fmt-check lint crds-check unit chart-test

# A full run gains nothing from incremental caches, which took a third of the disk CI had.
test: export CARGO_INCREMENTAL = 0

# PROGRAM=Debian package for every server or tool the tests start (tests/harness).
TEST_PROGRAMS := redis-server=redis-server redis-cli=redis-tools openssl=openssl iptables-restore=iptables ip=iproute2 setpriv=util-linux nats-server=nats-server /usr/lib/postgresql/*/bin/initdb=postgresql

## deps: install the Debian packages the tests need (as root with apt), or name them
deps:
	@tests/install-deps.sh $(TEST_PROGRAMS)

## control-plane: build kube-apiserver, etcd and kubectl from tests/control-plane (cached)
control-plane:
	@tests/control-plane/build.sh >/dev/null

# The real-API-server suite applies the chart's RBAC (kube/rbac.rs reads this render).
unit: chart-render
	$(CARGO) test --workspace

## chart-render: the chart with default values, as `helm template` renders it
chart-render: $(VENV)/.installed
	@mkdir -p target/chart
	cd charts/tests && ../../$(VENV)/bin/python render.py > ../../target/chart/default.yaml

build:
	$(CARGO) build --workspace --release

## crds: regenerate the CRD YAML from the Rust types (into crds/yaml and the chart)
crds:
	$(CARGO) run -q -p breakwater-api --bin crdgen -- $(CRD_DIRS)

## crds-check: fail when the committed CRD YAML differs from the Rust types
crds-check: crds
	@git diff --exit-code -- $(CRD_DIRS) || { echo "CRD YAML is stale: run 'make crds' and commit"; exit 1; }

$(VENV)/.installed: charts/tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r charts/tests/requirements.txt
	touch $@

## chart-test: lint and render the Helm chart with real Helm (helm-python-sdk) and check it
## against the operator binary (its RBAC list, its flags, its injection of a sample pod)
chart-test: OPERATOR_BIN = $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/debug/breakwater-operator
chart-test: $(VENV)/.installed
	$(CARGO) build -q -p breakwater-operator
	@mkdir -p target
	$(OPERATOR_BIN) rbac > target/expected-rbac.json
	$(OPERATOR_BIN) run --help > target/operator-run-help.txt
	BREAKWATER_EXPECTED_RBAC=$(CURDIR)/target/expected-rbac.json \
	BREAKWATER_OPERATOR_RUN_HELP=$(CURDIR)/target/operator-run-help.txt \
	BREAKWATER_OPERATOR_BIN=$(OPERATOR_BIN) $(VENV)/bin/pytest charts/tests -q

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## e2e: the real-API-server suite (part of `make test`) against the cluster of
## BREAKWATER_E2E_KUBECONFIG instead of a private control plane
e2e: control-plane
	@test -n "$$BREAKWATER_E2E_KUBECONFIG" || { echo "set BREAKWATER_E2E_KUBECONFIG to the cluster's kubeconfig"; exit 1; }
	$(CARGO) test -p breakwater-operator --test it kube::

clean:
	$(CARGO) clean
	rm -rf $(VENV)

## golden: copy envoy-types' descriptor set that render needs (operator/descriptors), then the
## compiler's golden files (operator/tests/golden) from examples/; review the diff
golden:
	UPDATE_GOLDEN=1 $(CARGO) test -q -p breakwater-operator --test it descriptors
	UPDATE_GOLDEN=1 $(CARGO) test -q -p breakwater-operator --test it compile_golden

## bench-compile: compile time and peak memory for 1k-100k policies over 100-10k Services
bench-compile:
	$(CARGO) bench -q -p breakwater-operator --bench compile

## bench: every benchmark; the README quotes their figures
bench: bench-compile

.PHONY: golden bench bench-compile

## bench-rls: the rate-limit agent against redis-benchmark on the same Redis and Lua script;
## prints the table the README quotes (BENCH_SECONDS, BENCH_CONNECTIONS, BENCH_AGENT_ARGS)
bench-rls:
	$(CARGO) bench -q -p breakwater-agent --bench rls

bench: bench-rls

.PHONY: bench bench-rls

## bench-xds: the issue-13 world (10,000 Services, 5,000 proxies): bytes per proxy for one-policy
## changes, then one pushed to 1,000 live proxies (BENCH_LIVE_PROXIES); push latency on the examples
bench-xds:
	$(CARGO) bench -q -p breakwater-operator --bench push

bench: bench-xds

.PHONY: bench-xds

## bench-lease: lease acquire+release pairs/s at 1, 16, 64 clients (LeaseManager over Redis,
## in process) against raw SET NX PX + DEL on the same Redis; prints the table the README
## quotes (BENCH_SECONDS, BENCH_ROUNDS, BENCH_OUT)
bench-lease:
	$(CARGO) bench -q -p breakwater-agent --bench lease

bench: bench-lease

.PHONY: bench-lease

## bench-breaker: the shared breaker on four agents and one Redis: CLOSED-state checks beside
## the in-memory rate-limit check, access-log ingestion, failure-to-OPEN propagation, memory
bench-breaker:
	$(CARGO) bench -q -p breakwater-agent --bench breaker

bench: bench-breaker

.PHONY: bench-breaker

## bench-outbox: the outbox relay (release binary) against PostgreSQL, Redis and NATS, beside
## plain loops doing the same SQL and broker calls: rows/s, lag at 2,000 rows/s, peak RSS
bench-outbox:
	$(CARGO) bench -q -p breakwater-relay --bench outbox

bench: bench-outbox

.PHONY: bench-outbox

## bench-inject: admission latency with the injection webhook against the API server's own
## create path (100 pods/s), and 1,000 ADS streams authenticated by TokenReview (cold, warm)
## against unauthenticated ones, on a private real API server
bench-inject: control-plane
	$(CARGO) bench -q -p breakwater-operator --bench inject

bench: bench-inject

.PHONY: bench-inject

## bench-status: status writes per policy and last ACK -> all Programmed=True when 5,000 ADS
## streams ACK a change to 20 policies (an operator in cluster mode, pods and tokens on a
## private real API server, writes counted from its audit log and the operator's metric),
## beside the same storm at 50 proxies and one API write
bench-status: control-plane
	$(CARGO) bench -q -p breakwater-operator --bench status

bench: bench-status

.PHONY: bench-status
