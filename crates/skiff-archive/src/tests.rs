//! Tests on real files in temporary directories. Hostile archives are built
//! byte by byte, because `tar::Builder` refuses to write most of them.

use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixDatagram;
use tempfile::TempDir;

// --- helpers ----------------------------------------------------------------

fn write(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, contents).unwrap();
}

fn pack_to_vec(dir: &Path) -> (Vec<u8>, Packed) {
    let mut out = Vec::new();
    let packed = pack(dir, &mut out).unwrap();
    (out, packed)
}

/// Sorted paths stored in an archive, as tar reports them.
fn archive_paths(bytes: &[u8]) -> Vec<String> {
    let mut archive = Archive::new(bytes);
    let mut paths: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            String::from_utf8(e.path_bytes().into_owned()).unwrap()
        })
        .collect();
    paths.sort();
    paths
}

/// What a tree looks like: path -> description, without following symlinks.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, format!("link {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(root, &path, out);
            } else {
                let data = fs::read(&path).unwrap();
                out.insert(
                    rel,
                    format!("file {mode:o} {}", String::from_utf8_lossy(&data)),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// An empty `dest` beside a `sentinel` directory, inside a temp root that
/// holds nothing else; `assert_untouched` proves nothing escaped `dest`.
struct Env {
    root: TempDir,
    dest: PathBuf,
}

impl Env {
    fn new() -> Env {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        write(&root.path().join("sentinel/keep.txt"), "keep");
        Env { root, dest }
    }

    fn unpack(&self, bytes: &[u8]) -> Result<Unpacked, UnpackError> {
        self.unpack_with(bytes, &Limits::default())
    }

    fn unpack_with(&self, bytes: &[u8], limits: &Limits) -> Result<Unpacked, UnpackError> {
        unpack(bytes, &self.dest, limits)
    }

    /// An absolute path that would land beside `dest` if anything escaped.
    fn outside(&self, name: &str) -> String {
        self.root.path().join(name).to_str().unwrap().to_owned()
    }

    fn assert_untouched(&self) {
        let mut top: Vec<String> = fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["dest", "sentinel"],
            "something was written beside dest"
        );
        let sentinel = snapshot(&self.root.path().join("sentinel"));
        let expected: BTreeMap<String, String> =
            [("keep.txt".to_owned(), "file 644 keep".to_owned())].into();
        assert_eq!(sentinel, expected, "the sentinel directory changed");
    }
}

/// Writes tar headers byte by byte, so paths and kinds that `tar::Builder`
/// validates away can be produced.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn header(&mut self, path: &[u8], kind: u8, size: u64, link: &[u8], mode: u32) {
        let mut header = Header::new_gnu();
        {
            let old = header.as_old_mut();
            old.name[..path.len()].copy_from_slice(path);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(EntryType::new(kind));
        header.set_size(size);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
    }

    fn data(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }

    fn file(mut self, path: &str, data: &[u8]) -> Self {
        self.header(path.as_bytes(), b'0', data.len() as u64, b"", 0o644);
        self.data(data);
        self
    }

    fn file_mode(mut self, path: &str, data: &[u8], mode: u32) -> Self {
        self.header(path.as_bytes(), b'0', data.len() as u64, b"", mode);
        self.data(data);
        self
    }

    fn dir(mut self, path: &str) -> Self {
        self.header(path.as_bytes(), b'5', 0, b"", 0o755);
        self
    }

    fn link(mut self, path: &str, target: &str) -> Self {
        self.header(path.as_bytes(), b'2', 0, target.as_bytes(), 0o777);
        self
    }

    fn kind(mut self, path: &str, kind: u8, link: &str) -> Self {
        self.header(path.as_bytes(), kind, 0, link.as_bytes(), 0o644);
        self
    }

    /// A GNU long-name record naming the next entry.
    fn long_name(mut self, name: &[u8]) -> Self {
        self.header(b"././@LongLink", b'L', name.len() as u64, b"", 0o644);
        self.data(name);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

fn assert_unsafe(result: Result<Unpacked, UnpackError>, expected: PathProblem) {
    match result {
        Err(UnpackError::UnsafePath { problem, .. }) => assert_eq!(problem, expected),
        other => panic!("expected UnsafePath({expected:?}), got {other:?}"),
    }
}

// --- pack and round trip ----------------------------------------------------

fn sample_tree() -> TempDir {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join("app.py"), "print('hi')\n");
    write(&s.join("bin/run.sh"), "#!/bin/sh\n");
    fs::set_permissions(s.join("bin/run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    write(&s.join("lib/deep/mod.py"), "x = 1\n");
    write(&s.join(".env.example"), "KEY=\n");
    fs::create_dir(s.join("empty")).unwrap();
    symlink("../app.py", s.join("lib/app-link")).unwrap();
    symlink("..", s.join("lib/up")).unwrap();
    src
}

#[test]
fn round_trip_reproduces_tree() {
    let src = sample_tree();
    let (bytes, packed) = pack_to_vec(src.path());
    assert_eq!(packed.files, 4);
    assert_eq!(packed.bytes, 12 + 10 + 6 + 5);

    let env = Env::new();
    let unpacked = env.unpack(&bytes).unwrap();
    assert_eq!(
        unpacked,
        Unpacked {
            files: 4,
            bytes: 33
        }
    );

    let got = snapshot(&env.dest);
    let want: BTreeMap<String, String> = [
        (".env.example", "file 644 KEY=\n"),
        ("app.py", "file 644 print('hi')\n"),
        ("bin", "dir 755"),
        ("bin/run.sh", "file 755 #!/bin/sh\n"),
        ("empty", "dir 755"),
        ("lib", "dir 755"),
        ("lib/app-link", "link ../app.py"),
        ("lib/deep", "dir 755"),
        ("lib/deep/mod.py", "file 644 x = 1\n"),
        ("lib/up", "link .."),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(got, want);
    env.assert_untouched();
}

#[test]
fn archive_is_deterministic() {
    let src = sample_tree();
    let (first, _) = pack_to_vec(src.path());
    // Different timestamps and group/other bits must not change the archive.
    let file = File::options()
        .write(true)
        .open(src.path().join("app.py"))
        .unwrap();
    file.set_modified(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000),
    )
    .unwrap();
    fs::set_permissions(src.path().join("app.py"), fs::Permissions::from_mode(0o600)).unwrap();
    let (second, _) = pack_to_vec(src.path());
    assert!(first == second, "two packs of the same tree differ");

    let mut archive = Archive::new(first.as_slice());
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(
            (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
            (0, 0, 0)
        );
        let path = entry.path().unwrap().into_owned();
        assert!(
            path.is_relative() && !path.starts_with("."),
            "bad path {path:?}"
        );
    }
}

#[test]
fn long_paths_round_trip() {
    let src = tempfile::tempdir().unwrap();
    let long = format!("{}/{}.txt", "d".repeat(120), "f".repeat(150));
    write(&src.path().join(&long), "long");
    symlink(
        format!("{}.txt", "f".repeat(150)),
        src.path().join("d".repeat(120)).join("l".repeat(130)),
    )
    .unwrap();
    let (bytes, _) = pack_to_vec(src.path());
    let env = Env::new();
    env.unpack(&bytes).unwrap();
    assert_eq!(fs::read_to_string(env.dest.join(&long)).unwrap(), "long");
    assert_eq!(
        fs::read_to_string(env.dest.join("d".repeat(120)).join("l".repeat(130))).unwrap(),
        "long"
    );
}

#[test]
fn gitignore_applies_without_git_dir() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join(".gitignore"), "*.log\nnode_modules/\n");
    write(&s.join("main.js"), "");
    write(&s.join("debug.log"), "");
    write(&s.join("node_modules/x/index.js"), "");
    let (bytes, _) = pack_to_vec(s);
    assert_eq!(archive_paths(&bytes), [".gitignore", "main.js"]);
}

#[test]
fn skiffignore_ignores_and_negates() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join(".gitignore"), "*.log\n");
    write(
        &s.join(".skiffignore"),
        "data/\n*.bin\n!keep.bin\n!important.log\n",
    );
    write(&s.join("a.bin"), "");
    write(&s.join("keep.bin"), "");
    write(&s.join("noise.log"), "");
    write(&s.join("important.log"), "");
    write(&s.join("data/big.csv"), "");
    write(&s.join("main.rs"), "");
    let (bytes, _) = pack_to_vec(s);
    assert_eq!(
        archive_paths(&bytes),
        [
            ".gitignore",
            ".skiffignore",
            "important.log",
            "keep.bin",
            "main.rs"
        ]
    );
}

#[test]
fn nested_gitignore_applies_below_its_directory_only() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join("web/.gitignore"), "dist/\n*.tmp\n");
    write(&s.join("web/dist/app.js"), "");
    write(&s.join("web/x.tmp"), "");
    write(&s.join("web/src.js"), "");
    write(&s.join("dist/keep.js"), "");
    write(&s.join("y.tmp"), "");
    let (bytes, _) = pack_to_vec(s);
    assert_eq!(
        archive_paths(&bytes),
        [
            "dist",
            "dist/keep.js",
            "web",
            "web/.gitignore",
            "web/src.js",
            "y.tmp"
        ]
    );
}

#[test]
fn vcs_dirs_and_special_files_are_skipped() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    write(&s.join(".git/config"), "[core]\n");
    write(&s.join(".hg/store"), "");
    write(&s.join("sub/.svn/entries"), "");
    write(&s.join("sub/code.c"), "");
    UnixDatagram::bind(s.join("sock")).unwrap();
    let (bytes, packed) = pack_to_vec(s);
    assert_eq!(archive_paths(&bytes), ["sub", "sub/code.c"]);
    assert_eq!(packed.files, 1);
}

#[test]
fn pack_rejects_what_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("main.py");
    write(&file, "");
    let err = pack(&file, Vec::new()).unwrap_err();
    assert!(matches!(err, PackError::NotADirectory { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("main.py") && msg.contains("source directory"),
        "{msg}"
    );

    let missing = tmp.path().join("nope");
    let err = pack(&missing, Vec::new()).unwrap_err();
    assert!(matches!(err, PackError::Unreadable { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn pack_reports_bad_ignore_pattern() {
    for file in [".skiffignore", "sub/.gitignore"] {
        let src = tempfile::tempdir().unwrap();
        write(&src.path().join(file), "ok.txt\nbad{\n");
        let err = pack(src.path(), Vec::new()).unwrap_err();
        assert!(matches!(err, PackError::IgnoreFile { .. }), "{err:?}");
        assert!(err.to_string().contains(file), "{err}");
    }
}

// --- unpack: accepted shapes -----------------------------------------------

#[test]
fn unpack_strips_special_mode_bits_and_makes_parents() {
    let env = Env::new();
    let bytes = RawTar::default()
        .file_mode("a/b/suid", b"x", 0o4777)
        .file_mode("a/other", b"y", 0o2666)
        .finish();
    env.unpack(&bytes).unwrap();
    let got = snapshot(&env.dest);
    assert_eq!(got["a/b/suid"], "file 755 x");
    assert_eq!(got["a/other"], "file 644 y");
    assert_eq!(got["a/b"], "dir 755");
    env.assert_untouched();
}

#[test]
fn unpack_rejects_unusable_destination() {
    let env = Env::new();
    write(&env.dest.join("old"), "");
    let err = env.unpack(&RawTar::default().finish()).unwrap_err();
    assert!(matches!(err, UnpackError::BadDestination { .. }), "{err:?}");
    assert!(err.to_string().contains("not empty"), "{err}");
}

// --- unpack: rejections ----------------------------------------------------

#[test]
fn rejects_parent_dir_paths() {
    for path in ["../escaped", "a/../../escaped", "ok/.."] {
        let env = Env::new();
        let bytes = RawTar::default().file(path, b"pwned").finish();
        assert_unsafe(env.unpack(&bytes), PathProblem::ParentDir);
        env.assert_untouched();
    }
}

#[test]
fn rejects_absolute_paths() {
    let env = Env::new();
    let bytes = RawTar::default()
        .file(&env.outside("escaped"), b"pwned")
        .finish();
    assert_unsafe(env.unpack(&bytes), PathProblem::Absolute);
    env.assert_untouched();
}

#[test]
fn rejects_empty_paths() {
    for path in ["", ".", "./"] {
        let env = Env::new();
        let bytes = RawTar::default().file(path, b"x").finish();
        assert_unsafe(env.unpack(&bytes), PathProblem::Empty);
        env.assert_untouched();
    }
}

#[test]
fn rejects_nul_in_path() {
    let env = Env::new();
    let mut raw = RawTar::default().long_name(b"safe\0/../../escaped");
    raw.header(b"placeholder", b'0', 0, b"", 0o644);
    assert_unsafe(env.unpack(&raw.finish()), PathProblem::Nul);
    env.assert_untouched();
}

#[test]
fn rejects_absolute_symlink() {
    let env = Env::new();
    let bytes = RawTar::default().link("etc", "/etc").finish();
    let err = env.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, UnpackError::LinkOutside { path, target } if path == "etc" && target == "/etc"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("`etc`") && msg.contains("Remove the symlink"),
        "{msg}"
    );
    env.assert_untouched();
}

#[test]
fn rejects_symlink_leaving_tree() {
    for (path, target) in [
        ("up", ".."),
        ("sub/up2", "../.."),
        ("a/b/l", "../x/../../../sentinel"),
    ] {
        let env = Env::new();
        let bytes = RawTar::default().link(path, target).finish();
        let err = env.unpack(&bytes).unwrap_err();
        assert!(
            matches!(err, UnpackError::LinkOutside { .. }),
            "{path} -> {target}: {err:?}"
        );
        env.assert_untouched();
    }
}

#[test]
fn rejects_dotdot_after_name_in_link_target() {
    // `s/q -> ..` is the tree root, so `s/q/..` really is the parent of dest,
    // although `s/p -> q/..` lexically resolves to `s`.
    let env = Env::new();
    let bytes = RawTar::default()
        .link("s/q", "..")
        .link("s/p", "q/..")
        .finish();
    let err = env.unpack(&bytes).unwrap_err();
    assert!(
        matches!(&err, UnpackError::LinkOutside { path, .. } if path == "s/p"),
        "{err:?}"
    );
    env.assert_untouched();
}

#[test]
fn rejects_write_through_symlink_chain() {
    let env = Env::new();
    // `sub/d -> ..` resolves to the root and is allowed on its own ...
    let bytes = RawTar::default().link("sub/d", "..").finish();
    env.unpack(&bytes).unwrap();

    // ... but nothing may then be written through it.
    let env = Env::new();
    let bytes = RawTar::default()
        .link("sub/d", "..")
        .file("sub/d/x", b"through")
        .finish();
    assert_unsafe(
        env.unpack(&bytes),
        PathProblem::ThroughSymlink {
            link: "sub/d".into(),
        },
    );
    assert!(!env.dest.join("x").exists());
    env.assert_untouched();
}

#[test]
fn rejects_directory_through_symlink() {
    // The ancestor check does not depend on where the link points, nor on
    // the kind of entry that would go through it.
    let env = Env::new();
    let bytes = RawTar::default()
        .dir("sub")
        .link("sub/d", "..")
        .dir("sub/d/new")
        .finish();
    assert_unsafe(
        env.unpack(&bytes),
        PathProblem::ThroughSymlink {
            link: "sub/d".into(),
        },
    );
    env.assert_untouched();
}

#[test]
fn rejects_unsupported_entry_kinds() {
    for (kind, name) in [
        (b'1', "hard link"),
        (b'3', "character device"),
        (b'4', "block device"),
        (b'6', "fifo (named pipe)"),
        (b'7', "contiguous file"),
        (b'Z', "entry of unknown type \"Z\""),
    ] {
        let env = Env::new();
        let bytes = RawTar::default()
            .kind("thing", kind, "sentinel/keep.txt")
            .finish();
        match env.unpack(&bytes) {
            Err(UnpackError::UnsupportedEntry { path, kind }) => {
                assert_eq!((path.as_str(), kind.as_str()), ("thing", name));
            }
            other => panic!("kind {}: {other:?}", kind as char),
        }
        assert!(fs::symlink_metadata(env.dest.join("thing")).is_err());
        env.assert_untouched();
    }
}

#[test]
fn rejects_duplicates_and_kind_clashes() {
    let cases = [
        RawTar::default().file("a", b"1").file("a", b"2"),
        RawTar::default().dir("a").file("a", b"1"),
        RawTar::default().file("a", b"1").dir("a"),
        RawTar::default().link("a", "b").dir("a"),
        RawTar::default().link("a", "b").file("a", b"1"),
        RawTar::default().file("a", b"1").link("a", "b"),
        RawTar::default().file("a", b"1").file("a/b", b"2"),
    ];
    for (i, raw) in cases.into_iter().enumerate() {
        let env = Env::new();
        let result = env.unpack(&raw.finish());
        assert!(
            matches!(
                result,
                Err(UnpackError::UnsafePath {
                    problem: PathProblem::Clash,
                    ..
                })
            ),
            "case {i}: {result:?}"
        );
        env.assert_untouched();
    }
}

#[test]
fn rejects_too_many_entries() {
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let env = Env::new();
    let ok = RawTar::default()
        .dir("a")
        .file("a/1", b"")
        .file("a/2", b"")
        .finish();
    env.unpack_with(&ok, &limits).unwrap();

    let env = Env::new();
    let bytes = RawTar::default()
        .file("1", b"")
        .file("2", b"")
        .file("3", b"")
        .file("4", b"")
        .finish();
    let err = env.unpack_with(&bytes, &limits).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooManyEntries { limit: 3 }),
        "{err:?}"
    );
    assert!(!env.dest.join("4").exists());

    // Implicitly created parents count too.
    let env = Env::new();
    let bytes = RawTar::default().file("a/b/c/d", b"").finish();
    let err = env.unpack_with(&bytes, &limits).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooManyEntries { limit: 3 }),
        "{err:?}"
    );
    env.assert_untouched();
}

#[test]
fn rejects_too_big() {
    let limits = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let env = Env::new();
    let exact = RawTar::default()
        .file("a", &[1; 600])
        .file("b", &[2; 400])
        .finish();
    assert_eq!(env.unpack_with(&exact, &limits).unwrap().bytes, 1000);

    // The total, not any single file, goes over.
    let env = Env::new();
    let over = RawTar::default()
        .file("a", &[1; 600])
        .file("b", &[2; 401])
        .finish();
    let err = env.unpack_with(&over, &limits).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooBig { limit: 1000 }),
        "{err:?}"
    );
    assert!(!env.dest.join("b").exists() || fs::metadata(env.dest.join("b")).unwrap().len() <= 400);
    env.assert_untouched();

    let msg = UnpackError::TooBig {
        limit: Limits::default().max_bytes,
    }
    .to_string();
    assert!(msg.contains("more than 1 GiB"), "{msg}");
}

#[test]
fn size_limit_counts_bytes_actually_read() {
    // A reader that delivers more than any header promised.
    let flood = io::repeat(7).take(5000);
    let mut sink = Vec::new();
    assert!(matches!(
        copy_limited(flood, &mut sink, 4096),
        Err(CopyError::TooBig)
    ));
    assert!(sink.len() <= 4096);
    let mut sink = Vec::new();
    assert_eq!(
        copy_limited(io::repeat(7).take(4096), &mut sink, 4096).ok(),
        Some(4096)
    );
}

#[test]
fn rejects_truncated_archives() {
    let full = RawTar::default()
        .file("a", &[5; 2000])
        .file("b", b"bee")
        .finish();
    // Mid-data, mid-header, and exactly at an entry boundary with the
    // end-of-archive blocks missing.
    for cut in [700, 2560 + 100, 3072, 3584] {
        let env = Env::new();
        let err = env.unpack(&full[..cut]).unwrap_err();
        assert!(
            matches!(err, UnpackError::Corrupt { .. }),
            "cut at {cut}: {err:?}"
        );
        assert!(err.to_string().contains("deploy again"), "{err}");
        env.assert_untouched();
    }
    let env = Env::new();
    assert!(matches!(env.unpack(&[]), Err(UnpackError::Corrupt { .. })));
}

#[test]
fn rejects_random_bytes() {
    // A fixed xorshift stream: random-looking, reproducible.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let env = Env::new();
    let err = env.unpack(&noise).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt { .. }), "{err:?}");
    assert_eq!(fs::read_dir(&env.dest).unwrap().count(), 0);
    env.assert_untouched();
}

#[test]
fn rejects_oversized_header_records() {
    // A GNU long name of 2 MiB: tar would buffer it whole.
    let env = Env::new();
    let mut raw = RawTar::default().long_name(&vec![b'a'; 2 * 1024 * 1024]);
    raw.header(b"x", b'0', 0, b"", 0o644);
    let err = env.unpack(&raw.finish()).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt { .. }), "{err:?}");
    env.assert_untouched();
}

#[test]
fn error_messages_are_printable_and_actionable() {
    let env = Env::new();
    let bytes = RawTar::default().file("evil\x1b[2J/../x", b"").finish();
    let err = env.unpack(&bytes).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\x1b'), "{msg:?}");
    assert!(
        msg.contains("evil\\u{1b}[2J/../x") && msg.contains("skiff deploy"),
        "{msg}"
    );
}

#[test]
fn human_sizes() {
    assert_eq!(human_bytes(0), "0 bytes");
    assert_eq!(human_bytes(1023), "1023 bytes");
    assert_eq!(human_bytes(1024), "1 KiB");
    assert_eq!(human_bytes(1536 * 1024), "1.5 MiB");
    assert_eq!(human_bytes(1 << 30), "1 GiB");
}
