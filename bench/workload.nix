# The benchmark workload: `n` derivations, each with a builder script written by
# builtins.toFile, a shared file imported as a path, and dependencies on up to three
# earlier derivations. `salt` changes every store path, for runs where all are new.
#
#   nix-instantiate workload.nix --arg n 3000 --argstr salt "$RANDOM"
{ n ? 3000, salt ? "", system ? builtins.currentSystem }:

let
  shared = ./shared-input.txt;

  drv = i: derivation {
    name = "bench-${toString i}";
    inherit system;
    builder = "/bin/sh";
    args = [ (builtins.toFile "builder-${toString i}.sh" ''
      # ${salt}
      echo ${toString i} > $out
    '') ];
    inherit shared salt;
    deps = map (j: drvs.${toString j}) (builtins.filter (j: j >= 0) [ (i - 1) (i - 10) (i - 100) ]);
  };

  drvs = builtins.listToAttrs (builtins.genList (i: { name = toString i; value = drv i; }) n);
in
builtins.genList (i: drvs.${toString i}) n
