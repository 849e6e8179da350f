//! Opening a connection: magic numbers, version negotiation, the feature exchange
//! (1.38), and the daemon's greeting (its Nix version from 1.33, whether it trusts us
//! from 1.35, then any startup messages).

use std::collections::BTreeSet;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::codec::*;
use crate::error::{Error, Result};
use crate::logger::Logger;
use crate::protocol::*;
use crate::stderr::{Outcome, read_envelope};
use crate::types::TrustedFlag;

/// What the handshake learnt about the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonInfo {
    /// The version both sides speak: the lower of theirs and ours.
    pub version: Version,
    /// The version the daemon offered.
    pub daemon_version: Version,
    /// The daemon's Nix version, e.g. "2.26.3" (protocol 1.33 and later).
    pub nix_version: Option<String>,
    /// Whether the daemon trusts this client; `None` when the protocol doesn't say.
    pub trusted: Option<TrustedFlag>,
    /// Features both sides support (protocol 1.38 and later).
    pub features: BTreeSet<String>,
}

/// The features this client supports. Nix 2.26.3 defines none; the fork's daemon
/// offers `addTempRoots`, as upstream defines it.
pub const FEATURES: &[&str] = &[FEATURE_ADD_TEMP_ROOTS];

/// Runs the client side of the handshake. `d` must start at the version `ours`; on
/// success it speaks the negotiated version.
pub(crate) async fn handshake<W: AsyncWrite + Unpin>(
    d: &mut Decoder,
    w: &mut W,
    ours: Version,
    logger: &dyn Logger,
) -> Result<DaemonInfo> {
    let mut buf = Vec::new();
    Encoder::new(&mut buf, d.ctx()).u64(WORKER_MAGIC_1).u64(ours.to_wire());
    send(w, &mut buf).await?;

    let magic = d.u64().await?;
    if magic != WORKER_MAGIC_2 {
        return Err(Error::Protocol(format!(
            "this is not a Nix daemon: it answered the greeting with {magic:#x}, expected {WORKER_MAGIC_2:#x}"
        )));
    }
    let theirs = Version::from_wire(d.u64().await?);
    if theirs.major != ours.major || theirs < Version::MINIMUM {
        return Err(Error::UnsupportedDaemon { daemon: theirs, minimum: Version::MINIMUM });
    }
    let version = theirs.min(ours);
    d.set_version(version);

    let mut features = BTreeSet::new();
    if version.at_least(38) {
        let ours: Vec<String> = FEATURES.iter().map(|s| s.to_string()).collect();
        Encoder::new(&mut buf, d.ctx()).put(&ours);
        send(w, &mut buf).await?;
        let theirs: BTreeSet<String> = d.get().await?;
        features = theirs.into_iter().filter(|f| FEATURES.contains(&f.as_str())).collect();
    }

    // Obsolete CPU affinity and reserveSpace.
    Encoder::new(&mut buf, d.ctx()).u64(0).u64(0);
    send(w, &mut buf).await?;

    let nix_version = if version.at_least(33) { Some(d.text().await?) } else { None };
    let trusted = if version.at_least(35) { d.get::<Option<TrustedFlag>>().await? } else { None };

    match read_envelope(d, logger).await? {
        Outcome::Last => {}
        Outcome::Failed(e) => {
            return Err(Error::Protocol(format!("the daemon refused the connection: {}", e.message)));
        }
    }

    Ok(DaemonInfo { version, daemon_version: theirs, nix_version, trusted, features })
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut Vec<u8>) -> Result<()> {
    w.write_all(buf).await?;
    w.flush().await?;
    buf.clear();
    Ok(())
}
