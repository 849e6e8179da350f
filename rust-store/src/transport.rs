//! What a connection runs over: a Unix socket (the local daemon), or a pair of pipes
//! to a process that speaks the protocol on its standard input and output
//! (`nix-daemon --stdio`, or `ssh HOST nix-daemon --stdio` for `ssh-ng://`).
//!
//! The connection reads one and writes the other, the same either way; a
//! lease (`Client::lease`) hands both descriptors to a caller that speaks the
//! protocol itself. Each transport is named for messages: "the Nix daemon" for the
//! local socket, the store's URI for a remote one, so that a connection that breaks
//! says which host it lost.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

/// The descriptors a connection reads and writes: the same socket twice, or two pipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fds {
    pub read: RawFd,
    pub write: RawFd,
}

/// The two directions of a connection, and what it is connected to.
pub struct Transport {
    pub(crate) read: Box<dyn AsyncRead + Send + Unpin>,
    pub(crate) write: Box<dyn AsyncWrite + Send + Unpin>,
    pub(crate) fds: Fds,
    /// What is at the other end, for messages: "the Nix daemon", "ssh-ng://host".
    pub(crate) peer: String,
    /// The process at the other end, if this transport started it: killed when the
    /// connection ends.
    pub(crate) child: Option<Child>,
}

/// How the local daemon is named in messages.
pub const LOCAL_DAEMON: &str = "the Nix daemon";

impl Transport {
    /// A Unix socket connected to the daemon.
    pub fn unix(stream: UnixStream) -> Transport {
        let fd = stream.as_raw_fd();
        let (read, write) = stream.into_split();
        Transport {
            read: Box::new(read),
            write: Box::new(write),
            fds: Fds { read: fd, write: fd },
            peer: LOCAL_DAEMON.to_owned(),
            child: None,
        }
    }

    /// Descriptors someone else has opened (Nix's C++ client: a daemon socket, or the
    /// pipes of its `ssh` child), which this transport now owns: `read` and `write`
    /// are either one socket, passed as both, or the read end and the write end of
    /// two pipes. Must be called on a tokio runtime. `peer` names the other end.
    pub fn from_fds(read: OwnedFd, write: Option<OwnedFd>, peer: impl Into<String>) -> std::io::Result<Transport> {
        let peer = peer.into();
        let Some(write) = write else {
            let stream = std::os::unix::net::UnixStream::from(read);
            stream.set_nonblocking(true)?;
            return Ok(Transport { peer, ..Transport::unix(UnixStream::from_std(stream)?) });
        };
        let fds = Fds { read: read.as_raw_fd(), write: write.as_raw_fd() };
        let read = pipe::Receiver::from_owned_fd(read).map_err(|e| not_a_pipe("read", e))?;
        let write = pipe::Sender::from_owned_fd(write).map_err(|e| not_a_pipe("write", e))?;
        Ok(Transport { read: Box::new(read), write: Box::new(write), fds, peer, child: None })
    }

    /// Starts `command`, which must speak the protocol on its standard input and
    /// output, and connects to it; its standard error is the caller's. The process is
    /// killed when the connection ends. Must be called on a tokio runtime.
    pub fn spawn(mut command: Command, peer: impl Into<String>) -> std::io::Result<Transport> {
        let peer = peer.into();
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(std::io::Error::other("the child's standard input and output are not pipes"));
        };
        let fds = Fds { read: stdout.as_raw_fd(), write: stdin.as_raw_fd() };
        Ok(Transport { read: Box::new(stdout), write: Box::new(stdin), fds, peer, child: Some(child) })
    }

    /// The process at the other end, if this transport started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

fn not_a_pipe(end: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("the connection's {end} descriptor is not a pipe nor a socket: {e}"))
}
