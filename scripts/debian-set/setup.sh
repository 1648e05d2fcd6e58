#!/usr/bin/env bash
# Sets up the Debian-derived bundled package set in one command:
# fetch.sh (the .deb files for amd64 and arm64, with apt) + generate.py (the
# Nix files: one set per system, default.nix picks one).
#
# Usage: scripts/debian-set/setup.sh [--build] [--refresh]
#
#   --build   also build every package of the set with Nix (~30 s on 2 cores),
#             so that the first image requests do not wait for builds
#   --refresh ask apt again for the packages' versions (fetch.sh --refresh)
#
# Environment:
#   NIXERY_DEBIAN_CACHE    where the .deb files go   (default <repo>/.cache/debian-debs)
#   NIXERY_DEBIAN_SET_DIR  where default.nix goes    (default <repo>/.cache/debian-set)
#
# Exits non-zero when the .deb files cannot be fetched (no network, no apt);
# the registry then serves the busybox set (NIXERY_BUNDLED_SET=auto).
# Re-runnable, and quick when nothing changed: downloaded files are kept, and
# default.nix is rewritten only when its inputs changed (scripts/debian-set/,
# the .deb files), so `make run` leaves the set, and its revision, as it was.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=""
fetch_args=()
for arg in "$@"; do
  case $arg in
    --build) build=1 ;;
    --refresh) fetch_args+=(--refresh) ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg (usage: setup.sh [--build] [--refresh])" >&2; exit 2 ;;
  esac
done

start=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - start) / 1000000 ))" | sed 's/\(...\)$/.\1/;s/^\./0./'; }

if ! "$here/fetch.sh" "${fetch_args[@]}"; then
  echo "setup.sh: the Debian set is NOT set up (fetching failed after $(elapsed) s); the registry will serve the busybox set" >&2
  exit 1
fi

python=python3
[ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
"$python" "$here/generate.py"
set_dir=${NIXERY_DEBIAN_SET_DIR:-$repo/.cache/debian-set}
case $set_dir in /*) ;; *) set_dir=$repo/$set_dir ;; esac

if [ -n "$build" ]; then
  echo "setup.sh: building the set with Nix"
  before=$(date +%s)
  nix-build --no-out-link -E "let s = import $set_dir {}; in [ s.shell s.python3 s.perl ] ++ builtins.attrValues s.debian" > /dev/null
  echo "setup.sh: built in $(( $(date +%s) - before )) s"
fi
echo "setup.sh: Debian set ready in $set_dir; took $(elapsed) s"
