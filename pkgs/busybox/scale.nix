# A generated scale set for benchmarks: 300 packages, about 400 MB, with a
# layered dependency structure (a few big "runtimes" used by many, chains of
# libraries, and many small leaves). Everything is derived from the package
# number, so the set is the same on every machine.
{ runCommand, busyboxTools }:
let
  count = 300;
  range = builtins.genList (i: i) count;
  # Deterministic pseudo-random numbers (a linear congruential generator).
  rand = seed: n: let x = (seed * 1103515245 + 12345) - ((seed * 1103515245 + 12345) / 2147483648) * 2147483648; in
    if x < 0 then (0 - x) - ((0 - x) / n) * n else x - (x / n) * n;
  # Sizes in KiB: runtimes are big, libraries medium, leaves small.
  sizeOf = i:
    if i < 5 then 20000 + rand i 20000
    else if i < 60 then 1000 + rand i 3000
    else 100 + rand i 1200;
  depsOf = i:
    if i < 5 then [ ]
    else if i < 60 then [ (rand i 5) ] ++ (if i > 10 then [ (5 + rand (i + 7) (i - 5)) ] else [ ])
    else [ (rand i 5) (5 + rand (i + 1) 55) (5 + rand (i + 2) 55) ]
      ++ (if i > 100 then [ (60 + rand (i + 3) (i - 60)) ] else [ ]);
  name = i: "scale-${toString i}";
  mk = i:
    let deps = map (d: pkgs.${name d}) (depsOf i); in
    runCommand "${name i}-1.0" { } ''
      mkdir -p $out/bin $out/share
      # Compressible but not trivial content: busybox's machine code and text.
      kib=${toString (sizeOf i)}
      while [ $(( $(stat -c %s $out/share/data 2>/dev/null || echo 0) / 1024 )) -lt $kib ]; do
        cat ${busyboxTools}/bin/busybox >> $out/share/data
        seq ${toString i} 7 40000 >> $out/share/data
      done
      truncate -s ''${kib}K $out/share/data
      printf '#!${busyboxTools}/bin/sh\necho ${name i}\n' > $out/bin/${name i}
      chmod 555 $out/bin/${name i}
      ${builtins.concatStringsSep "\n" (map (d: "echo ${d} >> $out/share/deps") deps)}
    '';
  pkgs = builtins.listToAttrs (map (i: { name = name i; value = mk i; }) range);
in
pkgs
