//! What an instance may ask of the kernel: the system-call filter, resource
//! limits, `/tmp` at its size. Each probe runs inside the sandbox, and its
//! risky calls only when it is not root, so it can never change the host.

use crate::sandbox::host;
use crate::support::*;

/// A service that makes the calls the filter denies and reports each
/// one's errno (0: it succeeded).
const SYSCALL_PROBE: &str = r#"
import ctypes, json, multiprocessing, os, resource
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return 0 if r >= 0 else ctypes.get_errno()

def in_child(nr, *args):
    # A new user namespace needs a single-threaded caller (EINVAL
    # otherwise), and this server has threads: ask from a forked child.
    pid = os.fork()
    if pid == 0:
        os._exit(call(nr, *args) & 0xff)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)

def probe():
    if os.geteuid() == 0:
        return {"refused": "running as root"}
    params = ctypes.create_string_buffer(120)
    handle = ctypes.create_string_buffer(128)  # handle_bytes = 0: EOVERFLOW if allowed
    mount_id = ctypes.c_int(0)
    out = {
        "name_to_handle_at": call(303, -100, b"/tmp", handle, ctypes.byref(mount_id), 0),
        "unshare_user": in_child(272, 0x10000000),
        "clone3": call(435, 0, 0),
        "io_uring_setup": call(425, 1, params),
        "userfaultfd": call(323, 1),
        "add_key": call(248, b"user", b"skiff-probe", b"secret", 6, -4),
        "keyctl": call(250, 0, -4, 0),
        "bpf": call(321, 0, 0, 0),
        "perf_event_open": call(298, 0, 0, -1, -1, 0),
        "mount": call(165, b"none", b"/tmp", b"tmpfs", 0, 0),
        "setns": call(308, -1, 0),
        "getpid": call(39),
    }
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Seccomp", "Seccomp_filters"):
                out[k] = v.strip()
    out["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    for name in ("CORE", "MEMLOCK", "MSGQUEUE", "RTPRIO", "NICE"):
        out[name.lower()] = list(resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
    return out

def square(conn):
    conn.send(conn.recv() ** 2)
    conn.close()

def pipes():
    # multiprocessing with pipes, no shared memory: must work as before.
    ours, theirs = multiprocessing.Pipe()
    p = multiprocessing.Process(target=square, args=(theirs,))
    p.start()
    ours.send(12)
    got = ours.recv()
    p.join()
    return {"squared": got, "exit": p.exitcode}

def fill_tmp():
    try:
        with open("/tmp/fill", "wb") as f:
            for _ in range(150):
                f.write(b"x" * (4 << 20))
        return {"errno": 0}
    except OSError as e:
        print(f"OSError: [Errno {e.errno}] {e.strerror}: '/tmp/fill'", flush=True)
        return {"errno": e.errno}
    finally:
        try:
            os.unlink("/tmp/fill")
        except OSError:
            pass

held = []

def hold_inotify(n):
    # As many inotify instances as asked, kept open: the per-user limit.
    if os.geteuid() == 0:
        return {"refused": "running as root"}
    libc.inotify_init1.restype = ctypes.c_int
    for _ in range(n):
        fd = libc.inotify_init1(0)
        if fd < 0:
            return {"opened": len(held), "errno": ctypes.get_errno()}
        held.append(fd)
    return {"opened": len(held), "errno": 0}

def neighbours(port):
    # What this instance sees of others: its /tmp, processes, a port.
    import socket
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(("127.0.0.1", port))
        reached = 0
    except OSError as e:
        reached = e.errno
    procs = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    procs.append(f.read().replace(b"\0", b" ").decode().strip())
            except OSError:
                pass
    return {"uid": os.getuid(), "tmp": sorted(os.listdir("/tmp")), "procs": procs, "connect": reached}

listeners = []

def listen(port):
    import socket
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    listeners.append(s)
    with open(f"/tmp/mark-{os.environ.get('MARK', '')}", "w") as f:
        f.write("x")
    return {"listening": port}

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        from urllib.parse import urlparse, parse_qs
        u = urlparse(self.path)
        q = {k: int(v[0]) for k, v in parse_qs(u.query).items()}
        routes = {
            "/probe": probe, "/pipes": pipes, "/filltmp": fill_tmp,
            "/inotify": lambda: hold_inotify(q["n"]),
            "/neighbours": lambda: neighbours(q["port"]),
            "/listen": lambda: listen(q["port"]),
        }
        body = routes.get(u.path, lambda: {"ok": True})()
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

fn probe_service(d: &Up, limits: &str) -> String {
    let name = unique("probe");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             start = \"exec python3 /app/probe.py\"\n\
             [env]\nMARK = \"{name}\"\n\
             [limits]\n{limits}\n"
        ),
        &[("probe.py", SYSCALL_PROBE)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    name
}

fn json(d: &Up, name: &str, path: &str) -> serde_json::Value {
    let r = d.get(&host(name), path);
    assert_eq!(r.status, 200, "{path}: {r:?}");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", r.body))
}

#[test]
fn risky_kernel_calls_are_denied_with_eperm_and_clone3_falls_back() {
    let d = Up::serve(None, &[]);
    let name = probe_service(&d, "");
    let got = json(&d, &name, "/probe");
    let eperm = nix::libc::EPERM as i64;
    for call in [
        "name_to_handle_at",
        "unshare_user",
        "io_uring_setup",
        "userfaultfd",
        "add_key",
        "keyctl",
        "bpf",
        "perf_event_open",
        "mount",
        "setns",
    ] {
        assert_eq!(got[call].as_i64(), Some(eperm), "{call}: {got}");
    }
    assert_eq!(
        got["clone3"].as_i64(),
        Some(nix::libc::ENOSYS as i64),
        "{got}"
    );
    assert_eq!(got["getpid"].as_i64(), Some(0), "{got}");
    // Mode 2: a filter; two of them (the deny list, and clone3/x32).
    assert_eq!(got["Seccomp"], "2", "{got}");
    assert_eq!(got["Seccomp_filters"], "2", "{got}");
    // Resource limits: the default open files (at most skiff's own hard
    // limit, on a host that withholds CAP_SYS_RESOURCE from root), no core
    // dumps.
    let n = 65536.min(own_hard_open_files());
    assert_eq!(got["nofile"], serde_json::json!([n, n]), "{got}");
    assert_eq!(got["core"], serde_json::json!([0, 0]), "{got}");
    for (limit, value) in [
        ("memlock", 8 << 20),
        ("msgqueue", 800 << 10),
        ("rtprio", 0),
        ("nice", 0),
    ] {
        assert_eq!(
            got[limit],
            serde_json::json!([value, value]),
            "{limit}: {got}"
        );
    }
    // Ordinary programs still work: multiprocessing with pipes.
    let pipes = json(&d, &name, "/pipes");
    assert_eq!(pipes, serde_json::json!({"squared": 144, "exit": 0}));
}

/// The hard open-file limit the platform inherits from this test.
fn own_hard_open_files() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1
}

#[test]
fn open_files_follows_the_manifest() {
    let d = Up::serve(None, &[]);
    let name = probe_service(&d, "open_files = 1000");
    let got = json(&d, &name, "/probe");
    assert_eq!(got["nofile"], serde_json::json!([1000, 1000]), "{got}");
}

#[test]
fn filling_tmp_gives_enospc_at_tmp_size_not_an_out_of_memory_kill() {
    let d = Up::serve(None, &[]);
    // The defaults: /tmp as large as the memory limit (512 MiB each).
    let name = probe_service(&d, "");
    let got = json(&d, &name, "/filltmp");
    assert_eq!(
        got["errno"].as_i64(),
        Some(nix::libc::ENOSPC as i64),
        "{got}"
    );
    // The same instance answers on: it was not killed.
    assert_eq!(json(&d, &name, "/"), serde_json::json!({"ok": true}));
    let (_, out, _) = d.cli(&["doctor", &name]);
    for needle in [
        "/tmp is full",
        "limits.tmp_size (512MiB)",
        "[limits] tmp_size",
    ] {
        assert!(out.contains(needle), "no {needle:?} in {out}");
    }
    assert!(!out.contains("out of memory"), "{out}");
}

/// Node's worker threads run under the filter.
#[test]
fn node_worker_threads_run_under_the_filter() {
    let d = Up::serve(None, &[]);
    let name = unique("workers");
    let server = r#"
const { Worker } = require('worker_threads');
require('http').createServer((req, res) => {
  const w = new Worker('const { parentPort } = require("worker_threads"); parentPort.postMessage(6 * 7);', { eval: true });
  w.on('message', (m) => res.end('worker says ' + m));
  w.on('error', (e) => { res.statusCode = 500; res.end(String(e)); });
}).listen(process.env.PORT, '0.0.0.0');
"#;
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec node /app/server.js\"\n"),
        &[("server.js", server)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let r = d.get(&host(&name), "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "worker says 42"),
        "{r:?}"
    );
}

#[test]
fn two_services_share_no_user_limits_files_processes_or_ports() {
    let d = Up::serve(None, &[]);
    let a = probe_service(&d, "");
    let b = probe_service(&d, "");
    // A holds every inotify instance one user may have (128 by default on
    // Linux); B, another user, still gets its own.
    let held = json(&d, &a, "/inotify?n=100000");
    assert_eq!(
        held["errno"].as_i64(),
        Some(nix::libc::EMFILE as i64),
        "{held}"
    );
    let got = json(&d, &b, "/inotify?n=1");
    assert_eq!(
        got,
        serde_json::json!({"opened": 1, "errno": 0}),
        "B was starved: {got}"
    );
    // A listens on a second port and leaves a file in its /tmp.
    assert_eq!(json(&d, &a, "/listen?port=9099")["listening"], 9099);
    let seen_by_a = json(&d, &a, "/neighbours?port=9099");
    assert_eq!(seen_by_a["connect"].as_i64(), Some(0), "{seen_by_a}");
    let seen_by_b = json(&d, &b, "/neighbours?port=9099");
    assert_eq!(
        seen_by_b["connect"].as_i64(),
        Some(nix::libc::ECONNREFUSED as i64),
        "B reached A's port: {seen_by_b}"
    );
    assert_ne!(
        seen_by_a["uid"], seen_by_b["uid"],
        "one uid for two services"
    );
    let mark = format!("mark-{a}");
    assert!(seen_by_a["tmp"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| *f == mark.as_str()));
    assert!(
        !seen_by_b["tmp"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| *f == mark.as_str()),
        "{seen_by_b}"
    );
    // B sees only its own processes: its server and nothing of A's.
    let procs: Vec<&str> = seen_by_b["procs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    // (Both run the same command: seeing A's would show it twice.)
    let servers = procs.iter().filter(|p| p.contains("/app/probe.py")).count();
    assert_eq!(servers, 1, "{procs:?}");
    assert!(procs.len() <= 3, "{procs:?}");
}

/// A real program's words for a denied call reach the doctor.
#[test]
fn the_doctor_explains_a_denied_call_from_the_programs_own_output() {
    let d = Up::serve(None, &[]);
    let name = unique("userns");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             start = \"unshare --user true; exec python3 -m http.server $PORT\"\n"
        ),
        &[],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let (_, logs, _) = d.cli(&["logs", &name]);
    assert!(logs.contains("Operation not permitted"), "{logs}");
    let (_, out, _) = d.cli(&["doctor", &name]);
    for needle in [
        "a new namespace",
        "skiff's sandbox denies",
        "system-call filter",
    ] {
        assert!(out.contains(needle), "no {needle:?} in {out}");
    }
}
