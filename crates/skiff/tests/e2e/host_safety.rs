//! What a build or a service does cannot harm the host: each test is an
//! attack a tenant could write, aimed at a throwaway directory the test
//! made on the host (never a real host path).

use std::path::Path;

use crate::sandbox::host;
use crate::support::*;
use crate::FIRST_START;

/// A host directory with files in it that no build may touch.
struct Victim {
    dir: tempfile::TempDir,
}

impl Victim {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("skiff-victim-")
            .tempdir()
            .expect("tempdir");
        std::fs::write(dir.path().join("precious"), "keep me").unwrap();
        std::fs::create_dir_all(dir.path().join("apt/sub")).unwrap();
        std::fs::write(dir.path().join("apt/sub/deep"), "keep me too").unwrap();
        std::fs::write(dir.path().join("apt/file"), "and me").unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every file the victim had is still there, unchanged.
    fn assert_untouched(&self, what: &str) {
        for (rel, content) in [
            ("precious", "keep me"),
            ("apt/sub/deep", "keep me too"),
            ("apt/file", "and me"),
        ] {
            let got = std::fs::read_to_string(self.path().join(rel));
            assert_eq!(
                got.as_deref().ok(),
                Some(content),
                "{what}: the host's {rel} under {} was changed: {got:?}",
                self.path().display()
            );
        }
    }
}

/// Deploys a service whose build leaves links to the victim where the
/// platform cleans up after builds, and checks the service runs and the
/// victim is untouched.
fn build_leaving_links(links: &str, victim: &Victim) {
    let name = unique("links");
    let v = victim.path().display();
    let build = links.replace("VICTIM", &v.to_string());
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"{build}\"\n\
             start = \"exec python3 -m http.server $PORT --directory /app\"\n"
        ),
        &[("index.html", "up")],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    victim.assert_untouched(links);
    let r = up.get(&host(&name), "/index.html");
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn a_build_cannot_make_skiff_empty_a_host_directory_through_a_dropped_cache_link() {
    let victim = Victim::new();
    // Every directory skiff empties after a build, replaced by a link to
    // the victim.
    build_leaving_links(
        "rm -rf /root/.npm /root/.cache /var/log && ln -s VICTIM /root/.npm \
         && ln -s VICTIM /root/.cache && ln -s VICTIM /var/log",
        &victim,
    );
}

#[test]
fn a_build_cannot_make_skiff_empty_a_host_directory_through_a_linked_parent() {
    let victim = Victim::new();
    // `var/cache/apt` is reached through a linked `var/cache`, and
    // `var/lib/apt/lists` through a linked `var/lib/apt`.
    build_leaving_links(
        "rm -rf /var/cache && ln -s VICTIM /var/cache \
         && rm -rf /var/lib/apt && ln -s VICTIM/apt /var/lib/apt",
        &victim,
    );
}

#[test]
fn a_build_nesting_directories_deeper_than_a_stack_does_not_take_the_platform_down() {
    let d = Up::serve(None, &[]);
    // 20 000 nested directories in the build's layer, then a failure: the
    // platform removes the partial layer (a recursive removal overflowed
    // its stack and aborted the daemon, every service with it).
    let name = unique("deep");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"python3 -c 'import os\\nfor _ in range(20000): os.mkdir(\\\"d\\\"); os.chdir(\\\"d\\\")' && exit 3\"\n\
             start = \"exec python3 -m http.server $PORT\"\n"
        ),
        &[],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("exit code 3") || err.contains("code 3"),
        "{err}"
    );
    // The daemon is still there and serves a new deploy.
    let ok = unique("after");
    let next = App::new(
        &format!("name = \"{ok}\"\nstart = \"exec python3 -m http.server $PORT\"\n"),
        &[("index.html", "fine")],
    );
    let (status, out, err) = d.cli(&["deploy", next.path().to_str().unwrap()]);
    assert!(status.success(), "{out}{err}\n{}", d.stderr());
    assert_eq!(d.get(&host(&ok), "/index.html").status, 200);
    // Nothing of the failed build's layer is left.
    let images = d.state_dir().join("images");
    let left: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("img-"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Tries each `host:port` in `$TARGETS` from inside a build; any that
/// answers fails the build, naming it. A UDP `connect` to the metadata
/// address sends nothing, but fails when no route leads there.
const REACH_PROBE: &str = r#"
import os, socket, sys
reached = []
for t in os.environ["TARGETS"].split():
    host, port = t.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        reached.append(t)
    except OSError as e:
        print("refused", t, e)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.connect(("169.254.169.254", 80))
    reached.append("169.254.169.254 (a route leads there)")
except OSError as e:
    print("no route to 169.254.169.254:", e)
if reached:
    print("REACHED", *reached)
    sys.exit(1)
"#;

#[test]
fn a_build_reaches_neither_the_hosts_services_nor_link_local_addresses() {
    let d = Up::serve(None, &[]);
    let api = std::fs::read_to_string(d.state_dir().join("api-address")).unwrap();
    let api_port = api.trim().rsplit(':').next().unwrap().to_string();
    // A service of the host's bound to every address, as many are.
    let wide = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let wide_port = wide.local_addr().unwrap().port();
    let mut targets = vec![
        format!("127.0.0.1:{}", d.port.unwrap()),
        format!("127.0.0.1:{api_port}"),
        format!("127.0.0.1:{wide_port}"),
        format!("10.0.2.2:{wide_port}"),
    ];
    for ifa in nix::ifaddrs::getifaddrs().unwrap() {
        if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            if !a.ip().is_loopback() {
                targets.push(format!("{}:{wide_port}", a.ip()));
            }
        }
    }
    let name = unique("reach");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"python3 probe.py\"\n\
             start = \"exec python3 -m http.server $PORT\"\n\
             [env]\nTARGETS = \"{}\"\n",
            targets.join(" ")
        ),
        &[("probe.py", REACH_PROBE)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(
        status.success(),
        "the build reached the host:\n{out}{err}\n{}",
        d.stderr()
    );
    // The build did try, and was refused at each.
    let (_, logs, _) = d.cli(&["logs", &name]);
    for t in &targets {
        assert!(logs.contains(&format!("refused {t}")), "{t}: {logs}");
    }
    assert!(logs.contains("no route to 169.254.169.254"), "{logs}");
    drop(wide);
}

#[test]
fn an_instance_and_a_build_see_no_host_path_in_their_mounts_or_pid_1() {
    let name = unique("paths");
    let manifest = r#"
name = "NAME"
mode = "persistent"
build = "cat /proc/self/mountinfo > /app/build-mounts && tr '\\0' ' ' < /proc/1/cmdline > /app/build-cmdline && cat /proc/self/cgroup > /app/build-cgroup"
start = "cat /proc/self/mountinfo > /tmp/mounts && tr '\\0' ' ' < /proc/1/cmdline > /tmp/cmdline && cat /proc/self/cgroup > /tmp/cgroup && cp /app/build-* /tmp/ && exec python3 -m http.server $PORT --directory /tmp"
"#
    .replace("NAME", &name);
    let app = App::new(&manifest, &[]);
    // A serverless instance on three layers (build, source, base): its
    // root is a copy of the image's warm root.
    let serverless = unique("paths-ro");
    let stacked = App::new(
        &format!(
            "name = \"{serverless}\"\nbuild = \"echo built > /app/built\"\n\
             start = \"cat /proc/self/mountinfo > /tmp/mounts && \
             exec python3 -m http.server $PORT --directory /tmp\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path(), stacked.path()], &[]);
    assert_eq!(up.wait_urls(2, FIRST_START).len(), 2, "{}", up.stderr());
    let state = up.state_dir().display().to_string();
    let binary = std::fs::canonicalize(SKIFF).unwrap().display().to_string();
    // Each sees itself at the root of every cgroup hierarchy (its own
    // cgroup namespace, made once it was in its groups).
    for file in ["cgroup", "build-cgroup"] {
        let r = up.get(&host(&name), &format!("/{file}"));
        assert_eq!(r.status, 200, "{file}: {r:?}");
        assert!(
            r.body.lines().count() > 1 && r.body.lines().all(|l| l.ends_with(":/")),
            "{file} shows a path outside its cgroups:\n{}",
            r.body
        );
    }
    let stacked_mounts = up.get(&host(&serverless), "/mounts");
    assert!(
        stacked_mounts.body.contains("lowerdir=l0:l1:l2,"),
        "{stacked_mounts:?}"
    );
    for (service, file) in [
        (&name, "mounts"),
        (&name, "cmdline"),
        (&name, "build-mounts"),
        (&name, "build-cmdline"),
        (&name, "cgroup"),
        (&name, "build-cgroup"),
        (&serverless, "mounts"),
    ] {
        let r = up.get(&host(service), &format!("/{file}"));
        assert_eq!(r.status, 200, "{file}: {r:?}");
        assert!(!r.body.trim().is_empty(), "{file} is empty");
        for leak in [
            state.as_str(),
            "/var/cache/skiff",
            binary.as_str(),
            "images/",
        ] {
            assert!(
                !r.body.contains(leak),
                "{file} shows the host path {leak}:\n{}",
                r.body
            );
        }
    }
}

/// The names of the image directories in the state directory.
fn images(d: &Up) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("img-"))
        .collect()
}

#[test]
fn a_build_that_writes_past_build_disk_fails_and_the_old_version_keeps_serving() {
    let d = Up::serve(None, &[]);
    let name = unique("bigbuild");
    let manifest = |build: &str, limit: &str| {
        format!(
            "name = \"{name}\"\n\
             build = \"{build}\"\n\
             start = \"exec python3 -m http.server $PORT --directory /app\"\n\
             [limits]\nbuild_disk = \"{limit}\"\n"
        )
    };
    let app = App::new(&manifest("echo one > /app/version", "64MiB"), &[]);
    let deploy = || d.deploy(&app);
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    assert_eq!(d.get(&host(&name), "/version").body, "one\n");
    let first = images(&d);
    // 100 MiB into a 64 MiB layer: once failing the build on the error,
    // once ignoring it (the layer would be cut short without a word).
    for build in [
        "head -c 100M /dev/zero > /var/big",
        "head -c 100M /dev/zero > /var/big; echo two > /app/version",
    ] {
        std::fs::write(app.path().join("skiff.toml"), manifest(build, "64MiB")).unwrap();
        let (status, out, err) = deploy();
        assert!(!status.success(), "{build}: {out}{err}");
        for needle in [
            "filled its disk",
            "limits.build_disk",
            "64MiB",
            "was not changed",
        ] {
            assert!(err.contains(needle), "{build}: no {needle:?} in {err}");
        }
        assert_eq!(d.get(&host(&name), "/version").body, "one\n", "{build}");
        assert_eq!(images(&d), first, "{build}: the failed layer was kept");
    }
    // A build that may write more than the state directory's file system
    // has free is not started.
    std::fs::write(
        app.path().join("skiff.toml"),
        manifest("echo three > /app/version", "1000000GiB"),
    )
    .unwrap();
    let (status, out, err) = deploy();
    assert!(!status.success(), "{out}{err}");
    for needle in ["limits.build_disk", "free", "was not changed"] {
        assert!(err.contains(needle), "no {needle:?} in {err}");
    }
    assert_eq!(d.get(&host(&name), "/version").body, "one\n");
}

/// A persistent service that fills its files on `/fill` and says how
/// its writes ended.
const FILLER: &str = r#"import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"alive"
        if self.path == "/fill":
            try:
                with open("/app/big", "wb") as f:
                    for _ in range(40):
                        f.write(b"x" * (1 << 20))
                        f.flush()
                        os.fsync(f.fileno())
                body = b"wrote everything"
            except OSError as e:
                print(f"OSError: [Errno {e.errno}] {e.strerror}: '/app/big'", flush=True)
                body = f"errno {e.errno}".encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn a_persistent_service_past_its_disk_gets_enospc_and_keeps_running() {
    let d = Up::serve(None, &[]);
    let name = unique("fill");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             mode = \"persistent\"\n\
             start = \"exec python3 /app/filler.py\"\n\
             [limits]\ndisk = \"16MiB\"\n"
        ),
        &[("filler.py", FILLER)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let r = d.get(&host(&name), "/fill");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "errno 28", "40 MiB into a 16 MiB layer: {r:?}");
    // The service runs on, and the host's disk holds no more than the limit.
    assert_eq!(d.get(&host(&name), "/").body, "alive");
    let disks: Vec<_> = walk(&d.state_dir().join("writable"))
        .into_iter()
        .filter(|p| p.ends_with("disk.ext4"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    use std::os::unix::fs::MetadataExt;
    let taken = std::fs::metadata(&disks[0]).unwrap().blocks() * 512;
    assert!(
        taken < 24 << 20,
        "the layer takes {taken} bytes of the host's disk"
    );
    // The doctor names the limit that applied.
    let (_, out, _) = d.cli(&["doctor", &name]);
    for needle in [
        "writable layer is full",
        "limits.disk (16MiB)",
        "[limits] disk",
    ] {
        assert!(out.contains(needle), "no {needle:?} in {out}");
    }
}

/// Every path under `dir` (not following links).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
            out.push(e.path());
        }
    }
    out
}
