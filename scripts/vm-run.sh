#!/usr/bin/env bash
# Run a command inside a throw-away virtme-ng VM booted on the cached sched_ext kernel.
#
#   scripts/vm-run.sh [--kernel SERIES] [--cpus N] [--memory SIZE] [--tcg multi|single] [--] 'COMMAND'
#
# --kernel SERIES boots the cached kernel of that series, e.g. `--kernel 6.19` (the newest 6.19.x
# that scripts/setup.sh cached in $MLSCHED_CACHE/kernel/6.19); the default is the newest kernel
# ($MLSCHED_CACHE/kernel/current). A series that is not cached is refused (exit status 2).
# The 6.19 kernel boots without modules (the mirror keeps only its image), so without overlayfs:
# the guest's /tmp is then a tmpfs and /etc, /var, /usr are the host's, read-only.
# The guest's /boot is a tmpfs holding the booted kernel's config-<kver>, when it is cached.
#
# --tcg multi (the default; MLSCHED_VM_TCG) runs QEMU 10 from the cache (scripts/setup.sh) with
# multi-threaded TCG: one host thread per vCPU, so a 2-vCPU guest on 2 host cores runs two CPUs
# in parallel and placement can change throughput. --tcg single runs every vCPU on one host
# thread in turn (the guest gets one host core whatever the scheduler does). bookworm's QEMU 7.2
# panics the guest under multi-threaded TCG on kernel text patching, so multi needs QEMU 10.
#
# The host kernel has no sched_ext, so everything that attaches a scheduler runs here: vng boots
# the trixie-backports cloud kernel cached by scripts/setup.sh under TCG (no KVM), shares the
# host root read-only (guest /tmp, /etc, /var... are throw-away overlays) and <repo>/build/vm-out
# read-write. In the guest the command runs with bash from the repo, with the repo's .venv/bin
# first on PATH and bpffs mounted; its exit status is this script's exit status.
#
# Exit status: COMMAND's own status; 2 for bad usage or a missing setup; 125 when the VM did not
# boot twice in a row (about 1 boot in 20 returns nothing at all: virtiofsd is slow to start, vng
# exits 255 after ~5 s without any guest output; such a boot is retried once, a command that ran
# and failed is not).
#
# Environment: MLSCHED_CACHE (default ~/.cache/mlsched), MLSCHED_VENV (default <repo>/.venv),
# MLSCHED_VM_BOOT_TIMEOUT (seconds to wait for the guest to come up before killing the VM and
# counting it as a failed boot; default 180, a normal boot takes about 9 s).
set -euo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
CACHE=${MLSCHED_CACHE:-$HOME/.cache/mlsched}
VENV=${MLSCHED_VENV:-$ROOT/.venv}
BOOT_TIMEOUT=${MLSCHED_VM_BOOT_TIMEOUT:-180}
OUT_DIR=$ROOT/build/vm-out
MARKER='mlsched-vm: guest up'

usage() {
	echo "usage: $0 [--kernel SERIES] [--cpus N] [--memory SIZE] [--tcg multi|single] [--] 'COMMAND'" >&2
	exit 2
}
say() { printf 'vm-run: %s\n' "$*" >&2; }
refuse() {
	say "$*"
	exit 2
}

# --- arguments --------------------------------------------------------------------------------
cpus=2
memory=2G
series=current
tcg=${MLSCHED_VM_TCG:-multi}
while [ $# -gt 0 ]; do
	case $1 in
	--kernel) [ $# -ge 2 ] || usage; series=$2; shift 2 ;;
	--kernel=*) series=${1#--kernel=}; shift ;;
	--cpus) [ $# -ge 2 ] || usage; cpus=$2; shift 2 ;;
	--cpus=*) cpus=${1#--cpus=}; shift ;;
	--memory) [ $# -ge 2 ] || usage; memory=$2; shift 2 ;;
	--memory=*) memory=${1#--memory=}; shift ;;
	--tcg) [ $# -ge 2 ] || usage; tcg=$2; shift 2 ;;
	--tcg=*) tcg=${1#--tcg=}; shift ;;
	-h | --help) usage ;;
	--) shift; break ;;
	-*) say "unknown option: $1"; usage ;;
	*) break ;;
	esac
done
[ $# -ge 1 ] || usage
command=$*   # several words are joined with spaces, like ssh does
[[ $cpus =~ ^[1-9][0-9]*$ ]] || refuse "--cpus wants a positive integer, not '$cpus'"
[[ $tcg =~ ^(multi|single)$ ]] || refuse "--tcg wants multi or single, not '$tcg'"
[ "$series" != newest ] || series=current
[[ $series =~ ^([0-9]+\.[0-9]+|current)$ ]] ||
	refuse "--kernel wants a series like 6.19, not '$series'"

# --- what setup.sh left behind ----------------------------------------------------------------
if [ "$series" = current ]; then
	[ -f "$CACHE/kernel/current" ] || refuse "no cached kernel in $CACHE/kernel: run make setup"
else
	[ -f "$CACHE/kernel/$series" ] ||
		refuse "no $series kernel cached ($CACHE/kernel/$series missing): run make setup"
fi
kdir=$(cat "$CACHE/kernel/$series")
case $kdir in /*) ;; *) kdir=$CACHE/kernel/$kdir ;; esac
[ -e "$kdir/vmlinuz" ] && [ -f "$kdir/kver" ] ||
	refuse "kernel cache $kdir is incomplete (no vmlinuz or kver): run make setup"
kver=$(cat "$kdir/kver")
# vng derives the module directory from the image's *real* path (…/root/usr/lib/modules/<kver>/
# vmlinuz -> …/root/usr/lib/modules/<kver>) and builds an initramfs with the modules it needs
# (overlay is =m in this kernel and backs the guest's /tmp, /etc... overlays). Given the symlink
# in the cache dir it finds no modules and boots without them, so resolve it.
vmlinuz=$(readlink -f "$kdir/vmlinuz")
# The kernel's config, for libbpf's __kconfig externs (scx_central needs them): libbpf reads
# /boot/config-<kver> or /proc/config.gz, which these kernels lack (no IKCONFIG). The 6.19 cache
# has no config (only its image is left on the mirror).
kconfig=$(find "$kdir/root" \( -path "*/lib/modules/$kver/config" -o -name "config-$kver" \) \
	-type f -print -quit 2>/dev/null || true)
[ -x "$CACHE/bin/virtiofsd" ] || refuse "no virtiofsd wrapper in $CACHE/bin: run make setup"
VNG=$VENV/bin/vng
[ -x "$VNG" ] || refuse "no vng in $VENV/bin: run make setup"

# vng runs virtme-run from PATH, and the 7.3 cloud kernel has no 9p, so vng needs virtiofsd.
export PATH="$CACHE/bin:$VENV/bin:$PATH"
if [ "$tcg" = multi ]; then
	[ -x "$CACHE/qemu10/bin/qemu-system-x86_64" ] ||
		refuse "--tcg multi needs QEMU 10 in $CACHE/qemu10: run make setup (or --tcg single)"
	export PATH="$CACHE/qemu10/bin:$PATH"
fi
qemu_version=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
mkdir -p "$OUT_DIR"

# --- the guest script -------------------------------------------------------------------------
# virtme-ng-init runs it with /bin/sh (dash), so it is POSIX sh; COMMAND itself runs with bash.
# (dash exits on a failed redirection of a special builtin such as `:`, hence touch.) Without
# overlayfs (a kernel booted without modules) vng's /tmp overlay is missing: mount a tmpfs.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; } # quote for sh: 'it'\''s'
boot_config=
[ -z "$kconfig" ] || boot_config="if [ ! -e /boot/config-$kver ]; then
	mount -t tmpfs -o mode=0755 tmpfs /boot && cp $(sq "$kconfig") /boot/config-$kver ||
	echo 'mlsched-vm: warning: no /boot/config-$kver' >&2; fi"
# A repo under /tmp (a CI clone) must stay visible when a tmpfs covers /tmp: keep the host's
# /tmp on /mnt first, then bind the repo's top directory back (with its writable build/vm-out).
tmp_keep= tmp_back=
case $ROOT in /tmp/?*)
	top=${ROOT#/tmp/}
	top=${top%%/*}
	tmp_keep="mount --rbind /tmp /mnt &&"
	tmp_back="mkdir -p $(sq "/tmp/$top") && mount --rbind $(sq "/mnt/$top") $(sq "/tmp/$top") ||
	echo 'mlsched-vm: warning: cannot keep the repo under /tmp visible' >&2"
	;;
esac
guest_script="echo $(sq "$MARKER")
mnt() { grep -qs \" \$2 \$1 \" /proc/mounts || mount -t \$1 \$1 \$2 ||
	echo \"mlsched-vm: warning: cannot mount \$1 on \$2\" >&2; }
mnt bpf /sys/fs/bpf
mnt tracefs /sys/kernel/tracing
mnt debugfs /sys/kernel/debug
if touch /tmp/.mlsched-w 2>/dev/null; then rm -f /tmp/.mlsched-w
else $tmp_keep mount -t tmpfs -o mode=1777 tmpfs /tmp ||
	echo 'mlsched-vm: warning: /tmp is read-only (no overlayfs) and no tmpfs on it' >&2
	$tmp_back
fi
$boot_config
cd $(sq "$ROOT") || { echo 'mlsched-vm: cannot cd to the repo' >&2; exit 125; }
PATH=$(sq "$VENV/bin"):\$PATH
export PATH
exec bash -c $(sq "$command")"

# --- boot, with one retry when the guest never came up -----------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/vm-run.XXXXXX")
vng_pid=
# virtiofsd references every inode the guest has looked up with an O_PATH file descriptor by
# default, under its RLIMIT_NOFILE: 20,000 here, a hard limit that cannot be raised without
# CAP_SYS_RESOURCE (virtiofsd's own --rlimit-nofile and `ulimit -n` only go up to it). A kernel
# build through the shared root looks up more files than that and fails with "Too many open
# files in system". With file handles (ext4 has them; CAP_DAC_READ_SEARCH to open them) an
# inode costs no descriptor, only open files do; "prefer" falls back to O_PATH descriptors on
# a filesystem without handles. vng starts the first virtiofsd on PATH with fixed options, so
# a wrapper in front of setup.sh's adds this one.
mkdir "$tmp/bin"
printf '#!/bin/sh\nexec %s --inode-file-handles=prefer "$@"\n' "$(sq "$CACHE/bin/virtiofsd")" \
	>"$tmp/bin/virtiofsd"
chmod +x "$tmp/bin/virtiofsd"
export PATH="$tmp/bin:$PATH"
tee_pid=

# The VM (vng, qemu, virtiofsd) runs in its own session so a stuck boot can be killed as a group.
kill_vm() {
	if [ -n "$vng_pid" ] && kill -0 "$vng_pid" 2>/dev/null; then
		kill -TERM -- "-$vng_pid" 2>/dev/null || kill -TERM "$vng_pid" 2>/dev/null || true
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			kill -0 "$vng_pid" 2>/dev/null || break
			sleep 0.5
		done
		kill -KILL -- "-$vng_pid" 2>/dev/null || kill -KILL "$vng_pid" 2>/dev/null || true
	fi
}
# vng passes its command on the kernel command line (2048 bytes on x86, base64 on top): a long
# COMMAND would be cut and the guest would never start. The guest runs a file instead, in the
# shared writable directory (the guest's /tmp may be a fresh tmpfs).
guest_file=$OUT_DIR/.vm-run-$$.sh
printf '%s\n' "$guest_script" >"$guest_file"

cleanup() {
	kill_vm
	[ -z "$tee_pid" ] || kill "$tee_pid" 2>/dev/null || true
	rm -rf "$tmp"
	rm -f "$guest_file"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT
trap 'say "terminated"; exit 143' TERM HUP

# Boot once; sets $rc (vng's status, which is the guest's) and $booted (1 when the marker showed).
boot() {
	local log=$tmp/log fifo=$tmp/out start=$SECONDS
	rm -f "$log" "$fifo"
	: >"$log"
	mkfifo "$fifo"
	# vng must write into a pipe: its qemu opens /proc/self/fd/1 itself, and on a plain file each
	# open starts again at offset 0, so lines are lost. tee passes the output on and keeps a copy.
	tee "$log" <"$fifo" &
	tee_pid=$!
	setsid "$VNG" -r "$vmlinuz" --disable-kvm --cpus "$cpus" --memory "$memory" \
		--qemu-opts="-accel tcg,thread=$tcg" \
		--rwdir="$OUT_DIR" -- "sh $(sq "$guest_file")" >"$fifo" 2>&1 </dev/null &
	vng_pid=$!
	booted=0
	while kill -0 "$vng_pid" 2>/dev/null; do
		if grep -q "^$MARKER" "$log"; then
			booted=1
			break
		fi
		if [ $((SECONDS - start)) -ge "$BOOT_TIMEOUT" ]; then
			say "no guest after ${BOOT_TIMEOUT} s, stopping the VM"
			kill_vm
			break
		fi
		sleep 0.3
	done
	rc=0
	wait "$vng_pid" || rc=$?
	vng_pid=
	wait "$tee_pid" || true
	tee_pid=
	# The marker may have come in just before vng exited.
	if [ $booted = 0 ] && grep -q "^$MARKER" "$log"; then booted=1; fi
}

say "booting $kver ($cpus cpus, QEMU $qemu_version, $tcg-threaded TCG)..."
boot
if [ $booted = 0 ]; then
	say "VM did not boot, retrying once"
	boot
	if [ $booted = 0 ]; then
		say "VM did not boot twice (no guest output; vng exit status $rc); giving up"
		exit 125
	fi
fi
exit "$rc"
