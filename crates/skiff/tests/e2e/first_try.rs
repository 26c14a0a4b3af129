//! Real apps deploy with the build and start commands their own quick
//! starts give (issue: "real apps deploy on the first try").

use std::time::Duration;

use crate::sandbox::host;
use crate::support::*;

#[test]
fn pip_install_as_the_readme_writes_it() {
    let d = Up::serve(None, &[]);
    let name = unique("pip");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"pip install -r requirements.txt\"\n\
             start = \"python3 -c 'import itsdangerous' && exec python3 -m http.server $PORT\"\n"
        ),
        &[
            ("requirements.txt", "itsdangerous\n"),
            ("index.html", "installed"),
        ],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    assert!(!err.contains("externally-managed-environment"), "{err}");
    let r = d.get(&host(&name), "/index.html");
    assert_eq!((r.status, r.body.as_str()), (200, "installed"), "{r:?}");
}

const WSGI_APP: &str = r#"
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from a gunicorn worker"]
"#;

/// gunicorn as its quick start runs it (3 workers, default --timeout of
/// 30 s), frozen for longer than that timeout: every request after serves.
#[test]
fn gunicorn_serves_every_request_after_being_frozen_past_its_worker_timeout() {
    let d = Up::serve(None, &[]);
    let name = unique("gunicorn");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"pip install gunicorn\"\n\
             start = \"exec gunicorn --workers 3 --bind 0.0.0.0:$PORT --log-level debug app:app\"\n"
        ),
        &[("app.py", WSGI_APP)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let h = host(&name);
    assert_eq!(d.get(&h, "/").status, 200);
    // Frozen at once after each request (idle_suspend = 0s), for 40 s.
    std::thread::sleep(Duration::from_secs(40));
    for i in 0..10 {
        let r = d.get(&h, "/");
        assert_eq!(r.status, 200, "request {i} after the pause: {r:?}");
        assert_eq!(r.body, "hello from a gunicorn worker");
    }
    let (_, logs, _) = d.cli(&["logs", &name]);
    assert!(!logs.contains("WORKER TIMEOUT"), "{logs}");
    // Whether the arbiter or the workers run first after a thaw is a race
    // (it lost 2 requests in 19 in a trial); what settles it is the worker
    // timeout check being off, which gunicorn's own configuration dump says.
    assert!(logs.contains("timeout: 0"), "{logs}");
}

const HOST_RECORDER: &str = r#"
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
seen = []
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/kaithhealth":
            seen.append(self.headers.get("Host"))
        body = ("\n".join(seen)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Frameworks that check the Host header (Django's ALLOWED_HOSTS) accept
/// localhost by default, not 0.0.0.0.
#[test]
fn the_health_probe_says_localhost() {
    let d = Up::serve(None, &[]);
    let name = unique("hosthdr");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 /app/rec.py\"\n"),
        &[("rec.py", HOST_RECORDER)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let r = d.get(&host(&name), "/seen");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.body.is_empty() && r.body.lines().all(|l| l == "localhost:8080"),
        "{r:?}"
    );
}

/// `skiff logs NAME | head -1`: the command ends quietly when its output
/// is closed.
#[test]
fn a_command_whose_output_is_closed_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let d = Up::serve(None, &[]);
    let name = unique("chatty");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             start = \"for i in $(seq 3000); do echo line $i; done; exec python3 -m http.server $PORT\"\n"
        ),
        &[],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let mut logs = Command::new(SKIFF)
        .args(["logs", &name, "--state"])
        .arg(d.state_dir())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(logs.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    // The reader is gone (as `head -1` would be); the command must end by
    // itself, without a word on stderr.
    let out = logs.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(nix::libc::SIGPIPE),
        "{:?}",
        out.status
    );
}

/// A changed limit or mode is no reason to build again.
#[test]
fn a_changed_limit_reuses_the_image() {
    let d = Up::serve(None, &[]);
    let name = unique("rekey");
    let manifest = |limits: &str| {
        format!(
            "name = \"{name}\"\n\
             build = \"date +%s%N > /app/built\"\n\
             start = \"exec python3 -m http.server $PORT --directory /app\"\n\
             [limits]\n{limits}\n"
        )
    };
    let app = App::new(&manifest("memory = \"256MiB\""), &[]);
    let deploy = || d.deploy(&app);
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    let built = d.get(&host(&name), "/built").body;
    std::fs::write(
        app.path().join("skiff.toml"),
        manifest("memory = \"300MiB\"\nidle_stop = \"10m\""),
    )
    .unwrap();
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    assert!(err.contains("reusing the image"), "{err}");
    assert_eq!(d.get(&host(&name), "/built").body, built, "built again");
    // The new manifest is the one in /app.
    assert!(d.get(&host(&name), "/skiff.toml").body.contains("300MiB"));
}

/// No start command in skiff.toml: it comes from package.json, and skiff
/// says so.
#[test]
fn without_a_start_command_it_comes_from_package_json() {
    let d = Up::serve(None, &[]);
    let name = unique("pkgjson");
    let app = App::new(
        &format!("name = \"{name}\"\n"),
        &[
            (
                "package.json",
                r#"{"name": "x", "scripts": {"start": "node server.js"}}"#,
            ),
            (
                "server.js",
                "require('http').createServer((q, s) => s.end('from npm start'))\
                 .listen(process.env.PORT, '0.0.0.0');",
            ),
        ],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    assert!(
        err.contains("starting it with `npm start` (from package.json's scripts.start"),
        "{err}"
    );
    let r = d.get(&host(&name), "/");
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "from npm start"),
        "{r:?}"
    );
}

/// A service listening on another port fails after a few seconds, with the
/// same message, not after the whole start timeout (60 s by default).
#[test]
fn a_wrong_port_fails_fast() {
    let d = Up::serve(None, &[]);
    let name = unique("fastwrong");
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 -m http.server 3000 --bind 127.0.0.1\"\n"
        ),
        &[],
    );
    let t = std::time::Instant::now();
    let (status, out, err) = d.deploy(&app);
    let took = t.elapsed();
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("listening on 127.0.0.1:3000, expected 0.0.0.0:8080"),
        "{err}"
    );
    // Far below the 60 s start timeout (the grace is 8 s).
    assert!(took < Duration::from_secs(30), "failed only after {took:?}");
}

/// The doctor speaks of the version that serves, not of earlier failed
/// ones.
#[test]
fn findings_belong_to_the_version_they_came_from() {
    let d = Up::serve(None, &[]);
    let name = unique("versions");
    let manifest = |start: &str| format!("name = \"{name}\"\nstart = \"{start}\"\n");
    let app = App::new(&manifest("python -m http.server $PORT"), &[]);
    let deploy = || d.deploy(&app);
    let (status, _, err) = deploy();
    assert!(!status.success());
    assert!(err.contains("python3"), "the fix names python3: {err}");
    std::fs::write(
        app.path().join("skiff.toml"),
        manifest("exec python3 -m http.server $PORT"),
    )
    .unwrap();
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    let (_, out, _) = d.cli(&["doctor", &name]);
    assert!(out.contains("No known problem found."), "{out}");
    assert!(out.contains("of version 2"), "{out}");
    let (_, out, _) = d.cli(&["status", &name]);
    assert!(!out.contains("is not in the image"), "{out}");
}

/// A Streamlit app deployed as serverless gets a warning at deploy time.
#[test]
fn a_websocket_framework_in_serverless_mode_is_warned_about() {
    let d = Up::serve(None, &[]);
    let name = unique("streamlit");
    let app = App::new(
        &format!("name = \"{name}\"\nstart = \"exec python3 -m http.server $PORT\"\n"),
        &[("requirements.txt", "streamlit==1.40\n")],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    assert!(
        err.contains("warning: Streamlit keeps a WebSocket"),
        "{err}"
    );
    assert!(err.contains("mode = \"persistent\""), "{err}");
}

/// A rebuild after a change to the source finds apt's downloads (and
/// whatever else was left in the cached directories) in the service's
/// build cache; the image holds none of it.
#[test]
fn a_rebuild_uses_the_build_cache() {
    let d = Up::serve(None, &[]);
    let name = unique("cached");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             build = \"(test -e /.skiff-cache/pip/marker && echo kept || echo fresh) > /app/cache.txt; \
             touch /.skiff-cache/pip/marker; rm -rf ~/.cache; \
             apt-get update -qq && apt-get install -y --no-install-recommends jq\"\n\
             start = \"exec python3 -m http.server $PORT --directory /app\"\n"
        ),
        &[("index.html", "one")],
    );
    let deploy = || d.deploy(&app);
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    assert_eq!(d.get(&host(&name), "/cache.txt").body, "fresh\n");
    std::fs::write(app.path().join("index.html"), "two").unwrap();
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
    assert_eq!(d.get(&host(&name), "/index.html").body, "two");
    assert_eq!(d.get(&host(&name), "/cache.txt").body, "kept\n");
    // apt found its package in the cache and fetched nothing.
    assert!(err.contains("Need to get 0 B/"), "{err}");
    // None of it is in the image: the layer's cache directories are empty.
    // Both images, the first kept for a rollback (`skiff rollback`).
    let images = || -> Vec<_> {
        std::fs::read_dir(d.state_dir().join("images"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("img-"))
            .map(|e| d.platform_view(&e.path().join("disk/upper")))
            .collect()
    };
    let layers = images();
    assert_eq!(layers.len(), 2, "{layers:?}");
    for upper in &layers {
        // The path reaches the layer: the build's own files are there.
        assert!(upper.join("usr/bin/jq").exists(), "{}", upper.display());
        assert!(upper.join("app/cache.txt").exists());
        assert!(
            !upper
                .join("etc/apt/apt.conf.d/99skiff-build-cache")
                .exists(),
            "the cache's apt configuration stayed in the image"
        );
        for dir in ["var/cache/apt/archives", ".skiff-cache/apt-archives"] {
            let debs: Vec<_> = std::fs::read_dir(upper.join(dir))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
                        .map(|e| e.file_name())
                        .collect()
                })
                .unwrap_or_default();
            assert!(debs.is_empty(), "{dir} in the image: {debs:?}");
        }
    }
}

const RECORDER: &str = r#"
import os, sqlite3
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            db = sqlite3.connect("/app/db.sqlite3")
            if self.path == "/record":
                db.execute("insert into visits values (1)")
                db.commit()
            n = db.execute("select count(*) from visits").fetchone()[0]
            body, status = str(n).encode(), 200
        except Exception as e:
            print(f"sqlite3.OperationalError: {e}", flush=True)
            body, status = str(e).encode(), 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Persistent mode: the service writes what the build made (a SQLite
/// database made by a migration in the build, as Django's `migrate` does).
#[test]
fn a_persistent_service_writes_files_its_build_made() {
    let d = Up::serve(None, &[]);
    let name = unique("migrated");
    let app = App::new(
        &format!(
            "name = \"{name}\"\n\
             mode = \"persistent\"\n\
             build = \"python3 -c 'import sqlite3; sqlite3.connect(\\\"/app/db.sqlite3\\\").execute(\\\"create table visits (n)\\\")'\"\n\
             start = \"exec python3 /app/server.py\"\n"
        ),
        &[("server.py", RECORDER)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(status.success(), "{out}{err}");
    let h = host(&name);
    for n in 1..=3 {
        let r = d.get(&h, "/record");
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, n.to_string().as_str()),
            "{r:?}"
        );
    }
    let (_, logs, _) = d.cli(&["logs", &name]);
    assert!(!logs.contains("readonly database"), "{logs}");
}

/// `runtime = "node@22"`: the build and the service run on Node.js 22,
/// from a runtime layer made once; a second service reuses it.
#[test]
fn a_service_chooses_its_node_version() {
    let d = Up::serve(None, &[]);
    let server = "const built = require('fs').readFileSync('/app/built-with', 'utf8').trim();\
                  require('http').createServer((q, s) => s.end(process.version + ' ' + built))\
                  .listen(process.env.PORT, '0.0.0.0');";
    let mut names = Vec::new();
    for _ in 0..2 {
        let name = unique("node22");
        let app = App::new(
            &format!(
                "name = \"{name}\"\n\
                 runtime = \"node@22\"\n\
                 build = \"node --version > /app/built-with\"\n\
                 start = \"exec node server.js\"\n"
            ),
            &[("server.js", server)],
        );
        let (status, out, err) = d.deploy(&app);
        assert!(status.success(), "{out}{err}");
        // Served and built on Node.js 22.
        let r = d.get(&host(&name), "/");
        let (run, built) = r.body.split_once(' ').unwrap_or_default();
        assert!(run.starts_with("v22.") && built == run, "{r:?}");
        names.push((name, app));
    }
    // One runtime layer for both.
    let runtimes = std::fs::read_dir(d.state_dir().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("rt-"))
        .count();
    assert_eq!(runtimes, 1);
}

/// A build that needs a newer Node.js than the default 22 fails with the
/// line to add; with it, it builds.
#[test]
fn a_build_on_a_too_old_node_is_told_the_runtime_line() {
    let d = Up::serve(None, &[]);
    let name = unique("engines");
    let manifest = |runtime: &str| {
        format!(
            "name = \"{name}\"\n{runtime}\
             build = \"npm install\"\n\
             start = \"exec python3 -m http.server $PORT\"\n"
        )
    };
    let app = App::new(
        &manifest(""),
        &[
            (
                "package.json",
                r#"{"name": "needs-new-node", "version": "1.0.0", "engines": {"node": ">=24"}}"#,
            ),
            (".npmrc", "engine-strict=true\n"),
        ],
    );
    let deploy = || d.deploy(&app);
    let (status, out, err) = deploy();
    assert!(!status.success(), "{out}{err}");
    // (A package.json: Node.js 22 by default, and skiff says so.)
    assert!(err.contains("running it on Node.js 22"), "{err}");
    assert!(err.contains("runtime = \"node@24\""), "{err}");
    std::fs::write(
        app.path().join("skiff.toml"),
        manifest("runtime = \"node@24\"\n"),
    )
    .unwrap();
    let (status, out, err) = deploy();
    assert!(status.success(), "{out}{err}");
}

/// Python: 3.13 by default (Debian 13's), and `runtime = "python@3.11"`
/// runs the service on the base image of the Debian release whose python3
/// is 3.11 (made the first time, then cached like the default).
#[test]
fn a_service_chooses_its_python_version() {
    let d = Up::serve(None, &[]);
    for (runtime, version) in [
        ("", "Python 3.13."),
        ("runtime = \"python@3.11\"\n", "Python 3.11."),
    ] {
        let name = unique("python");
        let app = App::new(
            &format!(
                "name = \"{name}\"\n{runtime}\
                 build = \"pip install itsdangerous && python3 --version > /app/built-with\"\n\
                 start = \"python3 -c 'import itsdangerous' && exec python3 -m http.server $PORT --directory /app\"\n"
            ),
            &[],
        );
        let (status, out, err) = d.deploy(&app);
        assert!(status.success(), "{out}{err}");
        let r = d.get(&host(&name), "/built-with");
        assert!(r.body.starts_with(version), "{runtime}: {r:?}");
    }
}

/// A port that takes connections and closes them without HTTP: the
/// message says exactly that, not that nothing listens.
#[test]
fn a_port_that_answers_no_http_is_named_as_such() {
    let d = Up::serve(None, &[]);
    let name = unique("nohttp");
    let server = "import os, socket\n\
                  s = socket.socket()\n\
                  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                  s.bind(('0.0.0.0', int(os.environ['PORT'])))\n\
                  s.listen()\n\
                  print('handler crashed: KeyError /kaithhealth', flush=True)\n\
                  while True:\n    c, _ = s.accept()\n    c.close()\n";
    let app = App::new(
        &format!(
            "name = \"{name}\"\nstart = \"exec python3 /app/server.py\"\n\
             [limits]\nstart_timeout = \"3s\"\n"
        ),
        &[("server.py", server)],
    );
    let (status, out, err) = d.deploy(&app);
    assert!(!status.success(), "{out}{err}");
    assert!(
        err.contains("accepted connections on port 8080 but closed them without an HTTP answer"),
        "{err}"
    );
    assert!(!err.contains("is not being listened to"), "{err}");
    assert!(err.contains("| handler crashed"), "{err}");
}
