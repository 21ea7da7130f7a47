//! Test harness: a real `redis-server` on a free loopback port.
//!
//! [`RedisServer::start`] spawns `/usr/bin/redis-server` (waiting a while for
//! the binary to appear, in case it is still being installed) with its own
//! temporary directory, `--save ""`, and AOF on or off. Readiness is detected
//! by polling `PING` until `+PONG` (not `-LOADING`) under a deadline — never a
//! fixed sleep. [`RedisServer::restart`] kills the process with SIGKILL (a
//! crash) and starts it again on the same port and directory, so with AOF on
//! (`appendfsync always`) every acknowledged write survives. The process is
//! killed and the directory removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Where the harness looks for the server binary.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// Errors from the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{path} not found after waiting {waited:?}; install it (apt-get install redis-server)")]
    BinaryMissing { path: PathBuf, waited: Duration },
    #[error("harness I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-server on port {port} not ready after {waited:?}; log tail:\n{log}")]
    NotReady {
        port: u16,
        waited: Duration,
        log: String,
    },
    #[error("redis-server exited early ({status}); log tail:\n{log}")]
    Exited { status: String, log: String },
}

/// Options for [`RedisServer::start_with`].
#[derive(Debug, Clone)]
pub struct RedisServerOptions {
    /// Enable the append-only file (`appendfsync always`).
    pub appendonly: bool,
    /// How long to wait for the binary to exist.
    pub wait_for_binary: Duration,
    /// How long to wait for `PING` to answer `PONG`.
    pub ready_timeout: Duration,
    /// `requirepass`: clients must `AUTH` with it ([`RedisServer::url`] carries it).
    pub password: Option<String>,
}

impl Default for RedisServerOptions {
    fn default() -> Self {
        Self {
            appendonly: false,
            wait_for_binary: Duration::from_secs(120),
            ready_timeout: Duration::from_secs(15),
            password: None,
        }
    }
}

/// A running `redis-server` owned by a test.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    binary: PathBuf,
    options: RedisServerOptions,
}

impl RedisServer {
    /// Start a server without persistence.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with(RedisServerOptions::default()).await
    }

    /// Start a server with AOF on, for crash/restart tests.
    pub async fn start_with_aof() -> Result<Self, HarnessError> {
        Self::start_with(RedisServerOptions {
            appendonly: true,
            ..RedisServerOptions::default()
        })
        .await
    }

    /// Start a server with explicit options.
    pub async fn start_with(options: RedisServerOptions) -> Result<Self, HarnessError> {
        let binary = wait_for_binary(Path::new(REDIS_SERVER), options.wait_for_binary).await?;
        let dir = std::env::temp_dir().join(format!("r4-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            binary,
            options,
        };
        // A free port can be taken by someone else between probing and
        // binding; retry a few times with a fresh one.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::NotReady {
            port: server.port,
            waited: Duration::ZERO,
            log: String::new(),
        }))
    }

    /// `redis://127.0.0.1:<port>/`, or `redis://:<password>@127.0.0.1:<port>/` with a password.
    pub fn url(&self) -> String {
        match &self.options.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (holds the AOF and the log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Crash (SIGKILL) and start again on the same port and directory.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// Kill the server (SIGKILL) without restarting it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg("redis.log")
            .arg("--daemonize")
            .arg("no")
            .arg("--save")
            .arg("");
        if self.options.appendonly {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(p) = &self.options.password {
            cmd.arg("--requirepass").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn()?);
        let started = Instant::now();
        let deadline = started + self.options.ready_timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if ping(self.port, self.options.password.as_deref()).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(HarnessError::NotReady {
                    port: self.port,
                    waited: started.elapsed(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for_binary(path: &Path, wait: Duration) -> Result<PathBuf, HarnessError> {
    let started = Instant::now();
    loop {
        if path.exists() {
            return Ok(path.to_owned());
        }
        if started.elapsed() >= wait {
            return Err(HarnessError::BinaryMissing {
                path: path.to_owned(),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// One `PING` (after `AUTH` when the server has a password) with a short deadline; true on
/// `+PONG` with no error reply before it.
async fn ping(port: u16, password: Option<&str>) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let cmd = match password {
            Some(p) => format!("AUTH {p}\r\nPING\r\n"),
            None => "PING\r\n".to_string(),
        };
        s.write_all(cmd.as_bytes()).await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await?;
            got.extend_from_slice(&buf[..n]);
            if n == 0 || got.starts_with(b"-") || got.windows(3).any(|w| w == b"\n-") {
                return Ok::<bool, std::io::Error>(false);
            }
            if got.windows(5).any(|w| w == b"+PONG") {
                return Ok(true);
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}
