# Resolves image package names to derivations.
#
# Called by nixery with every user-supplied value passed as a string argument
# (`--argstr`), never spliced into Nix code:
#   pkgsPath  absolute path of a package set (a directory with default.nix)
#   request   JSON: { "packages": [names], "system": "x86_64-linux" }
#
# Prints JSON: { "packages": [{ name, attr, drvPath, outputs, mainProgram }],
#                "missing": [names] }
{ pkgsPath, request }:
let
  req = builtins.fromJSON request;
  pkgs = import (/. + pkgsPath) { inherit (req) system; };

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # The attribute of `set` called `name`, or else the one whose name matches
  # case-insensitively when exactly one does.
  lookupAttr = set: name:
    if builtins.hasAttr name set then { found = true; attr = name; }
    else
      let matches = builtins.filter (n: toLower n == toLower name) (builtins.attrNames set);
      in if builtins.length matches == 1
        then { found = true; attr = builtins.head matches; }
        else { found = false; };

  # Follows a dotted attribute path; every step must evaluate without error.
  lookupPath = set: parts: attrs:
    if parts == [ ] then { found = true; value = set; path = attrs; }
    else
      let
        safeSet = builtins.tryEval (builtins.isAttrs set);
        step = if safeSet.success && safeSet.value then lookupAttr set (builtins.head parts) else { found = false; };
        next = builtins.tryEval set.${step.attr};
      in
        if !step.found || !next.success then { found = false; }
        else lookupPath next.value (builtins.tail parts) (attrs ++ [ step.attr ]);

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

  # Nixery's meaning of `shell` for package sets that have no such attribute.
  expand = name:
    if toLower name == "shell" && !(pkgs ? shell)
    then [ "bashInteractive" "coreutils" "moreutils" "nano" ]
    else [ name ];

  describe = requested: name:
    let
      hit = lookupPath pkgs (builtins.filter builtins.isString (builtins.split "\\." name)) [ ];
      drv = hit.value;
      # nixpkgs marks the outputs a user wants (e.g. curl's `bin`) in meta.
      outputNames = drv.meta.outputsToInstall or [ (drv.outputName or "out") ];
      checked = builtins.tryEval (isDerivation drv && builtins.isString drv.drvPath);
    in
      if hit.found && checked.success && checked.value then {
        ok = true;
        value = {
          name = requested;
          attr = builtins.concatStringsSep "." hit.path;
          inherit (drv) drvPath;
          outputs = map (o: drv.${o}.outPath) outputNames;
          mainProgram = drv.meta.mainProgram or null;
        };
      } else { ok = false; name = requested; };

  results = builtins.concatLists (map (requested: map (describe requested) (expand requested)) req.packages);
in {
  packages = map (r: r.value) (builtins.filter (r: r.ok) results);
  missing = map (r: r.name) (builtins.filter (r: !r.ok) results);
}
