//! The image store: content-addressed source snapshots and build layers.
//!
//! A service's image is a stack of read-only layers: the build's layer (what
//! the build command wrote), the source snapshot (the source directory as
//! `/app`) and the base image. Each is keyed by a hash of what made it, so a
//! redeploy of the same source with the same build command and base reuses
//! the image without building. Layout under `<state>/images/`:
//!
//! - `src-<hash>/app/...`: a source snapshot;
//! - `img-<hash>/disk.ext4`: a build's layer, on a disk of its own whose
//!   size is the build's `limits.build_disk` (see `skiff_sandbox::disk`);
//!   mounted read-only on `img-<hash>/disk/` (the layer is `disk/upper/`)
//!   in the daemon's own mount namespace while the daemon runs;
//!   `img-<hash>/ready` once complete. (Images made before layers had
//!   disks hold the layer in `img-<hash>/upper/`, and are used as they are.)
//! - `rt-<hash>/disk.ext4`: a runtime layer (e.g. Node.js 22) over the
//!   base, made once by the platform and shared, laid out as `img-`;
//! - `refs/<service>`: the image key the service's current version uses.
//!   Images no ref names are garbage.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use skiff_sandbox::beneath::{remove_tree, Kind, Tree};
use skiff_sandbox::disk;

use crate::images::base::APP_PATH;

/// Directories of a source tree that never belong in an image.
const SKIPPED_DIRS: &[&str] = &[".git", ".hg", ".svn"];

/// The image store under `<state>/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Held while a layer's disk is mounted or unmounted, so that two
    /// deploys of one image never mount it twice.
    mounts: std::sync::Arc<std::sync::Mutex<()>>,
}

/// A source snapshot, ready to be a layer.
#[derive(Debug, Clone)]
pub struct SourceLayer {
    pub key: String,
    /// The key of the source as a build sees it: without `skiff.toml`.
    pub build_key: String,
    /// The layer's root (it holds `app/`).
    pub dir: PathBuf,
}

/// Where one image's build layer lives.
#[derive(Debug, Clone)]
pub struct ImageDir {
    pub key: String,
    pub dir: PathBuf,
}

impl ImageDir {
    /// The file holding the layer's disk.
    pub fn disk_file(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }

    /// Where the layer's disk is mounted.
    pub fn disk_dir(&self) -> PathBuf {
        self.dir.join("disk")
    }

    pub fn upper(&self) -> PathBuf {
        self.disk_dir().join("upper")
    }

    pub fn work(&self) -> PathBuf {
        self.disk_dir().join("work")
    }

    fn marker(&self) -> PathBuf {
        self.dir.join("ready")
    }

    /// Whether a complete build layer is there.
    pub fn is_ready(&self) -> bool {
        self.marker().is_file()
    }

    /// Marks the build layer complete; from now on it is reused.
    pub fn mark_ready(&self) -> io::Result<()> {
        fs::write(self.marker(), "")
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl ImageStore {
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let root = state_dir.join("images");
        fs::create_dir_all(root.join("refs"))?;
        Ok(Self {
            root,
            mounts: Default::default(),
        })
    }

    /// The layer that adds a runtime (e.g. `node@22`) to `base`: shared by
    /// every service that asks for it, made by the platform's own command
    /// (`runtime_command`), with no service's cache or environment.
    pub fn runtime_for(&self, base: &str, runtime: &str) -> ImageDir {
        self.keyed("rt", ["skiff-runtime-v1", base, runtime])
    }

    /// Mounts (read-only) the disks of those of `layers` that are build
    /// layers of this store and not mounted yet: after a restart of the
    /// daemon, or for a deploy that reuses an image.
    pub fn attach(&self, layers: &[PathBuf]) -> io::Result<()> {
        let _guard = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
        for entry in self.entries(layers) {
            let image = ImageDir {
                dir: self.root.join(&entry),
                key: String::new(),
            };
            if (entry.starts_with("img-") || entry.starts_with("rt-"))
                && image.disk_file().is_file()
                && !disk::is_mount_point(&image.disk_dir())?
            {
                disk::mount_disk(&image.disk_file(), &image.disk_dir(), true)?;
            }
        }
        Ok(())
    }

    /// Removes an image's directory, its disk unmounted first.
    pub fn remove_image(&self, dir: &Path) -> io::Result<()> {
        {
            let _guard = self.mounts.lock().unwrap_or_else(|p| p.into_inner());
            disk::unmount(&dir.join("disk"))?;
        }
        remove_tree(dir)
    }

    /// Snapshots `source` (unless a snapshot of the same content exists).
    /// Modes are normalised so that the non-root run user can read
    /// everything (and run what was executable); owners become root.
    pub fn snapshot(&self, source: &Path) -> io::Result<SourceLayer> {
        // The path itself is the deployer's (`skiff up ./link` is fine);
        // below it, nothing is followed.
        let source = &fs::canonicalize(source)?;
        let (key, build_key) = hash_tree_parts(source)?;
        let dir = self.root.join(format!("src-{}", &key[..32]));
        if !dir.join(".complete").is_file() {
            let partial = self.root.join(format!("src-{}.partial", &key[..32]));
            remove_tree(&partial)?;
            let app = partial.join(APP_PATH.trim_start_matches('/'));
            fs::create_dir_all(&app)?;
            fs::set_permissions(&app, fs::Permissions::from_mode(0o755))?;
            copy_tree(source, &app)?;
            fs::write(partial.join(".complete"), "")?;
            remove_tree(&dir)?;
            fs::rename(&partial, &dir)?;
        }
        Ok(SourceLayer {
            key,
            build_key,
            dir,
        })
    }

    /// The image `service`'s build makes by running `build` with `env` on
    /// `source` over `base`. Images are never shared between services: a
    /// build also reads the service's build cache, which the service's
    /// earlier builds wrote, and one service's builds must not be able to
    /// put anything into another's image. (One service deploys one version
    /// at a time, so no two builds ever share an image directory.)
    pub fn image_for(
        &self,
        service: &str,
        base: &str,
        source: &SourceLayer,
        build: &str,
        env: &BTreeMap<String, String>,
    ) -> ImageDir {
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // v3: build layers on disks of their own, one service's only. The
        // source without its manifest: a new limit or mode reuses the image
        // (the new snapshot, with the new skiff.toml, goes under it).
        let parts = ["skiff-image-v3", service, base, &source.build_key, build];
        self.keyed(
            "img",
            parts.into_iter().chain(env.iter().map(String::as_str)),
        )
    }

    /// The layer directory `<prefix>-<hash of parts>`.
    fn keyed<'a>(&self, prefix: &str, parts: impl IntoIterator<Item = &'a str>) -> ImageDir {
        let mut h = Sha256::new();
        for part in parts {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        let key = hex(&h.finalize())[..32].to_string();
        ImageDir {
            dir: self.root.join(format!("{prefix}-{key}")),
            key,
        }
    }

    /// The entries directly under the store that `layers` use (`img-…` for
    /// `img-…/upper`); layers outside the store (the base image) are not
    /// the store's.
    fn entries(&self, layers: &[PathBuf]) -> Vec<String> {
        layers
            .iter()
            .filter_map(|l| l.strip_prefix(&self.root).ok()?.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    }

    /// Records that `service`'s current version runs on `layers`: a root
    /// for garbage collection that survives restarts.
    pub fn set_ref(&self, service: &str, layers: &[PathBuf]) -> io::Result<()> {
        let path = self.root.join("refs").join(service);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, self.entries(layers).join("\n"))?;
        fs::rename(tmp, path)
    }

    /// Forgets `service`'s ref (the service was removed).
    pub fn remove_ref(&self, service: &str) -> io::Result<()> {
        match fs::remove_file(self.root.join("refs").join(service)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes images and snapshots that neither a ref nor `keep` names.
    /// `keep` holds the layers of everything live that has no ref (yet):
    /// deploys in progress, versions draining. The caller serialises this
    /// with the registration of those layers.
    pub fn collect(&self, keep: &[PathBuf]) -> io::Result<Vec<String>> {
        let mut live: HashSet<String> = self.entries(keep).into_iter().collect();
        for entry in fs::read_dir(self.root.join("refs"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                continue;
            }
            let text = fs::read_to_string(path)?;
            live.extend(text.lines().map(str::to_string));
        }
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // `.partial` directories belong to a snapshot being made now.
            let layer =
                (name.starts_with("src-") || name.starts_with("img-") || name.starts_with("rt-"))
                    && !name.ends_with(".partial");
            if layer && !live.contains(&name) {
                self.remove_image(&entry.path())?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// A hash of everything in a tree that ends up in the image: relative
/// paths, kinds, executable bits, symlink targets and contents.
pub fn hash_tree(dir: &Path) -> io::Result<String> {
    hash_tree_parts(dir).map(|(all, _)| all)
}

/// The manifest at the top of a source tree: the platform's, not the build's.
const MANIFEST: &str = "skiff.toml";

/// [`hash_tree`], and the same hash without the top-level `skiff.toml`,
/// which keys the build: a changed limit or mode is no reason to build
/// again.
fn hash_tree_parts(dir: &Path) -> io::Result<(String, String)> {
    let (mut all, mut code) = (Sha256::new(), Sha256::new());
    Tree::open(dir)?.walk(SKIPPED_DIRS, &mut |e| {
        let mut h = Sha256::new();
        h.update(e.rel.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        match e.kind {
            Kind::Dir => h.update(b"d"),
            Kind::Symlink => {
                h.update(b"l");
                h.update(e.read_link()?.as_encoded_bytes());
            }
            Kind::File => {
                h.update(if e.mode & 0o111 != 0 { b"x" } else { b"f" });
                h.update(e.len.to_le_bytes());
                let mut f = e.open()?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            Kind::Other => {}
        }
        h.update(b"\0");
        let entry = h.finalize();
        all.update(entry);
        if e.rel != Path::new(MANIFEST) {
            code.update(entry);
        }
        Ok(())
    })?;
    Ok((hex(&all.finalize()), hex(&code.finalize())))
}

/// Copies `src` into `dst` (which exists and is the platform's own, new
/// directory): regular files, directories and symlinks (as links, never
/// followed); sockets and devices are skipped.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    Tree::open(src)?.walk(SKIPPED_DIRS, &mut |e| {
        let target = dst.join(e.rel);
        match e.kind {
            Kind::Dir => {
                fs::create_dir(&target)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            }
            Kind::Symlink => std::os::unix::fs::symlink(e.read_link()?, &target)?,
            Kind::File => {
                let mode = if e.mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let mut to = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)?;
                io::copy(&mut e.open()?, &mut to)?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            }
            Kind::Other => {}
        }
        Ok(())
    })
}

/// Bytes in regular files under `dir` (a layer's size).
pub fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let _ = Tree::open(dir).and_then(|t| {
        t.walk(&[], &mut |e| {
            if e.kind == Kind::File {
                total += e.len;
            }
            Ok(())
        })
    });
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, content) in files {
            let p = d.path().join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        d
    }

    #[test]
    fn hash_follows_content_not_time_and_skips_git() {
        let a = tree(&[
            ("app.py", "print(1)"),
            ("lib/x.py", "x"),
            (".git/HEAD", "a"),
        ]);
        let b = tree(&[
            ("app.py", "print(1)"),
            ("lib/x.py", "x"),
            (".git/HEAD", "b"),
        ]);
        assert_eq!(hash_tree(a.path()).unwrap(), hash_tree(b.path()).unwrap());
        fs::write(b.path().join("lib/x.py"), "y").unwrap();
        assert_ne!(hash_tree(a.path()).unwrap(), hash_tree(b.path()).unwrap());
        let c = tree(&[("app.py", "print(1)"), ("lib/y.py", "x")]);
        assert_ne!(hash_tree(a.path()).unwrap(), hash_tree(c.path()).unwrap());
        fs::set_permissions(a.path().join("app.py"), fs::Permissions::from_mode(0o755)).unwrap();
        let h = hash_tree(a.path()).unwrap();
        assert_ne!(
            h,
            hash_tree(tree(&[("app.py", "print(1)"), ("lib/x.py", "x")]).path()).unwrap()
        );
    }

    #[test]
    fn snapshot_normalises_modes_and_is_reused() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let src = tree(&[("run.sh", "#!/bin/sh"), ("secret/data.txt", "d")]);
        fs::set_permissions(src.path().join("run.sh"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(src.path().join("secret"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(
            src.path().join("secret/data.txt"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("run.sh", src.path().join("link")).unwrap();

        let layer = store.snapshot(src.path()).unwrap();
        let app = layer.dir.join("app");
        let mode = |p: &str| fs::symlink_metadata(app.join(p)).unwrap().mode() & 0o777;
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("secret"), 0o755);
        assert_eq!(mode("secret/data.txt"), 0o644);
        assert_eq!(
            fs::read_link(app.join("link")).unwrap(),
            Path::new("run.sh")
        );

        let again = store.snapshot(src.path()).unwrap();
        assert_eq!(again.dir, layer.dir);
        // A source directory named through a link of the deployer's.
        let named = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(src.path(), named.path().join("src")).unwrap();
        let linked = store.snapshot(&named.path().join("src")).unwrap();
        assert_eq!(linked.dir, layer.dir);
    }

    #[test]
    fn a_changed_manifest_is_a_new_snapshot_but_the_same_image() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let env = BTreeMap::new();
        let before = store
            .snapshot(tree(&[("a", "1"), ("skiff.toml", "start = \"x\"")]).path())
            .unwrap();
        let after = store
            .snapshot(
                tree(&[
                    ("a", "1"),
                    ("skiff.toml", "start = \"x\"\n[limits]\nmemory = \"1GiB\""),
                ])
                .path(),
            )
            .unwrap();
        assert_ne!(before.dir, after.dir, "the new skiff.toml is in /app");
        let image = |s: &SourceLayer| store.image_for("svc", "base-1", s, "make", &env).key;
        assert_eq!(image(&before), image(&after));
        // Any other file is the build's business.
        let changed = store
            .snapshot(tree(&[("a", "2"), ("skiff.toml", "start = \"x\"")]).path())
            .unwrap();
        assert_ne!(image(&before), image(&changed));
    }

    #[test]
    fn image_keys_and_garbage_collection() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let v1 = store.snapshot(tree(&[("a", "1")]).path()).unwrap();
        let v2 = store.snapshot(tree(&[("a", "2")]).path()).unwrap();
        let env = BTreeMap::new();
        let i1 = store.image_for("svc", "base-1", &v1, "make", &env);
        assert_eq!(
            i1.key,
            store.image_for("svc", "base-1", &v1, "make", &env).key
        );
        assert_ne!(
            i1.key,
            store.image_for("svc", "base-2", &v1, "make", &env).key
        );
        assert_ne!(
            i1.key,
            store.image_for("svc", "base-1", &v1, "make all", &env).key
        );
        let env2 = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_ne!(
            i1.key,
            store.image_for("svc", "base-1", &v1, "make", &env2).key
        );
        assert_ne!(
            i1.key,
            store.image_for("other", "base-1", &v1, "make", &env).key
        );
        let i2 = store.image_for("svc", "base-1", &v2, "make", &env);
        for i in [&i1, &i2] {
            fs::create_dir_all(i.upper()).unwrap();
            i.mark_ready().unwrap();
        }
        store
            .set_ref(
                "svc",
                &[i1.upper(), v1.dir.clone(), PathBuf::from("/base/rootfs")],
            )
            .unwrap();
        // A deploy in progress keeps its layers without a ref.
        let removed = store.collect(&[i2.upper(), v2.dir.clone()]).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert!(i1.is_ready() && v1.dir.exists() && i2.is_ready());
        store.collect(&[]).unwrap();
        assert!(i1.is_ready() && v1.dir.exists());
        assert!(
            !i2.dir.exists() && !v2.dir.exists(),
            "unreferenced layers are removed"
        );
        // Another service keeps its own layers.
        store
            .set_ref("other", std::slice::from_ref(&v1.dir))
            .unwrap();
        store.remove_ref("svc").unwrap();
        let removed = store.collect(&[]).unwrap();
        assert_eq!(removed, vec![format!("img-{}", i1.key)]);
        assert!(v1.dir.exists());
    }
}
