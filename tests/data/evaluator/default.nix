# The bundled busybox set plus attributes that are slow to evaluate, for the
# long-running evaluator's tests (tests/test_evaluator.py).
{ system ? builtins.currentSystem, ... }@args:
let
  base = import ../../../pkgs/busybox args;
  # Summing n integers: about 1 s of evaluation per 3 million here.
  sum = n: builtins.foldl' (a: b: a + b) 0 (builtins.genList (x: x) n);
  # k such sums one after another (each list garbage once summed: memory stays flat).
  busy = k: value: if k == 0 then value else builtins.seq (sum (3000000 + k)) (busy (k - 1) value);
in
base // {
  slowEval = busy 1 base.hello;
  endlessEval = busy 1000 base.hello;
  evalError = throw "this package does not evaluate";
  # About 800 MB of resident memory within 2 s, then hello.
  memoryHog = builtins.seq (builtins.length (builtins.genList (x: x) 10000000)) base.hello;
  # A file that ends too soon: the error nix repl does not print.
  cutShort = import ./cut-short.nix;
  nested = { deeper = { tool = base.hello; }; };
}
