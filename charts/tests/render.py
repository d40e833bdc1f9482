"""Render the chart with its default values, as `helm template` would, to stdout.

The real-API-server suite (operator/tests/it/kube/rbac.rs) applies the RBAC objects of this
render and runs the operator with exactly that ServiceAccount. `make chart-render` writes it
to target/chart/default.yaml.
"""

import sys

import helm_python as helm

from test_chart import CHART_DIR, NAMESPACE, RELEASE

with helm.Chart.load(CHART_DIR) as chart:
    manifests = chart.render(None, name=RELEASE, namespace=NAMESPACE, is_install=True)
for template, text in sorted(manifests.items()):
    if template.endswith(".yaml") and text.strip():
        sys.stdout.write(f"---\n# Source: {template}\n{text.strip()}\n")
