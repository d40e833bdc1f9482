//! Workspace-level integration tests live in `tests/tests/`: the examples evaluated through
//! the operator library, and the real-cluster suite (`make e2e`).
