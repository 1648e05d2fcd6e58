# Resolves image package names to derivations in an imported package set.
#
#   pkgs  the package set, imported for the request's system
#   req   the decoded request: { "packages": [names], "system": "x86_64-linux" }
#
# Returns { packages = [{ name, attr, pullName, drvPath, outputs, mainProgram }]; missing = [names]; }.
# `attr` is the attribute path found; `pullName` is how to ask for it in an image
# name: in lower case (registry clients refuse upper-case names) whenever the
# lower-case name finds the same attribute, else the path as it is.
# Used by eval.nix (one nix-instantiate per image) and evaluator.nix (a long-running repl).
pkgs: req:
let
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # Nix spells attribute names that start with a digit with a leading
  # underscore (nixpkgs' `_7zz`, `_1password`); Docker names cannot start with
  # one, so `7zz` also finds `_7zz`.
  startsWithDigit = name: builtins.match "[0-9].*" name != null;
  undigit = name: if builtins.match "_[0-9].*" name != null then builtins.substring 1 (-1) name else name;

  # The attribute of `set` called `name` (or `_name` for a name that starts with
  # a digit), or else the one whose name matches case-insensitively when exactly
  # one does.
  lookupAttr = set: name:
    if builtins.hasAttr name set then { found = true; attr = name; }
    else if startsWithDigit name && builtins.hasAttr "_${name}" set then { found = true; attr = "_${name}"; }
    else
      let
        wanted = toLower (if startsWithDigit name then "_${name}" else name);
        matches = builtins.filter (n: toLower n == toLower name || toLower n == wanted) (builtins.attrNames set);
      in if builtins.length matches == 1
        then { found = true; attr = builtins.head matches; }
        else { found = false; };

  # Follows a dotted attribute path. The sets along the way must evaluate; the
  # final value is returned unevaluated, so that a package that exists but
  # fails to evaluate reports its own error rather than "not found".
  lookupPath = set: parts: attrs:
    let
      isSet = builtins.tryEval (builtins.isAttrs set);
      step = if isSet.success && isSet.value then lookupAttr set (builtins.head parts) else { found = false; };
      rest = builtins.tail parts;
    in
      if !step.found then { found = false; }
      else if rest == [ ] then { found = true; value = set.${step.attr}; path = attrs ++ [ step.attr ]; }
      else lookupPath set.${step.attr} rest (attrs ++ [ step.attr ]);

  # What `name` names: its dotted parts through nested sets, else the whole name
  # as one top-level attribute (a set may have dots in its names, as the
  # Debian-derived set's `python3.11`). Dotted paths come first, as they always did.
  find = name:
    let
      parts = builtins.filter builtins.isString (builtins.split "\\." name);
      byPath = lookupPath pkgs parts [ ];
      whole = lookupAttr pkgs name;
    in
      if byPath.found then byPath
      else if builtins.length parts > 1 && whole.found
        then { found = true; value = pkgs.${whole.attr}; path = [ whole.attr ]; }
      else { found = false; };

  # The name to pull a found attribute path by (see above), without the
  # underscore of `_7zz` when `7zz` finds the same attribute.
  pullName = path:
    let
      name = builtins.concatStringsSep "." path;
      lower = toLower (builtins.concatStringsSep "." (map undigit path));
      again = find lower;
    in
      if lower == name || !(again.found && again.path == path) then name else lower;

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

  # Nixery's meaning of `shell` for package sets that have no such attribute.
  expand = name:
    if toLower name == "shell" && !(pkgs ? shell)
    then [ "bashInteractive" "coreutils" "moreutils" "nano" ]
    else [ name ];

  describe = requested: name:
    let
      hit = find name;
      drv = hit.value;
      # nixpkgs marks the outputs a user wants (e.g. curl's `bin`) in meta.
      outputNames = drv.meta.outputsToInstall or [ (drv.outputName or "out") ];
      # A value that throws is reported by Nix itself (forced below), not hidden.
      checked = builtins.tryEval (isDerivation drv);
      broken = hit.found && !checked.success;
    in
      if hit.found && (broken || checked.value) then {
        ok = true;
        value = {
          name = requested;
          attr = builtins.concatStringsSep "." hit.path;
          # An expanded `shell` is asked for as `shell`.
          pullName = if name == requested then pullName hit.path else toLower requested;
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
