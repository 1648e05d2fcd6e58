# A flake as a package set (nixery/nix/flake.py), imported like any package
# set's default.nix from a directory of its own that holds flake.json:
#
#   locked  the flake's locked source (fetchTree attributes: a commit or a narHash)
#   locks   the whole lock graph, as `nix flake metadata` printed it: the flake's
#           lock file, with the inputs it lacks locked when the revision was resolved
#   dir     the flake's subdirectory in its source ("" for the top)
#
# Every flake of the graph is fetched by its locked attributes and its outputs
# called with its inputs, so the evaluation is the same wherever and whenever
# it runs. (`builtins.getFlake` would do the same in Nix 2.8 only for a lock
# file that lacks nothing: it tries to write the lock file otherwise.)
#
# A name is looked up in `packages.<system>`, then in `legacyPackages.<system>`
# (a nixpkgs flake has only those); dotted names go into nested sets there.
{ system, ... }:
let
  spec = builtins.fromJSON (builtins.readFile ./flake.json);
  graph = spec.locks;

  # An input names a node, or ("follows") a path of input names from the root.
  nodeOf = input: if builtins.isList input then follow graph.root input else input;
  follow = key: path:
    if path == [ ] then key
    else follow (nodeOf graph.nodes.${key}.inputs.${builtins.head path}) (builtins.tail path);

  within = source: subdirectory: if subdirectory == "" then source.outPath else "${source.outPath}/${subdirectory}";
  rootSource = builtins.fetchTree (builtins.removeAttrs spec.locked [ "dir" ]);

  flakes = builtins.mapAttrs (key: node:
    let
      isRoot = key == graph.root;
      locked = node.locked or { };
      # `path:./sub`: a directory of the root flake's own source.
      relative = !isRoot && locked.type == "path" && builtins.substring 0 1 locked.path != "/";
      sourceInfo =
        if isRoot then rootSource
        else if relative then { outPath = "${within rootSource spec.dir}/${locked.path}"; inherit (locked) narHash; }
        else builtins.fetchTree (builtins.removeAttrs locked [ "dir" ]);
      directory = within sourceInfo (if isRoot then spec.dir else locked.dir or "");
      inputs = builtins.mapAttrs (name: input: flakes.${nodeOf input}) (node.inputs or { });
      outputs = (import (directory + "/flake.nix")).outputs (inputs // { self = result; });
      result = outputs // sourceInfo // { inherit inputs outputs sourceInfo; _type = "flake"; };
    in if node.flake or true then result else sourceInfo) graph.nodes;

  flake = flakes.${graph.root};
in (flake.legacyPackages.${system} or { }) // (flake.packages.${system} or { })
