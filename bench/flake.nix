# The benchmark workloads as a flake, for evaluation as CI does it: `tools/fork-bench
# --mode flake` copies this directory into a git repository, writes `params.nix`
# (`{ shape = "workload" or "nixpkgs"; n; salt; system; }`) and commits it anew for
# each run, then runs `nix eval --json <repo>#drvPaths`, which forces every `drvPath`.
{
  outputs = { self }:
    let
      params = import ./params.nix;
      drvs = import (./. + "/${params.shape}.nix") { inherit (params) n salt system; };
    in
    {
      drvPaths = map (d: d.drvPath) drvs;

      # The same derivations as packages, for `nix flake check`.
      packages.${params.system} = builtins.listToAttrs (map (d: { name = d.pname or d.name; value = d; }) drvs);
    };
}
