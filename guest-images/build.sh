#!/usr/bin/env bash
# Builds tandem's guest and lab images from Debian packages and this directory.
#
#   guest-images/build.sh        -> prints the output directory on stdout
#
# Output: ${TANDEM_CACHE:-$HOME/.cache/tandem}/images/
#   vmlinuz              Debian cloud kernel (bzImage): guest kernel and lab host kernel
#   vmlinux              the same kernel as an uncompressed ELF (for PVH boot)
#   guest-initrd.cpio    guest initramfs (uncompressed newc): busybox, /init, tandem-work
#   lab-initrd.cpio.gz   lab host base initramfs: busybox, /init, KVM modules, /images/*
#   lab-qemu.cpio.gz     QEMU (binary, libraries, microvm firmware) to append to the
#                        lab initrd for benchmarks
#   tandem-work          the guest workload program (static), for use on the host
#   VERSIONS             exact package versions used
#   STAMP                build stamp; the build is skipped while it still matches
#
# Packages are fetched with `apt-get download` only (kept in $CACHE/debs/) and
# unpacked with `dpkg -x`; QEMU for lab-qemu.cpio.gz is the installed one.
# Environment: TANDEM_CACHE (cache root), TANDEM_KERNEL_PKG (kernel package,
# default: what linux-image-cloud-amd64 depends on), TANDEM_FORCE=1 (rebuild).
#
# Packages this script needs (a set-up script apt-get installs them):
REQUIRED_PACKAGES="qemu-system-x86 busybox-static lz4 cpio gzip gcc libc6-dev iproute2"
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${TANDEM_CACHE:-$HOME/.cache/tandem}
OUT=$CACHE/images
DEBS=$CACHE/debs
ARCH=amd64
QEMU_BIN=/usr/bin/qemu-system-x86_64
# Firmware/option ROMs QEMU reads for `-M microvm -kernel`: bios-microvm.bin
# (qboot), linuxboot_dma.bin (bzImage) and pvh.bin (ELF vmlinux, PVH entry).
QEMU_DATA_FILES="bios-microvm.bin qboot.rom linuxboot_dma.bin linuxboot.bin pvh.bin"
# The files in guest-images/ that the images are made from (part of the stamp).
STAMP_INPUTS="build.sh guest-init lab-init workload/tandem-work.c"

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query gcc cpio gzip lz4 ldd sha256sum flock grep; do
	command -v "$tool" >/dev/null || die "'$tool' not found (install: $REQUIRED_PACKAGES)"
done
[ -x "$QEMU_BIN" ] || die "$QEMU_BIN not found (install qemu-system-x86)"

mkdir -p "$CACHE" "$DEBS"
exec 9>"$CACHE/.images.lock"
flock 9
# Holding the lock, any temporary directory left here is from a killed build.
rm -rf "$CACHE"/images.tmp.* "$CACHE"/images.old.*

# ---------------------------------------------------------------- versions

# candidates PKG...: sets CANDIDATE[PKG] for each (one apt-cache run: it is slow).
declare -A CANDIDATE=()
candidates() {
	local pkg ver
	while read -r pkg ver; do
		CANDIDATE[$pkg]=$ver
	done < <(apt-cache policy "$@" 2>/dev/null |
		awk '/^[^ ].*:$/ { p = substr($0, 1, length($0) - 1) } /^  Candidate:/ { print p, $2 }')
	for pkg in "$@"; do
		ver=${CANDIDATE[$pkg]:-}
		[ -n "$ver" ] && [ "$ver" != "(none)" ] ||
			die "no candidate version for package $pkg (apt-get update?)"
	done
}

installed() {
	dpkg-query -W -f '${Version}' "$1" 2>/dev/null || echo unknown
}

if [ -n "${TANDEM_KERNEL_PKG:-}" ]; then
	KPKG=$TANDEM_KERNEL_PKG
else
	KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	[ -n "$KPKG" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
fi
BBPKG=busybox-static
candidates "$KPKG" "$BBPKG"
KVER=${CANDIDATE[$KPKG]}
BBVER=${CANDIDATE[$BBPKG]}
QEMU_VER=$(installed qemu-system-x86)
GCC_VER=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)
LIBC_VER=$(installed libc6-dev)

# iproute2's ip, for the lab's network namespaces and veth pairs (busybox's ip has
# neither), with the libraries it links.
IP_BIN=/usr/sbin/ip
ip_files() {
	echo "$IP_BIN"
	ldd "$IP_BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

qemu_files() { # the host files that go into lab-qemu.cpio.gz
	echo "$QEMU_BIN"
	ldd "$QEMU_BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
	local f d
	for f in $QEMU_DATA_FILES; do
		# QEMU 10's package keeps SeaBIOS's images in /usr/share/seabios (on its
		# firmware path) where 7.2 linked them into /usr/share/qemu.
		for d in /usr/share/qemu /usr/share/seabios; do
			[ -e "$d/$f" ] && { echo "$d/$f"; break; }
		done
	done
}

stamp() {
	{
		echo "format 1"
		echo "$KPKG $KVER"
		echo "$BBPKG $BBVER"
		echo "qemu-system-x86 $QEMU_VER"
		echo "gcc $GCC_VER libc6-dev $LIBC_VER"
		(cd "$HERE" && sha256sum $STAMP_INPUTS)
		qemu_files | xargs sha256sum
		ip_files | xargs sha256sum
	} | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp)

if [ "${TANDEM_FORCE:-0}" != 1 ] && [ -f "$OUT/STAMP" ] && [ "$(cat "$OUT/STAMP")" = "$STAMP" ]; then
	log "up to date ($OUT)"
	echo "$OUT"
	exit 0
fi

# ---------------------------------------------------------------- helpers

TMP=$(mktemp -d "$CACHE/images.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
WORK=$TMP/.work
mkdir -p "$WORK"

# fetch PKG VERSION: prints the path of the .deb in $DEBS, downloading it if needed.
fetch() {
	local pkg=$1 ver=$2 deb
	deb=$DEBS/${pkg}_${ver//:/%3a}_${ARCH}.deb
	if [ ! -f "$deb" ]; then
		log "downloading $pkg=$ver"
		local sandbox=()
		[ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
		(cd "$DEBS" && apt-get "${sandbox[@]}" -q download "$pkg=$ver" >&2) ||
			die "apt-get download $pkg=$ver failed"
	fi
	[ -f "$deb" ] || die "expected $deb after download"
	[ "$(dpkg-deb -f "$deb" Package)" = "$pkg" ] && [ "$(dpkg-deb -f "$deb" Version)" = "$ver" ] ||
		die "$deb is not $pkg $ver"
	echo "$deb"
}

# mkcpio DIR: writes DIR as a newc cpio (owner root, fixed mtimes) to stdout.
mkcpio() {
	find "$1" -exec touch -h -d @0 {} + 2>/dev/null || true
	(cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
		cpio -o -H newc -R 0:0 --reproducible --quiet)
}

# pad4 FILE: appends zero bytes up to a multiple of 4 bytes. Linux looks for an
# uncompressed cpio that follows a compressed one only at a 4-byte aligned
# offset (and skips zero bytes between archives), so every .cpio.gz is padded
# to keep `cat a.cpio.gz b.cpio.gz c.cpio` bootable. gzip ignores the zeros.
pad4() {
	local size
	size=$(stat -c %s "$1")
	if [ $((size % 4)) != 0 ]; then
		head -c $((4 - size % 4)) /dev/zero >>"$1"
	fi
}

# add_busybox ROOT: busybox at /bin/busybox plus a symlink for every applet.
add_busybox() {
	local root=$1 applet
	mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
	cp "$WORK/bb/bin/busybox" "$root/bin/busybox"
	for applet in $("$root/bin/busybox" --list-full); do
		case "$applet" in */*) ;; *) continue ;; esac # skip linuxrc
		[ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
	done
	mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run" "$root/root" "$root/etc"
	chmod 1777 "$root/tmp"
}

# ---------------------------------------------------------------- packages

KDEB=$(fetch "$KPKG" "$KVER")
BBDEB=$(fetch "$BBPKG" "$BBVER")

log "unpacking $(basename "$KDEB")"
dpkg -x "$KDEB" "$WORK/k"
dpkg -x "$BBDEB" "$WORK/bb"
[ -x "$WORK/bb/bin/busybox" ] || die "busybox not found in $BBDEB"

KREL=$(cd "$WORK/k/lib/modules" && ls | head -n1)
[ -n "$KREL" ] && [ -f "$WORK/k/boot/vmlinuz-$KREL" ] || die "no vmlinuz in $KDEB"
KMODS=$WORK/k/lib/modules/$KREL

# ---------------------------------------------------------------- kernel

cp "$WORK/k/boot/vmlinuz-$KREL" "$TMP/vmlinuz"

# vmlinux: the bzImage payload is an LZ4 legacy frame (magic 02 21 4c 18).
log "extracting vmlinux"
found=
for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$TMP/vmlinuz" | cut -d: -f1); do
	tail -c +$((off + 1)) "$TMP/vmlinuz" | lz4 -dc >"$WORK/vmlinux" 2>/dev/null || true
	if [ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
		found=$off
		break
	fi
done
[ -n "$found" ] || die "no LZ4-compressed ELF found in vmlinuz"
mv "$WORK/vmlinux" "$TMP/vmlinux"

# ---------------------------------------------------------------- workload

log "compiling tandem-work"
gcc -static -Os -s -Wall -Wextra -Werror -ffunction-sections -fdata-sections \
	-Wl,--gc-sections -o "$TMP/tandem-work" "$HERE/workload/tandem-work.c"

# ---------------------------------------------------------------- guest initrd

log "guest-initrd.cpio"
G=$WORK/guest
mkdir -p "$G"
add_busybox "$G"
install -m 0755 "$HERE/guest-init" "$G/init"
install -m 0755 "$TMP/tandem-work" "$G/usr/bin/tandem-work"

# Modules, each after what it depends on, listed in /lib/modules/order for the
# /init scripts to insmod: the kernel has them as modules, not built in.
declare -A MODPATH=() MODDONE=()
while IFS= read -r -d '' f; do
	n=$(basename "$f")
	n=${n%%.ko*}
	MODPATH[${n//_/-}]=$f
done < <(find "$KMODS/kernel" -name '*.ko*' -print0)
modfile() { # module name (either spelling) -> its file
	local n=${1//_/-}
	[ -n "${MODPATH[$n]:-}" ] || die "module $1 not found in $KPKG"
	echo "${MODPATH[$n]}"
}
# moddeps FILE.ko: what `modinfo -F depends` says, read straight from the
# module's .modinfo strings ("key=value\0"), so neither kmod nor a
# modules.dep is needed.
moddeps() {
	tr '\0' '\n' <"$1" | LC_ALL=C grep -a -m1 '^depends=' | cut -d= -f2- | tr ',' ' ' || true
}
add_module() { # ROOT MODULE: into ROOT/lib/modules, with its dependencies
	local root=$1 n=${2//_/-} f dep out
	[ -z "${MODDONE[$root:$n]:-}" ] || return 0
	MODDONE[$root:$n]=1
	mkdir -p "$root/lib/modules"
	f=$(modfile "$n")
	out=$root/lib/modules/$n.ko
	case "$f" in
	*.ko) cp "$f" "$out" ;;
	*.ko.xz) xz -dc "$f" >"$out" ;;
	*.ko.zst) zstd -qdc "$f" >"$out" ;;
	*.ko.gz) gzip -dc "$f" >"$out" ;;
	*) die "unknown module format: $f" ;;
	esac
	for dep in $(moddeps "$out"); do
		add_module "$root" "$dep"
	done
	echo "$n.ko" >>"$root/lib/modules/order"
}
# The guest's NIC and disk: virtio-mmio (found through the ACPI DSDT),
# virtio-net and virtio-blk.
for m in virtio-mmio virtio-net virtio-blk; do add_module "$G" "$m"; done
mkcpio "$G" >"$TMP/guest-initrd.cpio"

# ---------------------------------------------------------------- lab initrd

log "lab-initrd.cpio.gz"
L=$WORK/lab
mkdir -p "$L/lib/modules" "$L/images"
add_busybox "$L"
install -m 0755 "$HERE/lab-init" "$L/init"
# KVM; TAP devices, bridges and veth pairs for the guests' networks.
for m in irqbypass kvm kvm-amd tun bridge veth; do add_module "$L" "$m"; done
# iproute2's ip in place of busybox's, at the path busybox gave it.
rm -f "$L/sbin/ip" "$L/bin/ip"
for f in $(ip_files); do
	[ -e "$f" ] || die "$f missing (iproute2 installed?)"
	case "$f" in
	"$IP_BIN") cp -L "$f" "$L/sbin/ip" ;;
	*) mkdir -p "$L$(dirname "$f")" && cp -L "$f" "$L$f" ;;
	esac
done

cp "$TMP/vmlinuz" "$TMP/vmlinux" "$TMP/guest-initrd.cpio" "$L/images/"
mkcpio "$L" | gzip -6n >"$TMP/lab-initrd.cpio.gz"
pad4 "$TMP/lab-initrd.cpio.gz"

# ---------------------------------------------------------------- lab qemu

log "lab-qemu.cpio.gz"
Q=$WORK/qemu
mkdir -p "$Q"
for f in $(qemu_files); do
	[ -e "$f" ] || die "$f missing (qemu-system-x86 installed?)"
	mkdir -p "$Q$(dirname "$f")"
	cp -L "$f" "$Q$f" # same path, symlinks resolved
done
if [ ! -e "$Q/lib64/ld-linux-x86-64.so.2" ]; then
	mkdir -p "$Q/lib64"
	cp -L /lib64/ld-linux-x86-64.so.2 "$Q/lib64/"
fi
mkcpio "$Q" | gzip -6n >"$TMP/lab-qemu.cpio.gz"
pad4 "$TMP/lab-qemu.cpio.gz"

# ---------------------------------------------------------------- finish

{
	echo "$KPKG $KVER"
	echo "kernel-release $KREL"
	echo "$BBPKG $BBVER"
	echo "qemu-system-x86 $QEMU_VER (installed; in lab-qemu.cpio.gz)"
	echo "gcc $GCC_VER"
	echo "libc6-dev $LIBC_VER"
} >"$TMP/VERSIONS"
rm -rf "$WORK"
echo "$STAMP" >"$TMP/STAMP"
chmod 0755 "$TMP"

# Swap the new directory in: two renames, under the lock.
if [ -e "$OUT" ]; then
	OLD=$(mktemp -u "$CACHE/images.old.XXXXXX")
	mv -T "$OUT" "$OLD"
	mv -T "$TMP" "$OUT"
	rm -rf "$OLD"
else
	mv -T "$TMP" "$OUT"
fi
trap - EXIT

log "done: $(cd "$OUT" && du -h vmlinuz vmlinux guest-initrd.cpio lab-initrd.cpio.gz lab-qemu.cpio.gz | tr '\t\n' ': ')"
echo "$OUT"
