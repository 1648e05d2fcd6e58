#!/usr/bin/env bash
# Downloads the .deb files of the Debian-derived package set, for amd64 and
# arm64.
#
#   scripts/debian-set/fetch.sh [--refresh]   # into ${NIXERY_DEBIAN_CACHE:-<repo>/.cache/debian-debs}
#
# Does nothing (in well under a second) when an earlier run fetched for the
# same packages.txt, excluded.txt and fetch.sh and every file it listed is
# still intact: `make run` calls it every time. --refresh asks apt again
# anyway (newer Debian versions, after `apt-get update`).
#
# Resolves the dependency closure of packages.txt with apt's own resolver
# (Depends + Pre-Depends, no Recommends/Suggests), as if the packages of
# excluded.txt were already installed (so they and their dependencies are left
# out), then `apt-get download`s every package of the closure that is not in
# the cache yet (or whose SHA256 is not apt's). Writes $cache/manifest.txt
# (amd64) and $cache/manifest-arm64.txt: "name version arch file sha256" per
# line, the exact sets generate.py turns into Nix derivations. Files of
# architecture "all" are shared by both. arm64 is resolved by apt as if it
# were the native architecture, with package lists of its own in
# $cache/apt-lists-arm64 (updated when missing and on --refresh), so the
# machine's apt configuration is left as it is. Re-runnable: files already
# downloaded are kept. Exits non-zero with a message when apt cannot reach
# the Debian mirror.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${NIXERY_DEBIAN_CACHE:-$repo/.cache/debian-debs}
case $cache in /*) ;; *) cache=$repo/$cache ;; esac
start=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - start) / 1000000 ))" | sed 's/\(...\)$/.\1/;s/^\./0./'; }
fail() { echo "fetch.sh: $*" >&2; echo "fetch.sh: failed after $(elapsed) s; without the Debian set the registry serves the busybox set" >&2; exit 1; }

refresh=""
for arg in "$@"; do
  case $arg in
    --refresh) refresh=1 ;;
    *) echo "fetch.sh: unknown argument $arg (usage: fetch.sh [--refresh])" >&2; exit 2 ;;
  esac
done
# What apt was asked: when it is unchanged and every file listed is intact, there is nothing to do.
inputs=$(cat "$here/fetch.sh" "$here/packages.txt" "$here/excluded.txt" | sha256sum | cut -d' ' -f1)
manifests=("$cache/manifest.txt" "$cache/manifest-arm64.txt")
if [ -z "$refresh" ] && [ -s "${manifests[0]}" ] && [ -s "${manifests[1]}" ] &&
   [ "$(cat "$cache/inputs.sha256" 2>/dev/null)" = "$inputs" ] &&
   cat "${manifests[@]}" | awk '{ print $5 "  " $4 }' | (cd "$cache" && sha256sum --check --status --strict); then
  echo "fetch.sh: $(cat "${manifests[@]}" | wc -l) packages (amd64 and arm64) in $cache, fetched before for these package lists; took $(elapsed) s (--refresh asks apt for newer versions)"
  exit 0
fi

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
# apt drops privileges to _apt for downloads, which cannot write into our cache.
# Upgrade-By-Source-Package=false: apt would otherwise "upgrade" the pretend-installed
# systemd alongside libsystemd0 (same source package) and pull it back in.
APT_OPTS=(-o APT::Sandbox::User="$(id -un)" -o APT::Install-Recommends=false -o APT::Install-Suggests=false
          -o APT::Get::Upgrade-By-Source-Package=false)

names() { sed 's/#.*//' "$1" | tr -s ' \t' '\n\n' | sed '/^$/d'; }
mapfile -t packages < <(names "$here/packages.txt")
mapfile -t excluded < <(names "$here/excluded.txt")
[ "$(dpkg --print-architecture)" = amd64 ] || fail "only amd64 hosts are supported (dpkg says $(dpkg --print-architecture))"
command -v apt-get >/dev/null || fail "apt-get not found: the Debian set needs a Debian (12) host"

mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt parses all package lists on every call unless it may keep its binary
# cache (Debian's container images disable it): keep one for this run.
CACHE_OPTS=(-o Dir::Cache::pkgcache="$work/pkgcache.bin" -o Dir::Cache::srcpkgcache="$work/srcpkgcache.bin")
APT_OPTS+=("${CACHE_OPTS[@]}")

# fetch ARCH MANIFEST APT-OPTIONS...: resolves and downloads the closure for
# ARCH with apt run with APT-OPTIONS, and writes MANIFEST.
fetch() {
  local arch=$1 manifest=$2
  shift 2
  local apt=("${APT_OPTS[@]}" "$@") name version deb_arch file sha total

  # A dpkg status file claiming that the excluded packages are installed. Only
  # identity fields are kept: with their own dependencies left out they are
  # "installed and consistent", so apt neither fetches nor repairs them.
  { apt-cache show "${apt[@]}" --no-all-versions "${excluded[@]}" 2>/dev/null || true; } | awk '
    /^$/ { if (pkg != "") { print "Status: install ok installed"; print "" } pkg = ""; keep = 0; next }
    /^[A-Za-z-]+:/ { keep = ($1 ~ /^(Package|Version|Architecture|Multi-Arch|Provides|Essential):$/); if ($1 == "Package:") { pkg = $2; print; next } }
    /^[ \t]/ { if (keep) print; next }
    keep { print }
    END { if (pkg != "") { print "Status: install ok installed"; print "" } }
  ' > "$work/status"

  # apt's resolver on an otherwise empty system.
  if ! apt-get -s "${apt[@]}" -o Dir::State::status="$work/status" install "${packages[@]}" > "$work/plan" 2>&1; then
    cat "$work/plan" >&2
    fail "apt could not resolve packages.txt for $arch"
  fi
  # "Inst libc6 (2.36-9+deb12u10 Debian:12.10/stable [amd64])" -> "libc6 2.36-9+deb12u10 amd64"
  awk '/^Inst / { gsub(/[()\[\]]/, ""); print $2, $3, $NF }' "$work/plan" | sort > "$work/closure"
  [ -s "$work/closure" ] || fail "apt resolved no packages for $arch (plan in $work/plan)"
  awk -v arch="$arch" '$3 != arch && $3 != "all" { bad = 1; print "fetch.sh: " $1 " is for " $3 ", not " arch > "/dev/stderr" } END { exit bad }' \
    "$work/closure" || fail "apt mixed architectures for $arch"

  # apt-get download names files NAME_VERSION_ARCH.deb with ':' written as %3a.
  # The SHA256 apt expects for each file: a file cut short by an interrupted
  # run is downloaded again.
  awk '{ print $1 "=" $2 }' "$work/closure" | xargs apt-cache show "${apt[@]}" 2>/dev/null |
    awk '/^Package:/ { p = $2 } /^Version:/ { v = $2 } /^SHA256:/ { print p, v, $2 }' | sort -u > "$work/sha256"

  local missing=()
  : > "$work/manifest"
  while read -r name version deb_arch; do
    file="${name}_${version//:/%3a}_${deb_arch}.deb"
    sha=$(expected "$name" "$version")
    [ -n "$sha" ] || fail "apt knows no SHA256 for $name $version"
    echo "$name $version $deb_arch $file $sha" >> "$work/manifest"
    intact "$file" "$sha" || { rm -f "$cache/$file"; missing+=("$name=$version"); }
  done < "$work/closure"

  total=$(wc -l < "$work/closure")
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "fetch.sh: downloading ${#missing[@]} of $total .deb files for $arch into $cache"
    if ! (cd "$cache" && apt-get download -q "${apt[@]}" "${missing[@]}" > "$work/download.log" 2>&1); then
      tail -n 20 "$work/download.log" >&2
      fail "apt-get download failed: is the Debian mirror reachable?"
    fi
  fi
  while read -r name version deb_arch file sha; do
    intact "$file" "$sha" || fail "$file is missing or damaged after the download"
  done < "$work/manifest"
  mv "$work/manifest" "$manifest"
  echo "fetch.sh: $total packages for $arch; took $(elapsed) s"
}
expected() { awk -v p="$1" -v v="$2" '$1 == p && $2 == v { print $3; exit }' "$work/sha256"; }
intact() { [ -s "$cache/$1" ] && [ "$(sha256sum < "$cache/$1" | cut -d' ' -f1)" = "$2" ]; }

# amd64: the machine's own package lists; a fresh machine may never have run `apt-get update`.
if ! apt-cache show "${CACHE_OPTS[@]}" --no-all-versions "${packages[@]%%=*}" >/dev/null 2>&1; then
  echo "fetch.sh: updating apt package lists"
  $SUDO apt-get update -qq || fail "apt-get update failed: is the Debian mirror reachable?"
  rm -f "$work"/*.bin
  apt-cache show "${CACHE_OPTS[@]}" --no-all-versions "${packages[@]%%=*}" >/dev/null ||
    fail "apt does not know all packages of packages.txt (see the message above)"
fi
fetch amd64 "${manifests[0]}"

# arm64: apt as if on an arm64 machine, with lists of its own (the machine's
# sources), so that Multi-Arch dependencies never resolve to amd64 packages.
rm -f "$work"/*.bin  # apt's cache of the amd64 lists
lists=$cache/apt-lists-arm64
# (No dpkg status: the machine's installed amd64 packages are not arm64's.)
ARM64_OPTS=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::Lists="$lists"
            -o Dir::State::status=/dev/null)
if [ -n "$refresh" ] || ! compgen -G "$lists/*_Packages*" > /dev/null; then
  echo "fetch.sh: updating the arm64 package lists in $lists"
  mkdir -p "$lists/partial"
  apt-get update -qq "${APT_OPTS[@]}" "${ARM64_OPTS[@]}" || fail "apt-get update for arm64 failed: is the Debian mirror reachable?"
  rm -f "$work"/*.bin
fi
fetch arm64 "${manifests[1]}" "${ARM64_OPTS[@]}"

echo "$inputs" > "$cache/inputs.sha256"
echo "fetch.sh: $(cat "${manifests[@]}" | wc -l) packages (amd64 and arm64, $(du -sh --exclude=apt-lists-arm64 "$cache" | cut -f1)) in $cache; took $(elapsed) s"
