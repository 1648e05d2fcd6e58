# The bundled busybox set plus packages that fail or hang, for error-path tests.
{ system ? builtins.currentSystem, ... }@args:
let
  base = import ../../../pkgs/busybox args;
  runCommand = name: script: derivation {
    inherit name system;
    builder = "${base.busybox}/bin/sh";
    args = [ "-euc" script ];
    PATH = "${base.busybox}/bin";
  };
in
base // {
  # Fails with a recognisable message on its last lines.
  broken = runCommand "broken-1.0" ''
    echo "compiling broken..."
    echo "broken.c:42: error: the answer is not a number" >&2
    exit 1
  '';
  # Hangs (and starts a child), so that NIX_TIMEOUT has to kill a process tree.
  slow = runCommand "slow-1.0" ''
    sleep 3600 &
    sleep 3600
    mkdir $out
  '';
  # Evaluation error (not a build error).
  evalError = throw "this package does not evaluate";
}
