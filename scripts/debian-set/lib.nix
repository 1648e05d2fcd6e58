# Builders of the Debian-derived package set (copied next to the generated
# default.nix by scripts/debian-set/generate.py).
#
# Nothing from the host is used at build time except two things imported into
# the store: a static busybox (Debian's busybox-static: sh, ar, tar, xz, sed,
# find...) and the .deb files. patchelf is itself a .deb of the set, unpacked
# without patching and run through the unpacked glibc's dynamic loader.
#
# The builds always run this machine's programs (`buildSystem`): for another
# `system` (aarch64-linux on x86_64) only the packages' own files are of that
# system, and Nix runs the derivations with `--option extra-platforms`.
{ system
, busyboxBinary
, buildSystem ? system  # of busybox and the bootstrap patchelf
, triplet ? "x86_64-linux-gnu"  # Debian's multiarch directory of `system`
, loader ? "ld-linux-x86-64.so.2"  # glibc's dynamic loader of `system`, in lib/<triplet>
}:
rec {
  # The static busybox, imported as a directory so the binary keeps its name
  # ("busybox" in argv[0] means "the first argument is the applet").
  busyboxDir = builtins.path {
    path = dirOf busyboxBinary;
    name = "busybox-static";
    filter = path: type: path == toString busyboxBinary;
  };
  busybox = "${busyboxDir}/${baseNameOf busyboxBinary}";

  # One symlink per applet: the PATH of every build.
  tools = derivation {
    name = "debian-set-build-tools";
    system = buildSystem;
    builder = busybox;
    args = [ "sh" "-euc" ''
      ${busybox} mkdir -p $out/bin
      for applet in $(${busybox} --list); do
        ${busybox} ln -s ${busybox} $out/bin/$applet
      done
    '' ];
  };

  # A .deb file from the cache directory. With its hash known, Nix does not
  # read the file again once the store has it (evaluation stays fast).
  importDeb = { path, name, sha256 }: builtins.path { inherit path name sha256; recursive = false; };

  # A .deb unpacked as is (no patching): only for running patchelf at build time.
  unpackRaw = name: debs: derivation {
    inherit name debs;
    system = buildSystem;
    builder = busybox;
    args = [ "sh" "-euc" ''
      mkdir -p $out
      for deb in $debs; do
        rm -rf /tmp/unpack-$$ && mkdir /tmp/unpack-$$ && cd /tmp/unpack-$$
        ar x $deb
        for data in data.tar*; do :; done
        case $data in
          *.xz) xz -dc $data | tar -x -C $out ;;
          *.gz) gzip -dc $data | tar -x -C $out ;;
          *.tar) tar -xf $data -C $out ;;
          *) echo "unsupported $data in $deb" >&2; exit 1 ;;
        esac
        cd / && rm -rf /tmp/unpack-$$
      done
    '' ];
    PATH = "${tools}/bin";
  };

  # patchelf from the set's own .deb, run by the set's own glibc.
  mkPatchelf = { libc, libgcc, libstdcxx, patchelf }: derivation {
    name = "patchelf-bootstrap";
    system = buildSystem;
    builder = busybox;
    args = [ "sh" "-euc" ''
      mkdir -p $out/bin
      cat > $out/bin/patchelf <<EOF
      #!${busybox} sh
      exec ${libc}/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
        --library-path ${libc}/lib/x86_64-linux-gnu:${libgcc}/lib/x86_64-linux-gnu:${libstdcxx}/usr/lib/x86_64-linux-gnu \
        ${patchelf}/usr/bin/patchelf "\$@"
      EOF
      chmod 555 $out/bin/patchelf
      $out/bin/patchelf --version
    '' ];
    PATH = "${tools}/bin";
  };

  lines = builtins.concatStringsSep "\n";

  # build-deb.sh names x86_64's multiarch directory and loader (where it finds
  # libraries, which ELF files of glibc it leaves alone). For another system
  # they are replaced by its own, and the x86_64 script (and with it every
  # x86_64 store path) stays as it is.
  buildDeb =
    if triplet == "x86_64-linux-gnu" then ./build-deb.sh
    else builtins.toFile "build-deb.sh" (builtins.replaceStrings
      [ "x86_64-linux-gnu" "ld-linux-x86-64.so.2" ] [ triplet loader ] (builtins.readFile ./build-deb.sh));

  # One Debian package (or several, when Debian's dependencies form a cycle)
  # unpacked into $out and made to run from the store. See build-deb.sh.
  mkDeb =
    { name                # store name: "<package>-<version>"
    , packages            # Debian package names in this derivation
    , debs                # their .deb files
    , deps                # derivations of their Debian dependencies (become references)
    , closure             # all transitive dependencies, nearest first (library search)
    , patchelf
    , interpreter         # the store's glibc loader (ld-linux-x86-64.so.2); null: this is glibc itself
    , interpreters ? { }  # "#!" interpreter path -> store file, preferred over the closure
    , alternatives ? { }  # link -> target: what Debian's postinst would have made with update-alternatives
    , wrappers ? { }      # file -> { VAR = value; }: moved to libexec/nixery-wrapped and wrapped with a bash script
    , wrapperShell ? null # bash, for the wrappers
    , fixup ? ""          # shell run after unpacking, in $out
    , meta ? { }
    }:
    derivation {
      inherit name system debs deps closure fixup;
      builder = busybox;
      args = [ "sh" "-eu" buildDeb ];
      common = ./common.sh;
      PATH = "${tools}/bin";
      patchelf = "${patchelf}/bin/patchelf";
      debianPackages = packages;
      interpreter = if interpreter == null then "" else interpreter;
      interpreters = lines (builtins.attrValues (builtins.mapAttrs (path: target: "${path} ${target}") interpreters));
      alternatives = lines (builtins.attrValues (builtins.mapAttrs (link: target: "${link} ${target}") alternatives));
      wrappers = lines (builtins.attrValues (builtins.mapAttrs
        (file: vars: builtins.concatStringsSep "\t" ([ file ] ++ builtins.attrValues (builtins.mapAttrs (k: v: "${k}=${v}") vars)))
        wrappers));
      wrapperShell = if wrapperShell == null then "" else wrapperShell;
    } // { inherit meta packages; };

  # Files of a package copied into a package of their own, which refers to nothing: what every
  # image gets without the package's dependencies (libc-bin's C.UTF-8 locale).
  mkPart =
    { name
    , from                # the package
    , paths               # its files and directories to copy, relative to it
    , meta ? { }
    }:
    derivation {
      inherit name system from paths;
      builder = busybox;
      args = [ "sh" "-euc" ''
        for path in $paths; do
          mkdir -p "$out/$(dirname "$path")"
          cp -R "$from/$path" "$out/$path"
        done
      '' ];
      PATH = "${tools}/bin";
    } // { inherit meta; };

  # Several packages merged into one tree of symlinks (like nixpkgs' buildEnv),
  # for programs that look for their files next to their own executable
  # (python3 finds its standard library from its real location, so its binary
  # is copied). Scripts whose "#!" points into a member are copied and pointed
  # at the merged tree. See build-env.sh.
  mkEnv =
    { name
    , paths               # merged in order; the first one providing a file wins
    , copy ? [ ]          # files copied instead of symlinked
    , wrappers ? { }      # as in mkDeb
    , wrapperShell ? null
    , extraDeps ? [ ]     # more references (e.g. the CA bundle)
    , binOnly ? false     # only bin/ and sbin/ (the `shell` meta-package)
    , meta ? { }
    }:
    derivation {
      inherit name system paths copy extraDeps;
      builder = busybox;
      args = [ "sh" "-eu" ./build-env.sh ];
      common = ./common.sh;
      PATH = "${tools}/bin";
      binOnly = if binOnly then "1" else "";
      wrappers = lines (builtins.attrValues (builtins.mapAttrs
        (file: vars: builtins.concatStringsSep "\t" ([ file ] ++ builtins.attrValues (builtins.mapAttrs (k: v: "${k}=${v}") vars)))
        wrappers));
      wrapperShell = if wrapperShell == null then "" else wrapperShell;
    } // { inherit meta; };
}
