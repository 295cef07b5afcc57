//! The libpq password file (`PGPASSFILE`, default `~/.pgpass`): where a password comes from
//! when neither the source URL nor `PGPASSWORD` has one.
//!
//! Each line is `host:port:database:user:password`; a field of just `*` matches anything,
//! `\:` and `\\` stand for `:` and `\`, and the first matching line wins. Lines starting with
//! `#` are comments. As libpq does, a file that is not a plain file, or that the group or
//! others may read, is ignored with a warning (the caller logs it): a password file others can
//! read is a leak the operator should hear about, not a source to trust. The file is read at
//! each connection attempt, so a rotated password is picked up on the next reconnect.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The host a password-file line names for a Unix-socket connection, as in libpq.
const LOCALHOST: &str = "localhost";

/// What the connection attempt is, for matching lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// A TCP host name or address, or a Unix-socket directory.
    pub(crate) host: &'a str,
    pub(crate) is_unix_socket: bool,
    pub(crate) port: u16,
    pub(crate) database: &'a str,
    pub(crate) user: &'a str,
}

/// Why a password file was not used although it exists. Never holds a password.
#[derive(Debug)]
pub(crate) enum Ignored {
    NotAPlainFile(PathBuf),
    GroupOrWorldAccess(PathBuf),
    Unreadable(PathBuf, io::Error),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ignored::NotAPlainFile(path) => write!(
                f,
                "password file {} is not a plain file; ignoring it",
                path.display()
            ),
            Ignored::GroupOrWorldAccess(path) => write!(
                f,
                "password file {} has group or world access and is ignored; permissions \
                 should be u=rw (0600) or less: chmod 0600 {}",
                path.display(),
                path.display()
            ),
            Ignored::Unreadable(path, err) => {
                write!(f, "cannot read password file {}: {err}", path.display())
            }
        }
    }
}

/// The password `path` holds for `target`: `Ok(None)` when the file does not exist or has
/// no matching line.
pub(crate) fn lookup(path: &Path, target: &Target<'_>) -> Result<Option<String>, Ignored> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Ignored::Unreadable(path.to_path_buf(), e)),
    };
    if !meta.is_file() {
        return Err(Ignored::NotAPlainFile(path.to_path_buf()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Ignored::GroupOrWorldAccess(path.to_path_buf()));
        }
    }
    let text = std::fs::read(path).map_err(|e| Ignored::Unreadable(path.to_path_buf(), e))?;
    Ok(find(&String::from_utf8_lossy(&text), target))
}

/// The password of the first line of `text` that matches `target`.
pub(crate) fn find(text: &str, target: &Target<'_>) -> Option<String> {
    let port = target.port.to_string();
    // libpq looks a Unix-socket connection up as `localhost`; the socket directory itself
    // matches too, for files written with the path.
    let hosts: &[&str] = if target.is_unix_socket {
        &[LOCALHOST, target.host]
    } else {
        &[target.host]
    };
    text.lines()
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .find_map(|line| {
            let fields = split_fields(line)?;
            let [host, line_port, database, user, password] = fields;
            let matches = |field: &str, value: &str| field == "*" || field == value;
            let host_matches = host == "*" || hosts.contains(&host.as_str());
            (host_matches
                && matches(&line_port, &port)
                && matches(&database, target.database)
                && matches(&user, target.user))
            .then_some(password)
        })
}

/// The first five fields of a line, unescaped; `None` for a line with fewer (libpq skips
/// those). As in libpq, the password also ends at an unescaped colon.
fn split_fields(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = Vec::with_capacity(5);
    let mut current = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ':' => fields.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    fields.push(current);
    fields.truncate(5);
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp<'a>(host: &'a str, port: u16, database: &'a str, user: &'a str) -> Target<'a> {
        Target {
            host,
            is_unix_socket: false,
            port,
            database,
            user,
        }
    }

    #[test]
    fn the_first_matching_line_wins_with_wildcards() {
        let text = "# comment\n\
                    db1:5432:app:alice:first\n\
                    *:5433:*:alice:any-host\n\
                    db1:*:*:*:fallback\n";
        let t = tcp("db1", 5432, "app", "alice");
        assert_eq!(find(text, &t).as_deref(), Some("first"));
        let t = tcp("db2", 5433, "other", "alice");
        assert_eq!(find(text, &t).as_deref(), Some("any-host"));
        let t = tcp("db1", 6000, "other", "bob");
        assert_eq!(find(text, &t).as_deref(), Some("fallback"));
        let t = tcp("db2", 5432, "app", "alice");
        assert_eq!(find(text, &t), None);
    }

    #[test]
    fn escaped_colons_and_backslashes_are_unescaped() {
        let text = "h\\:1:5432:d:u:pa\\:ss\\\\word\nshort:line\n";
        let t = tcp("h:1", 5432, "d", "u");
        assert_eq!(find(text, &t).as_deref(), Some("pa:ss\\word"));
        // A `*` inside a field is literal, not a pattern.
        let text = "db*:5432:d:u:nope\n";
        assert_eq!(find(text, &tcp("db1", 5432, "d", "u")), None);
    }

    #[test]
    fn a_unix_socket_connection_matches_localhost() {
        let text = "localhost:5432:d:u:local\n";
        let t = Target {
            host: "/var/run/postgresql",
            is_unix_socket: true,
            port: 5432,
            database: "d",
            user: "u",
        };
        assert_eq!(find(text, &t).as_deref(), Some("local"));
    }

    #[cfg(unix)]
    #[test]
    fn a_file_others_can_read_is_ignored_and_a_missing_one_is_silent() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        let t = tcp("h", 5432, "d", "u");
        assert!(matches!(lookup(&path, &t), Ok(None)));
        std::fs::write(&path, "*:*:*:*:secret-pw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(lookup(&path, &t).unwrap().as_deref(), Some("secret-pw"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = lookup(&path, &t).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("group or world access"), "{text}");
        assert!(text.contains("chmod 0600"), "{text}");
        assert!(!text.contains("secret-pw"), "{text}");
        assert!(matches!(
            lookup(dir.path(), &t),
            Err(Ignored::NotAPlainFile(_))
        ));
    }
}
