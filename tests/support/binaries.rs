//! Locating the Postgres and Redis server binaries the tests boot.
//!
//! Debian keeps the Postgres server binaries out of PATH (in /usr/lib/postgresql/<ver>/bin),
//! so PATH alone is not enough. `scripts/ensure-deps` uses the same places and can install
//! what is missing; `eval "$(scripts/ensure-deps --env)"` pins the choice via the env vars.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Overrides Postgres discovery: a dir holding `initdb`, `postgres` and `pg_ctl`.
pub const PG_BINDIR_ENV: &str = "WALSWEEP_PG_BINDIR";
/// Overrides Redis discovery: path of the `redis-server` executable.
pub const REDIS_SERVER_ENV: &str = "WALSWEEP_REDIS_SERVER";

const PG_SERVER_TOOLS: [&str; 3] = ["initdb", "postgres", "pg_ctl"];
const PG_HINT: &str = "Postgres server binaries (initdb, postgres, pg_ctl) not found: run \
                       scripts/ensure-deps or `apt-get install -y postgresql`";
const REDIS_HINT: &str = "redis-server not found: run scripts/ensure-deps or \
                          `apt-get install -y redis-server`";

/// Dir with the Postgres server binaries: `$WALSWEEP_PG_BINDIR`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin`, else the dir of `initdb` found on PATH.
/// Panics with an install hint when none qualifies.
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os(PG_BINDIR_ENV) {
            let dir = PathBuf::from(dir);
            assert!(
                has_pg_server_tools(&dir),
                "{PG_BINDIR_ENV}={} does not contain {PG_SERVER_TOOLS:?}; unset it or fix it \
                 (scripts/ensure-deps --env prints a working value)",
                dir.display()
            );
            return dir;
        }
        pg_config_bindir()
            .filter(|d| has_pg_server_tools(d))
            .or_else(newest_debian_bindir)
            .or_else(|| {
                // Through symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin),
                // to land in the dir that also has postgres and pg_ctl.
                find_on_path("initdb")
                    .and_then(|p| p.canonicalize().ok())
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| has_pg_server_tools(d))
            })
            .unwrap_or_else(|| panic!("{PG_HINT}"))
    })
}

/// Path of a Postgres tool (`initdb`, `pg_ctl`, `psql`, ...) in [`pg_bindir`]. `psql` is a
/// client tool that some layouts keep elsewhere, so it falls back to PATH.
pub fn pg_tool(name: &str) -> PathBuf {
    let in_bindir = pg_bindir().join(name);
    if is_executable(&in_bindir) {
        return in_bindir;
    }
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "{name} not found in {} nor on PATH: run scripts/ensure-deps or \
             `apt-get install -y postgresql`",
            pg_bindir().display()
        )
    })
}

/// The `redis-server` executable: `$WALSWEEP_REDIS_SERVER`, else PATH, else
/// `/usr/bin/redis-server`. Panics with an install hint when none exists.
pub fn redis_server() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(REDIS_SERVER_ENV) {
            let bin = PathBuf::from(bin);
            assert!(
                is_executable(&bin),
                "{REDIS_SERVER_ENV}={} is not an executable; unset it or fix it",
                bin.display()
            );
            return bin;
        }
        find_on_path("redis-server")
            .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| is_executable(p)))
            .unwrap_or_else(|| panic!("{REDIS_HINT}"))
    })
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(dir.trim()))
}

/// Highest-versioned `/usr/lib/postgresql/<ver>/bin` with the server tools (compared
/// numerically, so 10 beats 9.6).
fn newest_debian_bindir() -> Option<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version: Vec<u32> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_pg_server_tools(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn has_pg_server_tools(dir: &Path) -> bool {
    PG_SERVER_TOOLS.iter().all(|t| is_executable(&dir.join(t)))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The repository root (where `scripts/`, `examples/` and `tests/compat/` live).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the compatibility venv (matroska-cache, redis): `$WALSWEEP_PYTHON`, else
/// `<repo>/.venv/bin/python`. Fails, never skips, when there is none; `needs` says who needs it.
pub fn python(needs: &str) -> PathBuf {
    const HOW: &str = "run scripts/ensure-venv (creates <repo>/.venv with \
                       tests/compat/requirements.txt), or eval \"$(scripts/ensure-venv --env)\"";
    match std::env::var_os("WALSWEEP_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.exists(),
                "WALSWEEP_PYTHON={} does not exist; {HOW}",
                p.display()
            );
            p
        }
        None => {
            let venv = repo().join(".venv/bin/python");
            assert!(
                venv.exists(),
                "{needs}: WALSWEEP_PYTHON is unset and {} does not exist; {HOW}",
                venv.display()
            );
            venv
        }
    }
}
