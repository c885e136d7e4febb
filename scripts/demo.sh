#!/usr/bin/env bash
# The demo: live takeovers. In the lab, a primary and a standby (two tandem processes
# over loopback QUIC with mutual TLS) run a Debian guest; the primary is killed with
# SIGKILL at a random moment and the standby takes over.
#  1. The console: the guest prints a numbered tick every 100 ms, and the ticks must go
#     on with none lost or repeated. Three runs, then a verdict.
#  2. The network: a client holds one TCP connection to the guest's server, sending a
#     numbered request every 50 ms, and every reply must come, in order, on the same
#     connection. Three runs (one cutting an HTTP download in two), then a verdict.
#  3. The disk: the guest appends numbered records to its disk, printing each once it
#     is durable; every record printed must be on the standby's disk after the
#     takeover, and the guest reads its whole journal back. Three runs, then a verdict.
#  4. Split brain averted: a witness on a third host; the link between primary and
#     standby is cut (both alive), then the standby is cut off from everyone. With the
#     witness exactly one side runs the guest each time, and no tick is lost.
# Arguments go to the first drill.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
cargo build --release --quiet
target/release/tandem drill --kill-at random --runs 3 --watch "$@"
target/release/tandem drill --workload net --kill-at random,download,idle --runs 3
target/release/tandem drill --workload journal --kill-at random,after-output:40,random --runs 3
exec target/release/tandem drill --partition p-s,s-isolated --witness --on-standby-loss continue
