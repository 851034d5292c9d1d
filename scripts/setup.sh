#!/usr/bin/env bash
# Install everything mlsched needs on a Debian 12 host; idempotent.
#
# Steps (each skipped when already done):
#   1. Debian packages (bookworm) + libbpf1/libbpf-dev/bpftool from bookworm-backports
#   2. the project virtualenv (.venv) with tensorflow-cpu, numpy, pyroute2, virtme-ng, pytest,
#      ruff, and bcc reachable through a .pth file
#   3. trixie's virtiofsd, run through trixie's own loader (bookworm has none)
#   4. the newest trixie-backports cloud kernel (sched_ext built in), unpacked in the cache
#
# The kernel and virtiofsd live in $MLSCHED_CACHE (default ~/.cache/mlsched), outside the repo.
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
BOOKWORM_PKGS=(clang-19 llvm-19 make qemu-system-x86 udev kmod busybox-static python3-bpfcc
	bpfcc-tools stress-ng zstd xz-utils binutils ca-certificates procps python3-venv
	util-linux gcc linux-perf)
BACKPORTS_PKGS=(libbpf1 libbpf-dev bpftool)
BACKPORTS_LIST=/etc/apt/sources.list.d/mlsched-bookworm-backports.list

backports_ok() {
	# libbpf >= 1.2 is needed for .struct_ops.link.
	local v
	v=$(dpkg-query -W -f='${Version}' libbpf1 2>/dev/null || true)
	dpkg --compare-versions "${v:-0}" ge 1:1.2 &&
		dpkg-query -W -f='${Status}\n' libbpf-dev bpftool 2>/dev/null | grep -c 'ok installed' |
		grep -qx 2
}

missing=()
for p in "${BOOKWORM_PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || ! backports_ok; then
	did_something=1
	if [ ! -f "$BACKPORTS_LIST" ]; then
		say "adding bookworm-backports to apt sources ($BACKPORTS_LIST)"
		echo "deb $MIRROR bookworm-backports main" >"$BACKPORTS_LIST"
	fi
	say "apt-get update"
	apt-get update -q >/dev/null
	if [ ${#missing[@]} -gt 0 ]; then
		say "installing Debian packages: ${missing[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			"${missing[@]}" >/dev/null
	fi
	if ! backports_ok; then
		say "installing from bookworm-backports: ${BACKPORTS_PKGS[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			-t bookworm-backports "${BACKPORTS_PKGS[@]}" >/dev/null
	fi
else
	say "Debian packages: already installed"
fi

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
# Download packages by name into $1 and unpack them into $2.
trixie_fetch() {
	local dl=$1 root=$2
	shift 2
	mkdir -p "$dl" "$root"
	(cd "$dl" && trixie_apt download "$@" >/dev/null)
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

# --- 4. the sched_ext kernel ------------------------------------------------------------------
KDIR="$CACHE/kernel"
if [ ! -f "$KDIR/current" ] || [ ! -f "$(cat "$KDIR/current")/vmlinuz" ]; then
	did_something=1
	trixie_update
	# Newest cloud kernel from trixie-backports; its package names carry the version.
	# The package is linux-binary-<ver>-cloud-amd64 (older: linux-image-<ver>-cloud-amd64).
	pkg=$(trixie_cache pkgnames linux-binary- |
		grep -E '^linux-binary-[0-9][^ ]*-cloud-amd64$' | sort -V | tail -1 || true)
	[ -n "$pkg" ] || pkg=$(trixie_cache pkgnames linux-image- |
		grep -E '^linux-image-[0-9][^ ]*-cloud-amd64$' | sort -V | tail -1 || true)
	[ -n "$pkg" ] || die "no trixie-backports cloud kernel found on $MIRROR"
	ver=${pkg#linux-binary-}
	ver=${ver#linux-image-}
	say "fetching kernel $ver ($pkg)"
	dest="$KDIR/$ver"
	rm -rf "$dest"
	want=("$pkg")
	for p in "linux-modules-$ver" "linux-headers-$ver"; do
		trixie_cache show "$p" >/dev/null 2>&1 && want+=("$p")
	done
	# headers-<ver> depends on the common headers and linux-base may be needed: take what exists
	common=$(trixie_cache show "linux-headers-$ver" 2>/dev/null | sed -n 's/^Depends: //p' |
		tr ',' '\n' | grep -oE 'linux-headers-[^ ]*-common[^ ]*' | head -1 || true)
	[ -n "$common" ] && want+=("$common")
	base=$(trixie_cache show "$pkg" 2>/dev/null | sed -n 's/^Depends: //p' | tr ',' '\n' |
		grep -oE 'linux-base[^ ]*' | head -1 || true)
	[ -n "$base" ] && want+=("$base")
	trixie_fetch "$dest/debs" "$dest/root" "${want[@]}"
	# The image sits in /usr/lib/modules/<kver>/vmlinuz (older packages: /boot/vmlinuz-<kver>).
	vmlinuz=$(find "$dest/root" -name 'vmlinuz*' -type f | head -1)
	[ -n "$vmlinuz" ] || die "kernel package has no vmlinuz"
	kver=$(basename "$(find "$dest/root" -path '*/lib/modules/*' -maxdepth 4 -mindepth 4 -type d |
		head -1)")
	[ -n "$kver" ] || die "kernel modules package has no lib/modules/<version>"
	ln -sfn "$vmlinuz" "$dest/vmlinuz"
	ln -sfn "$(find "$dest/root" -path '*linux-headers-*' -name vmlinux -type f | head -1)" \
		"$dest/vmlinux"
	[ -s "$dest/vmlinux" ] || die "kernel headers package has no vmlinux (BTF)"
	echo "$kver" >"$dest/kver"
	moddir=$(dirname "$(find "$dest/root" -path "*/lib/modules/$kver" -type d | head -1)")
	say "depmod for $kver"
	depmod -b "${moddir%/lib/modules}" "$kver"
	echo "$dest" >"$KDIR/current"
else
	say "kernel: $(cat "$(cat "$KDIR/current")/kver") already cached"
fi

if [ $did_something = 0 ]; then
	say "nothing to do: everything is already set up"
else
	say "done"
fi
