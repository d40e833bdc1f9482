// etcd, the version the pinned Kubernetes release is built against, for kube-apiserver's
// storage in the test suite.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
