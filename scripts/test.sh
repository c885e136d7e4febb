#!/usr/bin/env bash
# The tests: set up a fresh machine, lint, then every test, the lab tests included
# (they boot real Linux guests in the lab and fail, never skip, without it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Every test binary runs even after one fails, so one CI run shows every failure.
cargo test --workspace --no-fail-fast
