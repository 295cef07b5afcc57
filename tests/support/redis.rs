//! A private Redis server per test.
//!
//! redis-server runs as a direct child (not daemonized) with no persistence, so killing it is
//! an honest "Redis went away" and nothing outlives the test: `Drop` kills it, and a test
//! process that dies without unwinding leaves a pid file for the next run's stale sweep.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::binaries::redis_server;
use super::scratch;

const HOST: &str = "127.0.0.1";

/// How long start-up may take before we give up (it normally takes a few milliseconds).
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A private redis-server on a free port, killed on drop.
pub struct Redis {
    /// Working dir (`--dir`), log and pid file. Removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    /// `None` while stopped.
    child: Option<Child>,
    /// Keep data across `stop`/`restart` (append-only file, fsync on every write).
    persistent: bool,
    /// TLS-only server (`start_tls`): the port speaks TLS and there is no plain port.
    tls: Option<TlsFiles>,
    /// Settings after the defaults (redis-server lets the last one win), e.g. a cluster node's.
    extra_args: Vec<String>,
}

/// PEM files of a TLS-only server (see [`Redis::start_tls`]).
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Redis {
    /// Boots a server and waits until it answers. Panics (with its log's tail) if it can't.
    pub fn start() -> Redis {
        Redis::start_inner(false, None, "redis-", &Vec::new)
    }

    /// A TLS-only server (`--port 0 --tls-port PORT`) presenting `cert`/`key`; clients are not
    /// asked for certificates (`ca` is only what redis-server insists on having). `url()` is
    /// then `rediss://`; `connection()` does not work (it has no CA), use walsweep's client.
    pub fn start_tls(cert: &Path, key: &Path, ca: &Path) -> Redis {
        Redis::start_inner(
            false,
            Some(TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.to_path_buf(),
            }),
            "redis-",
            &Vec::new,
        )
    }

    /// Like `start`, but the data survives `stop` (SIGKILL) and `restart`: an outage test can
    /// then check that invalidations reach keys written before the outage.
    pub fn start_persistent() -> Redis {
        Redis::start_inner(true, None, "redis-", &Vec::new)
    }

    /// A non-persistent server with `extra_args` after the defaults, in an instance dir named
    /// `dir_prefix...`. The prefix must start with `redis-`: that is what the stale sweep looks
    /// for. `extra_args` is called again for every attempt, so it can pick fresh free ports
    /// (a cluster node's bus port) when the first ones turn out to be taken.
    pub fn start_with_args(dir_prefix: &str, extra_args: &dyn Fn() -> Vec<String>) -> Redis {
        assert!(
            dir_prefix.starts_with("redis-"),
            "instance dir prefix {dir_prefix:?} must start with `redis-` for the stale sweep"
        );
        Redis::start_inner(false, None, dir_prefix, extra_args)
    }

    fn start_inner(
        persistent: bool,
        tls: Option<TlsFiles>,
        dir_prefix: &str,
        extra_args: &dyn Fn() -> Vec<String>,
    ) -> Redis {
        // The free port can be taken by someone else before redis-server binds it; only that
        // case is worth another try.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let mut redis = Redis {
                dir: scratch::instance_dir(dir_prefix, false),
                port: scratch::free_port(),
                child: None,
                persistent,
                tls: tls.clone(),
                extra_args: extra_args(),
            };
            match redis.spawn() {
                Ok(()) => return redis,
                Err(e) if attempt < ATTEMPTS && redis.log_mentions_port_in_use() => {
                    eprintln!(
                        "walsweep test support: port {} taken, retrying: {e}",
                        redis.port
                    );
                }
                Err(e) => {
                    // Dropped first so its Drop does not print the log tail a second time.
                    drop(redis);
                    panic!("{e}");
                }
            }
        }
        unreachable!("the last attempt returns or panics");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{HOST}:{}/0", self.port)
    }

    /// A new multiplexed connection. It does not reconnect: after [`Redis::stop`] its commands
    /// fail, and after [`Redis::restart`] a new one is needed.
    pub async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
        let url = self.url();
        let client = ::redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("parsing Redis URL {url}: {e}"));
        client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to Redis at {url}: {e}"))
    }

    /// Kills the server (SIGKILL) and waits for it to exit, to simulate Redis going away. Its
    /// data is gone unless it was started with `start_persistent`. A no-op when stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // kill() only fails if the child was already reaped, which can't happen here.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts an empty server again on the same port (stopping it first if it is running).
    /// Panics if the port has been taken meanwhile or it does not come up.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn()
            .unwrap_or_else(|e| panic!("restarting Redis: {e}"));
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Pid of the running redis-server, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = redis_server();
        let dir = self.dir.path();
        let mut command = Command::new(bin);
        match &self.tls {
            None => command.arg("--port").arg(self.port.to_string()),
            Some(tls) => command
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "no"]),
        };
        // Only "ready" lines logged by this start count (restart appends to the same log).
        let log_start = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
        let child = command
            .args([
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let pid = child.id();
        self.child = Some(child);
        // For the stale sweep of a later run, should this process die without unwinding.
        let pid_file = dir.join("redis.pid");
        std::fs::write(&pid_file, format!("{pid}\n"))
            .map_err(|e| format!("writing {}: {e}", pid_file.display()))?;
        self.wait_ready(pid, log_start)
    }

    /// Waits until *our* redis-server answers on the port: a server that answers with another
    /// process id means someone else holds the port (ours will then exit, which we report).
    fn wait_ready(&mut self, pid: u32, log_start: u64) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned");
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(format!(
                        "redis-server on port {} exited during start-up ({status})\n{}",
                        self.port,
                        scratch::log_tail(&self.log_path(), 20)
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("checking on redis-server: {e}")),
            }
            // A TLS-only port does not answer the plain INFO below: there, our own log saying
            // it listens is the signal (a port taken by someone else makes it exit instead).
            let ready = if self.tls.is_some() {
                std::fs::read(self.log_path()).is_ok_and(|log| {
                    let start = usize::try_from(log_start)
                        .unwrap_or(usize::MAX)
                        .min(log.len());
                    String::from_utf8_lossy(&log[start..]).contains("Ready to accept connections")
                })
            } else {
                server_pid(self.port) == Some(pid)
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "redis-server on port {} not answering after {READY_TIMEOUT:?}\n{}",
                    self.port,
                    scratch::log_tail(&self.log_path(), 20)
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_mentions_port_in_use(&self) -> bool {
        // Also what a cluster node logs when its bus port is taken.
        std::fs::read_to_string(self.log_path())
            .map(|log| log.contains("Address already in use"))
            .unwrap_or(false)
    }
}

impl Drop for Redis {
    /// Never panics: a panic while unwinding would abort the whole test binary.
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "Redis on port {}:\n{}",
                self.port,
                scratch::log_tail(&self.log_path(), 20)
            );
        }
        self.stop();
    }
}

/// `process_id` from `INFO server` of whatever answers on the port, using raw RESP over a
/// blocking socket so start-up needs no async runtime.
fn server_pid(port: u16) -> Option<u32> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    // Reply: "$<len>\r\n<len bytes>\r\n"; read until the whole bulk string is in.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        // An error reply (e.g. "-LOADING") means "not ready yet".
        let Some((header, body)) = text.strip_prefix('$')?.split_once("\r\n") else {
            continue;
        };
        let len: usize = header.parse().ok()?;
        if body.len() >= len {
            return body
                .lines()
                .find_map(|l| l.strip_prefix("process_id:"))
                .and_then(|p| p.trim().parse().ok());
        }
    }
}
