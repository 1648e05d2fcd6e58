# The registry's own package, for its own image: nixery's source and its Python
# dependencies, run by the Debian-derived set's python3, next to nix, git and
# a shell. Copied next to the generated default.nix by
# scripts/self-image/generate.sh, which passes the arguments.
#
# Returns two derivations:
#   nixery               bin/nixery (meta.mainProgram), bin/python3 (finds nixery
#                        and its dependencies), nix-bin's programs (with a
#                        nix.conf for containers), and links to the programs of
#                        git and the Debian set's `shell` (bash,
#                        coreutils, grep, sed, tar...), so an image of `nixery`
#                        has them all in /bin
#   nixery-python-deps   the pip-installed dependencies, precompiled, with every
#                        ELF library pointed at the Debian set's libraries
{ debianSet             # the Debian-derived package set (scripts/debian-set)
, version               # nixery's version (nixery/__init__.py)
, source                # the repository's nixery/ directory
, sourceHash ? null     # NAR hash of the filtered source; null: hashed on every evaluation
, pythonDeps            # a `pip install --target` directory
, pythonDepsHash ? null # its NAR hash; with it, Nix never reads the directory again once imported
, system ? builtins.currentSystem
}:
let
  inherit (debianSet) python3 git shell patchelf;
  nix = debianSet.nix-bin;
  # The real bash (the set's bin/bash is a wrapper that sets TERMINFO_DIRS).
  bash = "${debianSet.bash}/libexec/nixery-wrapped/bin/bash";

  withHash = hash: attrs: if hash == null then attrs else attrs // { sha256 = hash; };

  # Caches and editor files never reach the image.
  ignored = name:
    name == "__pycache__" || name == ".mypy_cache" || name == ".pytest_cache" || name == ".ruff_cache"
    || builtins.match ".*\\.py[co]" name != null || builtins.match "\\..*\\.sw[a-p]" name != null
    || builtins.match ".*~" name != null;
  src = builtins.path (withHash sourceHash {
    path = source;
    name = "nixery-source-${version}";
    filter = path: type: !(ignored (baseNameOf path));
  });
  depsTree = builtins.path (withHash pythonDepsHash {
    path = pythonDeps;
    name = "nixery-site-packages";
  });

  # Where the libraries of the wheels' ELF files come from: glibc (libc, libm,
  # libgcc_s: Python has loaded most of them already), libstdc++ and zlib.
  libraryDirs = map (p: "${p}/lib/x86_64-linux-gnu") [ debianSet.libc6 debianSet.zlib1g ]
    ++ [ "${debianSet.libstdcxx6}/usr/lib/x86_64-linux-gnu" ];

  pythonDepsDrv = derivation {
    name = "nixery-python-deps-${version}";
    inherit system;
    builder = bash;
    args = [ "-euo" "pipefail" ./python-deps.sh ];
    PATH = "${shell}/bin";
    tree = depsTree;
    python = "${python3}/bin/python3";
    patchelf = "${patchelf}/bin/patchelf";
    libraryDirs = builtins.concatStringsSep ":" libraryDirs;
  } // {
    meta.description = "nixery's Python dependencies (pip wheels) for the Debian set's python3";
  };

  nixeryDrv = derivation {
    name = "nixery-${version}";
    inherit system src version;
    builder = bash;
    args = [ "-euo" "pipefail" ./nixery.sh ];
    PATH = "${shell}/bin";
    bash = bash;
    python = "${python3}/bin/python3";
    deps = pythonDepsDrv;
    nix = "${nix}";
    # bin/ of these is linked into $out/bin (first one wins)
    programs = [ "${git}" "${shell}" ];
  } // {
    meta = {
      mainProgram = "nixery";
      description = "nixery ${version}, the registry itself, with python3, nix, git and a shell";
    };
  };
in
{
  nixery = nixeryDrv;
  nixery-python-deps = pythonDepsDrv;
}
