#!/usr/bin/env bash
# Installs the Debian packages the registry and its tests need, and a
# project-owned Nix configuration (single-user, no daemon, no binary cache).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

packages=(
  nix-bin busybox-static git ca-certificates   # building images
  python3-venv                                  # the registry's environment
  skopeo podman runc containerd docker.io umoci uidmap  # real clients in the tests
  chromium                                      # browser tests of the web pages (playwright drives it)
  pigz zstd wrk apache2-utils hyperfine docker-registry nginx-light  # benchmark peers, load tools (ab: HEAD)
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
