#!/usr/bin/env bash
# The demo: set up a fresh machine, then boot a stock Debian Linux guest with 2 vCPUs
# under tandem inside the lab, showing its console until it powers off.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
cargo build --release --quiet
exec target/release/tandem lab -- tandem run --kernel /images/vmlinuz --initrd /images/guest-initrd.cpio \
	--vcpus 2 --append "tandem.workload=ticker tandem.ticks=30"
