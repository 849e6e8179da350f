# The nixpkgs-shaped benchmark workload: `n` packages built the way nixpkgs builds
# them, so that evaluation costs what it costs there (a few hundred µs a package)
# and the store sees what it sees there:
#
# - a package set that is a fix point of a base set and overlays (the second overlay
#   overrides every tenth package, as configuration does);
# - `callPackage` with `makeOverridable`-style results (`override`, `overrideAttrs`);
# - `mkDerivation` that checks `meta` (licence, platforms, broken, insecure) and
#   assembles phases into a builder script written with `builtins.toFile`;
# - multi-output packages (`out`, `dev`, `lib`), whose dependants use `dev`;
# - fixed-output sources, whose paths do not depend on `salt`: they stay valid
#   from one commit to the next, as a tarball does;
# - a setup script shared by every package, imported as a path.
#
# `salt` changes every other store path, for runs where all are new.
#
#   nix-instantiate nixpkgs.nix --arg n 2000 --argstr salt "$RANDOM"
{ n ? 2000, salt ? "", system ? builtins.currentSystem }:

let
  lib = rec {
    fix = f: let x = f x; in x;
    extends = overlay: f: final: let prev = f final; in prev // overlay final prev;
    composeOverlays = overlays: base: builtins.foldl' (f: o: extends o f) base overlays;
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalString = c: s: if c then s else "";
    concatMapStrings = f: xs: builtins.concatStringsSep "" (map f xs);
    concatStringsSep = builtins.concatStringsSep;
    mapAttrs = builtins.mapAttrs;
    elem = builtins.elem;
    filter = builtins.filter;
    genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
    functionArgs = f: if f ? __functionArgs then f.__functionArgs else builtins.functionArgs f;
    setFunctionArgs = f: args: { __functor = self: f; __functionArgs = args; };
    isFunction = f: builtins.isFunction f || (f ? __functor);
    toUpper = s: builtins.replaceStrings
      [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ]
      [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
      s;
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    getOutput = output: pkg: if pkg ? outputs && elem output pkg.outputs then pkg.${output} else pkg.out or pkg;

    # As nixpkgs' lib.makeOverridable: the result can be called again with other
    # arguments (`override`) or other derivation attributes (`overrideAttrs`).
    makeOverridable = f: origArgs:
      let
        result = f origArgs;
        overrideWith = newArgs: origArgs // (if isFunction newArgs then newArgs origArgs else newArgs);
      in
      result // {
        override = newArgs: makeOverridable f (overrideWith newArgs);
      };

    callPackageWith = autoArgs: fn: args:
      let
        f = if isFunction fn then fn else import fn;
        fargs = functionArgs f;
        allArgs = builtins.intersectAttrs fargs autoArgs // args;
      in
      makeOverridable f allArgs;
  };

  licenses = lib.genAttrs [ "mit" "bsd3" "gpl2" "gpl3" "lgpl21" "asl20" "mpl20" "isc" "unfree" ] (name: {
    shortName = name;
    fullName = lib.toUpper name;
    free = name != "unfree";
  });

  platforms = [ "x86_64-linux" "aarch64-linux" "i686-linux" "x86_64-darwin" "aarch64-darwin" system ];

  # As nixpkgs' check-meta.nix: refuse what the configuration does not allow.
  checkMeta = config: meta: attrs:
    let
      unfree = !(meta.license.free or true);
      broken = meta.broken or false;
      supported = lib.elem system (meta.platforms or platforms);
      insecure = (meta.knownVulnerabilities or [ ]) != [ ];
      reasons =
        lib.optional (unfree && !config.allowUnfree) "unfree"
        ++ lib.optional (broken && !config.allowBroken) "broken"
        ++ lib.optional (!supported) "unsupported"
        ++ lib.optional insecure "insecure";
    in
    if reasons == [ ] && validName attrs.name then attrs
    else throw "package ${attrs.name} is refused: ${lib.concatStringsSep ", " reasons}";

  # As nixpkgs checks names: a pattern match.
  validName = name: builtins.match "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]*" name != null;

  setup = ./shared-input.txt;

  base = final: {
    config = { allowUnfree = true; allowBroken = false; };

    stdenv = {
      inherit system;

      fetchurl = { name, url, sha256 }: derivation {
        inherit name system url;
        builder = "/bin/sh";
        args = [ "-c" "echo fetched > $out" ];
        outputHashMode = "flat";
        outputHashAlgo = "sha256";
        outputHash = sha256;
      };

      mkDerivation = attrs:
          let
            pname = attrs.pname;
            name = assert lib.versionAtLeast attrs.version "1"; "${pname}-${attrs.version}";
            outputs = attrs.outputs or [ "out" ];
            deps = (attrs.buildInputs or [ ]) ++ (attrs.nativeBuildInputs or [ ]);
            depOutputs = map (lib.getOutput "dev") deps;
            phases = [ "unpack" "patch" "configure" "build" "check" "install" "fixup" ];
            phaseText = phase: ''
              ${phase}Phase() {
                echo "${phase} ${name}"
                ${attrs."${phase}Phase" or ":"}
              }
            '';
            script = builtins.toFile "${name}-builder.sh" ''
              # ${salt}
              source ${setup}
              ${lib.concatMapStrings phaseText phases}
              ${lib.concatMapStrings (o: "mkdir -p \$${o}\n") outputs}
              ${lib.optionalString (attrs ? postInstall) attrs.postInstall}
            '';
            drvAttrs = {
              inherit name system outputs;
              builder = "/bin/sh";
              args = [ script ];
              src = attrs.src;
              buildInputs = depOutputs;
              configureFlags = attrs.configureFlags or [ ];
              NIX_CFLAGS = lib.concatStringsSep " " (map (d: "-I${d}/include") depOutputs);
              inherit salt;
            };
            drv = derivation (checkMeta final.config (attrs.meta or { }) drvAttrs);
            outputsSet = lib.genAttrs outputs (o: drv.${o});
          in
          drv // outputsSet // {
            inherit pname;
            version = attrs.version;
            meta = attrs.meta or { };
            passthru = attrs.passthru or { };
            overrideAttrs = f: final.stdenv.mkDerivation (attrs // f attrs);
          };
    };

    callPackage = lib.callPackageWith final;
  }
  // builtins.listToAttrs (builtins.genList (i: { name = "pkg${toString i}"; value = final.callPackage (package i) { }; }) n);

  # Package i, as a file in nixpkgs would define it: a function of its dependencies.
  package = i:
    let
      depIndices = builtins.filter (j: j >= 0) [ (i - 1) (i - 7) (i - 50) ];
      depNames = map (j: "pkg${toString j}") depIndices;
      multi = i - (i / 3) * 3 == 0;
      licenseNames = builtins.attrNames licenses;
      license = builtins.elemAt licenseNames (i - (i / builtins.length licenseNames) * builtins.length licenseNames);
      f = args: args.stdenv.mkDerivation {
        pname = "pkg${toString i}";
        version = "1.${toString (i / 10)}.${toString (i - (i / 10) * 10)}";
        src = args.stdenv.fetchurl {
          name = "pkg${toString i}-src.tar.gz";
          url = "https://example.org/pkg${toString i}.tar.gz";
          sha256 = builtins.hashString "sha256" "source of package ${toString i}";
        };
        outputs = if multi then [ "out" "dev" "lib" ] else [ "out" ];
        buildInputs = map (d: args.${d}) depNames;
        configureFlags = [ "--enable-shared" "--with-pkg=${toString i}" ]
          ++ lib.optionals multi [ "--includedir=$dev/include" "--libdir=$lib/lib" ];
        buildPhase = "make -j$NIX_BUILD_CORES";
        installPhase = "make install PREFIX=$out";
        postInstall = lib.optionalString multi "moveToOutput include $dev";
        meta = {
          description = "Package number ${toString i}";
          license = licenses.${license};
          platforms = platforms;
          maintainers = [ "maintainer${toString (i / 100)}" ];
        };
      };
    in
    lib.setFunctionArgs f (builtins.listToAttrs (map (d: { name = d; value = false; }) ([ "stdenv" ] ++ depNames)));

  overlays = [
    # Add a patched variant of every hundredth package.
    (final: prev: builtins.listToAttrs (builtins.genList
      (k: {
        name = "pkg${toString (k * 100)}-patched";
        value = prev."pkg${toString (k * 100)}".overrideAttrs (old: {
          pname = "${old.pname}-patched";
          patchPhase = "patch -p1 < fix-${toString k}.patch";
        });
      })
      ((n + 99) / 100)))
    # Override every tenth package's configuration, as a user's overlay does.
    (final: prev: builtins.listToAttrs (builtins.genList
      (k: {
        name = "pkg${toString (k * 10)}";
        value = prev."pkg${toString (k * 10)}".override (old: { });
      })
      ((n + 9) / 10)))
  ];

  pkgs = lib.fix (lib.composeOverlays overlays base);

  names = builtins.filter (name: builtins.substring 0 3 name == "pkg") (builtins.attrNames pkgs);
in
map (name: pkgs.${name}) names
