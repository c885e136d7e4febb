#!/usr/bin/env bash
# The demo: a live takeover. In the lab, a primary and a standby (two tandem processes
# over loopback QUIC with mutual TLS) run a Debian guest that prints a numbered tick
# every 100 ms; the primary is killed with SIGKILL at a random moment, the standby takes
# over, and the ticks must go on with none lost or repeated. Three runs, then a verdict.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
cargo build --release --quiet
exec target/release/tandem drill --kill-at random --runs 3 --watch "$@"
