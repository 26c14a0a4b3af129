//! Each service's own host user.
//!
//! Every service runs as a uid (and gid) of its own, given by the store
//! (`Store::service_uid`) and never given twice, so that no two services
//! share per-user kernel state: inotify instances, process and signal
//! limits, message queues, file ownership. Inside, the user is still named
//! `app` with home `/tmp`: each instance gets the image's `/etc/passwd` and
//! `/etc/group` with the `app` entries pointing at the service's ids,
//! mounted read-only over the image's.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use std::os::fd::AsRawFd;

use nix::fcntl::OFlag;
use skiff_sandbox::beneath::Tree;
use skiff_sandbox::Bind;

/// The name of the run user inside every instance.
pub const RUN_USER: &str = "app";

/// The image's file at `rel` (e.g. `etc/passwd`) as an overlay of `layers`
/// (top first) shows it: from the first layer that has it. A layer's
/// whiteout (a character device) or a link hides it. Read without
/// following links: the layers are the tenant's.
fn image_file(layers: &[PathBuf], rel: &str) -> io::Result<Option<String>> {
    for layer in layers {
        let tree = match Tree::open(layer) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // O_PATH first: opening a device node a build made (old layers sit
        // on a file system that allows them) could act on the device.
        let fd = match tree.open_beneath(Path::new(rel), OFlag::O_PATH) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            // A link, or a directory on the way that is one: not a file
            // the platform reads.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::ELOOP | nix::libc::ENOTDIR)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        // A whiteout (a character device), a directory or anything else
        // but a regular file: the image has no such file.
        let meta = nix::sys::stat::fstat(&fd)?;
        if meta.st_mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
            return Ok(None);
        }
        // Reopened for reading through the O_PATH descriptor: the same file.
        let mut file = std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let mut text = String::new();
        // At most 1 MiB: an account file, not whatever a build left there.
        (&mut file).take(1 << 20).read_to_string(&mut text)?;
        return Ok(Some(text));
    }
    Ok(None)
}

/// `text` (a passwd or group file) without the lines for `name` or for
/// `id`, and with `line` at the end.
fn with_entry(text: &str, name: &str, id: u32, line: &str) -> String {
    let mut out: String = text
        .lines()
        .filter(|l| {
            let mut fields = l.split(':');
            let entry = fields.next().unwrap_or("");
            let entry_id = fields.nth(1).unwrap_or("");
            entry != name && entry_id != id.to_string()
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    out.push_str(line);
    out.push('\n');
    out
}

/// Writes the account files for a service running as `uid` on `layers`
/// into `dir`, and returns the binds that put them in place.
pub fn account_files(layers: &[PathBuf], dir: &Path, uid: u32) -> io::Result<Vec<Bind>> {
    std::fs::create_dir_all(dir)?;
    let passwd = image_file(layers, "etc/passwd")?.unwrap_or_default();
    let group = image_file(layers, "etc/group")?.unwrap_or_default();
    let files = [
        (
            "passwd",
            with_entry(
                &passwd,
                RUN_USER,
                uid,
                &format!("{RUN_USER}:x:{uid}:{uid}:skiff service:/tmp:/bin/bash"),
            ),
        ),
        (
            "group",
            with_entry(&group, RUN_USER, uid, &format!("{RUN_USER}:x:{uid}:")),
        ),
    ];
    let mut binds = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        binds.push(Bind {
            source: path,
            target: format!("/etc/{name}"),
            writable: false,
        });
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_entry_points_at_the_service_and_nothing_else_does() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      app:x:10001:10001:skiff service:/tmp:/bin/bash\n\
                      squatter:x:1800000007:0::/:/bin/sh\n";
        let out = with_entry(
            passwd,
            "app",
            1_800_000_007,
            "app:x:1800000007:1800000007::/tmp:/bin/bash",
        );
        assert_eq!(
            out,
            "root:x:0:0:root:/root:/bin/bash\napp:x:1800000007:1800000007::/tmp:/bin/bash\n"
        );
    }

    #[test]
    fn files_come_from_the_top_layer_that_has_them_and_links_are_not_followed() {
        let top = tempfile::tempdir().unwrap();
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(base.path().join("etc")).unwrap();
        std::fs::write(
            base.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(base.path().join("etc/group"), "root:x:0:\n").unwrap();
        let layers = vec![top.path().to_path_buf(), base.path().to_path_buf()];
        let out = tempfile::tempdir().unwrap();
        let binds = account_files(&layers, out.path(), 1_800_000_001).unwrap();
        assert_eq!(binds.len(), 2);
        assert_eq!(
            std::fs::read_to_string(out.path().join("passwd")).unwrap(),
            "root:x:0:0::/root:/bin/sh\napp:x:1800000001:1800000001:skiff service:/tmp:/bin/bash\n"
        );
        // A build that replaced /etc/passwd with a link to a host file:
        // the link is not followed, and the service gets its entry alone.
        std::fs::create_dir_all(top.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", top.path().join("etc/passwd")).unwrap();
        account_files(&layers, out.path(), 1_800_000_001).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.path().join("passwd")).unwrap(),
            "app:x:1800000001:1800000001:skiff service:/tmp:/bin/bash\n"
        );
        // A whiteout (the build deleted /etc/group): hidden, and the device
        // node is never opened.
        if nix::unistd::geteuid().is_root() {
            use nix::sys::stat::{makedev, mknod, Mode, SFlag};
            mknod(
                &top.path().join("etc/group"),
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(0o600),
                makedev(0, 0),
            )
            .unwrap();
            account_files(&layers, out.path(), 1_800_000_001).unwrap();
            assert_eq!(
                std::fs::read_to_string(out.path().join("group")).unwrap(),
                "app:x:1800000001:\n"
            );
        }
    }
}
