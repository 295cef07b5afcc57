//! Host plumbing shared by the server helpers: the process-wide scratch dir, free ports,
//! running commands as the unprivileged server user, and cleanup of leftovers from earlier
//! test processes that died without running their destructors (SIGKILL, abort, power loss).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of the per-process scratch dirs; the suffix is the owning test process's pid, which
/// is how a later run recognises a dir whose owner is gone.
const SCRATCH_PREFIX: &str = "walsweep-test-";

/// OS user that owns and runs Postgres when we are root (initdb/postgres refuse to run as root).
pub const SERVER_USER: &str = "postgres";

/// Overrides where the scratch dir goes (its parent), e.g. `/tmp` to keep it off tmpfs.
pub const TMPDIR_ENV: &str = "WALSWEEP_TEST_TMPDIR";

/// Free space /dev/shm must have to be used for scratch (Docker's default of 64MB does not).
const MIN_SHM_FREE_KB: u64 = 2 * 1024 * 1024;

/// `<parent>/walsweep-test-<pid>`: holds the initdb template and every server's instance dir.
///
/// Created on first use; stale siblings from dead test processes are cleaned up at the same
/// time. Nothing removes this dir when the process exits (Rust has no reliable exit hook for
/// test binaries), which is exactly why the stale sweep exists: the next run reclaims it. The
/// per-server dirs inside it are removed by the servers' `Drop`, so only the template (~30MB)
/// outlives the process, until then.
pub fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let parent = scratch_parent();
        // All candidate parents: an earlier run may have chosen differently.
        let mut swept = Vec::new();
        for dir in [
            parent.clone(),
            PathBuf::from("/dev/shm"),
            std::env::temp_dir(),
        ] {
            if !swept.contains(&dir) {
                sweep_stale(&dir);
                swept.push(dir);
            }
        }
        let root = parent.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("creating test scratch dir {}: {e}", root.display()));
        // The server user must be able to traverse into its instance dirs, whatever our umask.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", root.display()));
        root
    })
}

/// Where the scratch dir goes: `$WALSWEEP_TEST_TMPDIR` if set; else /dev/shm when it is a
/// tmpfs with room, because copying the template data dir is most of a Postgres boot and on
/// this project's disk that copy takes ~4x longer than in RAM (~380ms vs ~80ms per boot);
/// else the system temp dir (or `/tmp` when we are root and the postgres user could not reach
/// into it, e.g. `TMPDIR=/root/tmp`).
fn scratch_parent() -> PathBuf {
    if let Some(dir) = std::env::var_os(TMPDIR_ENV) {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if roomy_tmpfs(shm) && world_traversable(shm) {
        return shm.to_path_buf();
    }
    let tmp = std::env::temp_dir();
    if !is_root() || world_traversable(&tmp) {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

/// Whether `dir` is a writable tmpfs with at least [`MIN_SHM_FREE_KB`] available.
fn roomy_tmpfs(dir: &Path) -> bool {
    let writable = fs::metadata(dir)
        .map(|m| m.is_dir() && (is_root() || m.permissions().mode() & 0o002 != 0))
        .unwrap_or(false);
    if !writable {
        return false;
    }
    let Ok(out) = Command::new("df")
        .args(["-k", "--output=fstype,avail"])
        .arg(dir)
        .output()
    else {
        return false;
    };
    // "Type Avail\ntmpfs 24682116\n"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.lines().nth(1).unwrap_or("").split_whitespace();
    out.status.success()
        && fields.next() == Some("tmpfs")
        && fields
            .next()
            .and_then(|kb| kb.parse::<u64>().ok())
            .is_some_and(|kb| kb >= MIN_SHM_FREE_KB)
}

fn world_traversable(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    dir.ancestors().all(|d| {
        fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// A fresh, empty dir under the scratch root, removed when the returned guard drops.
/// `for_server_user`: hand it to the postgres user (only matters when we are root).
pub fn instance_dir(prefix: &str, for_server_user: bool) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_root())
        .unwrap_or_else(|e| panic!("creating instance dir in {}: {e}", scratch_root().display()));
    if for_server_user {
        give_to_server_user(dir.path());
    }
    dir
}

/// chown a path to the server user when we are root; a no-op otherwise.
pub fn give_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user_ids() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| {
            panic!(
                "chown {} to {SERVER_USER} ({uid}:{gid}): {e}",
                path.display()
            )
        });
    }
}

/// Whether we run with effective uid 0. Read from /proc so the tests need no libc binding.
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = fs::read_to_string("/proc/self/status")
            .unwrap_or_else(|e| panic!("reading /proc/self/status to find our uid: {e}"));
        // "Uid:\treal\teffective\tsaved\tfs"
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no Uid line in /proc/self/status"));
        euid == "0"
    })
}

/// (uid, gid) of the server user when we are root, `None` when we are not (then servers simply
/// run as ourselves).
pub fn server_user_ids() -> Option<(u32, u32)> {
    static IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *IDS.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, SERVER_USER]).output();
            match out {
                Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("parsing `id {flag} {SERVER_USER}` output: {e}")),
                _ => panic!(
                    "running as root, so Postgres must run as the `{SERVER_USER}` OS user, but \
                     `id {flag} {SERVER_USER}` failed: run scripts/ensure-deps (installing the \
                     postgresql package creates that user)"
                ),
            }
        };
        Some((id("-u"), id("-g")))
    })
}

/// A command for `program` that runs as the server user: wrapped in `runuser` when we are root.
/// The working dir is the scratch root so the server user never starts in a dir it can't read
/// (initdb and pg_ctl complain about that).
pub fn server_command(program: &Path) -> Command {
    let mut cmd = if is_root() {
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .unwrap_or(Path::new("runuser"));
        let mut c = Command::new(runuser);
        c.args(["-u", SERVER_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(scratch_root());
    cmd
}

/// Runs a command to completion, returning its output, or a readable error naming the command
/// and carrying its stderr/stdout.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("spawning {shown}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        ))
    }
}

/// A port on 127.0.0.1 that nothing listens on right now and that this process has not handed
/// out before.
///
/// Binding port 0 lets the kernel pick; remembering what we handed out keeps two servers of the
/// same test process from ever being given the same port, even after one was stopped (a
/// stopped server keeps its port for `restart`). There is still a window between dropping the
/// listener and the server binding it where another process could grab it; server start-up
/// retries on "address in use" for that.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:0 to find a free port: {e}"))
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
    panic!("could not find a free port on 127.0.0.1 not already used by this test process");
}

/// The last `lines` lines of a server log, for panic messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            format!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                path.display(),
                tail.join("\n")
            )
        }
        Err(e) => format!("--- (could not read {}: {e}) ---", path.display()),
    }
}

/// Whether process `pid` exists and is running in `dir` (its cwd). Postgres chdirs into its
/// data dir and redis-server into its `--dir`, so this identifies our servers without trusting
/// a possibly recycled pid.
pub fn process_runs_in(pid: u32, dir: &Path) -> bool {
    let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) else {
        return false;
    };
    match dir.canonicalize() {
        Ok(dir) => cwd == dir,
        Err(_) => false,
    }
}

/// Sends `signal` (e.g. "KILL", "QUIT") to `pid` with the `kill` utility (no libc binding in
/// the tests).
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    run(Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string()))
    .map(|_| ())
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, is not).
pub fn process_alive(pid: u32) -> bool {
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces and parens.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits until `pid` has exited, up to `timeout`. Returns whether it did.
///
/// Needed after `pg_ctl stop`, which returns before the postmaster is gone. An exited but
/// not yet reaped process (zombie) counts as gone: the orphaned postmaster is reaped by
/// init, which here can take a second.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Live processes whose working dir is `dir`: a postmaster and all its children run in the
/// data dir.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_runs_in(pid, dir) && process_alive(pid))
        .collect()
}

/// Reads the pid on the first line of a pid file (postmaster.pid, redis.pid).
pub fn read_pid_file(path: &Path) -> io::Result<u32> {
    let text = fs::read_to_string(path)?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no pid on first line"))
}

/// Removes `walsweep-test-<pid>` dirs whose process is gone, first stopping any server that
/// still runs out of them (a test process killed with SIGKILL leaves its daemonized postmaster
/// behind; a redis-server child is merely re-parented).
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || process_alive(pid) {
            continue;
        }
        let dir = entry.path();
        stop_leftover_servers(&dir);
        if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!(
                "walsweep test support: could not remove stale {}: {e}",
                dir.display()
            );
        }
    }
}

fn stop_leftover_servers(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // Postgres: SIGQUIT is an immediate shutdown; the postmaster takes its backends along.
        // Redis: nothing to preserve.
        let (pid_file, cwd, sig) = if name.starts_with("pg-") {
            (dir.join("data/postmaster.pid"), dir.join("data"), "QUIT")
        } else if name.starts_with("redis-") {
            (dir.join("redis.pid"), dir.clone(), "KILL")
        } else {
            continue;
        };
        let Ok(pid) = read_pid_file(&pid_file) else {
            continue;
        };
        if process_runs_in(pid, &cwd) {
            eprintln!(
                "walsweep test support: stopping leftover server pid {pid} in {}",
                dir.display()
            );
            let _ = signal(pid, sig);
            let _ = wait_gone(pid, Duration::from_secs(10));
        }
    }
}
