#!/usr/bin/env bash
# Install everything mlsched needs on a Debian 12 host; idempotent.
#
# Steps (each skipped when already done):
#   1. Debian packages (bookworm) + libbpf1/libbpf-dev/bpftool from bookworm-backports, through
#      a private apt state (scripts/apt-backports.sh): the system's apt sources are never edited
#   2. the project virtualenv (.venv) with tensorflow-cpu, numpy, pyroute2, virtme-ng, pytest,
#      ruff, and bcc reachable through a .pth file
#   3. trixie's virtiofsd, run through trixie's own loader (bookworm has none)
#   4. the newest trixie-backports cloud kernel (sched_ext built in), unpacked in the cache
#      (kernel/current)
#   5. that kernel's source, the parts tools/sched_ext needs (scx headers, example schedulers,
#      libbpf, bpftool): linux-source/<version>/, its path in linux-source/current
#   6. the newest 6.19.x and 7.2.x cloud kernels (kernel/6.19, kernel/7.2): the older series the
#      VM tests run the walking skeleton on
#   7. QEMU 10 from bookworm-backports, unpacked in the cache (qemu10/), beside the system's 7.2:
#      its multi-threaded TCG runs one host thread per vCPU (scripts/vm-run.sh --tcg multi)
#
# All of it but the packages and the venv lives in $MLSCHED_CACHE (default ~/.cache/mlsched),
# outside the repo.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MLSCHED_CACHE:-$HOME/.cache/mlsched}
VENV=${MLSCHED_VENV:-$ROOT/.venv}
MIRROR=${MLSCHED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
did_something=0

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get and dpkg)"
mkdir -p "$CACHE"

# --- 1. Debian packages -----------------------------------------------------------------------
# libelf-dev and zlib1g-dev: `make scx-peers` builds libbpf and bpftool from the kernel tree.
BOOKWORM_PKGS=(clang-19 llvm-19 make qemu-system-x86 udev kmod busybox-static python3-bpfcc
	bpfcc-tools stress-ng zstd xz-utils binutils ca-certificates procps python3-venv
	util-linux gcc linux-perf libelf-dev zlib1g-dev systemd)  # systemd: systemd-analyze verify
BACKPORTS_PKGS=(libbpf1 libbpf-dev bpftool)
# An earlier setup added this source to the system; with a machine's own bookworm-backports entry
# it breaks every apt command. Backports now come through a private apt state.
OLD_BACKPORTS_LIST=/etc/apt/sources.list.d/mlsched-bookworm-backports.list

backports_ok() {
	# libbpf >= 1.2 is needed for .struct_ops.link.
	local v
	v=$(dpkg-query -W -f='${Version}' libbpf1 2>/dev/null || true)
	dpkg --compare-versions "${v:-0}" ge 1:1.2 &&
		dpkg-query -W -f='${Status}\n' libbpf-dev bpftool 2>/dev/null | grep -c 'ok installed' |
		grep -qx 2
}

if [ -f "$OLD_BACKPORTS_LIST" ]; then
	say "removing $OLD_BACKPORTS_LIST, which an earlier setup added (backports come privately now)"
	rm -f "$OLD_BACKPORTS_LIST"
fi
missing=()
for p in "${BOOKWORM_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	did_something=1
	say "apt-get update"
	apt-get update -q >/dev/null
	say "installing Debian packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${missing[@]}" >/dev/null
fi
if ! backports_ok; then
	did_something=1
	MLSCHED_CACHE=$CACHE MLSCHED_DEBIAN_MIRROR=$MIRROR \
		bash "$ROOT/scripts/apt-backports.sh" "${BACKPORTS_PKGS[@]}"
	backports_ok || die "libbpf1 >= 1.2, libbpf-dev and bpftool are still not installed"
fi
[ $did_something = 1 ] || say "Debian packages: already installed"

# --- 2. virtualenv ----------------------------------------------------------------------------
# pip's status survives the filter (pipefail); the filter drops warnings about local indexes
# that this machine's pip config names but that may not exist.
pip_install() {
	"$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 |
		{ grep -v 'is ignored: it is neither a file nor a directory' || true; }
}
PY_STAMP="$VENV/.mlsched-deps"
REQS="$ROOT/requirements.txt"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$PY_STAMP" ] || ! cmp -s "$REQS" "$PY_STAMP"; then
	did_something=1
	if [ ! -x "$VENV/bin/python" ]; then
		say "creating virtualenv $VENV"
		/usr/bin/python3 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
	fi
	say "installing Python packages (tensorflow-cpu is ~1.6 GB; a few minutes)"
	pip_install -r "$REQS"
	pip_install --no-deps -e "$ROOT"
	cp "$REQS" "$PY_STAMP"
else
	say "virtualenv: up to date"
fi
# bcc is Debian's python3-bpfcc; reach it from the venv without the rest of dist-packages.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BCC_DIR="$VENV/bcc-link"
if [ ! -e "$BCC_DIR/bcc" ] || [ ! -f "$SITE/mlsched-bcc.pth" ]; then
	did_something=1
	say "linking Debian's bcc into the virtualenv"
	mkdir -p "$BCC_DIR"
	ln -sfn /usr/lib/python3/dist-packages/bcc "$BCC_DIR/bcc"
	echo "$BCC_DIR" >"$SITE/mlsched-bcc.pth"
fi

# --- private apt state for trixie (never touches the system's apt config) ---------------------
TRIXIE="$CACHE/apt-trixie"
trixie_opts() {
	echo -o Dir::Etc::sourcelist="$TRIXIE/sources.list" -o Dir::Etc::sourceparts=- \
		-o Dir::State::Lists="$TRIXIE/lists" -o Dir::Cache="$TRIXIE/cache" -o Debug::NoLocking=1 \
		-o APT::Sandbox::User=root
}
# shellcheck disable=SC2046
trixie_apt() { apt-get -q $(trixie_opts) "$@"; }
# shellcheck disable=SC2046
trixie_cache() { apt-cache $(trixie_opts) "$@"; }
trixie_ready=0
trixie_update() {
	[ $trixie_ready = 1 ] && return
	mkdir -p "$TRIXIE/lists/partial" "$TRIXIE/cache/archives/partial"
	cat >"$TRIXIE/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie-backports main
SRC
	say "fetching trixie package lists (private apt state in $TRIXIE)"
	trixie_apt update >/dev/null
	trixie_ready=1
}
# Download packages by name into $1.
trixie_download() {
	local dl=$1
	shift
	mkdir -p "$dl"
	(cd "$dl" && trixie_apt download "$@" >/dev/null)
}
# Download packages by name into $1 and unpack them into $2.
trixie_fetch() {
	local dl=$1 root=$2 deb
	shift 2
	trixie_download "$dl" "$@"
	mkdir -p "$root"
	for deb in "$dl"/*.deb; do dpkg -x "$deb" "$root"; done
}

# --- 3. virtiofsd -----------------------------------------------------------------------------
VFS="$CACHE/virtiofsd"
if [ ! -x "$CACHE/bin/virtiofsd" ] || ! "$CACHE/bin/virtiofsd" --version >/dev/null 2>&1; then
	did_something=1
	trixie_update
	say "installing trixie's virtiofsd into $VFS"
	rm -rf "$VFS"
	trixie_fetch "$VFS/debs" "$VFS/root" virtiofsd libc6 libcap-ng0 libseccomp2 libgcc-s1
	mkdir -p "$CACHE/bin"
	cat >"$CACHE/bin/virtiofsd" <<WRAP
#!/bin/sh
# trixie's virtiofsd, run with trixie's own libc (bookworm has no virtiofsd).
R=$VFS/root
exec \$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path \$R/usr/lib/x86_64-linux-gnu \$R/usr/libexec/virtiofsd "\$@"
WRAP
	chmod +x "$CACHE/bin/virtiofsd"
	"$CACHE/bin/virtiofsd" --version >/dev/null || die "virtiofsd wrapper does not run"
else
	say "virtiofsd: already installed"
fi

# --- 4. the sched_ext kernel -------------------------------------------------------------------
# Two cloud kernels from trixie-backports (sched_ext built in), each unpacked in
# $KDIR/<ver>/{vmlinuz,vmlinux,kver}: the newest of all (its path in $KDIR/current, the default
# VM kernel) and the newest 6.19.x (its path in $KDIR/6.19, `vm-run.sh --kernel 6.19`). Old
# point releases disappear from the mirror, so each is picked as the newest of its series.
KDIR="$CACHE/kernel"
SRCDIR="$CACHE/linux-source"

kernel_complete() { [ -e "$1/vmlinuz" ] && [ -s "$1/vmlinux" ] && [ -f "$1/kver" ]; }
kernel_cached() { [ -f "$1" ] && kernel_complete "$(cat "$1")"; } # $1: a link file

# fetch_kernel SERIES LINK: SERIES is a version prefix ("6.19") or "" for the newest of all;
# LINK is the file under $KDIR that gets the kernel dir's path.
fetch_kernel() {
	local series=$1 link=$KDIR/$2 re pkg ver dest p common base vmlinuz kver moddir start=$SECONDS
	if kernel_cached "$link"; then
		say "kernel ${series:-newest}: $(cat "$(cat "$link")/kver") already cached"
		return
	fi
	did_something=1
	trixie_update
	# [0-9] for any version, else the series with its dots escaped and a trailing dot.
	if [ -n "$series" ]; then re="${series//./\\.}\\."; else re='[0-9]'; fi
	# The package is linux-binary-<ver>-cloud-amd64 (older: linux-image-<ver>-cloud-amd64); its
	# name carries the version.
	pkg=$(trixie_cache pkgnames linux-binary- |
		grep -E "^linux-binary-${re}[^ ]*-cloud-amd64\$" | sort -V | tail -1 || true)
	[ -n "$pkg" ] || pkg=$(trixie_cache pkgnames linux-image- |
		grep -E "^linux-image-${re}[^ ]*-cloud-amd64\$" | sort -V | tail -1 || true)
	[ -n "$pkg" ] || die "no trixie-backports cloud kernel ${series:+$series.x }found on $MIRROR"
	ver=${pkg#linux-binary-}
	ver=${ver#linux-image-}
	dest="$KDIR/$ver"
	if kernel_complete "$dest"; then
		say "kernel ${series:-newest}: $ver already unpacked"
		echo "$dest" >"$link"
		return
	fi
	say "fetching kernel $ver ($pkg) for ${series:-the newest series}"
	rm -rf "$dest"
	local want=("$pkg")
	# Take what the index still has: for an older series (6.19 today) only the signed image
	# package linux-binary-<ver> is left; its modules, headers and linux-base are gone.
	for p in "linux-modules-$ver" "linux-headers-$ver"; do
		has_candidate "$p" && want+=("$p")
	done
	common=$(trixie_cache show "linux-headers-$ver" 2>/dev/null | sed -n 's/^Depends: //p' |
		tr ',' '\n' | grep -oE 'linux-headers-[^ ]*-common[^ ]*' | head -1 || true)
	[ -n "$common" ] && has_candidate "$common" && want+=("$common")
	base=$(trixie_cache show "$pkg" 2>/dev/null | sed -n 's/^Depends: //p' | tr ',' '\n' |
		grep -oE 'linux-base[^ ]*' | head -1 || true)
	[ -n "$base" ] && has_candidate "$base" && want+=("$base")
	trixie_fetch "$dest/debs" "$dest/root" "${want[@]}"
	# The image sits in /usr/lib/modules/<kver>/vmlinuz (6.19 and older: /boot/vmlinuz-<kver>).
	vmlinuz=$(find "$dest/root" -name 'vmlinuz*' -type f | head -1)
	[ -n "$vmlinuz" ] || die "kernel package has no vmlinuz"
	ln -sfn "$vmlinuz" "$dest/vmlinuz"
	kver=$(basename "$(find "$dest/root" -path '*/lib/modules/*' -maxdepth 4 -mindepth 4 -type d |
		head -1)")
	if [ -n "$kver" ]; then
		moddir=$(dirname "$(find "$dest/root" -path "*/lib/modules/$kver" -type d | head -1)")
		say "depmod for $kver"
		depmod -b "${moddir%/lib/modules}" "$kver"
	else
		kver=$(basename "$vmlinuz")
		kver=${kver#vmlinuz-}
		[ "$kver" != vmlinuz ] || kver=$ver
		say "warning: no modules for $kver on the mirror: the VM boots without modules"
	fi
	echo "$kver" >"$dest/kver"
	# The BTF vmlinux comes with linux-headers-<ver>; without them, the ELF inside the image
	# carries the same .BTF section: take it out with the kernel tree's extract-vmlinux.
	local hdr
	hdr=$(find "$dest/root" -path '*linux-headers-*' -name vmlinux -type f | head -1)
	if [ -n "$hdr" ]; then
		ln -sfn "$hdr" "$dest/vmlinux"
	else
		local xv=
		[ -f "$SRCDIR/current" ] && xv="$(cat "$SRCDIR/current")/scripts/extract-vmlinux"
		[ -f "$xv" ] || die "no linux-headers-$ver, and no kernel source for extract-vmlinux"
		say "no linux-headers-$ver on the mirror: taking vmlinux (BTF) out of the image"
		bash "$xv" "$vmlinuz" >"$dest/vmlinux.tmp" 2>/dev/null && mv "$dest/vmlinux.tmp" "$dest/vmlinux"
		readelf -S "$dest/vmlinux" | grep -q '\.BTF ' || die "$dest/vmlinux has no .BTF section"
	fi
	[ -s "$dest/vmlinux" ] || die "no vmlinux (BTF) for $kver"
	echo "$dest" >"$link"
	say "kernel $kver cached in $((SECONDS - start)) s"
}
# (grep without -q: it reads to the end, no SIGPIPE for apt-cache under pipefail)
has_candidate() { trixie_cache show "$1" 2>/dev/null | grep '^Version:' >/dev/null; }
fetch_kernel "" current


# --- 5. kernel source for the scx headers and example schedulers ------------------------------
# From linux-source-<series of the newest kernel>: only the parts tools/sched_ext needs
# (tools/, include/, arch/x86/include/, scripts/, Makefile, kernel/bpf/), in
# $SRCDIR/<upstream version>/; its path in $SRCDIR/current. The deb (~170 MB) is deleted.
SRC_PARTS=(tools include arch/x86/include scripts Makefile kernel/bpf)
kseries=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' "$(cat "$KDIR/current")/kver")
src_ok() { # the cached tree is complete and of the newest kernel's series
	local d
	[ -f "$SRCDIR/current" ] && d=$(cat "$SRCDIR/current") &&
		[ -f "$d/tools/sched_ext/include/scx/common.bpf.h" ] && [ -f "$d/Makefile" ] &&
		[ -d "$d/kernel/bpf" ] && [ -d "$d/arch/x86/include" ] &&
		case $(basename "$d") in "$kseries" | "$kseries".*) true ;; *) false ;; esac
}
if src_ok; then
	say "kernel source: $(basename "$(cat "$SRCDIR/current")") already cached"
else
	did_something=1
	trixie_update
	spkg=linux-source-$kseries
	sver=$(trixie_cache show "$spkg" 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)
	[ -n "$sver" ] || die "no $spkg on $MIRROR (trixie-backports)"
	sver=${sver%%-*} # 7.3.4-1~bpo13+1 -> 7.3.4
	dest="$SRCDIR/$sver"
	dl="$SRCDIR/debs"
	rm -rf "$dl" "$dest.tmp"
	start=$SECONDS
	say "downloading $spkg ($sver, ~170 MB)"
	trixie_download "$dl" "$spkg"
	say "downloaded in $((SECONDS - start)) s; extracting ${SRC_PARTS[*]} into $dest"
	start=$SECONDS
	mkdir -p "$dest.tmp"
	# The deb holds usr/src/linux-source-<series>.tar.xz, whose top directory is
	# linux-source-<series>/: stream it out of the deb, keep only the parts.
	dpkg-deb --fsys-tarfile "$dl"/"${spkg}"_*.deb |
		tar -xO "./usr/src/$spkg.tar.xz" |
		tar -xJ -C "$dest.tmp" --strip-components=1 "${SRC_PARTS[@]/#/$spkg/}"
	rm -rf "$dl" "$dest"
	mv "$dest.tmp" "$dest"
	echo "$dest" >"$SRCDIR/current"
	src_ok || die "kernel source in $dest is incomplete"
	say "extracted in $((SECONDS - start)) s ($(du -sh "$dest" | cut -f1))"
fi

# --- 6. the 6.19 and 7.2 kernels (after the source: they may need its extract-vmlinux) ----------
fetch_kernel 6.19 6.19
fetch_kernel 7.2 7.2

# --- 7. QEMU 10 (bookworm-backports), run from the cache ---------------------------------------
# bookworm's QEMU 7.2 panics the guest under multi-threaded TCG (stale int3 after kernel text
# patching, DESIGN.md); 10.0 does not. Installed system-wide it would pull mesa and libdrm from
# backports, so its packages are unpacked here and run through a wrapper with its own firmware
# and data (-L); vm-run.sh puts the wrapper first on PATH, where virtme-ng looks for qemu.
QEMU10=$CACHE/qemu10
qemu10_ok() { "$QEMU10/bin/qemu-system-x86_64" --version 2>/dev/null | grep -q 'version 1[0-9]\.'; }
if qemu10_ok; then
	say "QEMU 10: $("$QEMU10/bin/qemu-system-x86_64" --version | head -1) already unpacked"
else
	did_something=1
	rm -rf "$QEMU10"
	MLSCHED_CACHE=$CACHE MLSCHED_DEBIAN_MIRROR=$MIRROR bash "$ROOT/scripts/apt-backports.sh" \
		--unpack "$QEMU10/root" qemu-system-x86 qemu-system-common qemu-system-data seabios
	mkdir -p "$QEMU10/bin"
	cat >"$QEMU10/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
# QEMU 10 from bookworm-backports (scripts/setup.sh), with its own firmware and data files.
R=$QEMU10/root
# Its own modules (audio, ui…), not the system 7.2 build's, which it refuses noisily.
export QEMU_MODULE_DIR=\$R/usr/lib/x86_64-linux-gnu/qemu
exec \$R/usr/bin/qemu-system-x86_64 -L \$R/usr/share/qemu -L \$R/usr/share/seabios "\$@"
WRAP
	chmod +x "$QEMU10/bin/qemu-system-x86_64"
	qemu10_ok || die "QEMU 10 from bookworm-backports does not run: $("$QEMU10/bin/qemu-system-x86_64" --version 2>&1 | head -1)"
	say "QEMU 10: $("$QEMU10/bin/qemu-system-x86_64" --version | head -1)"
fi

if [ $did_something = 0 ]; then
	say "nothing to do: everything is already set up"
else
	say "done"
fi
