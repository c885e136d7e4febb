#!/usr/bin/env bash
# Fetches QEMU 10 from Debian's bookworm-backports (scripts/setup.sh adds the suite)
# without installing it, and prints a wrapper to run the lab under it:
#   TANDEM_LAB_QEMU=$(scripts/lab-qemu-10.sh) tandem lab ...
# For side-by-side runs against the lab's own QEMU 7.2 (docs/lab.md).
set -euo pipefail
DIR=${TANDEM_CACHE:-$HOME/.cache/tandem}/qemu-10
if [ ! -x "$DIR/qemu" ]; then
	rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp/debs"
	(cd "$DIR.tmp/debs" && apt-get download -t bookworm-backports qemu-system-x86 qemu-system-common qemu-system-data seabios >&2)
	for deb in "$DIR.tmp"/debs/*.deb; do dpkg -x "$deb" "$DIR.tmp/root"; done
	R=$DIR/root
	cat >"$DIR.tmp/qemu" <<WRAP
#!/bin/sh
exec env QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu $R/usr/bin/qemu-system-x86_64 -L $R/usr/share/qemu -L $R/usr/share/seabios "\$@"
WRAP
	chmod +x "$DIR.tmp/qemu"
	rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
echo "$DIR/qemu"
