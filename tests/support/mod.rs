//! What the integration tests against `r4 dev` share: polling with a deadline (never a sleep
//! that hopes a condition holds by then) and running kubectl, the client nobody here wrote.
//! Each test binary uses part of it (`mod support;`), hence `dead_code` allowed here.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What a polled condition answers: done with a value, or not yet and why.
pub trait Polled {
    type Value;
    fn done(self) -> Result<Self::Value, String>;
}

impl Polled for bool {
    type Value = ();
    fn done(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("not yet".into()) }
    }
}

impl<T> Polled for Option<T> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet".into())
    }
}

impl<T> Polled for Result<T, String> {
    type Value = T;
    fn done(self) -> Result<T, String> {
        self
    }
}

/// Poll `f` every 50 ms until it is done, failing the test after `secs` seconds with `what`
/// and the last answer.
pub async fn eventually<P, F, Fut>(secs: u64, what: &str, mut f: F) -> P::Value
where
    P: Polled,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match f().await.done() {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually`] for a test without a runtime (the thread sleeps between polls).
pub fn eventually_blocking<P: Polled>(secs: u64, what: &str, mut f: impl FnMut() -> P) -> P::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = match f().done() {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}; last seen: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether kubectl runs here; under CI its absence fails the test instead of skipping it.
pub fn kubectl_present() -> bool {
    match Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(o) if o.status.success() => true,
        _ if std::env::var_os("CI").is_some() => panic!("kubectl is required under CI"),
        _ => {
            eprintln!("skipping: kubectl not found on PATH");
            false
        }
    }
}

/// A free loopback port (for a server the test starts and names by its address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A path under the repository's root.
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// `kubectl --kubeconfig KUBECONFIG [--cache-dir CACHE] ARGS…` from the repository's root,
/// `stdin` written to it; what it answered, whatever it was.
pub fn kubectl_output(
    kubeconfig: &Path,
    cache: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig);
    if let Some(c) = cache {
        cmd.arg("--cache-dir").arg(c);
    }
    let mut child = cmd
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .expect("kubectl");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("kubectl")
}

/// The standard output of a kubectl run that must have succeeded (the test fails with its
/// error output otherwise).
fn succeeded(args: &[&str], o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "kubectl {args:?}: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `kubectl --kubeconfig KUBECONFIG ARGS…` ([`kubectl_output`]), which must succeed; its
/// standard output.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    succeeded(args, kubectl_output(kubeconfig, None, args, stdin))
}

/// `r4 dev` (the test binary's `r4`) as a child process on a free port, with its controller
/// and kubelet, its kubeconfig and kubectl's cache in a directory of its own; killed when
/// dropped.
pub struct DevProcess {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevProcess {
    /// Start it — `configure` adds to the command (environment, where its output goes; it
    /// gets the directory) — and wait (30 s at most) until kubectl gets an answer from it.
    pub fn start(configure: impl FnOnce(&mut Command, &Path)) -> DevProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_r4"));
        cmd.args(["dev", "--listen", "127.0.0.1:0", "--kubeconfig-out"])
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        configure(&mut cmd, dir.path());
        let child = cmd.spawn().expect("spawn r4 dev");
        let dev = DevProcess { child, dir };
        eventually_blocking(30, "r4 dev serving", || {
            kubeconfig.exists() && dev.run(&["get", "namespaces"]).status.success()
        });
        dev
    }

    /// Its directory (the kubeconfig is `kubeconfig` in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// kubectl against it; what it answered.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, None)
    }

    /// [`Self::run`] with `stdin` written to kubectl.
    pub fn run_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let d = self.dir.path();
        kubectl_output(&d.join("kubeconfig"), Some(&d.join("cache")), args, stdin)
    }

    /// kubectl against it, which must succeed; its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    /// [`Self::ok`] with `stdin` written to kubectl.
    pub fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        succeeded(args, self.run_with(args, stdin))
    }
}
