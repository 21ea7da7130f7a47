//! What the integration tests against `r4 dev` share: polling with a deadline (never a sleep
//! that hopes a condition holds by then) and running kubectl, the client nobody here wrote.
//! Each test binary uses part of it (`mod support;`), hence `dead_code` allowed here.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::{Command, Stdio};
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

/// `kubectl --kubeconfig KUBECONFIG ARGS…` from the repository's root, `stdin` written to it;
/// its standard output, the test failed with its error output if it did not succeed.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
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
    let o = child.wait_with_output().expect("kubectl");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "kubectl {args:?}: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}
