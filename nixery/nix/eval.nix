# Resolves image package names to derivations, in one nix-instantiate run.
#
# Called by nixery with every user-supplied value passed as a string argument
# (`--argstr`), never spliced into Nix code:
#   pkgsPath  absolute path of a package set (a directory with default.nix)
#   request   JSON: { "packages": [names], "system": "x86_64-linux" }
#
# Prints JSON: { "packages": [{ name, attr, pullName, drvPath, outputs, mainProgram }],
#                "missing": [names] }   (see resolve.nix)
{ pkgsPath, request }:
let req = builtins.fromJSON request;
in import ./resolve.nix (import (/. + pkgsPath) { inherit (req) system; }) req
