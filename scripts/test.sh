#!/usr/bin/env bash
# The tests: set up a fresh machine, lint, then every test, the lab tests included
# (they boot real Linux guests in the lab and fail, never skip, without it).
# Closes with the tally of lab runs retried for an attributed lab fault (see
# tests/common/mod.rs and docs/lab.md), and fails when they exceed the budget.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
cd "$ROOT"
# Build outputs are cached beside the images (cargo's fingerprints keep them right
# for any checkout), so a fresh clone does not compile every dependency again.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${TANDEM_CACHE:-$HOME/.cache/tandem}/target}
started=$(date +%s)
# cargo judges a workspace crate fresh by the mtimes of the files its last build read,
# which for a shared target directory may be another checkout's: this checkout's own
# crates are always built again (the dependencies stay cached).
cargo clean -q -p tandem -p tandem-vmm -p tandem-proto -p tandem-replication
cargo clippy --workspace --all-targets --quiet -- -D warnings
export TANDEM_TALLY
TANDEM_TALLY=$(mktemp /tmp/tandem-tally.XXXXXX)
trap 'rm -f "$TANDEM_TALLY"' EXIT
# Every test binary runs even after one fails, so one CI run shows every failure.
# Binaries run one after another, and each holds its lab runs to one at a time.
rc=0
cargo test --workspace --no-fail-fast || rc=$?
runs=$(grep -c '^run ' "$TANDEM_TALLY" || true)
retries=$(grep -c '^retry ' "$TANDEM_TALLY" || true)
# The budget: 5 % of the lab runs, and never less than one.
budget=$(( runs * 5 / 100 ))
[ "$budget" -ge 1 ] || budget=1
echo
# Where the suite's time goes, for keeping it under its 15 minutes.
echo "slowest lab runs (s):"
grep '^run ' "$TANDEM_TALLY" | awk '{print $3, $2}' | sort -rn | head -8 | sed 's/^/  /' || true
grep '^retry ' "$TANDEM_TALLY" | sed 's/^retry /retried: /' || true
# The lab host froze in the lab kernel's patches of its own text; /lab/run holds what
# makes them, so the tests' commands should make none (docs/lab.md).
awk '$1 == "patches" && $3 == "unknown" { u++ } $1 == "patches" && $3 != "unknown" { s += $3; if ($3 > 0) { runs = runs sep $2 " " $3; sep = ", " } }
	END { printf "lab kernel text patches while the tests'"'"' commands ran: %d (in: %s; runs not counted: %d)\n", s, runs == "" ? "none" : runs, u }' "$TANDEM_TALLY"
echo "lab faults retried: $retries of $runs lab runs (budget $budget); tests took $(( $(date +%s) - started )) s"
if [ "$retries" -gt "$budget" ]; then
	echo "FAILED: more lab faults retried than the budget allows: the lab, or tandem, is not what docs/lab.md says" >&2
	rc=1
fi
exit $rc
