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
/// Picks the Postgres major (14..18) the tests run against: the machine's
/// `/usr/lib/postgresql/<major>/bin` if it has one, else the package `scripts/ensure-pg <major>`
/// put into [`PG_CACHE_ENV`] (default `/var/cache/walsweep/pg`). `scripts/test-matrix` sets it.
pub const TEST_PG_ENV: &str = "WALSWEEP_TEST_PG";
/// Where `scripts/ensure-pg` keeps the per-major packages (`<cache>/<major>/native/bin`).
pub const PG_CACHE_ENV: &str = "WALSWEEP_PG_CACHE";
const DEFAULT_PG_CACHE: &str = "/var/cache/walsweep/pg";
/// Next to the bindir of a `scripts/ensure-pg` package: marks that its binaries need
/// `LD_LIBRARY_PATH=<bindir>/../lib`.
const PACKAGE_MARKER: &str = "pg-symlinks.json";
/// Overrides Redis discovery: path of the `redis-server` executable.
pub const REDIS_SERVER_ENV: &str = "WALSWEEP_REDIS_SERVER";

const PG_SERVER_TOOLS: [&str; 3] = ["initdb", "postgres", "pg_ctl"];
const PG_HINT: &str = "Postgres server binaries (initdb, postgres, pg_ctl) not found: run \
                       scripts/ensure-deps or `apt-get install -y postgresql`";
const REDIS_HINT: &str = "redis-server not found: run scripts/ensure-deps or \
                          `apt-get install -y redis-server`";

/// Dir with the Postgres server binaries: `$WALSWEEP_PG_BINDIR`, else (with
/// `$WALSWEEP_TEST_PG`) that major's dir, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`, else the dir of `initdb` found on PATH. Panics with an install
/// hint when none qualifies, or when it is not the major `$WALSWEEP_TEST_PG` asks for.
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = find_pg_bindir();
        if let Some(major) = test_pg_major() {
            let version = pg_version(&dir);
            assert!(
                version.contains(&format!("(PostgreSQL) {major}.")),
                "{TEST_PG_ENV}={major} but {} is {version:?}; unset {PG_BINDIR_ENV} or fix it",
                dir.display()
            );
        }
        dir
    })
}

/// `LD_LIBRARY_PATH` the server binaries need: the `lib/` of a `scripts/ensure-pg` package
/// (they are not installed system-wide), `None` for the machine's Postgres. Only the server
/// commands get it: the package's libssl/libz must not leak into other programs.
pub fn pg_lib_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = pg_bindir().parent()?;
        root.join(PACKAGE_MARKER)
            .is_file()
            .then(|| root.join("lib"))
    })
    .as_deref()
}

/// The major version of the Postgres the tests boot (from `postgres --version` of
/// [`pg_bindir`]), for tests of features a major introduced (failover slots in 17, ...).
pub fn server_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let version = pg_version(pg_bindir());
        version
            .split("(PostgreSQL) ")
            .nth(1)
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no major version in `postgres --version`: {version:?}"))
    })
}

/// `$WALSWEEP_TEST_PG` as a major, validated; `None` when unset or empty.
pub fn test_pg_major() -> Option<u32> {
    let raw = std::env::var(TEST_PG_ENV).ok().filter(|v| !v.is_empty())?;
    match raw.parse::<u32>() {
        Ok(major @ 14..=18) => Some(major),
        _ => panic!("{TEST_PG_ENV}={raw}: expected a Postgres major, 14 to 18"),
    }
}

/// `postgres --version` of a bindir (with its package's lib dir, if any).
fn pg_version(bindir: &Path) -> String {
    let mut cmd = Command::new(bindir.join("postgres"));
    cmd.arg("--version");
    if let Some(root) = bindir.parent().filter(|r| r.join(PACKAGE_MARKER).is_file()) {
        cmd.env("LD_LIBRARY_PATH", root.join("lib"));
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {}/postgres --version: {e}", bindir.display()));
    assert!(
        out.status.success(),
        "{}/postgres --version failed ({}): {}",
        bindir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn find_pg_bindir() -> PathBuf {
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
    if let Some(major) = test_pg_major() {
        let machine = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        if has_pg_server_tools(&machine) {
            return machine;
        }
        let cache = std::env::var_os(PG_CACHE_ENV)
            .filter(|c| !c.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_PG_CACHE), PathBuf::from);
        let package = cache.join(major.to_string()).join("native/bin");
        assert!(
            has_pg_server_tools(&package),
            "{TEST_PG_ENV}={major}: no Postgres {major} in {} nor {}: run \
                 scripts/ensure-pg {major} (fetches it into the cache once)",
            machine.display(),
            package.display()
        );
        return package;
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
}

/// Path of a Postgres tool (`initdb`, `pg_ctl`, `psql`, ...) in [`pg_bindir`]. `psql` is a
/// client tool that some layouts keep elsewhere (a `scripts/ensure-pg` package has none), so
/// it falls back to PATH, then to the newest `/usr/lib/postgresql/*/bin` (clients talk to
/// every server major).
pub fn pg_tool(name: &str) -> PathBuf {
    let in_bindir = pg_bindir().join(name);
    if is_executable(&in_bindir) {
        return in_bindir;
    }
    find_on_path(name)
        .or_else(|| newest_debian_bindir_with(name).map(|d| d.join(name)))
        .unwrap_or_else(|| {
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
    newest_debian_bindir_where(has_pg_server_tools)
}

/// Highest-versioned `/usr/lib/postgresql/<ver>/bin` holding the executable `name`.
fn newest_debian_bindir_with(name: &str) -> Option<PathBuf> {
    newest_debian_bindir_where(|d| is_executable(&d.join(name)))
}

fn newest_debian_bindir_where(usable: impl Fn(&Path) -> bool) -> Option<PathBuf> {
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
            usable(&bin).then_some((version, bin))
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
