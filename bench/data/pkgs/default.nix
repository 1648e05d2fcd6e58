# The benchmarks' package set: the bundled busybox set plus packages of chosen
# sizes, so that layers (blobs) of about 1 MB, 50 MB and 200 MB exist, and a
# 2 GiB package for the memory benchmark (built on demand, deleted after).
#
#   nix-build bench/data/pkgs -A blob50m --no-out-link
#
# Random bytes do not compress, so a layer holding N MiB of them is an N MiB
# blob. The data is not reproducible across machines (it need not be: only the
# sizes matter here).
{ system ? builtins.currentSystem, ... }@args:
let
  base = import ../../../pkgs/busybox args;
  bb = base.busybox;
  runCommand = name: script: derivation {
    inherit name system;
    builder = "${bb}/bin/busybox";
    args = [ "sh" "-euc" script ];
    PATH = "${bb}/bin";
  };
  mib = n: toString (n * 1048576);
  random = name: size: runCommand "${name}-1.0" ''
    mkdir -p $out/share/${name}
    head -c ${mib size} /dev/urandom > $out/share/${name}/data
  '';
  # Compressible but not trivial: machine code and text, like real packages.
  mixed = name: size: runCommand "${name}-1.0" ''
    mkdir -p $out/share/${name}
    f=$out/share/${name}/data
    i=0
    while [ $i -lt ${toString size} ]; do
      cat ${bb}/bin/busybox
      seq $i 3 60000
      i=$((i + 2))
    done > $f
    truncate -s ${mib size} $f
  '';
in
base // {
  blob1m = random "blob1m" 1;
  blob50m = random "blob50m" 50;
  blob200m = random "blob200m" 200;
  # A package no busybox-set image holds: the one new layer of an image that
  # otherwise shares every layer with a stored one.
  extra50m = mixed "extra50m" 50;
  extra10m = mixed "extra10m" 10;
  big2g = mixed "big2g" 2048;
}
