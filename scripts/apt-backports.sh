#!/usr/bin/env bash
# Install Debian packages from bookworm-backports without touching the system's apt sources.
#
#   scripts/apt-backports.sh [--download-only] PACKAGE...
#   scripts/apt-backports.sh --unpack DIR PACKAGE...
#
# apt reads bookworm and bookworm-backports from a private source list and private package lists
# in $MLSCHED_CACHE/apt-bookworm-backports; dpkg installs into the system as usual. A machine
# may already list bookworm-backports with its own options (signed-by=…); a second entry with
# other options makes every later apt command fail ("Conflicting values set for option
# Signed-By"), so nothing is ever added to /etc/apt. Afterwards apt must still read the
# system's sources, or this fails. --download-only fetches the .debs into the private cache.
# --unpack DIR installs nothing: it downloads exactly the named packages (no dependencies) from
# bookworm-backports and unpacks them into DIR (dpkg -x), for a program run from there.
set -euo pipefail

CACHE=${MLSCHED_CACHE:-$HOME/.cache/mlsched}
MIRROR=${MLSCHED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
STATE=$CACHE/apt-bookworm-backports

say() { printf 'apt-backports: %s\n' "$*"; }
die() { printf 'apt-backports: error: %s\n' "$*" >&2; exit 1; }

download_only=() unpack=
if [ "${1:-}" = --download-only ]; then download_only=(--download-only); shift; fi
if [ "${1:-}" = --unpack ] && [ $# -ge 2 ]; then unpack=$2; shift 2; fi
[ $# -ge 1 ] || die "usage: $0 [--download-only | --unpack DIR] PACKAGE..."

mkdir -p "$STATE/lists/partial" "$STATE/cache/archives/partial"
cat >"$STATE/sources.list" <<SRC
deb [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bookworm-updates main
deb [signed-by=$KEYRING] $MIRROR bookworm-backports main
SRC
opts=(-q -o Dir::Etc::sourcelist="$STATE/sources.list" -o Dir::Etc::sourceparts=-
	-o Dir::State::Lists="$STATE/lists" -o Dir::Cache="$STATE/cache" -o APT::Sandbox::User=root)

say "fetching bookworm-backports package lists (private apt state in $STATE)"
apt-get "${opts[@]}" update >/dev/null || die "apt-get update of $MIRROR failed"
if [ -n "$unpack" ]; then
	dl=$STATE/unpack-debs
	rm -rf "$dl" && mkdir -p "$dl" "$unpack"
	say "downloading from bookworm-backports into $unpack: $*"
	(cd "$dl" && apt-get "${opts[@]}" download -t bookworm-backports "$@" >/dev/null) ||
		die "apt-get download $* failed"
	for deb in "$dl"/*.deb; do dpkg -x "$deb" "$unpack"; done
	rm -rf "$dl"
	exit 0
fi
say "installing from bookworm-backports: $*"
DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y --no-install-recommends \
	"${download_only[@]}" -t bookworm-backports "$@" >/dev/null
# The system's own sources were not touched; check that apt still reads them.
apt-cache policy >/dev/null 2>"$STATE/policy.err" ||
	die "apt no longer reads the system's sources: $(head -1 "$STATE/policy.err")"
