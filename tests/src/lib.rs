//! Workspace-level integration tests live in `tests/tests/`: the examples evaluated through
//! the operator library, and the operator and agent talking over ADS. The real-API-server
//! suite is in `operator/tests/it/kube/`.
