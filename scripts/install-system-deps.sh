#!/usr/bin/env bash
# Installs the Debian packages the registry and its tests need, a
# project-owned Nix configuration (single-user, no daemon, no binary cache),
# aarch64 emulation (qemu-user-static through binfmt_misc) and the static
# aarch64 busybox of the busybox set's aarch64-linux packages.
# Idempotent and quiet when everything is in place.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

# Nix runs single-user, without a daemon: only the owner of /nix can build. Another
# user would get a registry whose every first pull fails, so stop before changing anything.
if [ -n "$SUDO" ] && ! { [ -d /nix ] && [ -O /nix ]; }; then
  echo "install-system-deps.sh: the set-up runs Nix single-user for root (no daemon);" \
       "as $(id -un), Nix could build nothing: run the set-up as root (sudo make run, sudo make test)" >&2
  exit 1
fi

packages=(
  nix-bin busybox-static git ca-certificates   # building images
  python3-venv                                  # the registry's environment
  skopeo podman runc containerd docker.io umoci uidmap  # real clients in the tests
  chromium                                      # browser tests of the web pages (playwright drives it)
  openssl                                       # checks the registry's signatures independently of its library
  pigz zstd wrk apache2-utils hyperfine docker-registry nginx-light  # benchmark peers, load tools (ab: HEAD)
  qemu-user-static binfmt-support               # aarch64 programs run here (arm64 images, their tests)
)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Nix: single-user as root, no daemon, nothing to substitute from offline.
$SUDO mkdir -p /etc/nix /nix/var/nix
if ! grep -q 'nixery-py' /etc/nix/nix.conf 2>/dev/null; then
  $SUDO tee /etc/nix/nix.conf >/dev/null <<'CONF'
# written by nixery-py scripts/install-system-deps.sh
build-users-group =
substituters =
experimental-features = nix-command
sandbox = false
max-jobs = auto
tarball-ttl = 0
CONF
fi

# aarch64 emulation: binfmt_misc hands aarch64 ELF files to qemu-aarch64 (the
# "F" flag of Debian's entry keeps qemu open, so it also works in a chroot or
# container that has no qemu inside).
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  $SUDO mount -t binfmt_misc binfmt_misc "$binfmt"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
  $SUDO update-binfmts --enable qemu-aarch64
elif ! grep -qx enabled "$binfmt/qemu-aarch64"; then
  echo 1 | $SUDO tee "$binfmt/qemu-aarch64" > /dev/null
fi

# The busybox set's aarch64-linux packages (pkgs/busybox) copy this static
# aarch64 busybox, from Debian's busybox-static for arm64, as the x86_64 ones
# copy /usr/bin/busybox. apt fetches it with package lists of its own for
# arm64, so the machine's apt (its architectures, its lists) stays as it is.
# apt-get download checks the file against the SHA256 of the signed lists.
arm64_busybox=/usr/local/lib/nixery/aarch64-linux/busybox
if [ ! -x "$arm64_busybox" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  arm64_apt=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::status=/dev/null
             -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User="$(id -un)")
  mkdir -p "$work/lists/partial" "$work/cache"
  (cd "$work" && apt-get "${arm64_apt[@]}" update -qq && apt-get "${arm64_apt[@]}" download -qq busybox-static)
  dpkg-deb -x "$work"/busybox-static_*_arm64.deb "$work/root"
  $SUDO install -D -m 555 "$work/root/bin/busybox" "$arm64_busybox"
fi
