//! `ssh-ng://` in front of a [`Daemon`]: Debian's OpenSSH server, run in the trixie
//! root on 127.0.0.1 with keys made for it, whose `nix-daemon --stdio` forwards to the
//! daemon's socket; and a [`Relay`] that delays each direction of a TCP connection,
//! since this kernel has no netem.
//!
//! Clients run inside the trixie root as root, with the daemon's store directory,
//! and reach the server through `NIX_SSHOPTS` (port, key, no host-key prompt).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::{Daemon, Nix, kill, nix_root};

/// An OpenSSH server that lets root in with its own key and runs the daemon's
/// `nix-daemon --stdio` for `ssh-ng://` clients.
pub struct Sshd {
    root: PathBuf,
    /// Its directory as the root sees it: config, keys, the remote program.
    dir: String,
    /// Where it listens, on 127.0.0.1.
    pub port: u16,
    child: Child,
    /// Whether clients share one ssh connection (`ControlMaster`) that outlives them.
    master: bool,
}

impl Sshd {
    /// Starts a server in front of `d`, whose `nix-daemon --stdio` is `d.nix`'s own.
    pub fn start(d: &Daemon) -> Sshd {
        let root = nix_root(Nix::V2_26);
        assert_eq!(root, d.root, "sshd runs in the trixie root, beside the daemon");
        let dir = d.inner_path("ssh");
        let host_dir = d.host_path("ssh");
        std::fs::create_dir_all(&host_dir).expect("create the server's directory");
        std::fs::create_dir_all(root.join("run/sshd")).expect("create sshd's privilege separation directory");
        for key in ["host_key", "client_key"] {
            let _ = std::fs::remove_file(host_dir.join(key));
            let out = in_root(&root, &["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", &format!("{dir}/{key}")]);
            assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::copy(host_dir.join("client_key.pub"), host_dir.join("authorized_keys")).expect("authorize the key");
        // The program ssh-ng:// runs: the daemon's nix-daemon, with its store's
        // environment, forwarding to its socket.
        let mut script = String::from("#!/bin/sh\n");
        for var in Daemon::env_of(&d.dir) {
            script.push_str(&format!("export '{var}'\n"));
        }
        script.push_str(&format!("export NIX_REMOTE='unix://{}/socket'\n", d.dir));
        script.push_str(&format!("exec {} \"$@\"\n", d.nix.daemon_program()));
        let program = host_dir.join("remote-daemon");
        std::fs::write(&program, script).expect("write the remote program");
        std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

        let port = free_port();
        std::fs::write(
            host_dir.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1\nPort {port}\nHostKey {dir}/host_key\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nLogLevel ERROR\nMaxStartups 100\nMaxSessions 100\n"
            ),
        )
        .expect("write sshd_config");
        let log = std::fs::File::create(host_dir.join("sshd.log")).expect("create sshd's log");
        let child = Command::new("chroot")
            .arg(&root)
            .args(["/usr/sbin/sshd", "-D", "-e", "-f", &format!("{dir}/sshd_config")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let sshd = Sshd { root, dir, port, child, master: false };
        sshd.wait_ready();
        sshd
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("sshd did not come up; its log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join(self.dir.trim_start_matches('/')).join("sshd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The store URI a client uses, through `NIX_SSHOPTS` from [`Sshd::ssh_opts`].
    pub fn store_uri(&self) -> String {
        format!("ssh-ng://root@127.0.0.1?remote-program={}/remote-daemon", self.dir)
    }

    /// From now on, clients share one ssh connection per port, which stays open for a
    /// minute after the last (`ControlMaster=auto`, `ControlPersist`): what a user
    /// who runs many commands against one host configures, so that each command
    /// opens a session, not a connection.
    pub fn share_connections(&mut self) {
        self.master = true;
    }

    /// `NIX_SSHOPTS` for reaching this server at `port` (its own, or a relay's).
    pub fn ssh_opts(&self, port: u16) -> String {
        let mut opts = format!(
            "-p {port} -i {}/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o LogLevel=ERROR -o BatchMode=yes",
            self.dir
        );
        if self.master {
            opts.push_str(&format!(
                " -o ControlMaster=auto -o ControlPath={}/master-%p -o ControlPersist=60",
                self.dir
            ));
        }
        opts
    }

    /// `ssh … nix-daemon --stdio` to this server at `port`, run inside the root, for
    /// [`rust_store::transport::Transport::spawn`].
    pub fn ssh_command(&self, port: u16) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("chroot");
        cmd.arg(&self.root).args(["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "HOME=/root", "ssh"]);
        cmd.args(self.ssh_opts(port).split_whitespace());
        cmd.args(["root@127.0.0.1", &format!("{}/remote-daemon", self.dir), "--stdio"]);
        cmd
    }

    /// `args` run inside the root (as root, with the daemon's store directory) as a
    /// client of `d` through this server at `port`, with `env` added.
    pub fn client_command(&self, d: &Daemon, port: u16, env: &[(&str, &str)], args: &[&str]) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.root)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Daemon::env_of(&d.dir))
            .arg(format!("HOME={}", d.inner_path("home-ssh")))
            .arg(format!("NIX_SSHOPTS={}", self.ssh_opts(port)))
            .args(env.iter().map(|(k, v)| format!("{k}={v}")))
            .args(args)
            .stdin(Stdio::null());
        let _ = std::fs::create_dir_all(d.host_path("home-ssh"));
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Shared connections' masters would outlive the server by ControlPersist:
        // ask each to exit.
        let host_dir = self.root.join(self.dir.trim_start_matches('/'));
        for entry in std::fs::read_dir(&host_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("master-") {
                let control = format!("ControlPath={}/{name}", self.dir);
                let _ = in_root(&self.root, &["ssh", "-o", &control, "-O", "exit", "root@127.0.0.1"]);
            }
        }
        // The listener, by pid; its sessions end with their clients.
        kill(self.child.id());
        let _ = self.child.wait();
    }
}

fn in_root(root: &PathBuf, args: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg(root)
        .arg("/usr/bin/env")
        .arg("-i")
        .arg("PATH=/usr/bin:/bin")
        .args(args)
        .output()
        .expect("run a command in the root")
}

/// A port on 127.0.0.1 nobody listens on (now).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A TCP relay on 127.0.0.1 that delays every byte by a fixed time in each
/// direction, so that a round trip through it costs twice that. It stops when
/// dropped, or at the latest after [`Relay::MAX_LIFETIME`].
///
/// It counts **turns**: the times a client sends again after the server has answered,
/// whatever the client. A client that waits for every reply turns once per request;
/// one that pipelines turns only when it has to wait.
pub struct Relay {
    pub port: u16,
    turns: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);

    /// Relays connections to 127.0.0.1:`target`, delaying each direction by half of
    /// `round_trip`.
    pub fn start(target: u16, round_trip: Duration) -> Relay {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let delay = round_trip / 2;
        let turns = Arc::new(AtomicU64::new(0));
        let counter = turns.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("the relay's runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let to = SocketAddr::from((Ipv4Addr::LOCALHOST, target));
                let serve = async {
                    loop {
                        let Ok((inbound, _)) = listener.accept().await else { continue };
                        let turns = counter.clone();
                        tokio::spawn(async move {
                            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else { return };
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let (ir, iw) = inbound.into_split();
                            let (or, ow) = outbound.into_split();
                            // Whether the server spoke last.
                            let answered = Arc::new(AtomicBool::new(true));
                            tokio::join!(
                                delayed(ir, ow, delay, Turn::Client { answered: answered.clone(), turns }),
                                delayed(or, iw, delay, Turn::Server { answered }),
                            );
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = tokio::time::sleep(Relay::MAX_LIFETIME) => {}
                    () = serve => {}
                }
            });
        });
        Relay { port, turns, stop: Some(stop), thread: Some(thread) }
    }

    /// Turns so far, over every connection.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }
}

/// Which side a copy reads, for counting turns.
enum Turn {
    Client { answered: Arc<AtomicBool>, turns: Arc<AtomicU64> },
    Server { answered: Arc<AtomicBool> },
}

impl Turn {
    fn saw_data(&self) {
        match self {
            Turn::Client { answered, turns } => {
                if answered.swap(false, Ordering::Relaxed) {
                    turns.fetch_add(1, Ordering::Relaxed);
                }
            }
            Turn::Server { answered } => answered.store(true, Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; closes `to` for
/// writing once `from` ends and everything before has gone out.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    turn: Turn,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    turn.saw_data();
                    if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
