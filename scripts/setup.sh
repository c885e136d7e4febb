#!/usr/bin/env bash
# Everything tandem needs on a fresh Debian machine: the packages the lab and the
# image build use, a Rust build, and the guest/lab images (cached outside the repo).
# Sourced by demo.sh and test.sh; safe to run again (each step is skipped when done).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The packages guest-images/build.sh declares, plus binutils (strip) for lab boots.
packages="$(sed -n 's/^REQUIRED_PACKAGES="\(.*\)"/\1/p' "$ROOT/guest-images/build.sh") binutils"
missing=()
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	sudo=""
	[ "$(id -u)" = 0 ] || sudo="sudo"
	echo "setup: installing ${missing[*]}" >&2
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# apt-get download needs current package lists even when nothing was missing.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
	sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
	$sudo apt-get update -qq
fi

echo "setup: building guest and lab images" >&2
"$ROOT/guest-images/build.sh" >/dev/null
