#!/usr/bin/env bash
# Writes the package set of the registry's own image: the Debian-derived set
# plus `nixery` (this repository's nixery/ package, its Python dependencies,
# python3, nix, git and a shell). The registry itself then builds the image,
# with its own layering and tarball code, on the first pull:
#
# Usage: scripts/self-image/generate.sh [--build]
#        NIXERY_PKGS_PATH=.cache/self-set nixery serve
#        podman pull --tls-verify=false 127.0.0.1:8080/nixery
#
#   --build   also build the `nixery` package with Nix, so that the first pull
#             does not wait for it
#
# Steps: (1) checks the Debian set (scripts/debian-set/setup.sh) and that it has
# nix-bin; (2) installs the dependencies of pyproject.toml with the venv's pip
# for the set's python3 (CPython version and glibc read from the set's
# python3; manylinux wheels only; the venv's installed versions as
# constraints), unless already installed for the same inputs; (3) imports the
# source and the dependencies into the Nix store and writes default.nix with
# their hashes, next to a copy of nixery.nix and its builders.
#
# Environment:
#   NIXERY_DEBIAN_SET_DIR     the Debian set            (default <repo>/.cache/debian-set)
#   NIXERY_SELF_SET_DIR       where default.nix goes    (default <repo>/.cache/self-set)
#   NIXERY_SELF_IMAGE_CACHE   pip's target and stamps   (default <repo>/.cache/self-image)
#
# The image is a snapshot: run this again after changing the source (the new
# default.nix then gives the image a new revision in the registry).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=""
for arg in "$@"; do
  case $arg in
    --build) build=1 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "generate.sh: unknown argument $arg (usage: generate.sh [--build])" >&2; exit 2 ;;
  esac
done

absolute() { case $1 in /*) echo "$1" ;; *) echo "$repo/$1" ;; esac; }
debian_set=$(absolute "${NIXERY_DEBIAN_SET_DIR:-$repo/.cache/debian-set}")
out=$(absolute "${NIXERY_SELF_SET_DIR:-$repo/.cache/self-set}")
cache=$(absolute "${NIXERY_SELF_IMAGE_CACHE:-$repo/.cache/self-image}")
start=$(date +%s)
fail() { echo "generate.sh: $*" >&2; exit 1; }
step() { echo "generate.sh: $* ($(( $(date +%s) - start )) s)"; }

python=python3
[ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
"$python" -m pip --version > /dev/null 2>&1 || fail "$python has no pip (run \`make venv\`)"

# 1. The Debian set, with the packages the image needs.
[ -f "$debian_set/default.nix" ] || fail "the Debian set is not generated ($debian_set/default.nix missing): run scripts/debian-set/setup.sh"
for package in nix-bin python3 git bash coreutils patchelf; do
  grep -q "^$package " "$debian_set/packages.txt" ||
    fail "the Debian set in $debian_set has no $package: run scripts/debian-set/setup.sh again"
done
mkdir -p "$cache"
set_python=$(nix-build --no-out-link "$debian_set" -A python3 2> "$cache/build.log" | tail -n 1) ||
  { tail -n 20 "$cache/build.log" >&2; fail "building python3 of the Debian set failed (log: $cache/build.log)"; }
read -r py_version glibc <<< "$("$set_python/bin/python3" -c \
  'import os, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", os.confstr("CS_GNU_LIBC_VERSION").split()[1])')"
step "Debian set $debian_set: python $py_version, glibc $glibc"

# 2. The Python dependencies: pyproject.toml's pins, other versions as in the venv.
version=$("$python" -c "import ast, sys; print(ast.literal_eval(open(sys.argv[1]).read().split('__version__ =')[1].split()[0]))" "$repo/nixery/__init__.py")
"$python" -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
' "$repo/pyproject.toml" > "$cache/requirements.txt.new"
"$python" -m pip freeze --exclude-editable 2> /dev/null | grep -v -i '^nixery[= ]' > "$cache/constraints.txt.new" || true
cpython=${py_version/./}
platforms=(--platform "manylinux2014_x86_64")  # pip adds manylinux2010 and manylinux1
for minor in $(seq 17 "${glibc#2.}"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
pip_args=(install --quiet --no-compile --disable-pip-version-check --only-binary=:all:
          --python-version "$py_version" --implementation cp --abi "cp$cpython" "${platforms[@]}"
          -r "$cache/requirements.txt" -c "$cache/constraints.txt")
stamp=$(cat "$cache/requirements.txt.new" "$cache/constraints.txt.new" <(echo "${pip_args[*]}") | sha256sum | cut -c1-32)
mv "$cache/requirements.txt.new" "$cache/requirements.txt"
mv "$cache/constraints.txt.new" "$cache/constraints.txt"
site=$cache/site-packages
if [ "$(cat "$site.stamp" 2> /dev/null)" != "$stamp" ] || [ ! -d "$site" ]; then
  step "installing $(wc -l < "$cache/requirements.txt") dependencies (and theirs) with pip for CPython $py_version, glibc $glibc"
  rm -rf "$site.tmp" "$site.stamp"
  if ! "$python" -m pip "${pip_args[@]}" --target "$site.tmp" > "$cache/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$cache/pip.log" | tail -n 30 >&2
    fail "pip could not install the dependencies (log: $cache/pip.log)"
  fi
  rm -rf "$site.tmp/bin" "$site"  # console scripts name pip's interpreter
  find "$site.tmp" -name __pycache__ -prune -exec rm -rf {} +
  mv "$site.tmp" "$site"
  echo "$stamp" > "$site.stamp"
else
  step "dependencies already installed in $site"
fi

# 3. The set: nixery.nix and its builders, and default.nix with the hashes of
# what it imports (so that Nix reads the dependencies only once).
mkdir -p "$out"
for file in nixery.nix nixery.sh python-deps.sh; do cp "$here/$file" "$out/$file.tmp" && mv "$out/$file.tmp" "$out/$file"; done
nix_string() { printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"$]/\\&/g')"; }
imports=$(nix-instantiate --read-write-mode --eval --strict --json -E "
  let s = import $out/nixery.nix {
    debianSet = import $(nix_string "$debian_set") {};
    version = $(nix_string "$version");
    source = /. + $(nix_string "$repo/nixery");
    pythonDeps = /. + $(nix_string "$site");
  }; in [ s.nixery.src s.nixery-python-deps.tree ]") || fail "importing the source and dependencies into the store failed"
source_path=$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])[0])' "$imports")
deps_path=$("$python" -c 'import json, sys; print(json.loads(sys.argv[1])[1])' "$imports")
source_hash=$(nix-store -q --hash "$source_path")
deps_hash=$(nix-store -q --hash "$deps_path")
debian_hash=$(sha256sum "$debian_set/default.nix" | cut -d' ' -f1)

cat > "$out/default.nix.tmp" <<EOF
# The package set of nixery's own image: the Debian-derived set plus \`nixery\`.
# GENERATED by scripts/self-image/generate.sh; do not edit: run it again.
#
#   source          $repo/nixery ($source_path)
#   dependencies    $site ($deps_path)
#   Debian set      $debian_set (default.nix sha256 $debian_hash)
#   python $py_version, glibc $glibc
#
# The hashes make the image a snapshot: Nix reuses the imported copies while
# they are in the store; after a garbage collection an edited source no
# longer matches its hash, and this script must run again.
{ system ? builtins.currentSystem, ... }@args:
let
  debianSet = import $(nix_string "$debian_set") args;
  self = import ./nixery.nix {
    inherit debianSet system;
    version = $(nix_string "$version");
    source = /. + $(nix_string "$repo/nixery");
    sourceHash = $(nix_string "$source_hash");
    pythonDeps = /. + $(nix_string "$site");
    pythonDepsHash = $(nix_string "$deps_hash");
  };
in
debianSet // self
EOF
mv "$out/default.nix.tmp" "$out/default.nix"
step "wrote $out/default.nix (nixery $version)"

if [ -n "$build" ]; then
  nixery=$(nix-build --no-out-link "$out" -A nixery 2> "$cache/build.log" | tail -n 1) ||
    { tail -n 30 "$cache/build.log" >&2; fail "building nixery failed (log: $cache/build.log)"; }
  step "built $nixery"
fi
echo "generate.sh: serve it with NIXERY_PKGS_PATH=$out nixery serve, then pull HOST/nixery; took $(( $(date +%s) - start )) s"
