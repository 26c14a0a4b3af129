//! The core: `skiff up` runs a service sandboxed, routes to it, explains
//! start failures and leaves nothing behind.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::*;
use crate::FIRST_START;

/// A Python service that reports on its own sandbox. Its attempts to write
/// run only when it is not root, so it can never change the host.
pub const PROBE_APP: &str = r#"
import json, os, socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

def attempt_write(path):
    if os.getuid() == 0:
        return "refused: running as root"
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as e:
        return e.strerror or str(e)

def status_fields():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs"):
                out[k] = v.strip()
    return out

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        if u.path == "/id":
            import pwd
            body = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                    "user": pwd.getpwuid(os.getuid()).pw_name,
                    "host": socket.gethostname(), "cwd": os.getcwd()}
        elif u.path == "/write":
            body = {"result": attempt_write(q["path"])}
        elif u.path == "/status":
            body = status_fields()
        elif u.path == "/exists":
            body = {"exists": os.path.exists(q["path"])}
        elif u.path == "/read":
            try:
                with open(q["path"]) as f:
                    body = {"result": "read %d bytes" % len(f.read())}
            except OSError as e:
                body = {"result": e.strerror}
        elif u.path == "/ls":
            try:
                body = {"result": sorted(os.listdir(q["path"]))}
            except OSError as e:
                body = {"result": e.strerror}
        elif u.path == "/fds":
            fds = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    fds[fd] = os.readlink("/proc/self/fd/" + fd)
                except OSError:
                    pass
            body = {"fds": fds}
        elif u.path == "/exit":
            os._exit(int(q["code"]))
        elif u.path == "/env":
            body = {k: os.environ.get(k) for k in ("PORT", "HOME", "GREETING")}
        else:
            body = {"service": os.environ.get("SERVICE_NAME"), "path": self.path}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass

port = int(os.environ["PORT"])
ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

pub fn probe_app(name: &str, port: u16) -> App {
    App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 probe.py\"\nport = {port}\n\n[env]\n\
             SERVICE_NAME = \"{name}\"\nGREETING = \"hi\"\n"
        ),
        &[("probe.py", PROBE_APP)],
    )
}

pub fn host(name: &str) -> String {
    format!("{name}.localhost")
}

#[test]
fn bundled_example_answers_through_the_gateway() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello-python");
    let mut up = Up::start(&[&example], &[]);
    let urls = up.wait_urls(1, FIRST_START);
    assert_eq!(urls.len(), 1, "no URL printed; stderr:\n{}", up.stderr());
    let port = up.port.unwrap();
    assert_eq!(urls[0], format!("http://hello-python.localhost:{port}/"));
    let r = up.get(&format!("hello-python.localhost:{port}"), "/hi");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.contains("\"message\": \"Hello from skiff\""),
        "{r:?}"
    );
    assert!(r.body.contains("\"path\": \"/hi\""), "{r:?}");
    // The service's own log reaches the user, prefixed with its name.
    assert!(
        up.wait_output(
            "hello-python | listening on 0.0.0.0:8080",
            Duration::from_secs(10)
        ),
        "{}",
        up.stdout()
    );
}

#[test]
fn sandbox_is_read_only_unprivileged_and_private() {
    let name = unique("probe");
    let app = probe_app(&name, 8080);
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let h = host(&name);

    let id = up.get(&h, "/id");
    assert_eq!(id.status, 200, "{id:?}");
    // The service's own host user, named app.
    let v: serde_json::Value = serde_json::from_str(&id.body).unwrap();
    let uid = v["uid"].as_u64().unwrap();
    assert!(
        uid >= 1_800_000_000,
        "not a service's own user: {}",
        id.body
    );
    assert_eq!(v["euid"].as_u64(), Some(uid), "{}", id.body);
    assert_eq!(v["gid"].as_u64(), Some(uid), "{}", id.body);
    assert_eq!(v["user"], "app", "{}", id.body);
    assert!(
        id.body.contains(&format!("\"host\": \"{name}\"")),
        "{}",
        id.body
    );
    assert!(id.body.contains("\"cwd\": \"/app\""), "{}", id.body);

    for path in ["/x", "/etc/x", "/app/x", "/usr/x"] {
        let r = up.get(&h, &format!("/write?path={path}"));
        assert!(
            r.body.contains("Read-only file system"),
            "writing {path} should fail read-only: {}",
            r.body
        );
    }
    let tmp = up.get(&h, "/write?path=/tmp/x");
    assert!(
        tmp.body.contains("\"result\": \"ok\""),
        "/tmp must be writable: {}",
        tmp.body
    );
    let shm = up.get(&h, "/write?path=/dev/shm/x");
    assert!(
        !shm.body.contains("\"ok\"") && shm.body.contains("Read-only file system"),
        "/dev/shm must not be writable: {}",
        shm.body
    );

    let status = up.get(&h, "/status");
    for field in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        assert!(
            status
                .body
                .contains(&format!("\"{field}\": \"0000000000000000\"")),
            "{field} not empty: {}",
            status.body
        );
    }
    assert!(
        status.body.contains("\"NoNewPrivs\": \"1\""),
        "{}",
        status.body
    );

    let env = up.get(&h, "/env");
    assert!(env.body.contains("\"PORT\": \"8080\""), "{}", env.body);
    assert!(env.body.contains("\"HOME\": \"/tmp\""), "{}", env.body);
    assert!(env.body.contains("\"GREETING\": \"hi\""), "{}", env.body);

    // Nothing of the host or the platform is visible inside.
    let shadow = up.get(&h, "/read?path=/etc/shadow");
    assert!(shadow.body.contains("Permission denied"), "{}", shadow.body);
    let home = up.get(&h, "/ls?path=/home");
    assert!(
        home.body.contains("\"result\": []"),
        "/home must be empty: {}",
        home.body
    );
    let root = up.get(&h, "/ls?path=/root");
    assert!(root.body.contains("Permission denied"), "{}", root.body);
    let state = up.state_dir();
    for path in [
        state.to_str().unwrap(),
        "/work",
        "/root/.cargo",
        "/var/cache/skiff",
    ] {
        let r = up.get(&h, &format!("/exists?path={path}"));
        assert!(
            r.body.contains("\"exists\": false"),
            "{path} is visible inside: {}",
            r.body
        );
    }
}

#[test]
fn two_services_on_the_same_port_coexist() {
    let (a, b) = (unique("twin-a"), unique("twin-b"));
    let (app_a, app_b) = (probe_app(&a, 8080), probe_app(&b, 8080));
    let mut up = Up::start(&[app_a.path(), app_b.path()], &[]);
    assert_eq!(up.wait_urls(2, FIRST_START).len(), 2, "{}", up.stderr());
    for name in [&a, &b] {
        let r = up.get(&host(name), "/");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.body.contains(&format!("\"service\": \"{name}\"")),
            "{r:?}"
        );
    }
}

#[test]
fn wrong_port_gets_the_exact_message_and_what_it_listens_on() {
    let name = unique("wrongport");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 -m http.server 3000 --bind 127.0.0.1\"\n\
             port = 8080\n[limits]\nstart_timeout = \"3s\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    let status = up.wait_exit(FIRST_START);
    assert!(!status.success());
    let err = up.stderr();
    assert!(
        err.contains("\n  Port Some(8080) is not being listened to by the service\n"),
        "{err}"
    );
    assert!(
        err.contains("listening on 127.0.0.1:3000, expected 0.0.0.0:8080"),
        "{err}"
    );
    assert!(
        cgroups_named(&name).is_empty(),
        "{:?}",
        cgroups_named(&name)
    );
}

#[test]
fn early_exit_reports_code_output_and_the_build_hint() {
    let name = unique("early");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"echo starting; echo 'ModuleNotFoundError: flask' >&2; exit 3\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    let status = up.wait_exit(FIRST_START);
    assert!(!status.success());
    let err = up.stderr();
    assert!(err.contains("exited (exit code 3)"), "{err}");
    assert!(err.contains("| starting"), "{err}");
    assert!(err.contains("| ModuleNotFoundError: flask"), "{err}");
    assert!(err.contains("build command left out dependencies"), "{err}");
}

#[test]
fn unknown_service_is_404_and_failed_service_is_503_with_reason() {
    let good = unique("good");
    let bad = unique("bad");
    let good_app = probe_app(&good, 8080);
    let bad_app = App::new(&format!("name = \"{bad}\"\nstart = \"exit 7\"\n"), &[]);
    let mut up = Up::start(&[good_app.path(), bad_app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    assert!(up.wait_output(&format!("{bad} failed to start"), Duration::from_secs(60)));

    let r = up.get("nobody.localhost", "/");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("x-skiff-error"), Some("unknown-service"));
    assert!(r.body.contains("No service named \"nobody\""), "{r:?}");
    assert_eq!(r.body.trim().lines().count(), 1, "one line: {r:?}");

    let r = up.get(&host(&bad), "/");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-skiff-error"), Some("service-unavailable"));
    assert!(r.body.contains("exit code 7"), "{r:?}");

    let r = up.get("localhost", "/");
    assert_eq!(r.status, 404, "{r:?}");
}

fn assert_nothing_left(name: &str, marker: &str, state: &Path) {
    assert!(
        cgroups_named(name).is_empty(),
        "cgroups left: {:?}",
        cgroups_named(name)
    );
    assert!(
        processes_with(marker).is_empty(),
        "processes left: {:?}",
        processes_with(marker)
    );
    let state = state.to_string_lossy();
    assert!(
        mounts_with(&state).is_empty(),
        "mounts left: {:?}",
        mounts_with(&state)
    );
}

fn clean_stop(sig: Signal) {
    let name = unique("stop");
    let marker = format!("marker-{name}");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"(exec -a {marker}-child sleep 600) & exec -a {marker} python3 -m http.server 8080 --directory /tmp\"\n"
        ),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    assert!(
        !cgroups_named(&name).is_empty(),
        "the instance should have cgroups"
    );
    assert!(
        !processes_with(&marker).is_empty(),
        "the service should be running"
    );
    let state = up.state_dir();
    let status = up.signal_and_wait(sig);
    assert!(status.success(), "{status:?}: {}", up.stderr());
    assert_nothing_left(&name, &marker, &state);
}

#[test]
fn sigterm_leaves_nothing_behind() {
    clean_stop(Signal::SIGTERM);
}

#[test]
fn ctrl_c_leaves_nothing_behind() {
    clean_stop(Signal::SIGINT);
}

#[test]
fn sigkill_of_skiff_still_takes_the_instances_down() {
    let name = unique("killed");
    let marker = format!("marker-{name}");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec -a {marker} python3 -m http.server 8080 --directory /tmp\"\n"),
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    up.signal_and_wait(Signal::SIGKILL);
    // The helper and the instance die with skiff (parent-death signal).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_with(&marker).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    // A killed platform cannot remove its cgroups; the next one to start
    // on this host does. (Tests run in parallel: another test's platform
    // may be that next one already, so whether they are still there now
    // is not asserted.)
    let other = App::new(
        &format!("name = \"{}\"\nstart = \"exit 1\"\n", unique("next")),
        &[],
    );
    let mut next = Up::start(&[other.path()], &[]);
    next.wait_exit(FIRST_START);
    assert!(
        cgroups_named(&name).is_empty(),
        "{:?}",
        cgroups_named(&name)
    );
}

#[test]
fn bad_manifest_lists_every_problem_and_starts_nothing() {
    let app = App::new(
        "name = \"Bad Name\"\nport = 0\nstart = \"\"\ncolour = 1\n",
        &[],
    );
    let mut up = Up::start(&[app.path()], &[]);
    let status = up.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let err = up.stderr();
    assert!(err.contains("skiff.toml has 4 problems"), "{err}");
    assert!(err.contains("skiff.toml:1:8: name"), "{err}");
    assert!(err.contains("port: 0 is not a usable port"), "{err}");
    assert!(err.contains("the start command is empty"), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");
}

#[test]
fn a_crashed_instance_is_named_in_the_502_and_replaced_on_the_next_request() {
    let name = unique("dies");
    let app = probe_app(&name, 8080);
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let r = up.get(&host(&name), "/exit?code=5");
    assert_eq!(r.status, 502, "the request in flight fails: {r:?}");
    assert_eq!(r.header("x-skiff-error"), Some("upstream-failed"));
    assert!(r.body.contains("exited (exit code 5)"), "{r:?}");
    assert!(up.wait_output(
        "exited (exit code 5); it is replaced",
        Duration::from_secs(10)
    ));
    let r = up.get(&host(&name), "/id");
    assert_eq!(r.status, 200, "a new instance serves: {r:?}");
}

#[test]
fn a_private_source_directory_still_runs_for_the_non_root_user() {
    // The source is snapshotted into the image with modes made readable,
    // as a deploy from a private home directory needs.
    let name = unique("private");
    let app = probe_app(&name, 8080);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(app.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        app.path().join("probe.py"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    assert_eq!(up.get(&host(&name), "/id").status, 200);
}

#[test]
fn descriptors_skiff_inherited_do_not_reach_the_service() {
    let marker = tempfile::Builder::new()
        .prefix("skiff-fd-marker-")
        .tempfile()
        .unwrap();
    // An inheritable copy at a high number, as a careless parent would
    // leave (F_DUPFD does not set close-on-exec).
    let inherited =
        nix::fcntl::fcntl(marker.as_file(), nix::fcntl::FcntlArg::F_DUPFD(200)).unwrap();
    let name = unique("fds");
    let app = probe_app(&name, 8080);
    let mut up = Up::start(&[app.path()], &[]);
    assert_eq!(up.wait_urls(1, FIRST_START).len(), 1, "{}", up.stderr());
    let fds = up.get(&host(&name), "/fds").body;
    assert!(fds.contains("\"0\": \"/dev/null\""), "{fds}");
    assert!(
        !fds.contains("skiff-fd-marker"),
        "an inherited descriptor reached the service: {fds}"
    );
    // Only stdin, the two output pipes and the service's own sockets.
    assert_eq!(fds.matches("pipe:").count(), 2, "{fds}");
    assert_eq!(fds.matches("/dev/null").count(), 1, "{fds}");
    nix::unistd::close(inherited).unwrap();
}
