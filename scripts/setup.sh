#!/usr/bin/env bash
# Everything tandem needs on a fresh Debian machine: the packages the lab and the
# image build use, a Rust build, and the guest/lab images (cached outside the repo).
# Sourced by demo.sh and test.sh; safe to run again (each step is skipped when done).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

# The lab runs under bookworm's QEMU 7.2. QEMU 10 from Debian's bookworm-backports
# lost more replicated guests to triple faults and crashed the lab's own kernel:
# docs/lab.md has the side-by-side counts. scripts/lab-qemu-10.sh fetches 10 for
# such comparisons (TANDEM_LAB_QEMU), from the backports suite added here with the
# base system's own archive and keyring (priority 100: nothing comes from it unasked).
BACKPORTS=/etc/apt/sources.list.d/tandem-bookworm-backports.sources
if [ ! -f "$BACKPORTS" ]; then
	uri=$(sed -n 's/^URIs: *\(.*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n1)
	[ -n "$uri" ] || uri=http://deb.debian.org/debian
	printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" |
		$sudo tee "$BACKPORTS" >/dev/null
	$sudo apt-get update -qq
fi
version_of() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }
case "$(version_of qemu-system-x86)" in
	1:7.2*) ;;
	*)
		# Pinned to bookworm's suite, whatever else is installed: a base image may hold
		# backports' qemu-utils 10, which breaks 7.2's qemu-system-common unless it is
		# brought back to 7.2 too (the lab needs neither version of it).
		want=(qemu-system-x86/bookworm qemu-system-common/bookworm qemu-system-data/bookworm seabios/bookworm)
		case "$(version_of qemu-utils)" in
			""|1:7.2*) ;;
			*) want+=(qemu-utils/bookworm) ;;
		esac
		echo "setup: installing bookworm's QEMU 7.2 for the lab (${want[*]})" >&2
		$sudo apt-get update -qq
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${want[@]}" >/dev/null
		;;
esac

# The packages guest-images/build.sh declares, plus binutils (strip) for lab boots and
# iproute2 (ip tuntap) for the TAP tests.
packages="$(sed -n 's/^REQUIRED_PACKAGES="\(.*\)"/\1/p' "$ROOT/guest-images/build.sh") binutils iproute2"
missing=()
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup: installing ${missing[*]}" >&2
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# apt-get download needs current package lists even when nothing was missing.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
	$sudo apt-get update -qq
fi

echo "setup: building guest and lab images" >&2
"$ROOT/guest-images/build.sh" >/dev/null
