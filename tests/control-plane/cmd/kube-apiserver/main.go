// kube-apiserver, exactly as Kubernetes ships it, built from the pinned k8s.io/kubernetes
// module so the test suite runs the real API server (validation, CEL, server-side apply,
// watches, RBAC) without downloading a release binary.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
