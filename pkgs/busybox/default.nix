# The bundled offline package set: no nixpkgs, only plain derivations whose
# builder is a statically linked busybox imported into the store.
#
# Like nixpkgs, it is a function of one attribute set returning an attribute
# set of derivations.
#
# For another system than this machine's (`{ system = "aarch64-linux"; }` on
# x86_64), the packages hold that system's static busybox while the builds
# still run this machine's: the derivations say `system = "aarch64-linux"`
# with an x86_64 builder, which Nix runs with
# `--option extra-platforms aarch64-linux` (their outputs run under emulation).
{ system ? builtins.currentSystem
, busyboxBinary ? # from Debian's busybox-static; /usr/bin first because /bin may be a symlink
    (if builtins.pathExists /usr/bin/busybox then /usr/bin/busybox else /bin/busybox)
  # The static busybox of each other system, by system: scripts/install-system-deps.sh
  # puts Debian's arm64 busybox-static there.
, busyboxBinaries ? { aarch64-linux = /usr/local/lib/nixery/aarch64-linux/busybox; }
, caBundle ? /etc/ssl/certs/ca-certificates.crt
, ...
}:
let
  # A static busybox binary, copied into the store. (Imported as a directory
  # so the binary keeps its name: busybox picks the applet from argv[0], and
  # "busybox" means "the first argument is the applet".)
  importBusybox = binary: "${builtins.path {
    path = dirOf binary;
    name = "busybox-static";
    filter = path: type: path == toString binary;
  }}/${baseNameOf binary}";

  # The busybox every build runs: this machine's.
  busyboxFile = importBusybox busyboxBinary;

  native = system == builtins.currentSystem;
  # The busybox the packages hold: `system`'s.
  targetBusyboxFile =
    if native then busyboxFile
    else if busyboxBinaries ? ${system} && builtins.pathExists busyboxBinaries.${system}
    then importBusybox busyboxBinaries.${system}
    else throw ("the busybox set has no static busybox for ${system}"
      + (if busyboxBinaries ? ${system}
         then " (${toString busyboxBinaries.${system}} is missing: run scripts/install-system-deps.sh)"
         else ""));

  runCommand = name: attrs: script: derivation ({
    inherit name system;
    builder = busyboxFile;
    args = [ "sh" "-euc" script ];
    PATH = "${buildTools}/bin";
  } // attrs);

  # A busybox with one symlink per applet. Another system's applets are
  # listed by this machine's busybox (builds need no emulation): both
  # come from the same Debian source package.
  mkBusyboxTools = toolsSystem: binary: let own = binary == busyboxFile; in derivation {
    name = "busybox-1.35.0";
    system = toolsSystem;
    builder = busyboxFile;
    args = [ "sh" "-euc" ''
      bb=${busyboxFile}
      $bb mkdir -p $out/bin
      $bb cp ${if own then "$bb" else binary} $out/bin/busybox
      $bb chmod 555 $out/bin/busybox
      for applet in $(${if own then "$out/bin/busybox" else "$bb"} --list); do
        [ "$applet" = busybox ] || $bb ln -s busybox $out/bin/$applet
      done
    '' ];
  } // { meta.mainProgram = "sh"; };

  # `system`'s busybox: what the packages hold and their scripts run.
  busyboxTools = mkBusyboxTools system targetBusyboxFile;
  # This machine's: on PATH in every build.
  buildTools = if native then busyboxTools else mkBusyboxTools builtins.currentSystem busyboxFile;

  # A program written as a busybox shell script, with its dependencies' store
  # paths baked in so Nix records them as references.
  script = { name, version, text, deps ? [ ] }:
    runCommand "${name}-${version}" { passAsFile = [ "text" ]; inherit text; } ''
      mkdir -p $out/bin
      { echo '#!${busyboxTools}/bin/sh'; cat "$textPath"; } > $out/bin/${name}
      chmod 555 $out/bin/${name}
      ${builtins.concatStringsSep "\n" (map (d: "echo ${d} >> $out/.deps") deps)}
    '' // { meta.mainProgram = name; };

  # A "library": data that several programs read at run time.
  dataLibrary = { name, version, files }:
    runCommand "${name}-${version}" { } ''
      mkdir -p $out/share/${name}
      ${builtins.concatStringsSep "\n" (builtins.attrValues (builtins.mapAttrs
        (file: content: "cat > $out/share/${name}/${file} <<'NIXERY_EOF'\n${content}\nNIXERY_EOF") files))}
    '';

  scale = import ./scale.nix { inherit runCommand busyboxTools; };

  packages = rec {
    busybox = busyboxTools;

    # The meta-package behind the `shell` image component: a shell and the core
    # utilities, all from busybox.
    shell = busyboxTools;
    bash = busyboxTools;  # busybox sh stands in for bash in this set
    coreutils = busyboxTools;

    cacert = runCommand "nss-cacert-3.0" { } ''
      mkdir -p $out/etc/ssl/certs
      ${if builtins.pathExists caBundle
        then "cp ${builtins.path { path = caBundle; name = "ca-bundle.crt"; }} $out/etc/ssl/certs/ca-bundle.crt"
        else "touch $out/etc/ssl/certs/ca-bundle.crt"}
    '';

    hello = script {
      name = "hello"; version = "2.12.1";
      text = ''echo "Hello, world!"'';
    };

    # Three programs that share one library, so images that hold any two of
    # them share the library's layer.
    libwords = dataLibrary {
      name = "libwords"; version = "1.4";
      files = {
        "fortunes" = builtins.concatStringsSep "\n" [
          "A store path is forever."
          "Layers shared are layers saved."
          "The closure is the program."
        ];
        "banner-font" = "#####";
      };
    };
    fortune = script {
      name = "fortune"; version = "1.99";
      text = ''shuf -n 1 ${libwords}/share/libwords/fortunes'';
    };
    cowsay = script {
      name = "cowsay"; version = "3.7.0";
      text = ''
        msg="''${*:-$(head -n 1 ${libwords}/share/libwords/fortunes)}"
        echo " < $msg >"
        echo "        \   ^__^"
        echo "         \  (oo)\_______"
        echo "            (__)\       )\/\\"
      '';
    };
    figlet = script {
      name = "figlet"; version = "2.2.5";
      text = ''
        font=$(cat ${libwords}/share/libwords/banner-font)
        echo "$font $* $font"
      '';
    };

    # A two-level dependency chain: greet -> libgreeting -> libwords.
    libgreeting = runCommand "libgreeting-0.3" { } ''
      mkdir -p $out/share/libgreeting
      echo "Greetings from ${libwords}" > $out/share/libgreeting/greeting
    '';
    greet = script {
      name = "greet"; version = "0.3";
      text = ''cat ${libgreeting}/share/libgreeting/greeting'';
    };

    # A package that is much larger than the others, for layer-size tests.
    bigdata = runCommand "bigdata-1.0" { } ''
      mkdir -p $out/share/bigdata
      for i in $(seq 1 12); do cat ${targetBusyboxFile} >> $out/share/bigdata/blob; done
    '';

    # Sets nest, as in nixpkgs: reach them as `tools.jqlite` in image names.
    tools = {
      jqlite = script {
        name = "jqlite"; version = "0.1";
        text = ''sed -n 's/.*"\([a-z]*\)": *"\([^"]*\)".*/\1=\2/p' '';
      };
    };
  } // scale;
in
packages
