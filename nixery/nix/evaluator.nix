# The package set of a long-running `nix repl` (nixery/nix/evaluator.py).
#
# Imported once per process with the decoded setup file: the package set is
# imported once for one system, and every request reuses what earlier ones
# evaluated. User input arrives only as JSON files read by `request`, never
# as Nix code:
#   pkgsPath  absolute path of a package set (a directory with default.nix)
#   system    the one system this evaluator serves
#
# `request file` returns the JSON text of resolve.nix's answer.
{ pkgsPath, system, ... }:
let
  pkgs = import (/. + pkgsPath) { inherit system; };
  resolve = import ./resolve.nix pkgs;
in {
  # Forces the import of the package set's top level (not its packages).
  warm = builtins.isAttrs pkgs;
  # Evaluates `shell`, the name most images start with, and with it what most
  # packages share (nixpkgs' stdenv; the bundled set's busybox import).
  warmShell = builtins.deepSeq (resolve { packages = [ "shell" ]; inherit system; }) true;

  request = file:
    let req = builtins.fromJSON (builtins.readFile file);
    in if req.system != system
      then throw "nixery: this evaluator serves ${system}, not ${req.system}"
      else builtins.toJSON (resolve req);
}
