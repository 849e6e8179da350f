//! The worker protocol's constants: its magic numbers, the stderr message codes, the
//! version a connection negotiates and the operation codes. Every other module builds
//! on these; this one depends on none of them.

use std::fmt;

pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
pub const STDERR_READ: u64 = 0x6461_7461;
pub const STDERR_WRITE: u64 = 0x6461_7416;
pub const STDERR_LAST: u64 = 0x616c_7473;
pub const STDERR_ERROR: u64 = 0x6378_7470;
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// The feature a daemon offers when it serves AddTempRoots (op 49): a set of paths
/// rooted in one request, answered with `1`.
pub const FEATURE_ADD_TEMP_ROOTS: &str = "addTempRoots";

/// A worker protocol version, `major.minor`, sent on the wire as `major << 8 | minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl Version {
    /// The newest version this client speaks: that of Nix 2.26.3.
    pub const LATEST: Version = Version::new(1, 38);
    /// The oldest daemon version this client accepts (Nix 2.4's content-addressed
    /// AddToStore).
    pub const MINIMUM: Version = Version::new(1, 25);

    pub const fn new(major: u8, minor: u8) -> Version {
        Version { major, minor }
    }

    pub fn from_wire(v: u64) -> Version {
        Version { major: ((v >> 8) & 0xff) as u8, minor: (v & 0xff) as u8 }
    }

    pub fn to_wire(self) -> u64 {
        (u64::from(self.major) << 8) | u64::from(self.minor)
    }

    /// Whether this version has at least the given minor (same major assumed: the
    /// handshake refuses any other).
    pub fn at_least(self, minor: u8) -> bool {
        self.minor >= minor
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

macro_rules! ops {
    ($($name:ident = $code:literal,)*) => {
        /// A worker-protocol operation code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u64)]
        pub enum Op { $($name = $code,)* }

        impl Op {
            pub fn from_code(code: u64) -> Option<Op> {
                match code { $($code => Some(Op::$name),)* _ => None }
            }

            pub fn name(self) -> &'static str {
                match self { $(Op::$name => stringify!($name),)* }
            }
        }
    };
}

ops! {
    IsValidPath = 1,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    FindRoots = 14,
    SetOptions = 19,
    CollectGarbage = 20,
    QueryAllValidPaths = 23,
    QueryPathInfo = 26,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
    AddPermRoot = 47,
    AddTempRoots = 49,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
