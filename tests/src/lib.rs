//! A harness that runs private Nix daemons for the tests and benchmarks.
//!
//! Each [`Daemon`] is a real `nix-daemon` (2.26.3 from the Debian trixie root, or
//! 2.8.0 from the bookworm root that `tools/nix-env setup` prepares) serving a fresh
//! store of its own, relocated the way Nix's functional tests relocate theirs. The
//! daemon runs chrooted into its root; its directory lives in that root's /tmp, so the
//! host reaches the socket through the root's path. Dropping the [`Daemon`] kills it
//! and its per-connection children, by pid, and removes the store.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rust_store::{Client, ConnectOptions, StoreDir};

pub mod ssh;

/// Which Nix the daemon runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nix {
    /// 2.26.3, protocol 1.38: the reference.
    V2_26,
    /// 2.8.0, an older protocol.
    V2_8,
    /// The fork's own daemon (tools/build-fork), in the 2.26.3 root.
    Fork,
}

impl Nix {
    fn root_name(self) -> &'static str {
        match self {
            Nix::V2_26 | Nix::Fork => "trixie",
            Nix::V2_8 => "bookworm",
        }
    }

    /// The daemon's program, as its root sees it.
    fn daemon_program(self) -> String {
        match self {
            Nix::Fork => format!("{FORK_PREFIX}/bin/nix-daemon"),
            Nix::V2_26 | Nix::V2_8 => "nix-daemon".to_owned(),
        }
    }
}

/// Whether the daemon trusts the test process (decided by its `trusted-users`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    Untrusted,
}

/// The cache `tools/nix-env` fills.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NIXRS_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    base.join("nixrs")
}

/// The root holding the given Nix, checked to be set up.
pub fn nix_root(nix: Nix) -> PathBuf {
    let root = cache_dir().join(nix.root_name());
    assert!(
        root.join(".nixrs-packages").exists(),
        "{} is not set up: run `tools/nix-env setup` (as root) first",
        root.display()
    );
    assert!(
        root.join("proc/self").exists() && root.join("dev/.nixrs").exists(),
        "{} has no /proc or /dev mounted (after a reboot?): run `tools/nix-env setup`",
        root.display()
    );
    root
}

/// The fork's installation prefix inside the trixie root, as the root sees it.
pub const FORK_PREFIX: &str = "/opt/nix-fork";

/// Checks that the fork is built (tools/build-fork). The tests of the fork call this
/// first; when the fork is missing they are marked ignored at build time (see
/// `build.rs`), so they show as such, unless NIXRS_REQUIRE_FORK=1 (as CI sets), which
/// lets them run and fail here.
pub fn require_fork() {
    let nix = nix_root(Nix::V2_26).join(FORK_PREFIX.trim_start_matches('/')).join("bin/nix");
    assert!(nix.exists(), "the fork is not built ({} is missing): run tools/build-fork", nix.display());
}

/// The non-root user `tools/nix-env setup` creates in the trixie root.
pub fn client_user() -> &'static str {
    const USER: &str = "nixbench";
    let root = nix_root(Nix::V2_26);
    let exists =
        Command::new("chroot").arg(&root).args(["/usr/bin/id", USER]).output().is_ok_and(|o| o.status.success());
    assert!(exists, "the trixie root has no user '{USER}': run `tools/nix-env setup`");
    USER
}

/// The unpacked Nix 2.26.3 source.
pub fn nix_source() -> PathBuf {
    nix_root(Nix::V2_26).join("src/nix")
}

/// Installs a `tracing` subscriber once, filtered by RUST_LOG.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// A running private daemon and its store.
pub struct Daemon {
    pub nix: Nix,
    root: PathBuf,
    /// The daemon's directory as the daemon sees it (inside the root).
    dir: String,
    /// The socket as this process reaches it.
    pub socket: PathBuf,
    /// The store directory (a path inside the root, as Nix prints it).
    pub store_dir: StoreDir,
    child: Child,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Daemon {
    pub fn start(nix: Nix, trust: Trust) -> Daemon {
        Self::start_in(
            nix,
            trust,
            &format!("/tmp/nt-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)),
        )
    }

    /// Like [`Daemon::start`], in a directory of the caller's choice (inside the
    /// root's /tmp): store paths depend on the store directory, so stores to compare
    /// path by path must have the same one, one after the other.
    pub fn start_in(nix: Nix, trust: Trust, dir: &str) -> Daemon {
        init_tracing();
        let root = nix_root(nix);
        let dir = dir.to_owned();
        let host_dir = root.join(dir.trim_start_matches('/'));
        let _ = std::fs::remove_dir_all(&host_dir);
        for sub in ["store", "var/nix", "var/log/nix", "etc", "home"] {
            std::fs::create_dir_all(host_dir.join(sub)).expect("create the daemon's directories");
        }
        let trusted_users = match trust {
            Trust::Trusted => "root",
            Trust::Untrusted => "",
        };
        std::fs::write(
            host_dir.join("etc/nix.conf"),
            format!(
                "build-users-group =\nsandbox = false\nsubstituters =\ntrusted-users = {trusted_users}\n\
                 allowed-users = *\nexperimental-features = nix-command ca-derivations\n\
                 keep-derivations = true\nfsync-metadata = false\n"
            ),
        )
        .expect("write nix.conf");
        // Create the store's database and directories before any connection can race
        // to do it (Nix 2.8.0 fails one of two first connections that do).
        let init = Command::new("chroot")
            .arg(&root)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Self::env_of(&dir))
            .args(["NIX_REMOTE=local", "nix-store", "--init"])
            .output()
            .expect("run nix-store --init");
        assert!(init.status.success(), "nix-store --init failed: {}", String::from_utf8_lossy(&init.stderr));
        let socket = host_dir.join("socket");
        let log = std::fs::File::create(host_dir.join("daemon.log")).expect("create the daemon's log");
        let child = Command::new("chroot")
            .arg(&root)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Self::env_of(&dir))
            .arg("NIX_REMOTE=local")
            .arg(nix.daemon_program())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("start nix-daemon");
        let store_dir = StoreDir::new(format!("{dir}/store")).expect("a valid store dir");
        let daemon = Daemon { nix, root, dir, socket, store_dir, child };
        daemon.wait_ready();
        daemon
    }

    /// The environment that relocates a store into `dir`.
    fn env_of(dir: &str) -> Vec<String> {
        vec![
            "PATH=/usr/bin:/bin".into(),
            format!("HOME={dir}/home"),
            format!("NIX_STORE_DIR={dir}/store"),
            format!("NIX_STATE_DIR={dir}/var/nix"),
            format!("NIX_LOG_DIR={dir}/var/log/nix"),
            format!("NIX_CONF_DIR={dir}/etc"),
            format!("NIX_DAEMON_SOCKET_PATH={dir}/socket"),
        ]
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nix-daemon did not come up; its log:\n{}", self.log());
    }

    /// What the daemon wrote to its stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.host_path("daemon.log")).unwrap_or_default()
    }

    /// A path in the daemon's directory, as this process reaches it.
    pub fn host_path(&self, rel: &str) -> PathBuf {
        self.root.join(self.dir.trim_start_matches('/')).join(rel)
    }

    /// A path in the daemon's directory, as the daemon and the Nix CLI see it.
    pub fn inner_path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.dir)
    }

    /// The host path of a store path's contents.
    pub fn real_path(&self, printed: &str) -> PathBuf {
        self.root.join(printed.trim_start_matches('/'))
    }

    pub fn options(&self) -> ConnectOptions {
        ConnectOptions { store_dir: self.store_dir.clone(), ..ConnectOptions::default() }
    }

    pub async fn connect(&self) -> Client {
        self.connect_with(self.options()).await
    }

    pub async fn connect_with(&self, options: ConnectOptions) -> Client {
        match Client::connect(&self.socket, options).await {
            Ok(c) => c,
            Err(e) => panic!("connecting to the daemon: {e}\ndaemon log:\n{}", self.log()),
        }
    }

    /// Puts the bundled workload (`bench/workload.nix` and its shared input) in the
    /// daemon's directory; returns its path as Nix sees it.
    pub fn workload(&self) -> String {
        let dir = self.host_path("work");
        std::fs::create_dir_all(&dir).expect("create the workload's directory");
        std::fs::write(dir.join("workload.nix"), include_str!("../../bench/workload.nix")).expect("write the workload");
        std::fs::write(dir.join("shared-input.txt"), include_str!("../../bench/shared-input.txt"))
            .expect("write the workload's input");
        self.inner_path("work/workload.nix")
    }

    /// `nix-daemon --stdio` in the root, serving this daemon's store on its standard
    /// input and output (by forwarding to the daemon's socket, as behind `ssh`), for
    /// [`rust_store::transport::Transport::spawn`].
    pub fn stdio_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("chroot");
        cmd.arg(&self.root)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Self::env_of(&self.dir))
            .arg(format!("NIX_REMOTE=unix://{}/socket", self.dir))
            .args([self.nix.daemon_program().as_str(), "--stdio"]);
        cmd
    }

    /// Runs a Nix command inside the root as a client of this daemon.
    pub fn nix(&self, args: &[&str]) -> Output {
        self.run_from(self.nix, args)
    }

    /// A command inside the root as `user`, a client of this daemon through the
    /// default store (`auto`, which finds the daemon's socket because the state
    /// directory is not the user's), with a writable home and extra environment.
    pub fn command_as(&self, user: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
        let home = self.host_path(&format!("home-{user}"));
        if !home.exists() {
            std::fs::create_dir_all(&home).expect("create the user's home");
            let chown = Command::new("chroot")
                .arg(&self.root)
                .args(["/usr/bin/chown", user, &self.inner_path(&format!("home-{user}"))])
                .status();
            assert!(chown.is_ok_and(|s| s.success()), "chown the user's home");
        }
        let mut cmd = Command::new("chroot");
        cmd.arg(format!("--userspec={user}:{user}"))
            .arg(&self.root)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Self::env_of(&self.dir))
            .arg(format!("HOME={}", self.inner_path(&format!("home-{user}"))))
            .args(env.iter().map(|(k, v)| format!("{k}={v}")))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs [`Daemon::command_as`] to completion.
    pub fn run_as(&self, user: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
        output_within(self.command_as(user, env, args), COMMAND_LIMIT)
    }

    /// Runs `args` (as root) with the programs of `client`'s root, as a client of this
    /// daemon. When that is another root, the daemon's directory is bind-mounted at
    /// the same path in it for the run, so the socket and the store are where the
    /// client looks for them.
    pub fn run_from(&self, client: Nix, args: &[&str]) -> Output {
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let other = nix_root(client);
        let _unmount = (other != self.root).then(|| {
            let host_dir = self.root.join(self.dir.trim_start_matches('/'));
            let target = other.join(self.dir.trim_start_matches('/'));
            std::fs::create_dir_all(&target).expect("create the mount point");
            let mounted = Command::new("mount").arg("--bind").arg(&host_dir).arg(&target).status();
            assert!(
                mounted.is_ok_and(|s| s.success()),
                "cannot bind-mount {} at {}",
                host_dir.display(),
                target.display()
            );
            Unmount(target)
        });
        let mut cmd = Command::new("chroot");
        cmd.arg(&other)
            .arg("/usr/bin/env")
            .arg("-i")
            .args(Self::env_of(&self.dir))
            // Root could open the store directly (`auto` would); it must go through
            // the daemon.
            .arg("NIX_REMOTE=daemon")
            .args(args)
            .stdin(Stdio::null());
        output_within(cmd, COMMAND_LIMIT)
    }

    /// Every path in `paths`, with its closure, is valid in the store (a
    /// `nix-store --check-validity` of the whole closure) and on disk.
    pub fn assert_closure_valid(&self, paths: &[String]) {
        let mut args = vec!["nix-store", "-qR"];
        args.extend(paths.iter().map(String::as_str));
        let closure = self.nix_ok(&args);
        let closure: Vec<&str> = closure.lines().collect();
        assert!(closure.len() > paths.len(), "the closure of {} paths has {} paths", paths.len(), closure.len());
        let mut args = vec!["nix-store", "--check-validity"];
        args.extend(closure.iter().copied());
        self.nix_ok(&args);
        for p in &closure {
            assert!(self.real_path(p).exists(), "{p} is valid but not on disk");
        }
    }

    /// Like [`Daemon::nix`], returning stdout and panicking on failure.
    pub fn nix_ok(&self, args: &[&str]) -> String {
        let out = self.nix(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// The daemon's per-connection children.
    pub fn workers(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    /// Kills the daemon's connection workers (SIGKILL), leaving the daemon itself
    /// serving new connections.
    pub fn kill_workers(&self) {
        for pid in self.workers() {
            kill(pid);
        }
    }

    /// Stops the daemon's connection workers (SIGSTOP): they read and answer nothing
    /// until killed, so that what is pending stays pending.
    pub fn stop_workers(&self) {
        for pid in self.workers() {
            signal(pid, "-STOP");
        }
    }

    /// Kills the daemon and its connection workers at once.
    pub fn kill(&mut self) {
        for pid in self.workers() {
            kill(pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let dir = self.root.join(self.dir.trim_start_matches('/'));
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// How long one command of a test may run: far beyond what any takes, so that a
/// command that hangs fails its test instead of holding up the whole run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Runs `cmd` to completion, collecting its output like [`Command::output`]. If it
/// is still running after `limit`, kills it (SIGKILL) and panics naming it, with
/// what it had printed.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{:?}", cmd);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    wait_within(child, limit, &what)
}

/// Waits for `child` (its output piped, or not) like [`Child::wait_with_output`],
/// for at most `limit`; then kills it and panics naming `what`.
pub fn wait_within(mut child: Child, limit: Duration, what: &str) -> Output {
    use std::io::Read;
    // Read both pipes meanwhile, so that a child printing much never blocks.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            let _ = tx.send(out);
        });
        rx
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for a command") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A process the child left behind may hold its pipes open: wait for the output
    // a little longer, then go on without it.
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    match status {
        Some(status) => Output { status, stdout, stderr },
        None => panic!(
            "{what} still ran after {limit:?}, killed; it printed:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name may hold spaces; the parent pid is the second field after it.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let ppid = rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// With 300 additions pending on `c` (a client of `d`, whose workers are stopped so
/// that they stay pending), kills `pid`, the process at `c`'s other end, and checks
/// that every one fails within a second, as a lost connection naming `peer`.
/// Returns how long they took.
pub async fn pending_fail_when_killed(d: &Daemon, c: &Client, pid: u32, peer: &str) -> Duration {
    let none = std::collections::BTreeSet::new();
    c.add_text("before", b"before".to_vec(), &none).await.expect("an addition before the kill");
    d.stop_workers();
    let mut calls = Vec::new();
    for i in 0..300 {
        let call = c.add_text(&format!("k{i}"), format!("kill {i}").into_bytes(), &none).start().await;
        calls.push(call.expect("send an addition"));
    }
    let killed = Instant::now();
    kill(pid);
    for call in calls {
        let e = tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .expect("request still pending a second after the kill")
            .expect_err("answered by a dead peer");
        assert!(e.is_disconnect(), "{e}");
        assert!(e.to_string().contains(peer), "{e}");
    }
    killed.elapsed()
}

/// Sends SIGKILL to `pid`.
pub fn kill(pid: u32) {
    signal(pid, "-KILL");
}

fn signal(pid: u32, signal: &str) {
    // The process may have exited already; that is fine.
    let _ = Command::new("kill").arg(signal).arg(pid.to_string()).stderr(Stdio::null()).status();
}

/// The workloads' files, which make a flake.
const FLAKE_FILES: [(&str, &str); 4] = [
    ("flake.nix", include_str!("../../bench/flake.nix")),
    ("workload.nix", include_str!("../../bench/workload.nix")),
    ("nixpkgs.nix", include_str!("../../bench/nixpkgs.nix")),
    ("shared-input.txt", include_str!("../../bench/shared-input.txt")),
];

/// The system the flake's packages are for.
pub const SYSTEM: &str = "x86_64-linux";

/// A git repository holding the workloads as a flake, in the daemon's directory and
/// owned by the client user, to which each [`Flake::commit`] adds a commit.
pub struct Flake<'d> {
    d: &'d Daemon,
    commits: usize,
}

impl<'d> Flake<'d> {
    pub fn new(d: &'d Daemon) -> Flake<'d> {
        let dir = d.host_path("flake");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in FLAKE_FILES {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let flake = Flake { d, commits: 0 };
        d.nix_ok(&["chown", "-R", client_user(), &d.inner_path("flake")]);
        flake.git("git init -q && git config user.name test && git config user.email test@localhost");
        flake
    }

    fn git(&self, script: &str) {
        let out =
            self.d.run_as(client_user(), &[], &["sh", "-c", &format!("cd {} && {script}", self.d.inner_path("flake"))]);
        assert!(out.status.success(), "git: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Commits the workload's parameters anew (a new commit even if they are the
    /// same, as CI evaluates each commit) and returns the flake's reference.
    pub fn commit(&mut self, shape: &str, n: usize, salt: &str) -> String {
        self.commits += 1;
        let params = format!(
            "# commit {}\n{{ shape = \"{shape}\"; n = {n}; salt = \"{salt}\"; system = \"{SYSTEM}\"; }}\n",
            self.commits
        );
        std::fs::write(self.d.host_path("flake/params.nix"), params).unwrap();
        self.git(&format!("git add -A && git commit -qm 'commit {}'", self.commits));
        format!("git+file://{}", self.d.inner_path("flake"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_run_to_completion_with_its_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = output_within(cmd, Duration::from_secs(30));
        assert_eq!((out.status.code(), &out.stdout[..], &out.stderr[..]), (Some(3), &b"out\n"[..], &b"err\n"[..]));
    }

    #[test]
    fn a_command_past_its_limit_is_killed_and_named() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 60"]);
        let started = Instant::now();
        let panic =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| output_within(cmd, Duration::from_millis(300))))
                .unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("sleep 60") && message.contains("started"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
