# Builder of the `nixery` package (see nixery.nix):
#   $out/lib/nixery/nixery   the source, precompiled
#   $out/bin/nixery          runs `python3 -m nixery`
#   $out/bin/python3         the Debian set's python3, finding nixery and its dependencies
#   $out/bin/nix*            Nix's programs, with nix.conf below unless the system has one
#   $out/bin/*               links to the programs of git and `shell`
#   $out/etc/nix/nix.conf    Nix settings for a container, used unless /etc/nix/nix.conf exists
out=${out:?}
mkdir -p "$out/bin" "$out/lib/nixery" "$out/etc/nix"
cp -r "$src" "$out/lib/nixery/nixery"
chmod -R u+w "$out/lib"
"$python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$out/lib/nixery" > /dev/null

pythonpath=$out/lib/nixery:$deps/lib/python

cat > "$out/etc/nix/nix.conf" <<'EOF'
# Nix in nixery's image: root in a container, without build users or a sandbox
# (the Kubernetes manifests set the same with NIX_CONFIG). Used when
# /etc/nix/nix.conf does not exist and NIX_CONF_DIR is not set.
build-users-group =
sandbox = false
experimental-features = nix-command
EOF

# Prologue of both wrappers.
common() {
  cat <<EOF
#!$bash
# nixery $version: $1
if [ -z "\${NIX_CONF_DIR-}" ] && [ ! -e /etc/nix/nix.conf ]; then
  export NIX_CONF_DIR=$out/etc/nix
fi
export PYTHONPATH="$pythonpath\${PYTHONPATH:+:\$PYTHONPATH}"
export PYTHONNOUSERSITE=1
EOF
}
{
  common "the registry"
  echo "exec $python -m nixery \"\$@\""
} > "$out/bin/nixery"
# Not `exec -a`: python3 finds its standard library from the path it is run as.
for name in python3 python3.11 python; do
  {
    common "the Debian set's python3, with nixery and its dependencies importable"
    echo "exec $python \"\$@\""
  } > "$out/bin/$name"
done
chmod 555 "$out"/bin/*

# Nix's programs: the same nix.conf as nixery's (they pick their personality
# from the name they are run as, which the Debian set's wrapper of `nix` keeps).
for entry in "$nix"/bin/*; do
  name=${entry##*/}
  {
    echo "#!$bash"
    echo "# nixery $version: Nix, with the settings for a container unless /etc/nix/nix.conf exists"
    echo "if [ -z \"\${NIX_CONF_DIR-}\" ] && [ ! -e /etc/nix/nix.conf ]; then"
    echo "  export NIX_CONF_DIR=$out/etc/nix"
    echo "fi"
    echo "exec $entry \"\$@\""
  } > "$out/bin/$name"
  chmod 555 "$out/bin/$name"
done

for package in $programs; do
  for entry in "$package"/bin/*; do
    name=${entry##*/}
    [ -e "$out/bin/$name" ] || [ -L "$out/bin/$name" ] || ln -s "$entry" "$out/bin/$name"
  done
done

"$out/bin/nixery" --version
