//! A large transaction's pending mirror ops on disk.
//!
//! Mirror writes land after their transaction's commit, in commit order, so until then a plan
//! holds one op per distinct row: a million-row INSERT would hold a million rows in memory.
//! Past `[mirror] spill_after_bytes` of ops in memory, a plan appends them to a file of its own
//! in `[mirror] spill_dir`, and the sink reads them back a chunk at a time. A file lives exactly
//! as long as the plan part holding it: it is removed once its transaction was applied, or
//! dropped (rolled back, or delivered again after a reconnect). Files of a process that crashed
//! carry its pid and a token of that run in their name and are removed at the next start: the
//! token tells them apart when the next run gets the same pid (PID 1 in a container).
//!
//! The encoding is private to one process run (written and read by the same binary), so it
//! has no version: a file never outlives its writer.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::plan::{Field, IndexAdd, IndexRemove, MirrorOp, Retention, RowWrite};
use super::WriteMode;
use crate::config::MirrorFormat;
use crate::plan::rules::FallbackCause;

/// Every spill file's name starts with this, then `<pid>-<run>-<n>`.
pub(crate) const FILE_PREFIX: &str = "walsweep-spill-";

/// This process run's token in its file names (shared by every pipeline of the process).
static RUN: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{:016x}", rand::random::<u64>()));

/// Where and when plans spill (`[mirror]`), shared by every plan of a run.
#[derive(Debug)]
pub(crate) struct Spill {
    dir: PathBuf,
    after_bytes: usize,
    next: AtomicU64,
}

/// A spill file could not be written or read back.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct SpillError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// `[mirror]`'s directory and threshold, or `None` when nothing spills (no mirror, or
/// `spill_after_bytes = 0`).
pub(crate) fn settings(config: &crate::config::Config) -> Option<(PathBuf, usize)> {
    let after = config.mirror.spill_after_bytes;
    if after == 0 || config.tables.iter().all(|t| t.mirror.is_empty()) {
        return None;
    }
    let dir = config
        .mirror
        .spill_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    Some((dir, usize::try_from(after).unwrap_or(usize::MAX)))
}

impl Spill {
    /// Spilling into `dir` past `after_bytes`, after checking that a file can be created there
    /// and removing the files of walsweep processes that no longer run. The error says which
    /// setting to change.
    pub(crate) fn open(dir: &Path, after_bytes: usize) -> Result<Arc<Spill>, String> {
        let spill = Spill {
            dir: dir.to_path_buf(),
            after_bytes,
            next: AtomicU64::new(0),
        };
        spill.probe()?;
        let removed = spill.remove_stale();
        if removed > 0 {
            tracing::info!(dir = %dir.display(), files = removed, "removed spill files left by a walsweep process that no longer runs");
        }
        Ok(Arc::new(spill))
    }

    /// Whether `dir` takes spill files (for `walsweep check`: creates and removes one file,
    /// touches nothing else).
    pub(crate) fn check_dir(dir: &Path) -> Result<(), String> {
        Spill {
            dir: dir.to_path_buf(),
            after_bytes: 0,
            next: AtomicU64::new(0),
        }
        .probe()
    }

    fn probe(&self) -> Result<(), String> {
        let probe = self.create().map_err(|e| {
            format!(
                "mirror.spill_dir {}: cannot create a file there ({}). Large transactions' \
                 pending mirror writes wait there until they are applied: point \
                 mirror.spill_dir at an existing directory walsweep's user can write, or set \
                 mirror.spill_after_bytes = 0 to keep them in memory",
                self.dir.display(),
                e.source
            )
        })?;
        drop(probe);
        Ok(())
    }

    pub(crate) fn after_bytes(&self) -> usize {
        self.after_bytes
    }

    /// A new, empty file of this process.
    pub(crate) fn create(&self) -> Result<SpillFile, SpillError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("{FILE_PREFIX}{}-{}-{n}", std::process::id(), *RUN));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        // Rows of the mirrored tables: readable by walsweep's user alone, even in a shared /tmp.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path).map_err(|source| SpillError {
            action: "creating spill file",
            path: path.clone(),
            source,
        })?;
        Ok(SpillFile {
            path,
            len: 0,
            ops: 0,
        })
    }

    /// Removes spill files whose process is gone, or of an earlier run with this process's pid;
    /// returns how many. Files of this run (several pipelines may share a process, as in tests)
    /// and of other running processes stay. Without /proc nothing can be told, and nothing is
    /// removed.
    fn remove_stale(&self) -> usize {
        if !Path::new("/proc/self").exists() {
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let own = std::process::id();
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(FILE_PREFIX)) else {
                continue;
            };
            let mut parts = rest.split('-');
            let Some(pid) = parts.next().and_then(|pid| pid.parse::<u32>().ok()) else {
                continue;
            };
            let live = if pid == own {
                parts.next() == Some(RUN.as_str())
            } else {
                Path::new(&format!("/proc/{pid}")).exists()
            };
            if live {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale spill file")
                }
            }
        }
        removed
    }
}

/// One plan part's ops on disk, in order. Removed when dropped.
#[derive(Debug)]
pub(crate) struct SpillFile {
    path: PathBuf,
    /// Bytes of whole records: a failed append leaves garbage past it, overwritten next time.
    len: u64,
    ops: usize,
}

impl SpillFile {
    /// Appends `ops` after the ones already written.
    pub(crate) fn append(&mut self, ops: &[MirrorOp]) -> Result<(), SpillError> {
        let error = |source| SpillError {
            action: "writing spill file",
            path: self.path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(error)?;
        file.seek(SeekFrom::Start(self.len)).map_err(error)?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let mut record = Vec::new();
        let mut written = 0u64;
        for op in ops {
            record.clear();
            encode(op, &mut record);
            out.write_all(&record).map_err(error)?;
            written += record.len() as u64;
        }
        out.flush().map_err(error)?;
        self.len += written;
        self.ops += ops.len();
        Ok(())
    }

    /// Reads the ops back from the start.
    pub(crate) fn reader(&self) -> Result<SpillReader, SpillError> {
        let file = File::open(&self.path).map_err(|source| SpillError {
            action: "opening spill file",
            path: self.path.clone(),
            source,
        })?;
        Ok(SpillReader {
            path: self.path.clone(),
            input: BufReader::with_capacity(256 * 1024, file),
            left: self.ops,
            names: HashMap::new(),
        })
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot remove a spill file");
            }
        }
    }
}

/// Reads a spill file's ops back, a chunk at a time.
pub(crate) struct SpillReader {
    path: PathBuf,
    input: BufReader<File>,
    left: usize,
    /// Column names read so far: one allocation per name, not per row.
    names: HashMap<Box<str>, Arc<str>>,
}

impl SpillReader {
    pub(crate) fn is_done(&self) -> bool {
        self.left == 0
    }

    /// The next up to `max` ops.
    pub(crate) fn next_chunk(&mut self, max: usize) -> Result<Vec<MirrorOp>, SpillError> {
        let n = self.left.min(max.max(1));
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let op = decode(&mut self.input, &mut self.names).map_err(|source| SpillError {
                action: "reading spill file",
                path: self.path.clone(),
                source,
            })?;
            out.push(op);
        }
        self.left -= n;
        Ok(out)
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lengths and counts come from memory; none reaches 4 GiB in one op.
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_removes(out: &mut Vec<u8>, removes: &[IndexRemove]) {
    put_u32(out, removes.len());
    for r in removes {
        put_str(out, &r.key);
        put_str(out, &r.member);
    }
}

fn encode(op: &MirrorOp, out: &mut Vec<u8>) {
    match op {
        MirrorOp::Write(w) => {
            out.push(0);
            put_str(out, &w.key);
            // A row written in place has its source equal to its key: kept once.
            if w.source == w.key {
                out.push(0);
            } else {
                out.push(1);
                put_str(out, &w.source);
            }
            out.push(match w.mode.format {
                MirrorFormat::Json => 0,
                MirrorFormat::Hash => 1,
            });
            out.push(u8::from(w.mode.only_if_present));
            out.extend_from_slice(&w.mode.ttl_seconds.to_le_bytes());
            match &w.document {
                None => out.push(0),
                Some(d) => {
                    out.push(1);
                    put_str(out, d);
                }
            }
            put_u32(out, w.fields.len());
            for (name, field) in &w.fields {
                put_str(out, name);
                match field {
                    Field::Value(v) => {
                        out.push(0);
                        put_str(out, v);
                    }
                    Field::Null => out.push(1),
                    Field::Keep => out.push(2),
                }
            }
            put_removes(out, &w.index_removes);
            put_u32(out, w.index_adds.len());
            for a in &w.index_adds {
                put_u32(out, a.index);
                put_str(out, &a.key);
                put_str(out, &a.member);
                out.extend_from_slice(&a.score.to_le_bytes());
                match a.retention {
                    None => out.push(0),
                    Some(r) => {
                        out.push(1);
                        out.extend_from_slice(&r.base.to_le_bytes());
                        out.extend_from_slice(&r.units_per_second.to_le_bytes());
                        out.extend_from_slice(&r.window_seconds.to_le_bytes());
                    }
                }
            }
        }
        MirrorOp::Delete { key, index_removes } => {
            out.push(1);
            put_str(out, key);
            put_removes(out, index_removes);
        }
        MirrorOp::Clear { prefixes, cause } => {
            out.push(2);
            put_u32(out, prefixes.len());
            for p in prefixes {
                put_str(out, p);
            }
            put_str(out, cause.as_str());
        }
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt record: {what}"),
    )
}

struct Input<'a, R> {
    r: &'a mut R,
}

impl<R: Read> Input<'_, R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }

    fn u32(&mut self) -> io::Result<usize> {
        Ok(u32::from_le_bytes(self.bytes()?) as usize)
    }

    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn f64(&mut self) -> io::Result<f64> {
        Ok(f64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> io::Result<String> {
        let len = self.u32()?;
        let mut buf = Vec::new();
        self.r.by_ref().take(len as u64).read_to_end(&mut buf)?;
        if buf.len() != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        String::from_utf8(buf).map_err(|_| corrupt("text is not UTF-8"))
    }

    fn removes(&mut self) -> io::Result<Vec<IndexRemove>> {
        let n = self.u32()?;
        let mut out = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            out.push(IndexRemove {
                key: self.string()?,
                member: self.string()?,
            });
        }
        Ok(out)
    }
}

fn decode(r: &mut impl Read, names: &mut HashMap<Box<str>, Arc<str>>) -> io::Result<MirrorOp> {
    let mut i = Input { r };
    Ok(match i.u8()? {
        0 => {
            let key = i.string()?;
            let source = match i.u8()? {
                0 => key.clone(),
                _ => i.string()?,
            };
            let format = match i.u8()? {
                0 => MirrorFormat::Json,
                1 => MirrorFormat::Hash,
                _ => return Err(corrupt("format")),
            };
            let mode = WriteMode {
                format,
                only_if_present: i.u8()? != 0,
                ttl_seconds: i.u64()?,
            };
            let document = match i.u8()? {
                0 => None,
                _ => Some(i.string()?),
            };
            let n = i.u32()?;
            let mut fields = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let name = i.string()?;
                let name = match names.get(name.as_str()) {
                    Some(shared) => shared.clone(),
                    None => {
                        let shared: Arc<str> = Arc::from(name.as_str());
                        names.insert(name.into_boxed_str(), shared.clone());
                        shared
                    }
                };
                let field = match i.u8()? {
                    0 => Field::Value(i.string()?),
                    1 => Field::Null,
                    2 => Field::Keep,
                    _ => return Err(corrupt("field")),
                };
                fields.push((name, field));
            }
            let index_removes = i.removes()?;
            let n = i.u32()?;
            let mut index_adds = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let index = i.u32()?;
                let key = i.string()?;
                let member = i.string()?;
                let score = i.f64()?;
                let retention = match i.u8()? {
                    0 => None,
                    _ => Some(Retention {
                        base: i.f64()?,
                        units_per_second: i.f64()?,
                        window_seconds: i.u64()?,
                    }),
                };
                index_adds.push(IndexAdd {
                    index,
                    key,
                    member,
                    score,
                    retention,
                });
            }
            MirrorOp::Write(RowWrite {
                key,
                source,
                mode,
                document,
                fields,
                index_removes,
                index_adds,
            })
        }
        1 => MirrorOp::Delete {
            key: i.string()?,
            index_removes: i.removes()?,
        },
        2 => {
            let n = i.u32()?;
            let mut prefixes = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                prefixes.push(i.string()?);
            }
            let cause = i.string()?;
            MirrorOp::Clear {
                prefixes,
                cause: FallbackCause::parse(&cause).ok_or_else(|| corrupt("fallback cause"))?,
            }
        }
        _ => return Err(corrupt("op")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<MirrorOp> {
        let mode = WriteMode {
            format: MirrorFormat::Hash,
            only_if_present: true,
            ttl_seconds: 60,
        };
        vec![
            MirrorOp::Write(RowWrite {
                key: "r:2".into(),
                source: "r:1".into(),
                mode,
                document: None,
                fields: vec![
                    (Arc::from("a"), Field::Value("1".into())),
                    (Arc::from("b"), Field::Null),
                    (Arc::from("body"), Field::Keep),
                ],
                index_removes: vec![IndexRemove {
                    key: "i:old".into(),
                    member: "1".into(),
                }],
                index_adds: vec![
                    IndexAdd {
                        index: 1,
                        key: "i:new".into(),
                        member: "2".into(),
                        score: -1.5,
                        retention: Some(Retention {
                            base: f64::NEG_INFINITY,
                            units_per_second: 1000.0,
                            window_seconds: 3600,
                        }),
                    },
                    IndexAdd {
                        index: 0,
                        key: "i:x".into(),
                        member: "ünïcode".into(),
                        score: 9007199254740991.0,
                        retention: None,
                    },
                ],
            }),
            MirrorOp::Write(RowWrite {
                key: "r:3".into(),
                source: "r:3".into(),
                mode: WriteMode {
                    format: MirrorFormat::Json,
                    only_if_present: false,
                    ttl_seconds: 0,
                },
                document: Some("{\"a\":3}".into()),
                fields: Vec::new(),
                index_removes: Vec::new(),
                index_adds: Vec::new(),
            }),
            MirrorOp::Delete {
                key: "r:4".into(),
                index_removes: Vec::new(),
            },
            MirrorOp::Clear {
                prefixes: vec!["r:".into(), "i:".into()],
                cause: FallbackCause::UnknownOldValue,
            },
        ]
    }

    fn spill(dir: &Path) -> Arc<Spill> {
        Spill::open(dir, 1).expect("a writable dir")
    }

    #[test]
    fn every_op_reads_back_as_written_in_order_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = spill(dir.path()).create().unwrap();
        let ops = ops();
        file.append(&ops[..1]).unwrap();
        file.append(&ops[1..]).unwrap();
        let mut reader = file.reader().unwrap();
        let mut back = Vec::new();
        while !reader.is_done() {
            let chunk = reader.next_chunk(3).unwrap();
            assert!(chunk.len() <= 3);
            back.extend(chunk);
        }
        assert_eq!(back, ops);
    }

    #[test]
    fn a_file_is_removed_with_its_owner_and_stale_files_at_open() {
        let dir = tempfile::tempdir().unwrap();
        // Above the kernel's largest pid: never a running process.
        let stale = dir
            .path()
            .join(format!("{FILE_PREFIX}4194305-00000000000000aa-0"));
        // An earlier run that had this process's pid (PID 1 in a restarted container).
        let same_pid = dir.path().join(format!(
            "{FILE_PREFIX}{}-00000000000000bb-0",
            std::process::id()
        ));
        let other = dir.path().join("walsweep-something-else");
        let live = dir
            .path()
            .join(format!("{FILE_PREFIX}1-00000000000000cc-0"));
        for path in [&stale, &same_pid, &other, &live] {
            std::fs::write(path, b"left by a crash").unwrap();
        }
        let spill = spill(dir.path());
        let mine = spill.create().unwrap();
        assert!(!stale.exists(), "a dead process's spill file is removed");
        assert!(
            !same_pid.exists(),
            "an earlier run's file with this pid is removed"
        );
        assert!(other.exists(), "other files are left alone");
        assert!(live.exists(), "a running process's file is left alone");
        // A second pipeline of this process starting keeps this run's files.
        Spill::open(dir.path(), 1).unwrap();
        assert!(mine.path.exists());
        let file = spill.create().unwrap();
        let path = file.path.clone();
        assert!(path.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "spill files hold table rows");
        }
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_that_cannot_take_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("plain-file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let err = Spill::open(&not_a_dir, 1).unwrap_err();
        assert!(err.starts_with("mirror.spill_dir "), "{err}");
        assert!(err.contains(&not_a_dir.display().to_string()), "{err}");
        assert!(err.contains("spill_after_bytes = 0"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = spill(dir.path()).create().unwrap();
        file.append(&ops()).unwrap();
        let len = std::fs::metadata(&file.path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&file.path)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let err = file.reader().unwrap().next_chunk(100).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("reading spill file {}", file.path.display())),
            "{err}"
        );
    }
}
