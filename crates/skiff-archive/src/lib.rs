//! Packing and unpacking of `skiff deploy` uploads.
//!
//! `skiff deploy DIR` turns a service's source directory into a plain tar
//! stream with [`pack`]; the daemon, which runs as root, turns that stream back
//! into files with [`unpack`]. The two halves trust each other not at all:
//! [`unpack`] treats every byte of the upload as hostile, because anything able
//! to reach the daemon's upload endpoint can send it, and a single path that
//! escapes the staging directory would let that sender write anywhere as root.
//!
//! The crate is Unix-only: it relies on Unix permission bits and symlinks.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ignore::WalkBuilder;
use tar::{Archive, Builder, EntryType, Header};

#[cfg(test)]
mod tests;

/// The only modes skiff ever writes. Uploads never carry owners, setuid,
/// setgid or sticky bits, so nothing unpacked by the root daemon can gain
/// privileges from the archive.
const MODE_EXEC: u32 = 0o755;
const MODE_PLAIN: u32 = 0o644;
const MODE_DIR: u32 = 0o755;
const MODE_SYMLINK: u32 = 0o777;

/// Version-control metadata is never part of a deploy, whatever the ignore
/// files say: it is large, may hold credentials, and the service never needs it.
const VCS_DIRS: [&str; 3] = [".git", ".hg", ".svn"];

/// Ignore file that lets a service exclude things from deploys only, with the
/// same syntax as `.gitignore`.
pub const SKIFFIGNORE: &str = ".skiffignore";

/// Most bytes the tar reader may consume between two entries' data: the
/// header plus any GNU long-name / long-link and pax records. The tar crate
/// buffers those records whole in memory, so without a cap one forged header
/// could make the daemon allocate gigabytes. Real ones are a few KiB.
const MAX_ENTRY_METADATA: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// pack
// ---------------------------------------------------------------------------

/// What [`pack`] put into the archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packed {
    /// Number of regular files.
    pub files: u64,
    /// Total size of those files in bytes.
    pub bytes: u64,
}

/// Why [`pack`] failed. Every message names the path involved and says what
/// to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The path given to `skiff deploy` exists but is not a directory.
    #[error(
        "`{}` is not a directory. Pass the service's source directory instead, e.g. `skiff deploy ./my-service`.",
        path.display()
    )]
    NotADirectory {
        /// The path that was given.
        path: PathBuf,
    },
    /// A directory, file or symlink under the source directory could not be read.
    #[error(
        "cannot read `{}`: {source}. Pass a source directory you can read, or fix the permissions of that path.",
        path.display()
    )]
    Unreadable {
        /// The path that could not be read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A `.gitignore`, `.ignore` or `.skiffignore` file could not be read or parsed.
    #[error(
        "cannot use the ignore file `{}` ({detail}). Fix or remove the bad line, then deploy again.",
        path.display()
    )]
    IgnoreFile {
        /// The ignore file (or, if the error does not say, the directory holding it).
        path: PathBuf,
        /// What went wrong, as reported by the ignore-file parser.
        detail: String,
    },
    /// A file's size changed between listing it and copying it.
    #[error(
        "`{}` changed while it was being packed. Stop whatever is writing to it (or ignore it in `.skiffignore`) and deploy again.",
        path.display()
    )]
    Changed {
        /// The file that changed.
        path: PathBuf,
    },
    /// The archive could not be written to the output.
    #[error(
        "could not write `{}` into the upload: {source}. Check the connection to the skiff daemon and deploy again.",
        path.display()
    )]
    Write {
        /// The entry being written when the output failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Packs the source directory `dir` into an uncompressed tar stream on `out`.
///
/// Files are chosen like git would choose them: `.gitignore` files apply even
/// outside a git repository, and so do `.ignore` and `.skiffignore` (which
/// wins over the other two). Only ignore files inside `dir` count, never the
/// user's global gitignore, `.git/info/exclude` or ignore files above `dir`,
/// so the same tree packs the same way on every machine. Hidden files are
/// included; `.git`, `.hg` and `.svn` never are.
///
/// The archive is deterministic: entries are sorted and carry no timestamps,
/// owners or permission bits beyond "executable or not", so equal trees give
/// byte-identical archives. Symlinks are stored as symlinks and never followed;
/// sockets, fifos and devices are skipped.
pub fn pack(dir: &Path, out: impl Write) -> Result<Packed, PackError> {
    check_source_dir(dir)?;

    let mut walker = WalkBuilder::new(dir);
    walker
        .hidden(false)
        .parents(false)
        .ignore(true)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .follow_links(false)
        .add_custom_ignore_filename(SKIFFIGNORE)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|entry| {
            entry.depth() == 0 || !VCS_DIRS.iter().any(|vcs| entry.file_name() == *vcs)
        });

    let mut builder = Builder::new(out);
    let mut packed = Packed::default();
    for result in walker.build() {
        let entry = result.map_err(|err| walk_error(dir, &err))?;
        if let Some(err) = entry.error() {
            return Err(PackError::IgnoreFile {
                path: ignore_error_path(err).unwrap_or(entry.path()).to_path_buf(),
                detail: ignore_error_detail(err),
            });
        }
        if entry.depth() == 0 {
            continue;
        }
        let Some(file_type) = entry.file_type() else {
            continue;
        };
        let full = entry.path();
        // The walker joins every path onto `dir`, so this cannot fail.
        let rel = full.strip_prefix(dir).unwrap_or(full);

        if file_type.is_dir() {
            let mut header = base_header(EntryType::Directory, MODE_DIR);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(|source| write_error(rel, source))?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(full).map_err(|source| PackError::Unreadable {
                path: full.to_path_buf(),
                source,
            })?;
            let mut header = base_header(EntryType::Symlink, MODE_SYMLINK);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(|source| write_error(rel, source))?;
        } else if file_type.is_file() {
            packed.bytes += append_file(&mut builder, full, rel)?;
            packed.files += 1;
        }
        // Sockets, fifos and devices mean nothing on another machine: skip them.
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|source| write_error(Path::new("end of archive"), source))?;
    Ok(packed)
}

/// Fails early, with advice, when `dir` is not something `skiff deploy` can pack.
fn check_source_dir(dir: &Path) -> Result<(), PackError> {
    let unreadable = |source| PackError::Unreadable {
        path: dir.to_path_buf(),
        source,
    };
    let meta = fs::metadata(dir).map_err(unreadable)?;
    if !meta.is_dir() {
        return Err(PackError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    fs::read_dir(dir).map_err(unreadable)?;
    Ok(())
}

/// A header with everything that varies between machines zeroed.
fn base_header(kind: EntryType, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header
}

/// Appends one regular file and returns its size.
fn append_file<W: Write>(
    builder: &mut Builder<W>,
    full: &Path,
    rel: &Path,
) -> Result<u64, PackError> {
    let unreadable = |source| PackError::Unreadable {
        path: full.to_path_buf(),
        source,
    };
    let file = File::open(full).map_err(unreadable)?;
    // Size and mode come from the open handle, so they describe the very file
    // whose bytes get copied.
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(PackError::Changed {
            path: full.to_path_buf(),
        });
    }
    let size = meta.len();
    let mode = if meta.permissions().mode() & 0o111 != 0 {
        MODE_EXEC
    } else {
        MODE_PLAIN
    };
    let mut header = base_header(EntryType::Regular, mode);
    header.set_size(size);
    let mut reader = ExactReader {
        file,
        remaining: size,
        problem: None,
    };
    match builder.append_data(&mut header, rel, &mut reader) {
        Ok(()) => Ok(size),
        Err(source) => Err(match reader.problem {
            Some(ReadProblem::Shrunk) => PackError::Changed {
                path: full.to_path_buf(),
            },
            Some(ReadProblem::Failed(source)) => unreadable(source),
            None => write_error(rel, source),
        }),
    }
}

/// Why an [`ExactReader`] stopped early.
enum ReadProblem {
    Shrunk,
    Failed(io::Error),
}

/// Yields exactly the size promised in the tar header, no more and no less.
///
/// The tar builder copies whatever the reader yields and pads afterwards, so a
/// file that grows or shrinks while being packed would otherwise produce a
/// corrupt archive. Extra bytes are left out; missing bytes are an error that
/// records why, so [`pack`] can tell a changed file from a failed upload.
struct ExactReader {
    file: File,
    remaining: u64,
    problem: Option<ReadProblem>,
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.file.read(&mut buf[..want]) {
            Ok(0) => {
                self.problem = Some(ReadProblem::Shrunk);
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(err) => {
                let kind = err.kind();
                self.problem = Some(ReadProblem::Failed(err));
                Err(kind.into())
            }
        }
    }
}

fn write_error(rel: &Path, source: io::Error) -> PackError {
    PackError::Write {
        path: rel.to_path_buf(),
        source,
    }
}

fn walk_error(dir: &Path, err: &ignore::Error) -> PackError {
    let path = ignore_error_path(err).unwrap_or(dir).to_path_buf();
    let source = match io_error_of(err) {
        Some(io) => io::Error::new(io.kind(), io.to_string()),
        None => io::Error::other(err.to_string()),
    };
    PackError::Unreadable { path, source }
}

fn io_error_of(err: &ignore::Error) -> Option<&io::Error> {
    match err {
        ignore::Error::Io(io) => Some(io),
        ignore::Error::WithPath { err, .. }
        | ignore::Error::WithDepth { err, .. }
        | ignore::Error::WithLineNumber { err, .. } => io_error_of(err),
        ignore::Error::Partial(errs) => errs.iter().find_map(io_error_of),
        _ => None,
    }
}

/// An `ignore` error's message without the path, which is reported separately.
fn ignore_error_detail(err: &ignore::Error) -> String {
    match err {
        ignore::Error::WithPath { err, .. } | ignore::Error::WithDepth { err, .. } => {
            ignore_error_detail(err)
        }
        ignore::Error::Partial(errs) => errs
            .iter()
            .map(ignore_error_detail)
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// The path an `ignore` error is about, if it records one.
fn ignore_error_path(err: &ignore::Error) -> Option<&Path> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            ignore_error_path(err)
        }
        ignore::Error::Partial(errs) => errs.iter().find_map(ignore_error_path),
        ignore::Error::Loop { child, .. } => Some(child),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// unpack
// ---------------------------------------------------------------------------

/// Resource limits for [`unpack`], so one upload cannot fill the daemon's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of regular-file content the upload may unpack to.
    pub max_bytes: u64,
    /// Most entries the upload may hold. Directories that [`unpack`] creates
    /// implicitly (parents missing from the archive) count too, so deep paths
    /// cannot be used to create more inodes than this.
    pub max_entries: u64,
}

impl Default for Limits {
    /// 1 GiB of file content and 200 000 entries: far above any real service's
    /// source tree, far below what would hurt the host.
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 30,
            max_entries: 200_000,
        }
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Number of regular files written.
    pub files: u64,
    /// Total bytes written into them.
    pub bytes: u64,
}

/// What made an entry's path unsafe. Part of [`UnpackError::UnsafePath`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathProblem {
    /// The path starts at `/`.
    Absolute,
    /// The path has a `..` component.
    ParentDir,
    /// The path is empty (or only `.`).
    Empty,
    /// The path contains a NUL byte, which no real file name can.
    Nul,
    /// A symlink's target is empty or contains a NUL byte.
    BadLinkTarget,
    /// The path lies below a symlink that an earlier entry created.
    ThroughSymlink {
        /// The symlink, relative to the staging directory.
        link: String,
    },
    /// The path was already created by an earlier entry: a duplicate, or
    /// another kind of entry in the way (e.g. a file where a directory is needed).
    Clash,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const REPACK: &str =
            "pack the service with `skiff deploy DIR`, which only stores paths inside DIR";
        match self {
            PathProblem::Absolute => write!(f, "has an absolute path. Upload paths must be relative; {REPACK}"),
            PathProblem::ParentDir => write!(f, "has a `..` in its path, which would escape the staging directory. {REPACK}"),
            PathProblem::Empty => write!(f, "has an empty path. {REPACK}"),
            PathProblem::Nul => write!(f, "has a NUL byte in its path. {REPACK}"),
            PathProblem::BadLinkTarget => write!(f, "is a symlink with an empty or NUL-containing target. Remove the symlink from the source directory"),
            PathProblem::ThroughSymlink { link } => write!(f, "lies below the symlink `{link}`, and skiff never writes through symlinks. Replace that symlink with a real directory"),
            PathProblem::Clash => write!(f, "clashes with an earlier entry (a duplicate, or a file where a directory is needed). {REPACK}"),
        }
    }
}

/// Why [`unpack`] rejected an upload. On any error the caller should delete
/// the staging directory: it may hold the entries unpacked before the bad one.
///
/// Entry paths and link targets come from the upload, so they are stored with
/// control characters escaped, safe to print into logs and terminals.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// The staging directory is missing, not a directory, or not empty.
    #[error(
        "cannot unpack into `{}`: {reason}. Pass an existing, empty directory.",
        path.display()
    )]
    BadDestination {
        /// The destination that was given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The stream is not a complete tar archive.
    #[error(
        "the upload is not a valid tar archive ({detail}): it may have been cut off; deploy again."
    )]
    Corrupt {
        /// What the tar reader or [`unpack`] found wrong.
        detail: String,
    },
    /// An entry's path could escape or misuse the staging directory.
    #[error("archive entry `{path}` {problem}.")]
    UnsafePath {
        /// The entry's path as stored in the upload.
        path: String,
        /// What is wrong with it.
        problem: PathProblem,
    },
    /// A symlink points outside the unpacked tree.
    #[error(
        "symlink `{path}` points to `{target}`, outside the source directory. Remove the symlink or make it point inside the source directory with a relative path (any `..` first)."
    )]
    LinkOutside {
        /// The symlink's path.
        path: String,
        /// Its target as stored in the upload.
        target: String,
    },
    /// An entry is neither a directory, a regular file nor a symlink.
    #[error(
        "archive entry `{path}` is a {kind}, which skiff does not deploy. Remove it from the source directory; only files, directories and symlinks are allowed."
    )]
    UnsupportedEntry {
        /// The entry's path.
        path: String,
        /// What kind of entry it is, in words (e.g. "hard link").
        kind: String,
    },
    /// The upload has more entries than [`Limits::max_entries`].
    #[error(
        "the upload has more than {limit} files, directories and symlinks. Add build output and dependencies to `.skiffignore`, or ask the operator to raise the entry limit."
    )]
    TooManyEntries {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The upload's files add up to more than [`Limits::max_bytes`].
    #[error(
        "the upload unpacks to more than {}. Add large files (build output, dependencies, data) to `.skiffignore`, or ask the operator to raise the size limit.",
        human_bytes(*limit)
    )]
    TooBig {
        /// The limit that was exceeded, in bytes.
        limit: u64,
    },
    /// Writing into the staging directory failed for a reason unrelated to the upload.
    #[error(
        "could not write `{path}` into the staging directory ({source}). Check the skiff host's free disk space and permissions, then deploy again."
    )]
    Io {
        /// The entry being written.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Unpacks the tar stream `input` into `dest`, which must be an existing,
/// empty directory, and rejects anything that is not plainly a tree of
/// directories, regular files and symlinks that stay inside `dest`.
///
/// Entries are created one by one with exclusive-create semantics; nothing is
/// ever written through a symlink or over an existing path, and files get mode
/// 0644 or 0755 only. The first bad entry stops the unpack with an error
/// naming it; the caller then deletes `dest`, which may hold earlier entries.
///
/// Symlink targets must be relative, stay inside the tree when resolved
/// against the link's own directory, and put any `..` components first:
/// `q/..` is refused even where it looks harmless, because if `q` is itself a
/// symlink the real resolution differs from the lexical one and can escape.
pub fn unpack(input: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked, UnpackError> {
    check_destination(dest)?;
    let guard = GuardedReader::new(input);
    let mut archive = Archive::new(&guard);
    let mut entries = archive.entries().map_err(corrupt)?;
    let mut state = Unpacker {
        dest,
        limits,
        entries: 0,
        done: Unpacked::default(),
    };
    loop {
        guard.begin_metadata();
        let next = entries.next();
        guard.end_metadata();
        let mut entry = match next {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(err)) if guard.over_budget.get() => {
                return Err(UnpackError::Corrupt {
                    detail: format!(
                        "an entry's header records exceed {} ({err})",
                        human_bytes(MAX_ENTRY_METADATA)
                    ),
                })
            }
            Some(Err(err)) => return Err(corrupt(err)),
        };
        state.entry(&mut entry)?;
    }
    if guard.hit_eof.get() {
        // tar treats end of input at a header boundary as the end of the
        // archive; a complete upload ends with zero blocks instead.
        return Err(UnpackError::Corrupt {
            detail: "it ends without the end-of-archive marker".into(),
        });
    }
    Ok(state.done)
}

fn check_destination(dest: &Path) -> Result<(), UnpackError> {
    let bad = |reason: String| UnpackError::BadDestination {
        path: dest.to_path_buf(),
        reason,
    };
    let meta = fs::symlink_metadata(dest).map_err(|err| bad(err.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("it is not a directory".into()));
    }
    let mut listing = fs::read_dir(dest).map_err(|err| bad(err.to_string()))?;
    if listing.next().is_some() {
        return Err(bad("it is not empty".into()));
    }
    Ok(())
}

fn corrupt(err: io::Error) -> UnpackError {
    UnpackError::Corrupt {
        detail: err.to_string(),
    }
}

/// One regular, directory or symlink entry, validated and ready to create.
enum Kind {
    Dir,
    File { mode: u32, size: u64 },
    Symlink { target: OsString },
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    /// Entries seen plus directories created implicitly.
    entries: u64,
    done: Unpacked,
}

impl Unpacker<'_> {
    fn count_entry(&mut self) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.count_entry()?;
        let kind_byte = entry.header().entry_type();
        if kind_byte.is_pax_global_extensions() {
            // Archive-wide metadata (e.g. `git archive`'s commit id): no file.
            return Ok(());
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown = printable(&raw_path);
        let parts = safe_components(&raw_path).map_err(|problem| UnpackError::UnsafePath {
            path: shown.clone(),
            problem,
        })?;

        let kind = match kind_byte {
            EntryType::Directory => Kind::Dir,
            EntryType::Regular => {
                let mode = entry.header().mode().map_err(corrupt)?;
                let mode = if mode & 0o111 != 0 {
                    MODE_EXEC
                } else {
                    MODE_PLAIN
                };
                Kind::File {
                    mode,
                    size: entry.size(),
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                check_link_target(&parts, &target).map_err(|err| match err {
                    LinkProblem::Bad => UnpackError::UnsafePath {
                        path: shown.clone(),
                        problem: PathProblem::BadLinkTarget,
                    },
                    LinkProblem::Outside => UnpackError::LinkOutside {
                        path: shown.clone(),
                        target: printable(&target),
                    },
                })?;
                Kind::Symlink {
                    target: OsStr::from_bytes(&target).to_os_string(),
                }
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    path: shown,
                    kind: kind_name(other),
                })
            }
        };

        if let Kind::File { size, .. } = kind {
            if size > self.budget() {
                return Err(self.too_big());
            }
        }

        let target = self.prepare_parents(&parts, &shown)?;
        let clash = || UnpackError::UnsafePath {
            path: shown.clone(),
            problem: PathProblem::Clash,
        };
        let io_err = |source| UnpackError::Io {
            path: shown.clone(),
            source,
        };
        match kind {
            Kind::Dir => match fs::symlink_metadata(&target) {
                // A parent made implicitly by an earlier entry, or a repeated
                // directory entry: harmless, and common in tar files.
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(clash()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    make_dir(&target).map_err(io_err)?;
                }
                Err(err) => return Err(io_err(err)),
            },
            Kind::Symlink { target: link } => {
                std::os::unix::fs::symlink(&link, &target).map_err(|err| {
                    if err.kind() == io::ErrorKind::AlreadyExists {
                        clash()
                    } else {
                        io_err(err)
                    }
                })?;
            }
            Kind::File { mode, size } => {
                // create_new is O_CREAT|O_EXCL: it fails on any existing path,
                // a dangling symlink included, so nothing is followed or overwritten.
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|err| {
                        if err.kind() == io::ErrorKind::AlreadyExists {
                            clash()
                        } else {
                            io_err(err)
                        }
                    })?;
                // The umask may have cleared bits; set the exact mode on the handle.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err)?;
                let budget = self.budget();
                let written = match copy_limited(entry, &mut file, budget) {
                    Ok(n) => n,
                    Err(CopyError::TooBig) => return Err(self.too_big()),
                    Err(CopyError::Read(err)) => return Err(corrupt(err)),
                    Err(CopyError::Write(err)) => return Err(io_err(err)),
                };
                if written != size {
                    return Err(UnpackError::Corrupt {
                        detail: format!("`{shown}` is cut short"),
                    });
                }
                self.done.files += 1;
                self.done.bytes += written;
            }
        }
        Ok(())
    }

    fn budget(&self) -> u64 {
        self.limits.max_bytes.saturating_sub(self.done.bytes)
    }

    fn too_big(&self) -> UnpackError {
        UnpackError::TooBig {
            limit: self.limits.max_bytes,
        }
    }

    /// Makes sure every ancestor of the entry is a real directory inside
    /// `dest`, creating missing ones, and returns the entry's full path.
    ///
    /// Ancestors are checked with `symlink_metadata`, which does not follow
    /// links: an ancestor that is a symlink (made by an earlier entry) would
    /// let this entry be written wherever that symlink points.
    fn prepare_parents(&mut self, parts: &[&OsStr], shown: &str) -> Result<PathBuf, UnpackError> {
        let mut path = self.dest.to_path_buf();
        // `safe_components` refuses empty paths; answered the same here
        // rather than assumed.
        let Some((last, parents)) = parts.split_last() else {
            return Err(UnpackError::UnsafePath {
                path: shown.to_string(),
                problem: PathProblem::Empty,
            });
        };
        for (depth, part) in parents.iter().enumerate() {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let link = parts[..=depth]
                        .iter()
                        .map(|p| printable(p.as_bytes()))
                        .collect::<Vec<_>>()
                        .join("/");
                    return Err(UnpackError::UnsafePath {
                        path: shown.to_owned(),
                        problem: PathProblem::ThroughSymlink { link },
                    });
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::UnsafePath {
                        path: shown.to_owned(),
                        problem: PathProblem::Clash,
                    })
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.count_entry()?;
                    make_dir(&path).map_err(|source| UnpackError::Io {
                        path: shown.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(UnpackError::Io {
                        path: shown.to_owned(),
                        source,
                    })
                }
            }
        }
        path.push(last);
        Ok(path)
    }
}

/// Creates one directory (never its parents) with mode 0755 exactly.
fn make_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(MODE_DIR).create(path)?;
    // mkdir fails on an existing path, so `path` is the directory just made.
    fs::set_permissions(path, fs::Permissions::from_mode(MODE_DIR))
}

/// Splits an entry path into plain names, refusing anything that could point
/// outside the staging directory. `.` components are dropped.
fn safe_components(raw: &[u8]) -> Result<Vec<&OsStr>, PathProblem> {
    if raw.contains(&0) {
        return Err(PathProblem::Nul);
    }
    let mut parts = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(name) => parts.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathProblem::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(PathProblem::Absolute),
        }
    }
    if parts.is_empty() {
        return Err(PathProblem::Empty);
    }
    Ok(parts)
}

enum LinkProblem {
    Bad,
    Outside,
}

/// Checks that a symlink at `link` (names relative to the tree root) pointing
/// to `target` cannot lead outside the tree.
///
/// The target is resolved lexically against the link's directory, which is a
/// real directory (ancestors are never symlinks). All `..` must come first:
/// after a name, `..` would climb from wherever that name resolves to, which
/// for a symlink is not the lexical parent. With that rule, following any
/// chain of such links from inside the tree stays inside it.
fn check_link_target(link: &[&OsStr], target: &[u8]) -> Result<(), LinkProblem> {
    if target.is_empty() || target.contains(&0) {
        return Err(LinkProblem::Bad);
    }
    let mut depth = link.len() - 1; // the link's own directory
    let mut seen_name = false;
    for component in Path::new(OsStr::from_bytes(target)).components() {
        match component {
            Component::Normal(_) => seen_name = true,
            Component::CurDir => {}
            Component::ParentDir if !seen_name && depth > 0 => depth -= 1,
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(LinkProblem::Outside)
            }
        }
    }
    Ok(())
}

fn kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Link => "hard link".into(),
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "fifo (named pipe)".into(),
        EntryType::Continuous => "contiguous file".into(),
        EntryType::GNUSparse => "sparse file".into(),
        EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader => {
            "stray extension header".into()
        }
        other => format!("entry of unknown type {:?}", printable(&[other.as_byte()])),
    }
}

enum CopyError {
    TooBig,
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` into `to`, failing once more than `budget` bytes arrive.
///
/// The limit is enforced on the bytes actually read, not on the size the
/// archive claims, so no header or pax record can talk its way past it.
fn copy_limited(mut from: impl Read, mut to: impl Write, budget: u64) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(CopyError::Read(err)),
        };
        total += n as u64;
        if total > budget {
            return Err(CopyError::TooBig);
        }
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

/// Wraps the upload so [`unpack`] can see what the tar reader cannot report:
/// whether input ended abruptly, and how much it consumed between entries.
///
/// `Read` is implemented for `&GuardedReader`, so the archive reads through a
/// shared reference while [`unpack`] keeps another to switch the metadata cap
/// on and off and to inspect the flags.
struct GuardedReader<R> {
    inner: RefCell<R>,
    /// Bytes consumed since [`Self::begin_metadata`].
    consumed: Cell<u64>,
    /// Whether reads are currently capped at [`MAX_ENTRY_METADATA`].
    capped: Cell<bool>,
    /// A read hit the cap.
    over_budget: Cell<bool>,
    /// The input reported end-of-file.
    hit_eof: Cell<bool>,
}

impl<R: Read> GuardedReader<R> {
    fn new(inner: R) -> Self {
        GuardedReader {
            inner: RefCell::new(inner),
            consumed: Cell::new(0),
            capped: Cell::new(false),
            over_budget: Cell::new(false),
            hit_eof: Cell::new(false),
        }
    }

    fn begin_metadata(&self) {
        self.consumed.set(0);
        self.capped.set(true);
    }

    fn end_metadata(&self) {
        self.capped.set(false);
    }
}

impl<R: Read> Read for &GuardedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut want = buf.len();
        if self.capped.get() {
            let left = MAX_ENTRY_METADATA.saturating_sub(self.consumed.get());
            if left == 0 && want > 0 {
                self.over_budget.set(true);
                return Err(io::Error::other("entry header records too large"));
            }
            want = want.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        let n = self.inner.borrow_mut().read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            self.hit_eof.set(true);
        }
        self.consumed.set(self.consumed.get() + n as u64);
        Ok(n)
    }
}

/// Makes bytes from the upload safe to show: invalid UTF-8 is replaced and
/// control characters are escaped, so a hostile name cannot forge log lines
/// or send terminal escape sequences.
fn printable(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in String::from_utf8_lossy(raw).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Formats a byte count for people: "1 GiB", "1.5 MiB", "512 bytes".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut unit = 1024u64;
    let mut index = 0;
    while index + 1 < UNITS.len() && n / unit >= 1024 {
        unit *= 1024;
        index += 1;
    }
    if n.is_multiple_of(unit) {
        format!("{} {}", n / unit, UNITS[index])
    } else {
        format!("{:.1} {}", n as f64 / unit as f64, UNITS[index])
    }
}
